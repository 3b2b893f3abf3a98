"""Issue 15: does ``--method auto`` (the default) pick, on every source, an initialisation as good as the best
single candidate - and never worse than ``fvt`` or the uncalibrated rows? And what does the choice cost?

Quality (``--sources``): for each source, every candidate of auto's grid run as the standalone method a user
would call (``clp`` calibrated / uncalibrated, ``clp pieces_weight=0.5`` both ways, ``fvt``, FVT calibrated
(``clp pieces_weight=1``: tokens without source pieces take similarity rows instead of the mean row), ``omp
k=8`` both ways), then ``auto`` with the text and ``auto`` without it (the fallback). Each transfer is a
subprocess with ``--threads`` threads; every output is scored at step 0 on the dev and test splits (exact bits
per byte, ``bench_init_quality.score``). The helper is ``benchmarks/assets/helper-de-600`` (16k German BPE);
the target text is the ``helper_train`` split (11.5 MB), from which auto holds out its check documents - dev and
test are never seen by any choice. Sources:

- ``smollm2-135m``: English-only SmolLM2-135M (``make_source.py``);
- ``mixed-en-de``: a 7M Llama pretrained on English + German with its own 12k BPE (``make_mixed_source.py``),
  a source that already knows the target language;
- ``tiny-bpe`` / ``tiny-sentencepiece`` / ``tiny-wordpiece``: the tests' tiny families (random weights; a
  tokenizer of each family trained on ``en_train``), built here.

Time (``--timing``): the default transfer of SmolLM2-135M with 16 MB of German text (``helper_train`` +
``cpt_train``, then ``helper_train`` again up to 16 MB: repeated documents change nothing of the cost) against
today's calibrated ``clp`` with the same text, back to back, wall and CPU time of each subprocess.

    python benchmarks/quality/bench_auto.py --sources mixed-en-de smollm2-135m tiny-bpe tiny-sentencepiece tiny-wordpiece
    python benchmarks/quality/bench_auto.py --timing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_omp import git_commit, new_token_ids, score_output, timed  # noqa: E402
from common import DEFAULT_CACHE, REPO, read_jsonl  # noqa: E402

HELPER = REPO / "benchmarks" / "assets" / "helper-de-600"
# name -> (method, params, with text)
RUNS: dict[str, tuple[str, dict, bool]] = {
    "clp (calibrated)": ("clp", {}, True),
    "clp uncalibrated": ("clp", {"calibrate": 0}, False),
    "clp pieces 0.5": ("clp", {"pieces_weight": 0.5}, True),
    "clp pieces 0.5 uncalibrated": ("clp", {"pieces_weight": 0.5, "calibrate": 0}, False),
    "fvt": ("fvt", {}, False),
    "fvt calibrated": ("clp", {"pieces_weight": 1.0}, True),
    "omp k=8": ("omp", {"k": 8}, False),
    "omp k=8 calibrated": ("omp", {"k": 8, "calibrate": 1.0}, True),
    "auto": ("auto", {}, True),
    "auto without text": ("auto", {}, False),
}
SINGLE = [n for n in RUNS if not n.startswith("auto")]
TINY = {"tiny-bpe": ("llama", "bpe", True), "tiny-sentencepiece": ("gpt_neox", "sentencepiece", False),
        "tiny-wordpiece": ("gpt2", "wordpiece", None)}


def source_dir(name: str, cache: Path) -> Path:
    """The source's directory, building a tiny family on first use."""
    if name in ("smollm2-135m", "mixed-en-de"):
        path = cache / name
        if not (path / "config.json").exists():
            script = "make_source.py" if name == "smollm2-135m" else "make_mixed_source.py"
            raise SystemExit(f"bench_auto: {path} is missing; run benchmarks/quality/{script} first")
        return path
    arch, kind, tied = TINY[name]
    path = cache / "bench_auto" / name
    if not (path / "config.json").exists():
        from clp_transfer.tiny import save_model, tiny_model, train_tokenizer

        lines = [r["text"] for r in read_jsonl(cache / "splits" / "en_train.jsonl")[:3000]]
        tok = train_tokenizer(lines, 2000, kind)
        save_model(tiny_model(arch, tok, seed=0, tie_word_embeddings=tied, hidden_size=64, num_layers=2,
                              num_heads=4), tok, path)
    return path


def command(method: str, params: dict, text: Path | None, source: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "clp_transfer.cli", "transfer", "--source", str(source), "--helper", str(HELPER),
           "--output", str(out), "--method", method, "--overwrite"]
    if params:
        cmd += ["--params", *[f"{k}={v}" for k, v in params.items()]]
    if text is not None:
        cmd += ["--text", str(text)]
    return cmd


def run_source(name: str, cache: Path, work: Path, env: dict, splits: dict, results: dict, out_json: Path) -> None:
    source = source_dir(name, cache)
    new_ids = new_token_ids(source, HELPER)
    rows = results["sources"].setdefault(name, {})
    if "source itself" not in results.setdefault("source_itself", {}).get(name, {}):
        # the untouched source with its own tokenizer: how much German it already knows
        results["source_itself"][name] = {"source itself": score_output(source, splits, [])}
    for run, (method, params, with_text) in RUNS.items():
        if run in rows:
            continue
        out = work / "out"
        text = cache / "splits" / "helper_train.jsonl" if with_text else None
        time_ = timed(command(method, params, text, source, out), env, work / "transfer.log")
        report = json.loads((out / "transfer_report.json").read_text())
        row = {"method": method, "params": report["params"], "time": time_,
               "scores": score_output(out, splits, new_ids), "auto": report["new_rows"].get("auto"),
               "timings": report.get("timings")}
        rows[run] = row
        shutil.rmtree(out)
        print(f"{name:20s} {run:28s} dev {row['scores']['dev']['bits_per_byte']:.4f} "
              f"test {row['scores']['test']['bits_per_byte']:.4f}  {time_['wall_s']:.0f} s", flush=True)
        out_json.write_text(json.dumps(results, indent=1))


def verdict(rows: dict) -> dict:
    """The acceptance checks of one source, on test bits per byte."""
    test = {n: r["scores"]["test"]["bits_per_byte"] for n, r in rows.items()}
    singles = {n: test[n] for n in SINGLE if n in test}
    best = min(singles, key=singles.get)
    out = {"best_single": best, "best_single_test": singles[best], "auto_test": test.get("auto"),
           "auto_choice": (rows.get("auto", {}).get("auto") or {}).get("choice")}
    if "auto" in test:
        out["auto_minus_best"] = test["auto"] - singles[best]
        out["within_0.01_of_best"] = out["auto_minus_best"] <= 0.01
        out["not_worse_than_fvt"] = test["auto"] <= test.get("fvt", float("inf"))
        out["not_worse_than_uncalibrated_rows"] = test["auto"] <= test.get("clp uncalibrated", float("inf"))
    return out


def table(results: dict) -> str:
    """The markdown table of docs/research.md (one row per source, test bits per byte)."""
    lines = ["| source | source itself (own tokenizer) | best single candidate | fvt | clp uncalibrated | clp calibrated | "
             "auto (choice) | auto - best | auto without text |", "|---|---:|---|---:|---:|---:|---|---:|---:|"]
    for name, rows in results["sources"].items():
        v = rows.get("verdict") or {}
        test = {n: r["scores"]["test"]["bits_per_byte"] for n, r in rows.items() if n != "verdict"}
        own = results.get("source_itself", {}).get(name, {}).get("source itself", {}).get("test", {})

        def f(n: str) -> str:
            return f"{test[n]:.4f}" if n in test else "-"
        lines.append(f"| {name} | {own.get('bits_per_byte', float('nan')):.4f} | {v.get('best_single')} "
                     f"{v.get('best_single_test', float('nan')):.4f} | {f('fvt')} | {f('clp uncalibrated')} | "
                     f"{f('clp (calibrated)')} | `{v.get('auto_choice')}` {f('auto')} | "
                     f"{v.get('auto_minus_best', float('nan')):+.4f} | {f('auto without text')} |")
    return "\n".join(lines)


def make_16mb(cache: Path, path: Path, size: int = 16_000_000) -> Path:
    if path.exists():
        return path
    parts = [cache / "splits" / "helper_train.jsonl", cache / "splits" / "cpt_train.jsonl"]
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size:
            for p in parts + parts[:1]:
                for line in open(p, encoding="utf-8"):
                    out.write(line)
                    written += len(json.loads(line)["text"].encode("utf-8"))
                    if written >= size:
                        return path
    return path


def timing(cache: Path, work: Path, env: dict, results: dict, out_json: Path) -> None:
    text = make_16mb(cache, work / "de-16mb.jsonl")
    source = source_dir("smollm2-135m", cache)
    for name, method in (("clp (calibrated), 16 MB", "clp"), ("auto (default), 16 MB", "auto")):
        results["timing"][name] = timed(command(method, {}, text, source, work / "t"), env, work / "timing.log")
        report = json.loads((work / "t" / "transfer_report.json").read_text())
        results["timing"][name]["timings"] = report["timings"]
        results["timing"][name]["auto"] = report["new_rows"].get("auto")
        shutil.rmtree(work / "t")
        print(name, results["timing"][name]["wall_s"], results["timing"][name]["cpu_s"], flush=True)
    a, c = results["timing"]["auto (default), 16 MB"], results["timing"]["clp (calibrated), 16 MB"]
    results["timing"]["ratio"] = {"wall": round(a["wall_s"] / c["wall_s"], 2), "cpu": round(a["cpu_s"] / c["cpu_s"], 2)}
    out_json.write_text(json.dumps(results, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--sources", nargs="*", default=[])
    p.add_argument("--timing", action="store_true")
    p.add_argument("--table", action="store_true", help="print the markdown table of the results JSON and stop")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/bench_auto")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "bench_auto.json"))
    a = p.parse_args()
    cache, work, out_json = Path(a.cache), Path(a.work), Path(a.output)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(a.threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    if a.table:
        print(table(results))
        return
    results.setdefault("sources", {})
    results.setdefault("timing", {})
    results.update(commit=git_commit(), helper=str(HELPER.relative_to(REPO)), threads=a.threads,
                   text="helper_train")
    splits = {s: [r["text"] for r in read_jsonl(cache / "splits" / f"{s}.jsonl")] for s in ("dev", "test")}
    for name in a.sources:
        run_source(name, cache, work, env, splits, results, out_json)
        results["sources"][name]["verdict"] = verdict({k: v for k, v in results["sources"][name].items()
                                                      if k != "verdict"})
        out_json.write_text(json.dumps(results, indent=1))
        print(name, results["sources"][name]["verdict"], flush=True)
    if a.timing:
        timing(cache, work, env, results, out_json)


if __name__ == "__main__":
    main()
