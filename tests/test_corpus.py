"""Corpus extraction from unpacked Debian packages (no package client needed)."""

from __future__ import annotations

import gzip

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clp_transfer.demo import corpus
from clp_transfer.errors import ClpError


def test_fortunes_and_paragraphs(tmp_path):
    f = tmp_path / "usr/share/games/fortunes/de/zitate"
    f.parent.mkdir(parents=True)
    f.write_text("Wer andern eine Grube gräbt,\nfällt selbst hinein.\n%\nkurz\n%\nNoch ein Spruch mit\n  genug Wörtern.\n")
    (f.parent / "zitate.dat").write_bytes(b"\x00\x01")
    off = tmp_path / "usr/share/games/fortunes/off/rude"
    off.parent.mkdir(parents=True)
    off.write_text("this one must not appear at all\n%\n")
    docs = list(corpus.fortune_documents(tmp_path / "usr/share/games/fortunes"))
    assert docs == ["Wer andern eine Grube gräbt, fällt selbst hinein.", "kurz", "Noch ein Spruch mit genug Wörtern."]
    book = tmp_path / "book.txt.gz"
    book.write_bytes(gzip.compress("Erster Absatz mit\nzwei Zeilen.\n\n\nZweiter Absatz.\n".encode()))
    assert list(corpus.paragraph_documents(tmp_path, "*.txt.gz")) == ["Erster Absatz mit zwei Zeilen.", "Zweiter Absatz."]


def test_prose_filter():
    assert corpus.is_prose("Die Katze schläft auf dem Sofa.")
    assert not corpus.is_prose("kurz und gut")
    assert not corpus.is_prose("$ ls -la /usr/share/doc | grep 1234 >> x.txt")


@given(st.lists(st.text(min_size=1, max_size=20), unique=True, max_size=60), st.floats(0.05, 0.5))
def test_split_is_a_deterministic_partition(docs, frac):
    train, held = corpus.split_documents(docs, frac, seed=1)
    assert sorted(train + held) == sorted(docs)
    assert not set(train) & set(held)
    assert corpus.split_documents(list(reversed(docs)), frac, seed=1)[1] == list(reversed(held))


def test_missing_package_client_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ClpError, match="--corpus_dir"):
        corpus.fetch_debian_text("de", tmp_path / "cache")
    with pytest.raises(ClpError, match="no Debian text sources"):
        corpus.fetch_debian_text("xx", tmp_path / "cache")
