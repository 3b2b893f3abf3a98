"""``compare``: several models' results side by side, as a markdown table and a bar chart.

Reads result JSON files written by ``clp-transfer perplexity --output`` and ``clp-transfer evaluate
--output_dir`` (a directory is searched for ``results.json`` and other ``*.json`` result files), and also
plain lm-eval result files. Results of the same model (same label) are merged into one row.

Default columns: ``bits_per_byte`` and ``word_perplexity`` from perplexity runs (plus the loss on new and on
shared tokens when the run split it), and one main metric per task (``bits_per_byte`` for perplexity
tasks, else ``acc``). Token perplexity is left out unless ``--all_metrics``: it depends on the tokenizer and
does not compare models with different vocabularies. The best value of each column is in bold, and the
last column counts in how many columns a model is best. Tasks a run could not evaluate show as ``n/a``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..atomic import atomic_write_bytes, atomic_write_text, check_output_path
from ..errors import ClpError

LOWER_IS_BETTER = ("bits_per_byte", "perplexity", "loss", "byte_perplexity", "word_perplexity", "ter", "wer")
_SKIP_KEYS = ("alias", "name", "sample_len", "samples")


def lower_is_better(metric: str) -> bool:
    m = metric.rsplit("/", 1)[-1]
    return any(m == k or m.endswith(k) or m.startswith("loss") for k in LOWER_IS_BETTER)


@dataclass
class ModelResults:
    """One row of the comparison."""

    label: str
    metrics: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    """Column -> reason (shown as n/a)."""
    sources: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    """Rows (models) x columns (metrics)."""

    rows: list[ModelResults]
    columns: list[str]
    notes: list[str] = field(default_factory=list)
    """Tasks no model has a score for, with the reasons."""

    def value(self, label: str, column: str) -> float | None:
        for r in self.rows:
            if r.label == label:
                return r.metrics.get(column)
        raise KeyError(label)

    def best(self, column: str) -> str | None:
        vals = [(r.metrics[column], r.label) for r in self.rows if _finite(r.metrics.get(column))]
        if len(vals) < 2:
            return None
        return (min(vals) if lower_is_better(column) else max(vals))[1]

    def wins(self) -> dict[str, int]:
        out = {r.label: 0 for r in self.rows}
        for c in self.columns:
            b = self.best(c)
            if b is not None:
                out[b] += 1
        return out

    def markdown(self) -> str:
        heads = [f"{c} {'↓' if lower_is_better(c) else '↑'}" for c in self.columns]
        lines = ["| model | " + " | ".join(heads) + " | best in |",
                 "|---|" + "---:|" * len(self.columns) + "---:|"]
        wins = self.wins()
        for r in self.rows:
            cells = []
            for c in self.columns:
                v = r.metrics.get(c)
                if v is None:
                    cells.append("n/a")
                    continue
                s = _fmt(v)
                cells.append(f"**{s}**" if self.best(c) == r.label else s)
            lines.append(f"| {r.label} | " + " | ".join(cells) + f" | {wins[r.label]} |")
        notes = sorted({f"{r.label}, {c}: {why}" for r in self.rows for c, why in r.unavailable.items()
                        if c in self.columns})
        text = "\n".join(lines) + "\n"
        if notes:
            text += "\nn/a = not evaluated:\n" + "".join(f"- {n}\n" for n in notes)
        if self.notes:
            text += "\nNot evaluated for any model (no column):\n" + "".join(f"- {n}\n" for n in self.notes)
        return text


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:.4g}" if abs(v) >= 1e6 else f"{v:.1f}"
    return f"{v:.4f}"


# --------------------------------------------------------------------------------------------- reading


def _result_files(path: Path) -> list[Path]:
    if path.is_dir():
        main = path / "results.json"
        if main.is_file():
            return [main]
        files = sorted(p for p in path.glob("*.json") if p.name not in ("tasks.json", "transfer_report.json"))
        if not files:
            raise ClpError(f"{str(path)!r} holds no result JSON (results.json from evaluate, or perplexity --output)")
        return files
    if not path.is_file():
        raise ClpError(f"result file {str(path)!r} does not exist")
    return [path]


def _main_metric(metrics: dict[str, Any]) -> list[str]:
    names = [k.split(",", 1)[0] for k, v in metrics.items()
             if k not in _SKIP_KEYS and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)]
    for pick in ("bits_per_byte", "acc", "exact_match", "f1", "mcc"):
        if pick in names:
            return [pick]
    return names[:1]


def read_results(path: str | Path, all_metrics: bool = False) -> tuple[str, dict[str, float], dict[str, str]]:
    """``(model label, column -> value, column -> why unavailable)`` of one result JSON file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ClpError(f"{str(p)!r} is not JSON: {e}") from None
    except UnicodeDecodeError:
        raise ClpError(f"{str(p)!r} is not a UTF-8 text file, so not a result JSON of perplexity or evaluate") from None
    if not isinstance(data, dict):
        raise ClpError(f"{str(p)!r} is not a result file of perplexity or evaluate")
    metrics: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    if data.get("kind") == "perplexity":
        label = str(data.get("model_path") or data.get("model") or p.stem)
        keys = ["bits_per_byte", "word_perplexity"] + (["token_perplexity", "mean_loss", "byte_perplexity"]
                                                       if all_metrics else [])
        for k in keys:
            if _finite(data.get(k)):
                metrics[k] = float(data[k])
        for cls, v in (data.get("token_classes") or {}).items():
            if isinstance(v, dict) and _finite(v.get("mean_loss")):
                metrics[f"loss_{cls}"] = float(v["mean_loss"])
        return label, metrics, unavailable
    if isinstance(data.get("results"), dict):
        info = data.get("clp_transfer") or {}
        label = str(info.get("model_path") or info.get("model") or (data.get("config") or {}).get("model")
                    or p.parent.name or p.stem)
        for task, m in data["results"].items():
            if not isinstance(m, dict):
                continue
            wanted = None if all_metrics else set(_main_metric(m))
            for k, v in m.items():
                if k in _SKIP_KEYS or "_stderr" in k or not _finite(v) or isinstance(v, bool):
                    continue
                name = k.split(",", 1)[0]
                if wanted is None or name in wanted:
                    metrics[f"{task}/{name}"] = float(v)
        mapping = info.get("tasks") or {}
        for task, why in (info.get("unavailable") or {}).items():
            unavailable[f"{mapping.get(task, task)}/*"] = why
        return label, metrics, unavailable
    raise ClpError(f"{str(p)!r} is neither a perplexity result (kind=perplexity) nor an lm-eval result (results)")


def compare(paths: Sequence[str | Path], labels: Sequence[str] | None = None, all_metrics: bool = False,
            metrics: Sequence[str] | None = None) -> Comparison:
    """Collect results; ``labels`` rename the models of ``paths`` in order; ``metrics`` picks columns
    (exact names or glob patterns)."""
    import fnmatch

    if not paths:
        raise ClpError("give at least one result file or directory")
    if labels and len(labels) != len(paths):
        raise ClpError(f"--labels has {len(labels)} names for {len(paths)} results")
    rows: dict[str, ModelResults] = {}
    columns: list[str] = []
    for i, path in enumerate(paths):
        for f in _result_files(Path(path)):
            label, vals, unavailable = read_results(f, all_metrics)
            label = labels[i] if labels else _model_key(label)
            row = rows.setdefault(label, ModelResults(label))
            row.metrics.update(vals)
            row.sources.append(str(f))
            for c in vals:
                if c not in columns:
                    columns.append(c)
            for c, why in unavailable.items():
                row.unavailable[c] = why
    # a task some model could not run: n/a in that task's columns; a task no model ran: a note, no column
    notes: dict[str, str] = {}
    for r in rows.values():
        for c, why in list(r.unavailable.items()):
            task = c[:-2]
            hits = [col for col in columns if col.startswith(task + "/")]
            del r.unavailable[c]
            if not hits:
                notes.setdefault(task, why)
            for h in hits:
                r.unavailable[h] = why
    if not columns:
        why = "; ".join(f"{t}: {w}" for t, w in notes.items())
        raise ClpError(f"the results hold no metric values ({', '.join(str(p) for p in paths)})"
                       + (f"; unavailable: {why}" if why else "; did the run finish?"))
    if metrics:
        columns = [c for c in columns if any(c == m or fnmatch.fnmatchcase(c, m) for m in metrics)]
        if not columns:
            raise ClpError(f"no column matches --metrics {' '.join(metrics)}")
    order = {"bits_per_byte": 0, "word_perplexity": 1}
    columns.sort(key=lambda c: (order.get(c, 2) if "/" not in c else 3, ))
    shown = _display_labels(list(rows))
    for key, r in rows.items():
        r.label = shown[key]
    return Comparison(list(rows.values()), columns, [f"{t}: {why}" for t, why in notes.items()])


def _model_key(label: str) -> str:
    """The same model named as ``out/m`` in one run and ``/abs/out/m`` in another gets one row."""
    p = Path(label).expanduser()
    return str(p.resolve()) if p.exists() else label


def _display_labels(keys: list[str]) -> dict[str, str]:
    """Shortest path suffixes that keep local model paths apart (hub ids and given labels stay)."""
    out = {}
    for k in keys:
        if not Path(k).is_absolute():
            out[k] = k
            continue
        parts = Path(k).parts
        for n in range(1, len(parts) + 1):
            cand = "/".join(parts[-n:])
            others = [o for o in keys if o != k and "/".join(Path(o).parts[-n:]) == cand]
            if not others:
                out[k] = cand
                break
        else:
            out[k] = k
    return out


def plot_comparison(comparison: Comparison, path: str | Path, title: str | None = None) -> Path:
    """A bar chart per column (models as bars, the best one highlighted), written atomically as PNG."""
    from ..plotting import pyplot

    plt = pyplot("compare --plot")

    cols = [c for c in comparison.columns if any(_finite(r.metrics.get(c)) for r in comparison.rows)]
    if not cols:
        raise ClpError("nothing to plot: no column has a value")
    ncols = min(3, len(cols))
    nrows = -(-len(cols) // ncols)
    labels = [r.label for r in comparison.rows]
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 0.5 + (0.45 * len(labels) + 1.2) * nrows),
                             squeeze=False)
    for ax, col in zip(axes.flat, cols):
        vals = [r.metrics.get(col) for r in comparison.rows]
        best = comparison.best(col)
        colors = ["tab:green" if lab == best else "tab:gray" for lab in labels]
        ys = list(range(len(labels)))
        finite = [v for v in vals if _finite(v)]
        log_scale = min(finite) > 0 and max(finite) > 1e4
        base = min(finite) / 2 if log_scale else 0.0
        ax.barh(ys, [v - base if _finite(v) else 0 for v in vals], left=base, color=colors)
        if log_scale:
            ax.set_xscale("log")
        for y, v in zip(ys, vals):
            ax.text(v if _finite(v) else base, y, f" {_fmt(v)}" if _finite(v) else " n/a", va="center", fontsize=8)
        ax.set_yticks(ys, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{col} ({'lower' if lower_is_better(col) else 'higher'} is better)", fontsize=9)
        ax.margins(x=0.25)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="RESULTS",
                        help="result JSON files or directories (perplexity --output, evaluate --output_dir)")
    parser.add_argument("--labels", nargs="+", help="model names for the rows, one per RESULTS argument")
    parser.add_argument("--metrics", nargs="+", help="columns to show (names or glob patterns, e.g. '*/acc')")
    parser.add_argument("--all_metrics", "--all-metrics", action="store_true",
                        help="every metric, including token perplexity (not comparable across tokenizers)")
    parser.add_argument("--plot", help="write a PNG bar chart here")
    parser.add_argument("--output", help="write the markdown table here")
    parser.add_argument("--title", help="title of the plot")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --plot/--output files")


def cli_main(args: argparse.Namespace) -> int:
    for out in (args.plot, args.output):
        if out:
            check_output_path(out, args.overwrite, "output file")
    comparison = compare(args.results, args.labels, args.all_metrics, args.metrics)
    table = comparison.markdown()
    print(table, end="")
    if args.output:
        atomic_write_text(args.output, table)
        print(f"wrote {args.output}")
    if args.plot:
        plot_comparison(comparison, args.plot, args.title)
        print(f"wrote {args.plot}")
    return 0
