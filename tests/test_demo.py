"""`clp-transfer demo --quick` end to end on the fixture text (no package client, no network)."""

from __future__ import annotations

import json
import math

from clp_transfer.cli import main as cli


def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path, fixtures_dir, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--quick", "--corpus_dir", str(fixtures_dir / "german.txt"), "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Report: {out / 'report.md'}" in printed
    results = json.loads((out / "results.json").read_text())
    models = results["models"]
    assert set(models) == {"source (English, own tokenizer)", "helper (German, small)", "target: clp",
                           "target: clp-original", "target: random"}
    for name, r in models.items():
        assert math.isfinite(r["bits_per_byte"]) and r["bits_per_byte"] > 0, name
        assert set(r["generations"]) and all(isinstance(g, str) for g in r["generations"].values())
    for m in ("clp", "random"):
        after = models[f"target: {m}"]["after_training"]
        assert math.isfinite(after["bits_per_byte"])
    assert (out / "learning_curves.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| target: clp |" in report and "Quick mode" in report
    for stage in ("corpus", "helper", "transfer clp", "prepare", "train clp", "plot"):
        assert stage in results["timings"], stage
    # the clp target was calibrated on the demo's own training text
    rep = json.loads((out / "targets" / "clp" / "transfer_report.json").read_text())
    assert rep["calibration_text"] and rep["calibration_text"].endswith("train.txt")
    # the quick source is an instruct model (ChatML): one chat-formatted generation of the clp target
    assert [t["token"] for t in rep["chat"]["tokens"]] == ["<|im_start|>", "<|im_end|>"]
    chat = results["chat_generation"]
    assert chat["model"] == "target: clp" and chat["prompt"].endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWie speichere ich eine Datei?<|im_end|>" in chat["prompt"]
    assert 1 <= chat["new_tokens"] <= 24 and isinstance(chat["stopped_at_end_of_turn"], bool)
    assert (chat["stop_token"] is not None) == chat["stopped_at_end_of_turn"]
    assert "## Chat-formatted generation" in report and chat["prompt"] + chat["reply"] in report


def test_demo_refuses_existing_output_and_names_the_failing_stage(tmp_path, fixtures_dir, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli(["demo", "--quick", "--corpus_dir", str(fixtures_dir / "german.txt"), "--output_dir", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["demo", "--quick", "--corpus_dir", str(empty), "--output_dir", str(tmp_path / "d2")]) == 2
    err = capsys.readouterr().err
    assert "stage 'corpus'" in err and "--corpus_dir" in err
