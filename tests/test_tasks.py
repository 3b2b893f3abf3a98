"""make-tasks: item construction, determinism, bad input, and an offline lm-eval run of the tasks."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest
import yaml

from clp_transfer.cli import main
from clp_transfer.errors import ClpError
from clp_transfer.evaluate.tasks import cloze_items, make_tasks, read_pairs, sentences, translation_items


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_sentences_split_and_dedupe():
    docs = ["Das ist gut. Der Hund bellt!  Wer kommt?", "Das ist gut.", "z. B. klein"]
    assert sentences(docs) == ["Das ist gut.", "Der Hund bellt!", "Wer kommt?", "z. B. klein"]


def test_cloze_items_hold_the_original_continuation(german_lines):
    sents = sentences(german_lines)
    items = cloze_items(sents, 20, 4, random.Random(0))
    assert len(items) == 20
    originals = set(sents)
    for it in items:
        assert len(it["choices"]) == len(set(it["choices"])) == 4
        right = it["choices"][it["label"]]
        assert f"{it['context']} {right}" in originals
        assert sum(f"{it['context']} {c}" in originals for c in it["choices"]) == 1
    assert {it["label"] for it in items} == {0, 1, 2, 3}  # the answer is not always in the same place


def test_translation_items_never_offer_a_second_right_answer(fixtures_dir):
    pairs = read_pairs(fixtures_dir / "pairs.tsv") + [("Bau", "house"), ("Gebäude", "building")]
    de_of = defaultdict(set)
    for de, en in pairs:
        de_of[en].add(de)
    items = translation_items(pairs, 100, 4, random.Random(0))
    assert "wind" not in {it["english"] for it in items}  # same word in both languages: nothing to translate
    for it in items:
        right = it["choices"][it["label"]]
        assert right in de_of[it["english"]]
        assert sum(c in de_of[it["english"]] for c in it["choices"]) == 1
        assert all(c[:1].isupper() == right[:1].isupper() for c in it["choices"])


def test_make_tasks_writes_runnable_deterministic_tasks(tmp_path, fixtures_dir):
    text, pairs = fixtures_dir / "german.txt", fixtures_dir / "pairs.tsv"
    a = make_tasks(str(text), tmp_path / "a", pairs=str(pairs), prefix="fx", seed=3, num_fewshot_pool=3)
    b = make_tasks(str(text), tmp_path / "b", pairs=str(pairs), prefix="fx", seed=3, num_fewshot_pool=3)
    c = make_tasks(str(text), tmp_path / "c", pairs=str(pairs), prefix="fx", seed=4, num_fewshot_pool=3)
    assert a.names == ["fx_ppl", "fx_cloze", "fx_translate"]
    for name in a.names:
        assert (a.path / f"{name}.test.jsonl").read_bytes() == (b.path / f"{name}.test.jsonl").read_bytes()
        cfg = yaml.safe_load((a.path / f"{name}.yaml").read_text())
        assert cfg["task"] == name and cfg["tag"] == ["fx"]
        for f in cfg["dataset_kwargs"]["data_files"].values():
            assert f.startswith(str(a.path)) and (tmp_path / "a" / f.rsplit("/", 1)[1]).is_file()
    assert (a.path / "fx_cloze.test.jsonl").read_bytes() != (c.path / "fx_cloze.test.jsonl").read_bytes()
    assert len(_jsonl(a.path / "fx_ppl.test.jsonl")) == 30
    train = _jsonl(a.path / "fx_cloze.train.jsonl")
    test = _jsonl(a.path / "fx_cloze.test.jsonl")
    assert len(train) == 3 and not {json.dumps(t) for t in train} & {json.dumps(t) for t in test}
    manifest = json.loads((a.path / "tasks.json").read_text())
    assert manifest["tasks"]["fx_translate"]["test"] == len(_jsonl(a.path / "fx_translate.test.jsonl"))
    with pytest.raises(ClpError, match="exists"):
        make_tasks(str(text), tmp_path / "a")


@pytest.mark.parametrize(
    "content, pairs, message",
    [
        ("", None, "is empty"),
        ("\n\n", None, "hold no text"),
        ("Zu kurz.\nAuch kurz.\n", None, "cloze task needs at least"),
        (None, "Hafen harbour\n", "not german<TAB>english"),
        (None, "", "is empty"),
    ],
)
def test_bad_input(tmp_path, fixtures_dir, capsys, content, pairs, message):
    text = fixtures_dir / "german.txt"
    if content is not None:
        text = tmp_path / "t.txt"
        text.write_text(content)
    args = ["make-tasks", "--text", str(text), "--output_dir", str(tmp_path / "out")]
    if pairs is not None:
        (tmp_path / "p.tsv").write_text(pairs)
        args += ["--pairs", str(tmp_path / "p.tsv")]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_made_tasks_run_offline_through_evaluate(tmp_path, fixtures_dir, model_factory, monkeypatch, capsys):
    """The folder runs via `evaluate --include_path DIR --tasks <tag>`, even after it was moved."""
    out = tmp_path / "tasks_de"
    code = main(["make-tasks", "--text", str(fixtures_dir / "german.txt"), "--pairs", str(fixtures_dir / "pairs.tsv"),
                 "--output_dir", str(out), "--num_fewshot_pool", "3"])
    assert code == 0
    moved = tmp_path / "moved"
    out.rename(moved)
    monkeypatch.chdir(tmp_path)
    model = model_factory("gpt2", "de", "bpe")
    code = main(["evaluate", "--model", str(model), "--include_path", "moved", "--tasks", "de_local",
                 "--limit", "6", "--num_fewshot", "1", "--output_dir", "ev"])
    assert code == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(results["results"]) >= {"de_local_ppl", "de_local_cloze", "de_local_translate"}
    assert 0.0 <= results["results"]["de_local_cloze"]["acc,none"] <= 1.0
    assert results["results"]["de_local_ppl"]["bits_per_byte,none"] > 0
    assert not results["clp_transfer"]["unavailable"]
    assert "de_local_translate" in capsys.readouterr().out
