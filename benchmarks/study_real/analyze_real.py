"""Tables and the learning-curve plot of the real-model study (``run_real.py``'s per-run JSONs).

    python benchmarks/study_real/analyze_real.py [--results benchmarks/results/study_real]

Writes ``<results>/study_real.json`` (every figure below, per run and aggregated over seeds),
``<results>/learning_curves.png`` and prints a markdown table. Measures (all bits per byte are exact):

- ``step0_test`` / ``final_test``: test bits per byte before and after training; ``final_dev`` the same on dev;
- ``first_beats_source_kb``: German KB seen when the dev-subset curve first goes below the untouched source's
  dev-subset bits per byte (linear interpolation between evaluations; None if never);
- ``worse_in_first_10pct``: whether any evaluation within the first 10% of the bytes is above step 0;
- ``bytes_saved_vs_cpt``: 1 - (bytes this run needs to reach ``source-cpt``'s final dev-subset bits per
  byte) / (bytes ``source-cpt`` needed); the same against training FLOPs (``flops_saved_vs_cpt``); None
  where the run never reaches it;
- ``train_flops_per_byte`` and ``tokens_per_word`` (test split);
- ``final_test_bpb_new`` / ``final_test_bpb_shared``: the final test bits per byte split by the class of the
  predicted token (new rows / rows shared with the source; they add up to ``final_test``);
- ``cpt_at_equal_flops``: ``source-cpt``'s dev-subset bits per byte after the training FLOPs this run used
  (linear between evaluations; its final figure when the run used more) - the equal-compute comparison;
- ``gap_cpt_<p>pct``: this run's dev-subset bits per byte minus ``source-cpt``'s (mean of its seeds) at the same
  German bytes, after p = 10 / 25 / 50 / 100% of the budget: whether training closes the gap or widens it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BASELINE = "source-cpt"
GAP_POINTS = (10, 25, 50, 100)  # % of the budget at which the gap to source-cpt is read


def crossing(curve: list[dict], key: str, level: float) -> float | None:
    """First x (``key``) at which the dev-subset curve reaches ``level`` (linear between points)."""
    for a, b in zip(curve, curve[1:]):
        ya, yb = a["dev_curve_bpb"], b["dev_curve_bpb"]
        if ya <= level:
            return a[key]
        if yb <= level:
            return a[key] + (b[key] - a[key]) * (ya - level) / (ya - yb)
    return curve[0][key] if curve and curve[0]["dev_curve_bpb"] <= level else None


def value_at(curve: list[dict], key: str, x: float) -> float:
    """The dev-subset bits per byte of ``curve`` at ``key`` = x (linear between points, clamped)."""
    for a, b in zip(curve, curve[1:]):
        if a[key] <= x <= b[key]:
            w = (x - a[key]) / max(1e-12, b[key] - a[key])
            return a["dev_curve_bpb"] + w * (b["dev_curve_bpb"] - a["dev_curve_bpb"])
    return curve[-1]["dev_curve_bpb"] if x > curve[-1][key] else curve[0]["dev_curve_bpb"]


def class_bits(score: dict[str, Any], cls: str) -> float | None:
    """Bits per byte contributed by predicted tokens of class ``cls`` (loss x count / ln 2 / bytes)."""
    if score.get(f"loss_{cls}") is None:
        return None
    return score[f"loss_{cls}"] * score[f"tokens_{cls}"] / 0.6931471805599453 / score["bytes"]


def run_figures(r: dict[str, Any], source_level: float | None, target_level: float | None,
                cpt_need: dict[str, float] | None, cpt_curve: list[dict] | None = None,
                cpt_curves: list[list[dict]] | None = None) -> dict[str, Any]:
    curve = r["curve"]
    total = r["bytes_seen"]
    early = [p for p in curve[1:] if p["bytes"] <= 0.1 * total + 1e-9]
    f: dict[str, Any] = {
        "step0_test": r["step0"]["test"]["bits_per_byte"], "final_test": r["final"]["test"]["bits_per_byte"],
        "step0_dev": r["step0"]["dev"]["bits_per_byte"], "final_dev": r["final"]["dev"]["bits_per_byte"],
        "final_dev_curve": curve[-1]["dev_curve_bpb"], "steps": r["steps"], "kb_seen": total / 1024,
        "tokens_per_word": r["final"]["test"]["tokens_per_word"],
        "train_flops_per_byte": r["train_flops"] / max(1.0, total),
        "train_seconds": r["seconds"]["train_incl_curve_evals"],
        "worse_in_first_10pct": any(p["dev_curve_bpb"] > curve[0]["dev_curve_bpb"] for p in early),
        "first_eval_pct": 100 * curve[1]["bytes"] / total if len(curve) > 1 else None,
        "final_test_loss_new": r["final"]["test"].get("loss_new"),
        "final_test_loss_shared": r["final"]["test"].get("loss_shared"),
        "final_test_bpb_new": class_bits(r["final"]["test"], "new"),
        "final_test_bpb_shared": class_bits(r["final"]["test"], "shared"),
        "step0_test_bpb_new": class_bits(r["step0"]["test"], "new"),
        "step0_test_bpb_shared": class_bits(r["step0"]["test"], "shared"),
        "cpt_at_equal_flops": value_at(cpt_curve, "flops", r["train_flops"]) if cpt_curve else None,
    }
    for pct in GAP_POINTS:
        x = pct / 100 * total
        f[f"gap_cpt_{pct}pct"] = (value_at(curve, "bytes", x) - sum(value_at(c, "bytes", x) for c in cpt_curves)
                                  / len(cpt_curves)) if cpt_curves else None
    hit = crossing(curve, "bytes", source_level) if source_level is not None else None
    f["first_beats_source_kb"] = hit / 1024 if hit is not None else None
    if cpt_need and target_level is not None:
        for key, name in (("bytes", "bytes_saved_vs_cpt"), ("flops", "flops_saved_vs_cpt")):
            need = crossing(curve, key, target_level)
            f[name] = None if need is None else 1.0 - need / cpt_need[key]
    return f


def mean_std(xs: list[Any]) -> dict[str, Any]:
    vals = [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool)]
    if not vals:
        return {"mean": None, "std": None, "n": len(xs), "reached": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(xs), "reached": len(vals)}


def fmt(agg: dict[str, Any], digits: int = 4, pct: bool = False) -> str:
    if agg["mean"] is None:
        return "never" if agg["n"] else "-"
    m, s = (100 * agg["mean"], 100 * agg["std"]) if pct else (agg["mean"], agg["std"])
    body = f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if agg["n"] > 1 else "")
    if agg["reached"] < agg["n"]:
        body += f" ({agg['reached']}/{agg['n']} reach)"
    return body + ("%" if pct else "")


def saved(name: str, g: dict[str, Any], key: str) -> str:
    """A "saved vs source-cpt" cell; the baseline's own row is the reference (0 by definition)."""
    return "(reference)" if name == BASELINE else fmt(g.get(key, mean_std([])), 0, True)


def plot(runs: dict[str, list[dict]], source_level: float | None, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5))
    finals = []
    for i, (name, rs) in enumerate(sorted(runs.items())):
        r = rs[0]  # first seed: one line per run
        xs = [p["bytes"] / 1024 for p in r["curve"]]
        ys = [p["dev_curve_bpb"] for p in r["curve"]]
        finals.append(ys[-1])
        # more runs than colours: the line style tells apart runs that share a colour
        style = dict(lw=2.5, ls="-") if name in (BASELINE, "clp") else dict(lw=1.2, alpha=0.85, ls=["-", "--", ":"][i // 10 % 3])
        ax.plot(xs, ys, marker="o", ms=3, label=f"{name} (seed {r['seed']})", **style)
    # Some rows start far off the scale (clp-original ~44): the y-axis shows where the comparison happens.
    top = max(3.0, (source_level or 0) + 1.0)
    ax.set_ylim(min(finals) - 0.05, top)
    ax.text(0.01, 0.99, f"starts above {top:.1f} are cut off", transform=ax.transAxes, va="top", fontsize=8)
    if source_level is not None:
        ax.axhline(source_level, color="black", ls="--", lw=1, label="untouched English source")
    ax.set_xlabel("German training text seen (KB)")
    ax.set_ylabel("bits per byte (dev subset, exact)")
    ax.set_title("SmolLM2-135M to German: continued pretraining at equal German bytes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "study_real")
    a = p.parse_args(argv)
    files = sorted((a.results / "runs").glob("*.json"))
    if not files:
        print(f"analyze_real.py: no run results in {a.results / 'runs'}", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = defaultdict(list)
    for f in files:
        r = json.loads(f.read_text())
        runs[r["run"]].append(r)
    base = runs.get(BASELINE, [])
    source_level = statistics.fmean(r["curve"][0]["dev_curve_bpb"] for r in base) if base else None
    target_level = statistics.fmean(r["curve"][-1]["dev_curve_bpb"] for r in base) if base else None
    cpt_need = None
    if base:
        cpt_need = {k: statistics.fmean(crossing(r["curve"], k, target_level) or r["curve"][-1][k] for r in base)
                    for k in ("bytes", "flops")}
    cpt_curve = base[0]["curve"] if base else None  # seed 0's curve for the equal-compute comparison
    cpt_curves = [r["curve"] for r in base] or None
    per_run = {name: [run_figures(r, source_level, target_level, cpt_need, cpt_curve, cpt_curves) for r in rs]
               for name, rs in runs.items()}
    agg = {name: {k: mean_std([f[k] for f in fs]) for k in fs[0] if k != "worse_in_first_10pct"}
           | {"worse_in_first_10pct": [f["worse_in_first_10pct"] for f in fs]} for name, fs in per_run.items()}
    out = {"baseline": BASELINE, "untouched_source_dev_curve_bpb": source_level, "cpt_final_dev_curve_bpb": target_level,
           "cpt_need": cpt_need, "per_run": per_run, "aggregate": agg}
    (a.results / "study_real.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(runs, source_level, a.results / "learning_curves.png")
    print("| run | seeds | test bpb step 0 | test bpb final | dev bpb final | first beats source (KB) | "
          "bytes saved vs source-cpt | FLOPs saved vs source-cpt | worse in first 10% | tokens/word | train GFLOP/byte |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    order = sorted(agg, key=lambda n: (n != BASELINE, n != "clp", agg[n]["final_dev"]["mean"] or 99))
    for n in order:
        g = agg[n]
        print(f"| `{n}` | {g['steps']['n']} | {fmt(g['step0_test'])} | {fmt(g['final_test'])} | {fmt(g['final_dev'])} | "
              f"{fmt(g['first_beats_source_kb'], 0)} | {saved(n, g, 'bytes_saved_vs_cpt')} | "
              f"{saved(n, g, 'flops_saved_vs_cpt')} | "
              f"{'yes' if any(g['worse_in_first_10pct']) else 'no'} | {fmt(g['tokens_per_word'], 2)} | "
              f"{fmt({k: (v / 1e9 if isinstance(v, float) else v) for k, v in g['train_flops_per_byte'].items()}, 3)} |")
    print()
    print("| run | test bpb from new / shared predicted tokens, step 0 | the same, final | test loss new / shared, "
          "final (nats) | dev-subset final | source-cpt at equal FLOPs |")
    print("|---|---|---|---|---:|---:|")
    for n in order:
        g = agg[n]
        if g["final_test_bpb_new"]["mean"] is None:
            continue
        print(f"| `{n}` | {fmt(g['step0_test_bpb_new'], 3)} / {fmt(g['step0_test_bpb_shared'], 3)} | "
              f"{fmt(g['final_test_bpb_new'], 3)} / {fmt(g['final_test_bpb_shared'], 3)} | "
              f"{fmt(g['final_test_loss_new'], 2)} / {fmt(g['final_test_loss_shared'], 2)} | "
              f"{fmt(g['final_dev_curve'], 3)} | {fmt(g['cpt_at_equal_flops'], 3)} |")
    print()
    print("| run | " + " | ".join(f"gap to source-cpt after {p}%" for p in GAP_POINTS) + " |")
    print("|---|" + "---:|" * len(GAP_POINTS))
    for n in order:
        if n == BASELINE:
            continue
        print(f"| `{n}` | " + " | ".join(fmt(agg[n][f"gap_cpt_{p}pct"], 3) for p in GAP_POINTS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
