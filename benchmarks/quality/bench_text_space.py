"""Helper spaces built from text against the trained helper LM: step-0 bits per byte of ``clp`` (issue 16).

Source SmolLM2-135M (``<cache>/smollm2-135m``), target tokenizer = the benchmark helper LM's 16k byte-level BPE
(``<cache>/helper-de``, ``make_helper.py``). Every space is built on ``helper_train`` only - the text the helper
LM was trained on and the calibration text - with ``clp_transfer.transfer.helper_space.build_helper_space`` at a budget
of CPU minutes (process time of all threads, 2 threads). Rows:

- ``clp`` on the text space at each budget (the default method and parameters, calibrated on helper_train);
- ``clp`` on the helper LM (its build cost: the CPU time of ``make_helper.py``, passed as ``--helper-cpu-minutes``);
- ``fvt`` (no helper space at all) and FOCUS (``deepfocus``: its own fastText space over target tokens trained on
  helper_train, 3 epochs; installed as CONTEXT.md section 3 says), both uncalibrated as published;
- a dev-only sweep of clp's ``temperature`` on the 3-minute space (the default, 0.05, was chosen on the helper
  LM's anisotropic space); if dev prefers another value, test rows with it are added for every budget.

Dev chooses, test reports. Bits per byte from ``bench_init_quality.score`` (windows 512, stride 256).

    nice -n 5 python benchmarks/quality/bench_text_space.py --cache benchmarks/.cache/quality \\
        --helper-cpu-minutes M > bench_text_space.log 2>&1 &
    # -> benchmarks/results/bench_text_space.json and docs/text_space.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_init_quality import load, score  # noqa: E402
from common import DEFAULT_CACHE, REPO, ensure_helper, read_jsonl  # noqa: E402

TEMPERATURES = (0.02, 0.05, 0.1)


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (user + system)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def transfer_and_score(name: str, source: Path, helper: Path, work: Path, splits: dict, calib: Path,
                       method: str = "clp", params: dict | None = None, which=("dev", "test")) -> dict:
    from clp_transfer.transfer.pipeline import transfer

    t = time.perf_counter()
    res = transfer(str(source), str(helper), str(work / "target"), method=method, params=params or {},
                   overwrite=True, calibration_text=str(calib))
    row = {"name": name, "method": method, "params": res.report["params"], "transfer_s": round(time.perf_counter() - t, 1),
           "shared": res.report["matching"]["shared"], "missing": res.report["matching"]["missing"]}
    model, tok = load(res.path)
    for split in which:
        row[split] = score(model, tok, splits[split], res.report["new_token_ids"])
        log(f"[{split}] {name:34s} {row[split]['bits_per_byte']:.4f} bpb")
    return row


def build_space(text: Path, tokenizer: Path, out: Path, minutes: float, threads: int, reuse: bool = False) -> dict:
    from clp_transfer.transfer.helper_space import SpaceConfig, build_helper_space

    if reuse and (out / "helper_space.json").is_file():
        # Built beforehand by `clp-transfer helper --kind embeddings` with the same settings (see --append).
        report = json.loads((out / "helper_space.json").read_text())
        c = report["config"]
        if (c["cpu_minutes"], c["tokenizer"], c["text"], c["num_threads"]) != (minutes, str(tokenizer), [str(text)],
                                                                                threads):
            sys.exit(f"{out} was built with other settings: {c}")
        report["measured_cpu_seconds"] = report["cpu_seconds"]  # the build's own process-time count
        report["reused"] = True
        return report
    c = cpu_seconds()
    build_helper_space(SpaceConfig(text=[str(text)], output_dir=str(out), tokenizer=str(tokenizer),
                                   cpu_minutes=minutes, num_threads=threads, overwrite=True))
    report = json.loads((out / "helper_space.json").read_text())
    report["measured_cpu_seconds"] = round(cpu_seconds() - c, 1)
    return report


def space_stats(path: Path) -> dict:
    """Mean cosine between random pairs of non-zero vectors (anisotropy), for the analysis."""
    from safetensors.torch import load_file

    v = load_file(path / "embeddings.safetensors")["embeddings"]
    v = torch.nn.functional.normalize(v[v.norm(dim=1) > 0], dim=1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(len(v), (20000,), generator=g), torch.randint(len(v), (20000,), generator=g)
    return {"mean_cosine_random_pairs": round(float((v[a] * v[b]).sum(1).mean()), 4)}


def focus_row(source: Path, base: Path, text_txt: Path, work: Path, splits: dict) -> dict:
    """FOCUS rows (input side; SmolLM2 is tied) written into a copy of ``base`` (same tokenizer and body)."""
    import deepfocus.fasttext_embs as fe
    from deepfocus import FOCUS
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    fe.CACHE_DIR = work / "focus-cache"
    shutil.rmtree(fe.CACHE_DIR, ignore_errors=True)  # time its fastText training, not a cached model
    src_tok = AutoTokenizer.from_pretrained(source)
    tgt_tok = AutoTokenizer.from_pretrained(base)
    e_s = load_file(source / "model.safetensors")["model.embed_tokens.weight"]
    c, t = cpu_seconds(), time.perf_counter()
    rows = FOCUS(target_tokenizer=tgt_tok, source_tokenizer=src_tok, source_embeddings=e_s,
                 target_training_data_path=str(text_txt), processes=1, seed=0, verbosity="silent")
    cpu, wall = cpu_seconds() - c, time.perf_counter() - t
    out = work / "focus"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    tensors = load_file(out / "model.safetensors")
    emb = tensors["model.embed_tokens.weight"].clone()
    emb[: rows.shape[0]] = torch.as_tensor(rows, dtype=emb.dtype)
    tensors["model.embed_tokens.weight"] = emb
    if "lm_head.weight" in tensors:
        tensors["lm_head.weight"] = emb.clone()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    model, tok = load(out)
    new_ids = json.loads((base / "transfer_report.json").read_text())["new_token_ids"]
    row = {"name": "focus", "method": "focus (deepfocus 1.0.1, fastText 3 epochs, uncalibrated)",
           "build_cpu_seconds": round(cpu, 1), "build_wall_seconds": round(wall, 1)}
    for split in ("dev", "test"):
        row[split] = score(model, tok, splits[split], new_ids)
        log(f"[{split}] {'focus':34s} {row[split]['bits_per_byte']:.4f} bpb")
    return row


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    spaces = results["text_spaces"]
    for split, style in (("test", "o-"), ("dev", "o--")):
        pts = sorted((s["cpu_minutes_measured"], s["clp"][split]["bits_per_byte"]) for s in spaces if split in s["clp"])
        if pts:
            ax.plot(*zip(*pts), style, color="C0", alpha=1.0 if split == "test" else 0.5,
                    label=f"clp on a text space ({split})")
    lm = results.get("helper_lm")
    for split, marker in (("test", "r*"), ("dev", "m*")):
        if lm and split in lm["clp"] and lm.get("cpu_minutes"):
            ax.plot([lm["cpu_minutes"]], [lm["clp"][split]["bits_per_byte"]], marker, ms=14,
                    label=f"clp on the helper LM ({split})")
    for name, color in (("focus", "g"), ("fvt", "k")):
        row = results["peers"].get(name)
        if row and "test" in row:
            x = row.get("build_cpu_seconds", 0) / 60
            ax.plot([x], [row["test"]["bits_per_byte"]], "^" if name == "focus" else "x", color=color, ms=10,
                    label=f"{name} (uncalibrated)")
    src = results.get("source_test_bpb")
    if src:
        ax.axhline(src, color="gray", ls="--", lw=1, label="source, own tokenizer")
    ax.set_xscale("symlog", linthresh=0.5)
    ax.set_xlim(-0.05, 60)
    ax.set_xlabel("CPU minutes to build the helper space (2 threads)")
    ax.set_ylabel("bits per byte at step 0")
    ax.set_title("SmolLM2-135M -> German 16k vocabulary: helper space vs build time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict) -> str:
    """The markdown table of docs/research.md from the JSON."""
    lines = ["| helper space | build CPU-min | epochs | trained / from pieces / zero | dev bpb | test bpb | "
             "test loss new / shared |", "|---|---:|---:|---|---:|---:|---|"]

    def cells(row: dict) -> str:
        if "test" not in row:
            return f"{row['dev']['bits_per_byte']:.4f} | (not measured) | "
        t = row["test"]
        cls = f"{t['loss_new']:.2f} / {t['loss_shared']:.2f}" if "loss_new" in t else ""
        return f"{row['dev']['bits_per_byte']:.4f} | {t['bits_per_byte']:.4f} | {cls}"

    for s in sorted(results["text_spaces"], key=lambda s: s["cpu_minutes_measured"]):
        v = s["vectors"]
        lines.append(f"| `clp`, text space {s['cpu_minutes_budget']:g} CPU-min | {s['cpu_minutes_measured']:.2f} | "
                     f"{s['training']['epochs']:.1f} | {v['trained']} / {v['from_pieces']} / {v['zero']} | "
                     f"{cells(s['clp'])} |")
    lm = results.get("helper_lm")
    if lm:
        cpu = f"{lm['cpu_minutes']:.1f}" if lm.get("cpu_minutes") else "?"
        lines.append(f"| `clp`, helper LM ({lm['report_training']['steps']} steps) | {cpu} | "
                     f"{lm['report_training']['epochs']:.2f} | (LM input embeddings) | {cells(lm['clp'])} |")
    for name, row in results["peers"].items():
        if "test" not in row:
            continue
        cpu = f"{row['build_cpu_seconds'] / 60:.2f}" if "build_cpu_seconds" in row else "0"
        what = "FOCUS (own fastText space, 3 epochs), uncalibrated" if name == "focus" else "`fvt` (no space), uncalibrated"
        lines.append(f"| {what} | {cpu} | | | {cells(row)} |")
    return "\n".join(lines)


def spaces(budgets, results: dict, calib: Path, tokenizer: Path, work: Path, source: Path, splits: dict,
           threads: int, save, reuse: bool = False) -> None:
    """Build a text space at each budget (CPU minutes) and score clp (default parameters) on it."""
    for minutes in budgets:
        log(f"building a text space, {minutes} CPU minutes")
        path = work / f"space-{minutes:g}"
        report = build_space(calib, tokenizer, path, minutes, threads, reuse)
        entry = {"cpu_minutes_budget": minutes, "cpu_minutes_measured": round(report["measured_cpu_seconds"] / 60, 3),
                 "wall_seconds": report["wall_seconds"], "training": report["training"], "vectors": report["vectors"],
                 **space_stats(path), "path": str(path), "reused_prebuilt": bool(report.get("reused"))}
        log(f"space {minutes:g}: {entry['cpu_minutes_measured']} CPU min, {report['training']['epochs']} epochs, "
            f"{report['vectors']}")
        entry["clp"] = transfer_and_score(f"clp / text space {minutes:g} CPU-min", source, path, work, splits, calib)
        results["text_spaces"].append(entry)
        save()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1.0, 3.0, 10.0], help="CPU minutes")
    p.add_argument("--sweep", action="store_true", help="also choose clp's temperature on dev (one space)")
    p.add_argument("--sweep-budget", type=float, default=3.0, help="space on which clp's temperature is chosen (dev)")
    p.add_argument("--tokenizer", default=None, help="target tokenizer (default: <cache>/helper-de's); the helper LM "
                   "row checks that it is the helper's")
    p.add_argument("--wait-minutes", type=float, default=90, help="wait this long for helper-de to be complete")
    p.add_argument("--no-lm", action="store_true", help="skip the helper LM row (smoke tests)")
    p.add_argument("--late-budgets", type=float, nargs="*", default=[], help="CPU minutes of spaces built after "
                   "the helper LM row (long builds last, so the other rows are in even if time runs out)")
    p.add_argument("--helper-cpu-minutes", type=float, default=None, help="measured CPU minutes of make_helper.py")
    p.add_argument("--helper-cpu-log", default=None, help="file of '/proc/PID/stat' samples of make_helper.py: "
                   "'epoch utime stime cutime cstime' in clock ticks; its last line gives the helper's CPU time")
    p.add_argument("--source-test-bpb", type=float, default=None, help="the source's own bpb on test (for the plot)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-focus", action="store_true")
    p.add_argument("--max-docs", type=int, default=None, help="score only the first N documents (smoke tests)")
    p.add_argument("--work", default=None, help="scratch directory (default: <cache>/work-text-space)")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "bench_text_space.json"))
    p.add_argument("--plot", default=str(REPO / "docs" / "text_space.png"))
    p.add_argument("--append", action="store_true", help="add spaces at --budgets to the results in --output, "
                   "taking spaces already built in <work>/space-B (same settings) as they are; nothing else runs")
    p.add_argument("--report", action="store_true", help="only print the table and redraw the plot from --output")
    args = p.parse_args()
    if args.report:
        results = json.loads(Path(args.output).read_text())
        plot(results, Path(args.plot))
        print(table(results))
        return
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    source, helper = cache / "smollm2-135m", ensure_helper(cache)
    tokenizer = Path(args.tokenizer) if args.tokenizer else helper
    splits = {s: [r["text"] for r in read_jsonl(cache / "splits" / f"{s}.jsonl")][: args.max_docs]
              for s in ("dev", "test")}
    calib = cache / "splits" / "helper_train.jsonl"
    work = Path(args.work) if args.work else cache / "work-text-space"
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"source": str(source), "helper": str(helper), "text": str(calib), "threads": args.threads,
                     "docs": {k: len(v) for k, v in splits.items()}, "source_test_bpb": args.source_test_bpb,
                     "text_spaces": [], "peers": {}, "dev_sweep": {}}

    def save() -> None:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")

    if args.append:
        results = json.loads(Path(args.output).read_text())
        spaces(args.budgets, results, calib, tokenizer, work, source, splits, args.threads, save, reuse=True)
        plot(results, Path(args.plot))
        log(f"wrote {args.output} and {args.plot}")
        return

    # 1. text spaces at each budget, clp with default parameters
    budgets = list(dict.fromkeys(args.budgets + ([args.sweep_budget] if args.sweep else [])))
    spaces(budgets, results, calib, tokenizer, work, source, splits, args.threads, save)


    # 2. dev-only temperature sweep on one space; test rows with the dev choice if it is not the default
    if args.sweep:
        sweep(args, results, source, work, splits, calib, save)

    # 3. peers: fvt (no space; the tokenizer of any space) and FOCUS (its own fastText space)
    first = Path(results["text_spaces"][0]["path"])
    fvt = transfer_and_score("fvt", source, first, work, splits, calib, method="fvt")
    results["peers"]["fvt"] = fvt
    base = work / "fvt-base"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(work / "target", base)
    save()
    if not args.no_focus:
        try:
            results["peers"]["focus"] = focus_row(source, base, cache / "splits" / "helper_train.txt", work, splits)
        except Exception as e:  # a peer's failure must not cost the helper LM row; recorded, not hidden
            log(f"FOCUS failed: {type(e).__name__}: {e}")
            results["peers"]["focus"] = {"error": f"{type(e).__name__}: {e}"}
        save()

    # 4. the helper LM (trained meanwhile by make_helper.py): its tokenizer must be the one the spaces used
    if not args.no_lm:
        results["helper_lm"] = lm_row(args, helper, tokenizer, source, work, splits, calib)
        save()
    spaces(args.late_budgets, results, calib, tokenizer, work, source, splits, args.threads, save)
    plot(results, Path(args.plot))
    log(f"wrote {args.output} and {args.plot}")


def lm_row(args, helper: Path, tokenizer: Path, source: Path, work: Path, splits: dict, calib: Path) -> dict:
    from transformers import AutoTokenizer

    deadline = time.time() + 60 * args.wait_minutes
    while not (helper / "helper_report.json").is_file():
        if time.time() > deadline:
            sys.exit(f"{helper} is not complete (no helper_report.json) after {args.wait_minutes} minutes")
        time.sleep(30)
    same = AutoTokenizer.from_pretrained(helper).backend_tokenizer.to_str() == \
        AutoTokenizer.from_pretrained(tokenizer).backend_tokenizer.to_str()
    log(f"helper LM ready; its tokenizer is {'identical to' if same else 'DIFFERENT from'} the spaces' tokenizer")
    cpu = args.helper_cpu_minutes
    if args.helper_cpu_log:
        time.sleep(10)  # the sampler's last line comes from just before the process ended
        ticks = [int(x) for x in Path(args.helper_cpu_log).read_text().split("\n")[-2].split()[1:5]]
        cpu = round(sum(ticks) / os.sysconf("SC_CLK_TCK") / 60, 2)
    lm = {"cpu_minutes": cpu, "cpu_minutes_source": "--helper-cpu-log" if args.helper_cpu_log else "--helper-cpu-minutes",
          "same_tokenizer_as_spaces": same,
          "report_training": json.loads((helper / "helper_report.json").read_text())["training"]}
    lm["report_training"].pop("loss_history", None)
    lm["clp"] = transfer_and_score("clp / helper LM", source, helper, work, splits, calib)
    return lm


def sweep(args, results: dict, source: Path, work: Path, splits: dict, calib: Path, save) -> None:
    sweep_space = next(s for s in results["text_spaces"] if s["cpu_minutes_budget"] == args.sweep_budget)
    rows = {0.05: sweep_space["clp"]["dev"]["bits_per_byte"]}
    for t in TEMPERATURES:
        if t not in rows:
            r = transfer_and_score(f"clp T={t} / text space {args.sweep_budget:g}", source, Path(sweep_space["path"]),
                                   work, splits, calib, params={"temperature": t}, which=("dev",))
            rows[t] = r["dev"]["bits_per_byte"]
    best = min(rows, key=rows.get)
    results["dev_sweep"] = {"space_cpu_minutes": args.sweep_budget, "dev_bpb_by_temperature": rows, "best": best}
    log(f"dev sweep: {rows} -> temperature {best}")
    save()
    if best != 0.05:
        for entry in results["text_spaces"]:
            entry["clp_dev_temperature"] = transfer_and_score(
                f"clp T={best} / text space {entry['cpu_minutes_budget']:g}", source, Path(entry["path"]), work,
                splits, calib, params={"temperature": best})
            save()


if __name__ == "__main__":
    main()
