"""``evaluate``: downstream tasks through lm-evaluation-harness (a thin wrapper over ``simple_evaluate``).

What the wrapper adds to the harness:

- **safe loading**: the model is loaded by :mod:`clp_transfer.models` (safetensors only unless
  ``allow_pickle``; remote code only when asked) and handed to the harness as an ``HFLM`` instance;
- **presets**: ``german-2025`` is the German tasks upstream lm-eval 0.4.x ships (ARC, HellaSwag, MMLU,
  Global-MMLU, TruthfulQA, Belebele, XNLI, PAWS-X, LAMBADA; see :data:`GERMAN_2025_PRESET`), the choice with
  network access; ``german`` is the study project's 2019 OpenGPT-X list, mapped to the names the installed
  lm-eval provides (see :data:`GERMAN_PRESET`), most of which upstream lm-eval does not ship. A preset task
  that is not available (not in this lm-eval, or its dataset cannot be fetched offline) is skipped with the
  reason, and never reported as a score;
- **local tasks**: ``include_path`` directories are mirrored into a temporary directory in which relative
  ``dataset_kwargs.data_files`` (and relative local ``dataset_path`` directories) are made absolute,
  resolved against the YAML file's directory first and the current directory second (lm-eval itself
  resolves them against the current directory only). So ``make-tasks`` output and hand-written task folders
  work from anywhere, offline;
- **per-task failures**: each task is built on its own; one whose dataset cannot be loaded is reported as
  unavailable and the others run;
- **outputs**: ``results.json`` (the harness's result dict plus a ``clp_transfer`` block with the task
  mapping and unavailable tasks) and ``results.md`` (a markdown table), written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import fnmatch
import glob
import importlib.metadata
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from .. import __version__
from ..atomic import atomic_write_json, atomic_write_text, check_output_path
from ..config import add_dataclass_arguments, build_config, require_flags
from ..errors import ClpError, UnknownNameError
from ..registry import Registry

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class PresetTask:
    """One task of a preset: the study project's name and the names lm-eval versions may use for it."""

    name: str
    """Name in the study project (OpenGPT-X fork of lm-eval)."""
    candidates: tuple[str, ...]
    """Names to look up in the installed lm-eval (and in --include_path), first match wins."""
    hint: str = ""
    """What to do when none is available."""


_OGX_HINT = ("an OpenGPT-X fork task that upstream lm-eval does not ship; put its YAML into a folder and pass "
             "--include_path")
GERMAN_PRESET: tuple[PresetTask, ...] = (
    PresetTask("ogx_oscar_ppl_de", ("ogx_oscar_ppl_de", "oscar_ppl_de"),
               _OGX_HINT + ". For perplexity on OSCAR-de use `clp-transfer perplexity --data DIR` on your "
               "validation split, or `clp-transfer make-tasks` for a local <prefix>_ppl task"),
    PresetTask("ogx_germeval2017", ("ogx_germeval2017", "germeval2017", "germeval_2017"), _OGX_HINT),
    PresetTask("ogx_germeval2018_coarse", ("ogx_germeval2018_coarse", "germeval2018_coarse",
                                           "germeval_2018_coarse"), _OGX_HINT),
    PresetTask("ogx_gnad10", ("ogx_gnad10", "gnad10", "10kgnad"), _OGX_HINT),
    PresetTask("ogx_xnli_de", ("ogx_xnli_de", "xnli_de")),
    PresetTask("ogx_pawsx_de", ("ogx_pawsx_de", "pawsx_de", "paws_de")),
    PresetTask("ogx_xstance_de", ("ogx_xstance_de", "xstance_de", "x_stance_de"), _OGX_HINT),
)

_UPSTREAM_HINT = ("a German task of upstream lm-evaluation-harness (0.4.13 ships it); a newer or older lm-eval may "
                  "name it differently: `lm_eval ls tasks | grep _de` lists the installed names")
GERMAN_2025_PRESET: tuple[PresetTask, ...] = tuple(PresetTask(name, (name,), _UPSTREAM_HINT) for name in (
    "arc_de",                # ARC-Challenge, machine-translated (Okapi)
    "arc_challenge_mt_de",   # ARC-Challenge, another translation
    "hellaswag_de",          # HellaSwag, machine-translated (Okapi)
    "m_mmlu_de",             # MMLU, machine-translated (Okapi)
    "global_mmlu_de",        # Global-MMLU (lite), translated and reviewed
    "truthfulqa_de_mc1",     # TruthfulQA multiple choice, one true answer (Okapi)
    "truthfulqa_de_mc2",     # TruthfulQA multiple choice, several true answers (Okapi)
    "belebele_deu_Latn",     # Belebele reading comprehension
    "xnli_de",               # XNLI natural language inference
    "paws_de",               # PAWS-X paraphrase identification
    "lambada_openai_mt_de",  # LAMBADA last-word prediction, machine-translated
))
"""German tasks that upstream lm-evaluation-harness 0.4.x ships (names as 0.4.13 spells them). Every one needs
its dataset from the Hugging Face hub; the local tasks of ``make-tasks`` are the offline alternative."""

PRESETS: Registry[tuple[PresetTask, ...]] = Registry("task preset")
PRESETS.add("german", GERMAN_PRESET)
PRESETS.add("german-2025", GERMAN_2025_PRESET)


@dataclass
class TaskPlan:
    """Requested names resolved against an lm-eval task index."""

    run: dict[str, str] = field(default_factory=dict)
    """Requested name -> lm-eval task/group/tag name to run."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Requested name -> why it is not run."""
    resolved: dict[str, str] = field(default_factory=dict)
    """Requested name -> lm-eval name, for every name found (also those whose data could not be loaded)."""


def split_task_list(tasks: str | Sequence[str]) -> list[str]:
    """``"a,b c"`` or ``["a,b", "c"]`` -> ``["a", "b", "c"]`` (order kept, duplicates dropped)."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for item in items:
        for name in str(item).replace(",", " ").split():
            if name not in out:
                out.append(name)
    if not out:
        raise ClpError("no tasks given: pass --tasks NAME[,NAME...] or a preset (" + ", ".join(PRESETS) + ")")
    return out


def plan_tasks(requested: Sequence[str], known: Sequence[str] | set[str], lm_eval_version: str = "") -> TaskPlan:
    """Map requested names (task, group, tag, glob pattern or preset) onto the known lm-eval names.

    Preset members that are missing become ``unavailable`` with the reason; any other unknown name is an
    :class:`UnknownNameError` listing close matches.
    """
    known_set = set(known)
    plan = TaskPlan()
    version = f" {lm_eval_version}" if lm_eval_version else ""
    for name in requested:
        if name in PRESETS:
            for t in PRESETS.get(name):
                hit = next((c for c in t.candidates if c in known_set), None)
                if hit:
                    plan.run[t.name] = hit
                    plan.resolved[t.name] = hit
                else:
                    reason = f"not available in the installed lm-eval{version} (looked for {', '.join(t.candidates)})"
                    plan.unavailable[t.name] = reason + (f"; {t.hint}" if t.hint else "")
        elif name in known_set:
            plan.run[name] = name
            plan.resolved[name] = name
        elif any(ch in name for ch in "*?["):
            matches = sorted(n for n in known_set if fnmatch.fnmatchcase(n, name))
            if not matches:
                raise UnknownNameError(f"task pattern {name!r} matches no task")
            for m in matches:
                plan.run.setdefault(m, m)
                plan.resolved.setdefault(m, m)
        else:
            raise UnknownNameError(unknown_task_message(name, known_set))
    return plan


def unknown_task_message(name: str, known: set[str]) -> str:
    pool = sorted(known | set(PRESETS))
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    return (f"unknown task {name!r}{hint} Presets: {', '.join(PRESETS)}; local tasks need --include_path DIR "
            "(e.g. the output of `clp-transfer make-tasks`)")


# --------------------------------------------------------------------------------------------- include paths


class _FunctionTag(str):
    """A ``!function module.name`` value kept verbatim through a YAML round trip."""


class _TaskLoader(yaml.SafeLoader):
    pass


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: _FunctionTag(loader.construct_scalar(node)))
_TaskDumper.add_representer(_FunctionTag, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def _resolve_local(value: str, yaml_dir: Path, must_exist_glob: bool = True) -> str | None:
    """Absolute path for a data file named in a task YAML, or None to leave it as it is."""
    if "://" in value:
        return None
    p = Path(value).expanduser()

    def exists(q: Path) -> bool:
        return bool(glob.glob(str(q))) if any(ch in str(q) for ch in "*?[") else q.exists()

    if p.is_absolute():
        if exists(p):
            return None
        moved = yaml_dir / p.name  # the task folder was moved: the file sits next to its YAML
        if exists(moved):
            log.warning("task data %s does not exist; using %s next to the task YAML", p, moved)
            return str(moved)
        return None
    for base in (yaml_dir, Path.cwd()):
        if exists(base / p):
            return str((base / p).resolve()) if not any(ch in value for ch in "*?[") else str(base.resolve() / p)
    return None


def _fix_data_paths(cfg: dict[str, Any], yaml_dir: Path) -> bool:
    """Rewrite relative data paths of one task config in place; True when something changed."""
    changed = False
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        def fix(v: Any) -> Any:
            nonlocal changed
            if isinstance(v, str):
                new = _resolve_local(v, yaml_dir)
                if new is not None and new != v:
                    changed = True
                    return new
                return v
            if isinstance(v, list):
                return [fix(x) for x in v]
            if isinstance(v, dict):
                return {k: fix(x) for k, x in v.items()}
            return v

        kwargs["data_files"] = fix(kwargs["data_files"])
    dp = cfg.get("dataset_path")
    if isinstance(dp, str) and not Path(dp).is_absolute() and (dp.startswith(".") or "/" not in dp):
        if (yaml_dir / dp).is_dir():
            cfg["dataset_path"] = str((yaml_dir / dp).resolve())
            changed = True
    return changed


def _looks_like_yaml(path: Path) -> bool:
    return path.suffix in (".yaml", ".yml") or path.name.endswith("yaml")


def mirror_include_path(src: str | os.PathLike, dst: Path) -> int:
    """Mirror task folder ``src`` into ``dst``: YAML files with relative data paths rewritten, the rest
    symlinked. Returns the number of YAML files rewritten."""
    src = Path(src).resolve()
    if not src.exists():
        raise ClpError(f"--include_path {str(src)!r} does not exist")
    if src.is_file():  # a single YAML file
        dst.mkdir(parents=True, exist_ok=True)
        return _mirror_file(src, dst / src.name)
    rewritten = 0
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", ".ipynb_checkpoints")]
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            rewritten += _mirror_file(Path(root) / f, dst / rel / f)
    return rewritten


def _mirror_file(src: Path, dst: Path) -> int:
    if _looks_like_yaml(src):
        text = src.read_text(encoding="utf-8", errors="replace")
        if "data_files" in text or "dataset_path" in text:
            try:
                cfg = yaml.load(text, Loader=_TaskLoader)  # noqa: S506 - SafeLoader subclass
            except yaml.YAMLError:
                cfg = None
            if isinstance(cfg, dict) and _fix_data_paths(cfg, src.parent):
                dst.write_text(yaml.dump(cfg, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True),
                               encoding="utf-8")
                return 1
    try:
        os.symlink(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return 0


@contextlib.contextmanager
def prepared_include_paths(paths: Sequence[str | os.PathLike]) -> Iterator[list[str]]:
    """Temporary mirrors of ``paths`` with absolute data paths (removed afterwards)."""
    if not paths:
        yield []
        return
    tmp = Path(tempfile.mkdtemp(prefix="clp-tasks-"))
    try:
        out = []
        for i, p in enumerate(paths):
            d = tmp / str(i)
            n = mirror_include_path(p, d)
            log.debug("include path %s -> %s (%d YAML files with rewritten data paths)", p, d, n)
            out.append(str(d))
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------- harness


def lm_eval_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ClpError("downstream evaluation needs lm-evaluation-harness: pip install 'clp-transfer[eval]'") from None


def go_offline() -> None:
    """Make the Hugging Face hub and datasets libraries fail at once instead of retrying the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    for mod, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                      ("datasets.config", "HF_DATASETS_OFFLINE")):
        if mod in sys.modules:
            setattr(sys.modules[mod], attr, True)


def task_manager(include_paths: Sequence[str], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=include_defaults)


_UNREGISTERED = "unregistered: "


def _unavailable_reason(name: str, err: BaseException, tm: Any) -> str:
    entry = tm.task_index.get(name)
    cfg = getattr(entry, "cfg", None) or {}
    dataset = cfg.get("dataset_path") if isinstance(cfg, dict) else None
    msg = " ".join(str(err).split())[:300]
    if isinstance(err, ConnectionError) or "Couldn't reach" in msg or "offline" in msg.lower():
        return f"needs dataset {dataset or '?'!r} from the Hugging Face hub, which cannot be reached ({msg})"
    if isinstance(err, KeyError):  # lm-eval: a name the index does not know (e.g. a group member)
        return _UNREGISTERED + msg
    if isinstance(err, FileNotFoundError):
        return f"data file not found ({msg})"
    return f"could not be loaded: {type(err).__name__}: {msg}"


def load_task_objects(plan: TaskPlan, tm: Any) -> list[Any]:
    """Build each planned task on its own; failures move to ``plan.unavailable``."""
    objects: list[Any] = []
    for requested, name in list(plan.run.items()):
        try:
            loaded = tm.load([name])
        except Exception as e:  # dataset download, missing file, bad YAML: skip this one, run the rest
            log.debug("task %s failed to load", name, exc_info=True)
            reason = _unavailable_reason(name, e, tm)
            plan.unavailable[requested] = reason if requested == name else f"lm-eval task {name!r} {reason}"
            del plan.run[requested]
            log.warning("task %s is unavailable: %s", requested, plan.unavailable[requested])
            continue
        top = [g for g in loaded.get("groups", {}).values() if g.name == name]
        objects.extend(top or list(loaded["tasks"].values()))
    return objects


@dataclass
class EvaluateResult:
    """What :func:`evaluate` returns."""

    results: dict[str, Any]
    """The harness's result dict with a ``clp_transfer`` block (task mapping, unavailable tasks)."""
    table: str
    """Markdown table of the scores, with the tasks that were not run below it."""
    unavailable: dict[str, str]
    """Task -> reason it was not run."""
    output_dir: Path | None = None

    def scores(self) -> dict[str, dict[str, float]]:
        """Task -> metric -> value (filters dropped from metric names, stderr left out)."""
        return task_scores(self.results)


def _metric_name(key: str) -> str:
    return key.split(",", 1)[0]


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results.get("results") or {}).items():
        row = {}
        for k, v in metrics.items():
            if k in ("alias", "name", "sample_len", "samples") or "_stderr" in k:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[_metric_name(k)] = float(v)
        if row:
            out[task] = row
    return out


def markdown_table(results: dict[str, Any], unavailable: dict[str, str] | None = None, title: str = "") -> str:
    lines = [f"## {title}", ""] if title else []
    lines += ["| task | metric | value | ± stderr |", "|---|---|---:|---:|"]
    for task, metrics in (results.get("results") or {}).items():
        for k, v in metrics.items():
            if k in ("alias", "name", "sample_len") or "_stderr" in k or not isinstance(v, (int, float)):
                continue
            se = metrics.get(k.replace(",", "_stderr,", 1) if "," in k else f"{k}_stderr")
            se_s = f"{se:.4f}" if isinstance(se, (int, float)) else ""
            lines.append(f"| {task} | {_metric_name(k)} | {v:.4f} | {se_s} |")
    if unavailable:
        lines += ["", "Not evaluated (no score):", ""]
        lines += [f"- `{t}`: {why}" for t, why in unavailable.items()]
    return "\n".join(lines) + "\n"


@dataclass
class EvaluateConfig:
    """Everything ``clp-transfer evaluate`` takes."""

    model: str
    """Model: local HF directory (safetensors), hub id or .gguf file."""
    tasks: list[str] = field(default_factory=list)
    """Task names, groups, glob patterns or a preset (german-2025: the German tasks upstream lm-eval ships;
    german: the study's 2019 OpenGPT-X list), space- or comma-separated."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt (default: each task's own default, usually 0)."""
    include_path: list[str] = field(default_factory=list)
    """Folders (or YAML files) with extra task definitions, e.g. from `clp-transfer make-tasks`."""
    limit: float | None = None
    """At most this many examples per task (a fraction when < 1); for quick checks, not for reporting."""
    batch_size: int = 8
    """Requests per forward pass."""
    max_length: int | None = None
    """Context length given to the harness (default: the model's)."""
    output_dir: str | None = None
    """Write results.json and results.md here."""
    overwrite: bool = False
    """Replace existing results in --output_dir."""
    offline: bool = False
    """Never try the Hugging Face hub: tasks whose dataset is not local are reported unavailable at once."""
    tokenizer: str | None = None
    """Tokenizer directory when the model directory has none."""
    device: str | None = None
    """cpu, cuda, cuda:1, mps (default: a GPU when there is one)."""
    dtype: str | None = None
    """auto (float32 on CPU, bfloat16 on capable GPUs), float32, bfloat16 or float16."""
    seed: int = 0
    """Seed for the harness (few-shot sampling)."""
    allow_pickle: bool = False
    """Allow pickle checkpoints (*.bin); unsafe for files you do not trust."""
    trust_remote_code: bool = False
    """Allow models whose code lives in their repository."""


def evaluate(
    model: Any,
    tasks: str | Sequence[str],
    tokenizer: Any = None,
    *,
    num_fewshot: int | None = None,
    include_path: str | Sequence[str] | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    offline: bool = False,
    seed: int = 0,
    **load_options: Any,
) -> EvaluateResult:
    """Run lm-eval tasks on ``model`` (a path/hub id/.gguf, or a loaded model with its ``tokenizer``).

    >>> r = evaluate("out/target", "german", output_dir="eval/target")          # doctest: +SKIP
    >>> r = evaluate(model, "de_ppl,de_cloze", tok, include_path="tasks_de")  # doctest: +SKIP
    >>> r.scores()["de_cloze"]["acc"], r.unavailable                           # doctest: +SKIP
    """
    check_evaluate_numbers(limit=limit, batch_size=batch_size, max_length=max_length, num_fewshot=num_fewshot)
    _require_lm_eval()
    if offline:
        go_offline()
    requested = split_task_list(tasks)
    includes = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    out_dir = Path(output_dir) if output_dir else None
    if out_dir is not None:
        for f in ("results.json", "results.md"):
            check_output_path(out_dir / f, overwrite, "result file")
    version = lm_eval_version()
    t0 = time.perf_counter()
    with prepared_include_paths(includes) as inc:
        plan, tm, full_index = _index_tasks(requested, inc, version)
        lm_obj, name = _harness_model(model, tokenizer, batch_size, max_length, load_options)  # fail early
        plan, tm, objects = _load_tasks(plan, tm, full_index, requested, inc, version)
        from lm_eval import simple_evaluate

        int_limit = int(limit) if limit is not None and limit >= 1 else limit
        results = simple_evaluate(
            model=lm_obj, tasks=objects, task_manager=tm, num_fewshot=num_fewshot, limit=int_limit,
            batch_size=batch_size, log_samples=False, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        )
    if results is None:  # non-zero rank in a distributed run
        raise ClpError("the harness returned no results (distributed run on a non-main rank?)")
    results["clp_transfer"] = {
        "kind": "evaluate",
        "model": name,
        "model_path": str(Path(name).resolve()) if isinstance(model, (str, os.PathLike)) and Path(name).exists()
        else None,
        "requested": requested,
        "tasks": dict(plan.resolved),
        "unavailable": dict(plan.unavailable),
        "include_path": [str(Path(p).resolve()) for p in includes],
        "num_fewshot": num_fewshot,
        "limit": limit,
        "lm_eval_version": version,
        "elapsed_s": round(time.perf_counter() - t0, 2),
        "version": __version__,
    }
    table = markdown_table(results, plan.unavailable, title=f"{name}")
    if out_dir is not None:
        atomic_write_json(out_dir / "results.json", _plain(results))
        atomic_write_text(out_dir / "results.md", table)
    return EvaluateResult(results, table, dict(plan.unavailable), out_dir)


def _index_tasks(requested: list[str], inc: list[str], version: str) -> tuple[TaskPlan, Any, bool]:
    """The task plan and the task manager it was made with, and whether that indexed the built-in tasks.

    Only the include paths are indexed when they cover every requested name (indexing the ~14k built-in
    tasks takes seconds); else, or for a preset with tasks the include paths lack, everything is."""
    plan: TaskPlan | None = None
    if inc:
        tm = task_manager(inc, include_defaults=False)
        with contextlib.suppress(UnknownNameError):
            plan = plan_tasks(requested, tm.all_tasks, version)
        if plan is not None and plan.unavailable and any(n in PRESETS for n in requested):
            plan = None
    if plan is not None:
        return plan, tm, False
    tm = task_manager(inc, include_defaults=True)
    return plan_tasks(requested, tm.all_tasks, version), tm, True


def _load_tasks(plan: TaskPlan, tm: Any, full_index: bool, requested: list[str], inc: list[str],
                version: str) -> tuple[TaskPlan, Any, Any]:
    """The harness's task objects of ``plan``; indexes the built-in tasks after all when a local group refers
    to one of them. Refuses a plan of which no task can run."""
    objects = load_task_objects(plan, tm)
    if not full_index and any(_UNREGISTERED in why for why in plan.unavailable.values()):
        tm = task_manager(inc, include_defaults=True)
        plan = plan_tasks(requested, tm.all_tasks, version)
        objects = load_task_objects(plan, tm)
    for k, why in plan.unavailable.items():
        plan.unavailable[k] = why.replace(_UNREGISTERED, "refers to a task lm-eval does not know: ")
    if not objects:
        details = "; ".join(f"{k}: {v}" for k, v in plan.unavailable.items())
        raise ClpError(f"none of the requested tasks can be run ({details})")
    return plan, tm, objects


def _plain(obj: Any) -> Any:
    """JSON-safe copy of the harness's results (callables and dtypes become strings)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item") and callable(obj.item):
        with contextlib.suppress(Exception):
            return obj.item()
    return str(obj)


def _harness_model(model: Any, tokenizer: Any, batch_size: int, max_length: int | None,
                   load_options: dict[str, Any]) -> tuple[Any, str]:
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, HFLM):
        return model, str(getattr(model, "pretrained", "model"))
    if isinstance(model, (str, os.PathLike)):
        from ..models import load_for_eval

        loaded = load_for_eval(model, tokenizer=tokenizer, **load_options)
        lm, tok, name = loaded.model, loaded.tokenizer, loaded.name
    else:
        if tokenizer is None:
            raise ClpError("pass the tokenizer together with a loaded model")
        lm, tok = model, tokenizer
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    if max_length:
        kwargs["max_length"] = max_length
    return HFLM(pretrained=lm, tokenizer=tok, **kwargs), str(name)


def check_evaluate_numbers(limit: float | None, batch_size: int, max_length: int | None,
                           num_fewshot: int | None) -> None:
    """Reject out-of-range numbers before any model or task is loaded."""
    if limit is not None and not (math.isfinite(limit) and limit > 0):
        raise ClpError(f"--limit must be a positive number of examples (or a fraction in (0, 1)), not {limit}")
    if batch_size < 1:
        raise ClpError(f"--batch_size must be at least 1 (got {batch_size})")
    if max_length is not None and max_length < 2:
        raise ClpError(f"--max_length must be at least 2 tokens (got {max_length})")
    if num_fewshot is not None and num_fewshot < 0:
        raise ClpError(f"--num_fewshot must be >= 0 (got {num_fewshot})")


def run_evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    return evaluate(
        cfg.model, cfg.tasks, cfg.tokenizer, num_fewshot=cfg.num_fewshot, include_path=cfg.include_path,
        limit=cfg.limit, batch_size=cfg.batch_size, max_length=cfg.max_length, output_dir=cfg.output_dir,
        overwrite=cfg.overwrite, offline=cfg.offline, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
        allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code,
    )


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, EvaluateConfig)
    parser.add_argument("--list-presets", action="store_true", help="show the task presets and exit")


def cli_main(args: argparse.Namespace) -> int:
    if args.list_presets:
        for name in PRESETS:
            print(f"{name}: " + ", ".join(t.name for t in PRESETS.get(name)))
        return 0
    if getattr(args, "offline", False):
        go_offline()  # before transformers/datasets are imported
    require_flags(EvaluateConfig, args)
    cfg = build_config(EvaluateConfig, args)
    if not cfg.tasks:
        raise ClpError("missing required flag: --tasks (task names or a preset: " + ", ".join(PRESETS) + ")")
    result = run_evaluate(cfg)
    print(result.table, end="")
    if result.output_dir:
        print(f"wrote {result.output_dir / 'results.json'} and results.md")
    return 0
