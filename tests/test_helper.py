"""``clp-transfer helper``: text files -> tokenizer + small causal LM, saved atomically."""

from __future__ import annotations

import gzip
import json
import typing
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clp_transfer import tiny
from clp_transfer.cli import main
from clp_transfer.config import field_docs
from clp_transfer.transfer.helper import REPORT_NAME, HelperConfig, read_documents, train_helper

TINY = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, block_size=32, batch_size=4,
            learning_rate=3e-3, warmup_steps=3, logging_steps=5, num_threads=1)
TINY_FLAGS = [f"--{k}={v}" for k, v in TINY.items()]


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fixtures_dir) -> Path:
    out = tmp_path_factory.mktemp("helper") / "helper-de"
    return train_helper(HelperConfig(text=[str(fixtures_dir / "german.txt")], output_dir=str(out), max_steps=30,
                                     **TINY))


def test_output_loads_and_generates(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", REPORT_NAME} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert not _leftovers(trained.parent, trained.name)
    tok = AutoTokenizer.from_pretrained(trained)
    model = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    assert model.config.model_type == "gpt2" and model.config.vocab_size == len(tok) <= 300
    assert model.config.n_positions == 32 and tok.model_max_length == 32
    assert model.config.eos_token_id == tok.eos_token_id
    ids = tok("Die Stadt", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 8
    assert isinstance(tok.decode(gen[0]), str)


def test_report_and_loss_goes_down(trained):
    report = json.loads((trained / REPORT_NAME).read_text())
    t = report["training"]
    assert t["steps"] == 30 and t["stopped_by"] == "max_steps"
    assert 0 < t["tokens"] <= 30 * 4 * 32
    assert report["data"]["documents"] == 30 and report["data"]["tokens"] >= report["data"]["blocks"] * 32
    assert report["model"]["parameters"] == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(trained).parameters())
    history = t["loss_history"]
    assert [s for s, _ in history] == [5, 10, 15, 20, 25, 30]
    first, last = history[0][1], history[-1][1]
    assert last < first - 0.5, history  # ln(300) ~ 5.7 at the start
    assert t["final_loss"] == pytest.approx(last, abs=1e-3)
    assert report["config"]["max_steps"] == 30


def test_cli_time_budget_gz_jsonl_and_overwrite(tmp_path, german_lines):
    half = len(german_lines) // 2
    txt_gz = tmp_path / "a.txt.gz"
    txt_gz.write_bytes(gzip.compress(("\n".join(german_lines[:half]) + "\n").encode()))
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": line, "id": i}) + "\n\n" for i, line in enumerate(german_lines[half:])))
    out = tmp_path / "out"
    args = ["helper", "--text", str(txt_gz), str(jsonl), "--output-dir", str(out), *TINY_FLAGS]
    # A budget of ~0.1 s: stopped by time after at least one step.
    assert main([*args, "--time_budget_minutes", "0.002"]) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["training"]["stopped_by"] == "time_budget" and report["training"]["steps"] >= 1
    assert report["data"]["documents"] == len(german_lines)
    assert [f["documents"] for f in report["data"]["files"]] == [half, len(german_lines) - half]
    # Existing output: refused without --overwrite (left as it was), replaced with it.
    assert main([*args, "--max_steps", "2"]) == 2
    assert json.loads((out / REPORT_NAME).read_text()) == report
    assert main([*args, "--max_steps", "2", "--overwrite"]) == 0
    assert json.loads((out / REPORT_NAME).read_text())["training"]["steps"] == 2
    assert not _leftovers(tmp_path, "out")


@pytest.mark.parametrize("kind,arch", [("sentencepiece", "llama"), ("wordpiece", "gpt_neox")])
def test_other_tokenizers_and_architectures(tmp_path, fixtures_dir, kind, arch):
    out = train_helper(HelperConfig(text=[str(fixtures_dir / "german.txt")], output_dir=str(tmp_path / "h"),
                                    max_steps=3, **{**TINY, "vocab_size": 400, "tokenizer_kind": kind,
                                                    "architecture": arch}))
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.model_type == arch and model.get_input_embeddings().weight.shape[0] == len(tok)
    gen = model.generate(**tok("Die Stadt", return_tensors="pt", return_token_type_ids=False), max_new_tokens=3,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > 3


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp / "empty.txt"
    empty.write_text("\n  \n")
    latin = tmp / "latin1.txt"
    latin.write_bytes("Größe und Übermaß\n".encode("latin-1"))
    bad_json = tmp / "bad.jsonl"
    bad_json.write_text('{"text": "gut"}\nnicht json\n')
    no_text = tmp / "notext.jsonl"
    no_text.write_text('{"content": "kein Feld text"}\n')
    bad_gz = tmp / "bad.txt.gz"
    bad_gz.write_text("kein gzip")
    good = str(Path(__file__).parent / "fixtures" / "german.txt")
    return {
        "missing": ([str(tmp / "nope.txt")], "does not exist"),
        "empty": ([str(empty)], "holds no text"),
        "not utf-8": ([str(latin)], "not UTF-8"),
        "bad jsonl": ([str(bad_json)], "line 2"),
        "jsonl without text": ([str(no_text)], '"text"'),
        "bad gzip": ([str(bad_gz)], "gzip"),
        "directory": ([str(tmp)], "is a directory"),
        "heads": ([good, "--num_heads", "5"], "multiple of --num_heads"),
        "too little text": ([good, "--block_size", "100000"], "fewer than one block"),
        "negative steps": ([good, "--max_steps", "-1"], "must be positive"),
    }


BAD_CASES = ["missing", "empty", "not utf-8", "bad jsonl", "jsonl without text", "bad gzip", "directory", "heads",
             "too little text", "negative steps"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys, case):
    src = tmp_path / "in"
    src.mkdir()
    cases = _bad_inputs(src)
    assert set(cases) == set(BAD_CASES)
    text_args, message = cases[case]
    out = tmp_path / "out"
    code = main(["helper", *TINY_FLAGS, "--max_steps", "2", "--output_dir", str(out), "--text", *text_args])
    assert code == 2
    err = capsys.readouterr().err
    assert "clp-transfer helper: error:" in err and message in err, err
    assert not out.exists() and not _leftovers(tmp_path, "out")


def test_missing_required_flags(tmp_path, capsys):
    assert main(["helper", "--output_dir", str(tmp_path / "o")]) == 2
    assert "--text" in capsys.readouterr().err


def test_read_documents_formats(tmp_path):
    (tmp_path / "a.txt").write_text("\ufeffeins zwei\n\n drei vier \n", encoding="utf-8")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "Absatz eins\\nAbsatz zwei"}\n'))
    docs, infos = read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl.gz"])
    assert docs == ["eins zwei", "drei vier", "Absatz eins\nAbsatz zwei"]
    assert [i["documents"] for i in infos] == [2, 1] and all(len(i["sha256"]) == 64 for i in infos)


def test_config_docs_flags_and_choices_match_tiny(capsys):
    docs = field_docs(HelperConfig)
    assert all(docs.get(f) for f in HelperConfig.__dataclass_fields__), "every field needs a docstring"
    hints = typing.get_type_hints(HelperConfig)
    assert typing.get_args(hints["tokenizer_kind"]) == typing.get_args(tiny.TokenizerKind)
    assert typing.get_args(hints["architecture"]) == typing.get_args(tiny.Architecture)
    with pytest.raises(SystemExit):
        main(["helper", "--help"])
    out = capsys.readouterr().out
    for flag in ("--text", "--output_dir", "--time_budget_minutes", "--time-budget-minutes", "--tokenizer_kind",
                 "--overwrite"):
        assert flag in out
