"""Aggregate the study's run JSONs: tables, tokens saved against from-scratch training, learning curves.

    python benchmarks/study/analyze.py [--results benchmarks/results/study]

Reads ``<results>/runs/*.json`` (written by ``run_study.py``) and writes ``<results>/study.json``,
``<results>/table.md`` and ``<results>/learning_curves.png``.

Tokens to reach from scratch: the from-scratch run of the same seed ends at dev loss ``L*`` (its last
evaluation, after ``N`` tokens). For another run, the first evaluation at or below ``L*``, linearly interpolated
with the evaluation before it, gives ``n`` tokens; ``% tokens saved = 100 * (1 - n / N)``. A run that never
gets to ``L*`` within ``N`` tokens gets no number ("not reached"). All runs share one tokenizer, so dev
losses are comparable between them; evaluations are every ``N / evals`` tokens, which bounds the resolution.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

ORDER = ["scratch", "random", "mean", "fvt", "clp-original", "clp", "clp+et10", "clp+accel", "clp+et100",
         "scratch+constant", "clp+constant", "clp+et10+constant", "clp-topk_softmax", "clp-topk_uniform",
         "clp-nocalib", "clp-no_canonical", "clp-no_head_fix", "map", "hybrid", "focus", "wechsel"]
SCRATCH_FOR_SCHEDULE = {"cosine": "scratch", "constant": "scratch+constant"}


def schedule_of(run: dict) -> str:
    return (run.get("train_overrides") or {}).get("lr_scheduler_type", "cosine")


def tokens_to_reach(curve: list[dict], target: float) -> float | None:
    prev = None
    for pt in curve:
        if pt["eval_loss"] <= target:
            if prev is None:
                return 0.0
            l0, l1 = prev["eval_loss"], pt["eval_loss"]
            frac = (l0 - target) / (l0 - l1) if l0 != l1 else 1.0
            return prev["tokens"] + frac * (pt["tokens"] - prev["tokens"])
        prev = pt
    return None


def ms(xs: list[float], fmt: str = "{:.3f}") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs))}"


def analyze(results: Path) -> dict:
    runs = [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]
    # tokens saved are counted against from-scratch training with the same learning-rate schedule
    scratch_by = {sched: {r["seed"]: r for r in runs if r["run"] == name} for sched, name in SCRATCH_FOR_SCHEDULE.items()}
    by_seed_random = {r["seed"]: r for r in runs if r["run"] == "random"}
    per_run: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_seed_scratch = scratch_by.get(schedule_of(r)) or scratch_by["cosine"]
        scratch = by_seed_scratch.get(r["seed"]) or next(iter(by_seed_scratch.values()), None)
        row = {"seed": r["seed"], "step0_test_bpb": r["step0_test"]["bits_per_byte"],
               "step0_dev_bpb": r["curve"][0]["eval_bpb"], "final_dev_bpb": r["curve"][-1]["eval_bpb"],
               "final_dev_loss": r["curve"][-1]["eval_loss"], "final_test_bpb": r["final_test"]["bits_per_byte"],
               "tokens": r["tokens_seen"], "train_seconds": r["seconds"]["train"]}
        if scratch is not None:
            target = scratch["curve"][-1]["eval_loss"]
            n = tokens_to_reach(r["curve"], target)
            row["scratch_run"] = scratch["run"]
            row["scratch_seed"] = scratch["seed"]
            row["scratch_final_dev_loss"] = target
            row["tokens_to_scratch_final"] = n
            budget = scratch["curve"][-1]["tokens"]  # tokens at the scratch run's last evaluation
            row["scratch_tokens"] = budget
            row["pct_tokens_saved"] = None if n is None or n > budget else 100.0 * (1 - n / budget)
        ref = by_seed_random.get(r["seed"]) or next(iter(by_seed_random.values()), None)
        if ref is not None:  # the same against `random` (source body, random new rows): what the init adds
            n = tokens_to_reach(r["curve"], ref["curve"][-1]["eval_loss"])
            budget = ref["curve"][-1]["tokens"]
            row["pct_tokens_saved_vs_random"] = None if n is None or n > budget else 100.0 * (1 - n / budget)
        per_run[r["run"]].append(row)
    summary = {}
    for name, rows in per_run.items():
        summary[name] = {"seeds": [x["seed"] for x in rows], "per_seed": rows}
        for k in ("step0_test_bpb", "step0_dev_bpb", "final_dev_bpb", "final_test_bpb", "pct_tokens_saved",
                  "pct_tokens_saved_vs_random"):
            vals = [x.get(k) for x in rows if x.get(k) is not None]
            summary[name][k] = {"mean": statistics.mean(vals) if vals else None,
                                "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals),
                                "not_reached": sum(1 for x in rows if k.startswith("pct_") and x.get(k) is None)}
    return {"runs": summary, "curves": {f"{r['run']}-s{r['seed']}": r["curve"] for r in runs},
            "settings": runs[0]["settings"] if runs else None}


def table(study: dict, references: dict | None) -> str:
    names = sorted(study["runs"], key=lambda n: ORDER.index(n) if n in ORDER else 99)
    lines = ["| run | seeds | step-0 test bpb | final test bpb | final dev bpb | % tokens saved vs scratch "
             "(same schedule) | "
             "% tokens saved vs random |", "|---|---|---|---|---|---|---|"]
    for n in names:
        s = study["runs"][n]
        rows = s["per_seed"]
        cells = []
        for key, refname in (("pct_tokens_saved", "scratch"), ("pct_tokens_saved_vs_random", "random")):
            saved = [x.get(key) for x in rows]
            nr = sum(1 for x in saved if x is None)
            txt = ms([x for x in saved if x is not None], "{:.0f}")
            if n == refname or (refname == "scratch" and n in SCRATCH_FOR_SCHEDULE.values()):
                txt = "0 (reference)"
            elif nr:
                txt = f"not reached in {nr}/{len(rows)}" + ("" if nr == len(rows) else f"; {txt}")
            cells.append(txt)
        lines.append(f"| {n} | {len(rows)} | {ms([x['step0_test_bpb'] for x in rows])} | "
                     f"{ms([x['final_test_bpb'] for x in rows])} | {ms([x['final_dev_bpb'] for x in rows])} | "
                     f"{cells[0]} | {cells[1]} |")
    if references:
        lines += ["", "| reference (no training here) | test bpb |", "|---|---|"]
        for k, v in references.items():
            lines.append(f"| {k} | {v['bits_per_byte']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(study: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[list[dict]]] = defaultdict(list)
    for key, c in study["curves"].items():
        curves[key.rsplit("-s", 1)[0]].append(c)
    main_runs = ["scratch", "random", "mean", "fvt", "clp-original", "clp", "focus", "wechsel"]
    groups = [("initialisations", [n for n in main_runs if n in curves]),
              ("clp variants and schedules", [n for n in curves if n not in main_runs or n in ("scratch", "clp")])]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, (title, names) in zip(axes, groups):
        for n in sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else 99):
            cs = curves[n]
            xs = [p["tokens"] / 1e3 for p in cs[0]]
            ys = [statistics.mean(c[i]["eval_bpb"] for c in cs) for i in range(len(cs[0]))]
            refs = {"scratch": "black", "scratch+constant": "dimgray"}  # the references: dashed
            color = refs.get(n) or plt.get_cmap("tab20")(ORDER.index(n) % 20 if n in ORDER else 19)
            ax.plot(xs, ys, "--" if n in refs else "-", color=color, marker=".", label=f"{n} (n={len(cs)})")
        ax.set_title(title)
        ax.set_xlabel("German training tokens (thousands)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("dev bits per byte (mean over seeds)")
    top = max(statistics.mean(c[1]["eval_bpb"] for c in cs) for cs in curves.values() if len(cs[0]) > 1)
    axes[0].set_ylim(top=min(top * 1.15, 8))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "study")
    a = p.parse_args(argv)
    study = analyze(a.results)
    if not study["runs"]:
        print("analyze.py: no runs yet", file=sys.stderr)
        return 1
    ref_path = a.results / "references.json"
    references = json.loads(ref_path.read_text()) if ref_path.exists() else None
    if references:
        study["references"] = {k: {kk: v[kk] for kk in ("bits_per_byte", "word_perplexity", "parameters")}
                               for k, v in references.items()}
    (a.results / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    md = table(study, references)
    (a.results / "table.md").write_text(md)
    plot(study, a.results / "learning_curves.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
