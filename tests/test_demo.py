"""`clp-transfer demo --quick` end to end on the fixture text (no package client, no network)."""

from __future__ import annotations

import json
import math

from clp_transfer.cli import main as cli


def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path, fixtures_dir, capsys, monkeypatch):
    monkeypatch.setenv("CLP_TRANSFER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert cli(["demo", "--quick", "--corpus_dir", str(fixtures_dir / "german.txt"), "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Report: {out / 'report.md'}" in printed
    results = json.loads((out / "results.json").read_text())
    models = results["models"]
    assert set(models) == {"source (English, own tokenizer)", "target: clp", "target: clp-original", "target: random"}
    for name, r in models.items():
        assert math.isfinite(r["bits_per_byte"]) and r["bits_per_byte"] > 0, name
        assert set(r["generations"]) and all(isinstance(g, str) for g in r["generations"].values())
        assert r["generated_tokens"] == 3 * 8 and r["words_per_second"] > 0, name  # min_new_tokens = max
    # continued pretraining: both trained targets and the source (its own tokenizer), same steps and shape
    trained = ("target: clp", "target: random", "source (English, own tokenizer)")
    for name in trained:
        after = models[name]["after_training"]
        assert math.isfinite(after["bits_per_byte"]) and after["bytes_seen"] > 0, name
        assert after["tokens_seen"] == 6 * 4 * 64, name
    assert "after_training" not in models["target: clp-original"]
    # the same German text, two tokenizers: one set of shards each, the same documents
    tgt = json.loads((out / "data" / "shards-target" / "stats.json").read_text())["splits"]
    src = json.loads((out / "data" / "shards-source" / "stats.json").read_text())["splits"]
    assert tgt["train"]["bytes"] == src["train"]["bytes"] and tgt["valid"]["bytes"] == src["valid"]["bytes"]
    assert (out / "learning_curves.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "Quick mode" in report and "tokens per German word" in report
    for name in models:
        assert f"| {name} |" in report, name
    assert "The user's alternative" in report and "The `clp` target after continued pretraining" in report
    for stage in ("corpus", "helper", "transfer clp", "prepare target", "prepare source", "train clp",
                  "train random", "train source", "plot"):
        assert stage in results["timings"], stage
    # the helper space is cached by content: a second run reuses it
    assert (out / "helper" / "helper_space.json").is_file()
    assert len(list((tmp_path / "cache" / "demo-helpers").iterdir())) == 1
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


def test_demo_helper_space_is_built_once_per_text(tmp_path, fixtures_dir, monkeypatch):
    from clp_transfer.demo.run import DemoConfig, build_helper

    monkeypatch.setenv("CLP_TRANSFER_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "train.txt"
    text.write_text((fixtures_dir / "german.txt").read_text(encoding="utf-8"), encoding="utf-8")
    cfg = DemoConfig(quick=True)
    first = build_helper(cfg, text, tmp_path / "a")
    cached = next((tmp_path / "cache" / "demo-helpers").iterdir())
    stamp = (cached / "embeddings.safetensors").stat().st_mtime_ns
    second = build_helper(cfg, text, tmp_path / "b")
    assert (cached / "embeddings.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert (first / "embeddings.safetensors").read_bytes() == (second / "embeddings.safetensors").read_bytes()
    text.write_text(text.read_text(encoding="utf-8") + "Ein neuer Satz.\n", encoding="utf-8")
    build_helper(cfg, text, tmp_path / "c")
    assert len(list((tmp_path / "cache" / "demo-helpers").iterdir())) == 2  # other text, other space


def test_demo_report_shows_an_unusable_contrast_method_instead_of_failing(tmp_path):
    from clp_transfer.demo.run import SOURCE_ROW, write_report

    ok = {"tokenizer": "German", "bits_per_byte": 2.0, "tokens_per_word": 1.6, "words_per_second": 9.0,
          "generations": {"Die Katze": "ist da"}}
    src = {**ok, "tokenizer": "source", "bits_per_byte": 1.9, "tokens_per_word": 2.8, "words_per_second": 6.0,
           "after_training": {"bits_per_byte": 1.5, "bytes_seen": 2048, "train_seconds": 1.0, "words_per_second": 6.0,
                              "generations": {}}}
    clp = {**ok, "after_training": {"bits_per_byte": 1.8, "bytes_seen": 4096, "train_seconds": 1.0,
                                    "words_per_second": 9.0, "generations": {"Die Katze": "schläft"}}}
    results = {"source": "s", "helper": {"vocab_size": 100}, "heldout": {"documents": 1, "bytes": 10}, "quick": False,
               "config": {"train_steps": 2, "train_batch_size": 1, "block_size": 8}, "timings": {},
               "models": {SOURCE_ROW: src, "target: clp": clp,
                          "target: clp-original": {"tokenizer": "German", "failed": "non-finite embeddings"}}}
    report = write_report(results, tmp_path).read_text()
    assert "| target: clp-original | German | | unusable: non-finite embeddings |" in report
    # the verdict is computed from the numbers: below the source (1.9) and its step 0 (2.0), behind source-cpt
    assert "1.800 bits per byte, below the English source (1.900) and below its own step 0 (2.000)" in report
    assert "1.500, better than the target by 0.300" in report and "target read 4 KB of German, the source 2 KB" in report
    assert "1.60 tokens per German word against 2.80" in report and "(1.50x)" in report


def test_demo_reports_only_non_finite_contrast_methods_as_unusable(tmp_path, fixtures_dir, capsys, monkeypatch):
    import clp_transfer.transfer.pipeline as transfer_module
    from clp_transfer.errors import ClpError, NonFiniteEmbeddingsError

    monkeypatch.setenv("CLP_TRANSFER_CACHE", str(tmp_path / "cache"))
    real = transfer_module.transfer

    def failing(fail_method, error):
        def fake(source, helper, output, method="clp", **kw):
            if method == fail_method:
                raise error
            return real(source, helper, output, method=method, **kw)
        return fake

    args = ["demo", "--quick", "--corpus_dir", str(fixtures_dir / "german.txt"), "--train_methods", "clp",
            "--no-train_source"]
    monkeypatch.setattr(transfer_module, "transfer",
                        failing("clp-original", NonFiniteEmbeddingsError("method 'clp-original' produced non-finite "
                                                                         "embeddings")))
    assert cli(args + ["--output_dir", str(tmp_path / "a")]) == 0
    models = json.loads((tmp_path / "a" / "results.json").read_text())["models"]
    assert models["target: clp-original"] == {"tokenizer": "German",
                                              "failed": "method 'clp-original' produced non-finite embeddings"}
    assert math.isfinite(models["target: random"]["bits_per_byte"])
    # any other failure of a contrast method still stops the demo, naming its stage
    monkeypatch.setattr(transfer_module, "transfer", failing("random", ClpError("no space left on device")))
    assert cli(args + ["--output_dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "stage 'transfer random'" in err and "no space left" in err
