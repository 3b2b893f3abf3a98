"""compare: reading perplexity/evaluate results, merging rows, best values, n/a for missing tasks, the plot."""

from __future__ import annotations

import json

import pytest

from clp_transfer.cli import main
from clp_transfer.evaluate.compare import compare, lower_is_better, plot_comparison


def _ppl(path, model, bpb, word_ppl, new=None):
    d = {"kind": "perplexity", "model": model, "bits_per_byte": bpb, "word_perplexity": word_ppl,
         "token_perplexity": 10.0, "mean_loss": 2.3, "token_classes": None}
    if new is not None:
        d["token_classes"] = {"new": {"num_tokens": 5, "nll": 1.0, "mean_loss": new, "share_of_nll": 0.4},
                              "shared": {"num_tokens": 5, "nll": 1.0, "mean_loss": 2.0, "share_of_nll": 0.6}}
    path.write_text(json.dumps(d))
    return path


def _eval(folder, model, scores, unavailable=None, mapping=None):
    folder.mkdir(parents=True, exist_ok=True)
    results = {t: {"alias": t, **{f"{k},none": v for k, v in m.items()},
                   **{f"{k}_stderr,none": 0.01 for k in m}} for t, m in scores.items()}
    (folder / "results.json").write_text(json.dumps({
        "results": results,
        "clp_transfer": {"kind": "evaluate", "model": model, "unavailable": unavailable or {},
                         "tasks": mapping or {}},
    }))
    return folder


@pytest.fixture
def runs(tmp_path):
    return [
        _ppl(tmp_path / "src.json", "source", 2.02, 900.0),
        _ppl(tmp_path / "tgt.json", "target", 1.90, 700.0, new=3.1),
        _eval(tmp_path / "ev_src", "source",
              {"de_cloze": {"acc": 0.40, "acc_norm": 0.41}, "de_ppl": {"bits_per_byte": 2.0}},
              unavailable={"ogx_xnli_de": "needs the hub"}, mapping={"ogx_xnli_de": "xnli_de"}),
        _eval(tmp_path / "ev_tgt", "target",
              {"de_cloze": {"acc": 0.55, "acc_norm": 0.50}, "de_ppl": {"bits_per_byte": 1.8}, "xnli_de": {"acc": 0.45}}),
    ]


def test_rows_merge_per_model_and_best_is_marked(runs):
    c = compare(runs)
    assert [r.label for r in c.rows] == ["source", "target"]
    assert c.columns[:2] == ["bits_per_byte", "word_perplexity"]
    assert "token_perplexity" not in c.columns  # not comparable across tokenizers
    assert {"de_cloze/acc", "de_ppl/bits_per_byte", "xnli_de/acc", "loss_new"} <= set(c.columns)
    assert "de_cloze/acc_norm" not in c.columns
    assert c.best("bits_per_byte") == "target" and c.best("de_cloze/acc") == "target"
    assert c.value("source", "xnli_de/acc") is None
    table = c.markdown()
    assert "| target | **1.9000** |" in table
    assert "n/a" in table.split("| source |")[1].split("\n")[0]
    assert "needs the hub" in table
    assert c.wins()["target"] >= 4


def test_all_metrics_labels_and_filters(runs):
    c = compare(runs, all_metrics=True)
    assert "token_perplexity" in c.columns and "de_cloze/acc_norm" in c.columns
    c = compare(runs[:2], labels=["en", "de"], metrics=["bits_per_byte"])
    assert [r.label for r in c.rows] == ["en", "de"] and c.columns == ["bits_per_byte"]
    assert lower_is_better("de_ppl/bits_per_byte") and lower_is_better("loss_new")
    assert not lower_is_better("xnli_de/acc")


def test_task_no_model_ran_is_a_note_not_a_column(tmp_path):
    a = _eval(tmp_path / "a", "m", {"t": {"acc": 0.5}}, unavailable={"ogx_gnad10": "not in lm-eval"})
    c = compare([a])
    assert c.columns == ["t/acc"] and any("ogx_gnad10" in n for n in c.notes)
    assert "ogx_gnad10: not in lm-eval" in c.markdown()


def test_plot_and_cli(tmp_path, runs, capsys):
    png = plot_comparison(compare(runs), tmp_path / "c.png", title="demo")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code = main(["compare", *map(str, runs), "--plot", str(tmp_path / "p.png"), "--output", str(tmp_path / "t.md")])
    out = capsys.readouterr().out
    assert code == 0 and "| model |" in out and (tmp_path / "p.png").stat().st_size > 1000
    assert (tmp_path / "t.md").read_text().startswith("| model |")
    assert main(["compare", str(runs[0]), "--plot", str(tmp_path / "p.png")]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err


def test_bad_results(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "x.json").write_text('{"foo": 1}')
    assert main(["compare", str(tmp_path / "x.json")]) == 2
    assert "neither a perplexity result" in capsys.readouterr().err
