"""evaluate: task planning (presets, unknown names), include-path repair, offline runs through lm-eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from clp_transfer.cli import main
from clp_transfer.errors import ClpError, UnknownNameError
from clp_transfer.evaluate.harness import (
    GERMAN_2025_PRESET,
    GERMAN_PRESET,
    PRESETS,
    _FunctionTag,
    _TaskLoader,
    evaluate,
    markdown_table,
    mirror_include_path,
    plan_tasks,
    split_task_list,
)

GERMAN = [t.name for t in GERMAN_PRESET]


def test_split_task_list():
    assert split_task_list("a,b  c") == ["a", "b", "c"]
    assert split_task_list(["a,b", "c", "a"]) == ["a", "b", "c"]
    with pytest.raises(ClpError, match="no tasks"):
        split_task_list(" , ")


def test_german_preset_maps_to_installed_names_and_reports_the_rest():
    plan = plan_tasks(["german"], {"xnli_de", "paws_de", "hellaswag"}, "0.4.13")
    assert plan.run == {"ogx_xnli_de": "xnli_de", "ogx_pawsx_de": "paws_de"}
    assert set(plan.unavailable) == set(GERMAN) - {"ogx_xnli_de", "ogx_pawsx_de"}
    assert all("not available in the installed lm-eval 0.4.13" in why for why in plan.unavailable.values())
    assert "clp-transfer perplexity" in plan.unavailable["ogx_oscar_ppl_de"]
    # a fork task given through --include_path wins over the upstream name
    plan = plan_tasks(["german"], {"xnli_de", "ogx_xnli_de", "ogx_gnad10"})
    assert plan.run["ogx_xnli_de"] == "ogx_xnli_de" and plan.run["ogx_gnad10"] == "ogx_gnad10"


def _task_dirs_naming(names: list[str]) -> list[str]:
    """Directories of the installed lm-eval's built-in tasks whose YAML files name one of ``names`` (a text scan,
    so that lm-eval's own indexer runs on a few directories instead of all ~14k tasks)."""
    import re

    import lm_eval.tasks

    pattern = re.compile(r"^\s*(task|group|tag)\s*:\s*['\"]?(" + "|".join(map(re.escape, names)) + r")['\"]?\s*$", re.M)
    root = Path(lm_eval.tasks.__file__).parent
    return sorted({str(p.parent) for p in root.rglob("*.yaml") if pattern.search(p.read_text(errors="replace"))})


def test_german_2025_preset_names_exist_in_the_installed_lm_eval():
    """Offline: every name of the preset is a task or group that the installed lm-eval's indexer finds."""
    from lm_eval.tasks import TaskManager

    from clp_transfer.evaluate.harness import lm_eval_version

    names = [t.name for t in GERMAN_2025_PRESET]
    assert len(names) == len(set(names)) >= 10 and PRESETS.get("german-2025") is GERMAN_2025_PRESET
    dirs = _task_dirs_naming(names)
    tm = TaskManager(include_path=dirs, include_defaults=False)
    missing = [n for n in names if n not in tm.all_tasks]
    assert not missing, f"not in lm-eval {lm_eval_version()}: {missing}"
    plan = plan_tasks(["german-2025"], tm.all_tasks, lm_eval_version())
    assert plan.run == {n: n for n in names} and not plan.unavailable


def test_german_2025_preset_reports_missing_tasks_as_missing():
    plan = plan_tasks(["german-2025", "de_ppl"], {"arc_de", "xnli_de", "de_ppl"}, "0.4.2")
    assert plan.run == {"arc_de": "arc_de", "xnli_de": "xnli_de", "de_ppl": "de_ppl"}
    assert set(plan.unavailable) == {t.name for t in GERMAN_2025_PRESET} - {"arc_de", "xnli_de"}
    assert all("not available in the installed lm-eval 0.4.2" in why for why in plan.unavailable.values())
    table = markdown_table({"results": {"arc_de": {"alias": "arc_de", "acc,none": 0.3}}}, plan.unavailable)
    scores, rest = table.split("Not evaluated (no score):")
    assert "hellaswag_de" in rest and "hellaswag_de" not in scores and "arc_de" in scores


def test_unknown_task_lists_close_matches():
    with pytest.raises(UnknownNameError, match=r"did you mean 'xnli_de'") as e:
        plan_tasks(["xnli_dee"], {"xnli_de", "xnli_en", "paws_de"})
    assert "--include_path" in str(e.value)
    with pytest.raises(UnknownNameError, match="'german'"):
        plan_tasks(["germna"], {"xnli_de"})
    assert plan_tasks(["xnli_*"], {"xnli_de", "xnli_en", "paws_de"}).run == {"xnli_de": "xnli_de", "xnli_en": "xnli_en"}
    with pytest.raises(UnknownNameError, match="matches no task"):
        plan_tasks(["zz_*"], {"xnli_de"})


def test_mirror_makes_data_paths_absolute_and_keeps_functions(tmp_path):
    src = tmp_path / "tasks"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "d.jsonl").write_text('{"text": "x"}\n')
    (src / "sub" / "t.yaml").write_text(
        "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\n    train: [d.jsonl]\n"
        "process_docs: !function utils.process\nmetadata: {version: 1}\n")
    (src / "sub" / "utils.py").write_text("def process(ds):\n    return ds\n")
    (src / "other.yaml").write_text("task: o\ndataset_path: json\n")
    dst = tmp_path / "mirror"
    assert mirror_include_path(src, dst) == 1
    cfg = yaml.load((dst / "sub" / "t.yaml").read_text(), Loader=_TaskLoader)  # noqa: S506
    absolute = str((src / "sub" / "d.jsonl").resolve())
    assert cfg["dataset_kwargs"]["data_files"] == {"test": absolute, "train": [absolute]}
    assert isinstance(cfg["process_docs"], _FunctionTag) and cfg["process_docs"] == "utils.process"
    from lm_eval.tasks._yaml_loader import load_yaml

    assert callable(load_yaml(dst / "sub" / "t.yaml", resolve_func=True)["process_docs"])
    assert (dst / "sub" / "utils.py").resolve() == (src / "sub" / "utils.py").resolve()
    assert (dst / "other.yaml").is_symlink()


def test_markdown_table_never_scores_unavailable_tasks():
    results = {"results": {"x": {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1}}}
    table = markdown_table(results, {"ogx_gnad10": "not available"})
    assert "| x | acc | 0.5000 | 0.1000 |" in table
    assert "ogx_gnad10" in table.split("Not evaluated")[1] and "| ogx_gnad10" not in table


def _ppl_task(folder: Path, lines: list[str], name: str = "rel_ppl", data: str = "data/docs.jsonl") -> None:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")


def test_relative_data_files_run_from_any_directory(tmp_path, monkeypatch, model_factory, german_lines):
    """lm-eval resolves relative data_files against the cwd; the wrapper resolves them next to the YAML."""
    from clp_transfer.evaluate.perplexity import perplexity

    tasks = tmp_path / "my_tasks"
    _ppl_task(tasks, german_lines[:6])
    _ppl_task(tasks, german_lines[:6], name="broken_ppl", data="data/missing.jsonl")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = model_factory("gpt2", "de", "bpe")
    r = evaluate(str(model), ["rel_ppl", "broken_ppl"], include_path=str(tasks), output_dir=tmp_path / "out",
                 batch_size=4)
    bpb = r.scores()["rel_ppl"]["bits_per_byte"]
    ours = perplexity(str(model), texts=german_lines[:6], progress=False)  # same default window: the context
    assert abs(bpb - ours.bits_per_byte) < 1e-4
    assert "broken_ppl" in r.unavailable and "not found" in r.unavailable["broken_ppl"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["clp_transfer"]["unavailable"].keys() == {"broken_ppl"} and "broken_ppl" not in saved["results"]
    assert "rel_ppl" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(ClpError, match="exists"):
        evaluate(str(model), "rel_ppl", include_path=str(tasks), output_dir=tmp_path / "out")


def test_cli_errors(tmp_path, model_factory, german_lines, capsys):
    tasks = tmp_path / "t"
    _ppl_task(tasks, german_lines[:3], data=str(tmp_path / "nowhere.jsonl"))
    model = model_factory("gpt2", "de", "bpe")
    code = main(["evaluate", "--model", str(model), "--include_path", str(tasks), "--tasks", "rel_ppl"])
    assert code == 2 and "none of the requested tasks can be run" in capsys.readouterr().err
    code = main(["evaluate", "--model", str(model)])
    assert code == 2 and "--tasks" in capsys.readouterr().err
    good = tmp_path / "good"
    _ppl_task(good, german_lines[:3])
    code = main(["evaluate", "--model", str(tmp_path / "nope"), "--include_path", str(good), "--tasks", "rel_ppl"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_german_preset_against_the_installed_lm_eval(model_factory, tmp_path, capsys):
    """Whole built-in index (~10 s): the preset's names exist or are reported; hub tasks fail offline, per task."""
    from lm_eval.tasks import TaskManager

    from clp_transfer.evaluate.harness import lm_eval_version

    tm = TaskManager()
    plan = plan_tasks(["german"], tm.all_tasks, lm_eval_version())
    assert set(plan.run) | set(plan.unavailable) == set(GERMAN)
    for requested, name in plan.run.items():
        assert name in tm.all_tasks
    model = model_factory("gpt2", "de", "bpe")
    tasks = tmp_path / "local"
    _ppl_task(tasks, ["Ein Satz.", "Noch ein Satz."])
    code = main(["evaluate", "--model", str(model), "--tasks", "german,rel_ppl", "--include_path", str(tasks),
                 "--offline", "--output_dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 0 and "rel_ppl" in out
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert set(saved["clp_transfer"]["unavailable"]) == set(GERMAN)  # nothing of the preset is local here
    assert set(saved["results"]) == {"rel_ppl"}
    code = main(["evaluate", "--model", str(model), "--tasks", "xnli_dee"])
    assert code == 2 and "did you mean 'xnli_de'" in capsys.readouterr().err
