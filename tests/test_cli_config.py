"""The CLI on jsonargparse: ``--config`` on every subcommand, dotted overrides, every YAML under configs/."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import yaml

from clp_transfer.cli import SUBCOMMANDS, build_parser, main, parse_command_args
from clp_transfer.config import from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# configs/<dir>/ -> (subcommand, module attribute of its config dataclass)
CONFIG_DIRS = {
    "prepare": ("prepare", "PrepareConfig"),
    "train": ("train", "TrainConfig"),
    "transfer": ("transfer", "TransferConfig"),
}


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_accepts_config(command):
    options = {o for action in build_parser(command)._actions for o in action.option_strings}
    assert "--config" in options


def yaml_files() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml"))


def test_the_readme_transfer_config_exists():
    readme = (CONFIGS.parent / "README.md").read_text(encoding="utf-8")
    assert "clp-transfer transfer --config configs/transfer/pythia-410m-de.yaml" in readme
    assert (CONFIGS / "transfer" / "pythia-410m-de.yaml").is_file()


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_under_configs_validates_against_its_command(path):
    kind = path.parent.name
    if kind == "accelerate":  # `accelerate launch --config_file`, not ours: its own keys
        data = yaml.safe_load(path.read_text())
        assert {"compute_environment", "distributed_type"} <= set(data)
        return
    command, class_name = CONFIG_DIRS[kind]
    parser = build_parser(command)
    args = parse_command_args(parser, ["--config", str(path)])  # unknown keys, wrong types: SystemExit
    cls = getattr(importlib.import_module(SUBCOMMANDS[command][0]), class_name)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    assert values, f"{path} sets none of {cls.__name__}'s fields"
    required = {f.name: "x" for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    from_dict(cls, {**required, **values}, where=str(path))


def test_config_has_the_lowest_precedence_and_dotted_keys_override_one_param(tmp_path):
    config = tmp_path / "t.yaml"
    config.write_text("source: a\nhelper: b\noutput: o\nseed: 3\nparams: [top_k=5, temperature=0.1]\n")
    parser = build_parser("transfer")
    args = parse_command_args(parser, ["--seed", "7", "--config", str(config), "--params.top_k", "9",
                                       "--params.weighting=topk_softmax"])
    assert args.seed == 7 and args.source == "a"
    assert args.params == ["top_k=9", "temperature=0.1", "weighting=topk_softmax"]
    with pytest.raises(SystemExit):
        parse_command_args(parser, ["--config", str(config), "--sourze.x", "1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sourze: a\n")
    with pytest.raises(SystemExit):
        parse_command_args(parser, ["--config", str(bad)])


def test_transfer_runs_from_a_config_file(tmp_path, model_factory):
    src = model_factory("gpt2", "en", vocab=300, hidden=16)
    hlp = model_factory("gpt2", "de", vocab=300, hidden=16)
    config = tmp_path / "transfer.yaml"
    config.write_text(f"source: {src}\nhelper: {hlp}\noutput: {tmp_path / 'unused'}\nmethod: clp\n"
                      "params: [calibrate=0, top_k=5]\n")
    out = tmp_path / "out"
    assert main(["transfer", "--config", str(config), "--output", str(out), "--params.top_k", "3"]) == 0
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["method"] == "clp" and report["params"]["top_k"] == 3 and report["params"]["calibrate"] == 0
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize("command, field, old", [
    ("prepare", "files", "--files"),
    ("transfer", "calibration_text", "--calibration_text"),
    ("perplexity", "text_files", "--text_files"),
    ("demo", "corpus_dir", "--corpus_dir"),
    ("make-tasks", "text", "--text"),
    ("helper", "text", "--text"),
])
def test_target_text_is_text_in_every_stage_and_the_old_flags_still_work(command, field, old, tmp_path):
    parser = build_parser(command)
    value = str(tmp_path / "de.txt")
    new = parse_command_args(parser, ["--text", value])
    legacy = parse_command_args(parser, [old, value])
    assert getattr(new, field) in (value, [value]) and getattr(legacy, field) == getattr(new, field)
