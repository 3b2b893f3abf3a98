"""Shared fixtures: small texts and tiny models built from scratch (no network, no ../shared)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def german_lines() -> list[str]:
    return FIXTURES.joinpath("german.txt").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def english_lines() -> list[str]:
    return FIXTURES.joinpath("english.txt").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory, german_lines, english_lines):
    """``make(arch, lang, kind="bpe", tied=None, vocab=400, pad=None, seed=0) -> Path`` of a saved tiny model.

    Results are cached per argument tuple for the whole session; treat the directories as read-only.
    """
    from clp_transfer.tiny import save_model, tiny_model, train_tokenizer

    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("models")

    def make(arch="gpt2", lang="en", kind="bpe", tied=None, vocab=400, pad=None, seed=0, hidden=32) -> Path:
        key = (arch, lang, kind, tied, vocab, pad, seed, hidden)
        if key not in cache:
            lines = english_lines if lang == "en" else german_lines
            tok = train_tokenizer(lines, vocab, kind)
            model = tiny_model(arch, tok, seed=seed, pad_vocab_to_multiple_of=pad, tie_word_embeddings=tied,
                               hidden_size=hidden, num_layers=2, num_heads=4)
            path = root / "-".join(str(k) for k in key)
            save_model(model, tok, path)
            cache[key] = path
        return cache[key]

    return make
