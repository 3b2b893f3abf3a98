"""``prepare``: ordered, disjoint, exact splits; every input format; exact shards; bad inputs; the seed command."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clp_transfer.data import pipeline as prepare_mod
from clp_transfer.cli import main as cli
from clp_transfer.data.pipeline import MB, PrepareConfig, prepare
from clp_transfer.data.encode import GPT2_PATTERN, Encoder, EncoderSpec, plan_piece_cache
from clp_transfer.data.shards import ShardWriter, TokenShards, tokenizer_fingerprint

REPO = Path(__file__).resolve().parents[1]
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def docs(german_lines) -> list[str]:
    """~50 documents with umlauts, digits, punctuation, and one that spells the EOS token."""
    out = [line for line in german_lines if line.strip()]
    out.append("Ein Text, der <|endoftext|> wörtlich enthält, und Zahlen: 12345 67.")
    out.append("  Führende  Leerzeichen und  doppelte, dann Tab\tund Ende ")
    return out + [f"{i}. Wiederholung: {line}" for i, line in enumerate(out[:20])]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, german_lines) -> Path:
    from clp_transfer.tiny import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "bpe"
    train_tokenizer(german_lines, 400, "bpe").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def big_tok_dir(tmp_path_factory) -> Path:
    """Byte-level BPE with 70,001 entries and EOS id 70,000: ids need uint32."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for i in range(len(vocab), 70_000):
        vocab[f"unused{i}"] = i
    vocab["<|endoftext|>"] = 70_000
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    path = tmp_path_factory.mktemp("tok") / "big"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)
    return path


def write_lines(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    return path


def jsonl_bytes(docs: list[str], key: str = "text") -> bytes:
    return "".join(json.dumps({key: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)).encode()


def read_split(out: Path, split: str) -> list[str]:
    return [json.loads(line)["text"] for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def nbytes(d: str) -> int:
    return len(d.encode("utf-8"))


def expected_split(docs: list[str], n: int, m: int) -> tuple[list[str], list[str]]:
    """The documented rule, written independently: a document goes where its first byte falls."""
    train, valid, pos = [], [], 0
    for d in docs:
        if pos < n:
            train.append(d)
        elif pos < n + m:
            valid.append(d)
        else:
            break
        pos += nbytes(d)
    return train, valid


def run(*args: str) -> int:
    return cli(["prepare", "--no-progress", *args])


# --------------------------------------------------------------------------------------- the split itself
alphabet = st.sampled_from(list("abcdefghij KLMNOP.,;!?äöüßÄ€𝄞-0123456789"))
doc_text = st.text(alphabet, min_size=1, max_size=40).filter(lambda s: not s.isspace())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(doc_text, min_size=1, max_size=25), n=st.integers(1, 400), m=st.integers(0, 300))
def test_splits_are_disjoint_ordered_and_exactly_the_first_n_plus_m_bytes(docs, n, m):
    with tempfile.TemporaryDirectory() as tmp:
        src = write_lines(Path(tmp) / "src.txt", docs)
        out = Path(tmp) / "out"
        r = prepare(out, n / MB, valid_size_mb=m / MB, files=[src], progress=False)
        train, valid = read_split(out, "train"), read_split(out, "valid")
        exp_train, exp_valid = expected_split(docs, n, m)
        assert (train, valid) == (exp_train, exp_valid)
        # Together they are the first documents of the source, in order, train first: disjoint by position.
        assert train + valid == docs[: len(train) + len(valid)]
        k = len(train) + len(valid)
        # ... and the shortest such prefix holding N+M bytes (or the whole source when it is smaller).
        total = sum(map(nbytes, docs[:k]))
        assert total >= n + m or k == len(docs)
        assert k == 0 or sum(map(nbytes, docs[: k - 1])) < n + m
        # train is the shortest prefix holding N bytes.
        assert sum(map(nbytes, train)) >= n or len(train) == len(docs)
        assert sum(map(nbytes, train[:-1])) < n
        s = r.stats["splits"]
        assert s["train"]["bytes"] == sum(map(nbytes, train)) and s["valid"]["bytes"] == sum(map(nbytes, valid))
        assert s["train"]["source_documents"] == [0, len(train)]
        assert s["valid"]["source_documents"] == [len(train), k]


def test_document_crossing_the_limit_stays_in_train(tmp_path):
    docs = ["aaaa", "bbbb", "cccc", "dddd", "eeee"]  # 4 bytes each
    src = write_lines(tmp_path / "s.txt", docs)
    prepare(tmp_path / "o", 6 / MB, valid_size_mb=3 / MB, files=[src], progress=False)
    # train [0, 6): aaaa (0) and bbbb (4, crosses 6); valid [6, 9): cccc (8); dddd starts at 12: not read.
    assert read_split(tmp_path / "o", "train") == ["aaaa", "bbbb"]
    assert read_split(tmp_path / "o", "valid") == ["cccc"]


def test_valid_defaults_to_a_tenth_and_bytes_are_utf8(tmp_path):
    docs = ["ä" * 50] * 30  # 100 bytes each, 50 characters
    src = write_lines(tmp_path / "s.txt", docs)
    r = prepare(tmp_path / "o", 1000 / MB, files=[src], progress=False)
    assert r.stats["valid_size_mb"] == pytest.approx(100 / MB)
    assert r.stats["splits"]["train"]["documents"] == 10 and r.stats["splits"]["valid"]["documents"] == 1
    assert r.stats["splits"]["train"]["bytes"] == 1000


# ---------------------------------------------------------------------------------------- token shards
def test_shards_decode_to_the_documents_with_eos_after_each(tmp_path, docs, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    src = write_lines(tmp_path / "s.txt", docs)
    n = sum(map(nbytes, docs[:40]))
    r = prepare(tmp_path / "o", n / MB, valid_size_mb=1500 / MB, files=[src], tokenizer=tok_dir, block_size=16,
                max_shard_tokens=300, progress=False, seed=7)
    eos = tok.eos_token_id
    for split in ("train", "valid"):
        texts = read_split(r.path, split)
        shards = r.shards(split)
        ids = shards.read(0, len(shards))
        assert len(shards.index.shards) > 1 or split == "valid"  # several shards, read as one array
        assert ids[-1] == eos and int((ids == eos).sum()) == len(texts)  # EOS only as separators
        cuts = np.flatnonzero(ids == eos)
        pieces = np.split(ids, cuts + 1)[:-1]
        assert [tok.decode(p[:-1].tolist(), clean_up_tokenization_spaces=False) for p in pieces] == texts
        # Same ids as the tokenizer itself (no special tokens added), document by document.
        assert [p[:-1].tolist() for p in pieces] == [
            tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] for t in texts
        ]
        idx = shards.index
        assert idx.dtype == "uint16" and idx.eos_token_id == eos and idx.block_size == 16
        assert idx.num_documents == len(texts) and idx.num_bytes == sum(map(nbytes, texts))
        assert idx.tokenizer_hash == tokenizer_fingerprint(tok) and idx.vocab_size == len(tok)
        shards.check_tokenizer(tok)
        st_ = r.stats["splits"][split]
        assert st_["tokens"] == len(shards) == idx.num_tokens
        assert st_["text_tokens"] == len(shards) - len(texts)
        assert st_["tokens_per_byte"] == pytest.approx(st_["text_tokens"] / st_["bytes"], rel=1e-5)
        assert st_["blocks"] == len(shards) // 16 == shards.num_blocks(16)
        assert np.array_equal(shards.block(1, 16), ids[16:32])
    stats = json.loads((r.path / "stats.json").read_text())
    assert stats["tokenizer"]["hash"] == tokenizer_fingerprint(tok)
    assert stats["tokenizer"]["name"] == str(tok_dir) and stats["tokenizer"]["dtype"] == "uint16"
    assert stats["tokenizer"]["piece_cache"] is True  # on by default for byte-level BPE
    assert stats["seed"] == 7 and stats["source"]["type"] == "files"
    assert stats["source"]["files"] == [str(src)] and stats["block_size"] == 16
    assert set(stats["skipped"]) == {"empty", "invalid_utf8", "malformed"}
    assert not list(r.path.rglob(".*"))  # no owner file, no temporaries


def test_large_vocabulary_uses_uint32(tmp_path, big_tok_dir):
    src = write_lines(tmp_path / "s.txt", ["hallo welt", "zweites dokument"])
    r = prepare(tmp_path / "o", 12 / MB, valid_size_mb=1 / MB, files=[src], tokenizer=big_tok_dir, progress=False)
    s = r.shards("train")
    assert s.index.dtype == "uint32" and s.index.eos_token_id == 70_000
    assert s.read(0, len(s))[-1] == 70_000
    assert (r.path / "tokens" / "train" / "00000.bin").stat().st_size == 4 * len(s)


@pytest.mark.parametrize("parallelism,piece_cache", [("processes", True), ("threads", False)])
def test_num_proc_1_and_2_write_identical_files(tmp_path, docs, tok_dir, monkeypatch, parallelism, piece_cache):
    monkeypatch.setattr(prepare_mod, "CHUNK_BYTES", 500)  # many chunks in flight through the worker pool
    src = write_lines(tmp_path / "s.txt", docs * 3)
    outs = []
    for p in (1, 2):
        out = tmp_path / f"o{p}"
        r = prepare(out, 6000 / MB, valid_size_mb=2000 / MB, files=[src], tokenizer=tok_dir, num_proc=p,
                    max_shard_tokens=700, progress=False, parallelism=parallelism, piece_cache=piece_cache)
        assert r.stats["run"]["parallelism"] == ("serial" if p == 1 else parallelism)
        outs.append(out)
    files = sorted(f.relative_to(outs[0]) for f in outs[0].rglob("*") if f.is_file() and f.name != "stats.json")
    assert len([f for f in files if f.suffix == ".bin"]) > 2
    assert files == sorted(f.relative_to(outs[1]) for f in outs[1].rglob("*") if f.is_file() and f.name != "stats.json")
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def test_piece_cache_on_and_off_write_identical_shards(tmp_path, docs, tok_dir):
    src = write_lines(tmp_path / "s.txt", docs)
    a = prepare(tmp_path / "a", 3000 / MB, files=[src], tokenizer=tok_dir, progress=False, num_proc=1,
                piece_cache=True)
    b = prepare(tmp_path / "b", 3000 / MB, files=[src], tokenizer=tok_dir, progress=False, num_proc=1,
                piece_cache=False)
    assert a.stats["tokenizer"]["piece_cache"] and not b.stats["tokenizer"]["piece_cache"]
    for split in ("train", "valid"):
        assert (a.path / "tokens" / split / "00000.bin").read_bytes() == (b.path / "tokens" / split / "00000.bin").read_bytes()


def test_shard_writer_rolls_over_and_index_comes_last(tmp_path):
    w = ShardWriter(tmp_path / "t", dtype="uint16", tokenizer_name="t", tokenizer_hash="h", vocab_size=10,
                    eos_token_id=0, max_shard_tokens=4)
    w.write(np.arange(1, 7))
    w.write(np.array([7, 0], dtype=np.int64))
    assert not (tmp_path / "t" / "index.json").exists()  # incomplete: readers do not see it
    with pytest.raises(Exception):
        TokenShards(tmp_path, "t")
    w.finish(num_documents=1, num_bytes=9)
    s = TokenShards(tmp_path, "t")
    assert [x.num_tokens for x in s.index.shards] == [4, 4]
    assert s.read(0, 8).tolist() == [1, 2, 3, 4, 5, 6, 7, 0]
    with pytest.raises(ValueError):
        ShardWriter(tmp_path / "u", dtype="uint16", tokenizer_name="t", tokenizer_hash="h", vocab_size=10,
                    eos_token_id=0).write(np.array([70_000]))


# ------------------------------------------------------------------------- the piece cache is exact
def _tokenizers(german_lines):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    from clp_transfer.tiny import train_tokenizer

    def bpe(pre, normalizer=None):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre
        if normalizer is not None:
            tok.normalizer = normalizer
        trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(german_lines, trainer=trainer)
        return tok.to_str()

    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return {
        "gpt2": train_tokenizer(german_lines, 350, "bpe").backend_tokenizer.to_str(),
        "llama3": bpe(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"), bl])),
        "digits": bpe(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])),
        "nfc": bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), normalizers.NFC()),
        "gaps": bpe(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{L}+"), "isolated"), bl])),
        "sentencepiece": train_tokenizer(german_lines, 350, "sentencepiece").backend_tokenizer.to_str(),
        "wordpiece": train_tokenizer(german_lines, 350, "wordpiece").backend_tokenizer.to_str(),
    }


@pytest.fixture(scope="module")
def encoder_pairs(german_lines):
    pairs = {}
    for name, tj in _tokenizers(german_lines).items():
        patterns, nfc, _ = plan_piece_cache(tj, True)
        pairs[name] = (
            Encoder(EncoderSpec(tj, 0, "uint16", True, patterns, nfc, max_cached_pieces=300, bypass_new_fraction=1.0)),
            Encoder(EncoderSpec(tj, 0, "uint16", True, None, nfc)),
        )
    return pairs


def test_piece_cache_plans(encoder_pairs):
    planned = {name: cached.cache_enabled for name, (cached, _) in encoder_pairs.items()}
    assert planned == {"gpt2": True, "llama3": True, "digits": True, "nfc": True, "gaps": True,
                       "sentencepiece": False, "wordpiece": False}
    assert encoder_pairs["gpt2"][0].spec.split_patterns == (GPT2_PATTERN,)
    assert plan_piece_cache(json.dumps({"normalizer": None, "pre_tokenizer": {
        "type": "Split", "pattern": {"Regex": r"(?<=a)b"}, "behavior": "Isolated", "invert": False}}), True)[0] is None


tricky = st.sampled_from(
    list("ab xyzÄöü'sStTdDmMlLrRvV123 \n\t\r.,!?-_()\u00a0\u2009\u3000\u200b\u0301e\u00e9\u4e2d\u0660\u00b2\u2160\x1c\x85")
    + ["<|endoftext|>", "  ", "'s", "'ll", " 's", "\r\n", " \n ", "Straße", "😀", "\U000e0001"]
)
tricky_text = st.lists(tricky, min_size=1, max_size=20).map("".join)
texts = st.lists(st.one_of(tricky_text, st.text(min_size=1, max_size=20)), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=texts)
def test_piece_cache_gives_the_backend_ids(encoder_pairs, batch):
    for name, (cached, backend) in encoder_pairs.items():
        got, want = cached.encode(batch), backend.encode(batch)
        assert got.tolist() == want.tolist(), (name, batch)


def test_piece_cache_on_real_text_and_cache_resets(encoder_pairs, german_lines):
    cached, backend = encoder_pairs["gpt2"]
    lines = german_lines * 3
    for i in range(0, len(lines), 17):
        assert cached.encode(lines[i : i + 17]).tolist() == backend.encode(lines[i : i + 17]).tolist()
    assert cached.stats["cache_resets"] > 0 and cached.stats["cached_docs"] > 0


def test_piece_cache_sends_text_that_never_repeats_to_the_backend(tok_dir):
    from tokenizers import Tokenizer

    tj = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json")).to_str()
    patterns, nfc, _ = plan_piece_cache(tj, True)
    assert patterns is not None
    rng = np.random.default_rng(0)
    words = ["".join(chr(c) for c in rng.integers(97, 123, size=8)) for _ in range(400)]
    random_docs = [" ".join(words[i : i + 20]) for i in range(0, 400, 20)]  # every word new
    natural = ["der Hund und die Katze und der Hund"] * 20  # two new words in three
    enc = Encoder(EncoderSpec(tj, 0, "uint16", True, patterns, nfc, bypass_after_chunks=0))
    ref = Encoder(EncoderSpec(tj, 0, "uint16", True, None, nfc))
    assert enc.encode(random_docs).tolist() == ref.encode(random_docs).tolist()
    assert enc.stats["bypassed_chunks"] == 1 and enc.stats["cached_docs"] == 0
    assert len(enc._units) == 1  # nothing learned from it (only the EOS entry)
    assert enc.encode(natural).tolist() == ref.encode(natural).tolist()
    assert enc.stats["bypassed_chunks"] == 1 and enc.stats["cached_docs"] == 20
    # by default the first two chunks teach the cache (a cold cache must be able to warm up) unless nearly
    # every word is new
    warm = Encoder(EncoderSpec(tj, 0, "uint16", True, patterns, nfc))
    assert warm.encode(random_docs).tolist() == ref.encode(random_docs).tolist()
    assert warm.stats["bypassed_chunks"] == 1 and len(warm._units) == 1  # all new: not learned
    common = words[:30]
    fresh = iter(["".join(chr(c) for c in rng.integers(97, 123, size=9)) for _ in range(3 * 160)])
    for expect_bypassed in (1, 1, 2):  # 12 common + 8 fresh words per document: ~40-48% new per chunk
        batch = [" ".join([common[(i + j) % 30] for j in range(12)] + [next(fresh) for _ in range(8)])
                 for i in range(20)]
        assert warm.encode(batch).tolist() == ref.encode(batch).tolist()
        assert warm.stats["bypassed_chunks"] == expect_bypassed


# ------------------------------------------------------------------------------------------- input formats
def test_every_input_format_gives_the_same_documents(tmp_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    d = tmp_path / "in"
    d.mkdir()
    k = 8
    part = [docs[i * k : (i + 1) * k] for i in range(6)]
    write_lines(d / "a.txt", part[0])
    (d / "b.txt.gz").write_bytes(gzip.compress("\n\n".join(part[1]).encode()))  # paragraphs, see below
    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(part[2])))
    (d / "d.json.xz").write_bytes(lzma.compress(json.dumps([{"text": t} for t in part[3]]).encode()))
    pq.write_table(pa.table({"id": list(range(k)), "text": part[4]}), d / "e.parquet")
    (d / "f.jsonl.bz2").write_bytes(bz2.compress(jsonl_bytes(part[5])))
    (d / "notes.md").write_text("ignored: not a supported suffix")
    all_docs = [x for p in part for x in p]

    # Paragraph mode: every file is paragraphs; the one-per-line file becomes a single paragraph then.
    for spec, fmt, expected in [
        ([str(d)], "lines", all_docs),  # blank lines between b.txt.gz's paragraphs are not documents
        ([str(d / "b.txt.gz")], "paragraphs", part[1]),
        ([str(d / "*.json*")], "lines", part[2] + part[3] + part[5]),
        ([str(d / "e.parquet"), str(d / "a.txt")], "lines", part[4] + part[0]),
    ]:
        out = tmp_path / f"o-{len(list(tmp_path.iterdir()))}"
        r = prepare(out, 10.0, files=spec, txt_format=fmt, progress=False)
        assert read_split(out, "train") == expected, spec
        assert r.stats["source_exhausted"] is True


def test_paragraphs_keep_inner_newlines_and_crlf_and_bom_are_dropped(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfeins\r\nzwei\r\n\r\n \n\ndrei\n")
    prepare(tmp_path / "o", 1.0, files=[tmp_path / "p.txt"], txt_format="paragraphs", progress=False)
    assert read_split(tmp_path / "o", "train") == ["eins\nzwei", "drei"]
    (tmp_path / "l.txt").write_bytes(b"\xef\xbb\xbfeins\r\n\r\nzwei\n   \n")
    r = prepare(tmp_path / "o2", 1.0, files=[tmp_path / "l.txt"], progress=False)
    assert read_split(tmp_path / "o2", "train") == ["eins", "zwei"]
    assert r.stats["skipped"]["empty"] == 2


def test_hub_code_path_streams_a_local_dataset_directory(tmp_path, docs):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "train.jsonl").write_bytes(jsonl_bytes(docs, key="content"))
    n = sum(map(nbytes, docs[:10]))
    r = prepare(tmp_path / "o", n / MB, valid_size_mb=1 / MB, dataset_name=str(ds), text_column="content",
                progress=False)
    assert read_split(r.path, "train") == docs[:10] and read_split(r.path, "valid") == docs[10:11]
    assert r.stats["source"] == {"type": "hub", "dataset_name": str(ds), "dataset_config_name": None,
                                 "split": "train", "text_column": "content", "streaming": True}


def _parquet_conversion(root: Path, config_docs: dict[str, list[str]], split_dir: str, shard_docs: int) -> Path:
    """The hub's refs/convert/parquet layout: <config>/<split_dir>/NNNN.parquet, OSCAR's columns (id, text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for config, texts in config_docs.items():
        d = root / config / split_dir
        d.mkdir(parents=True)
        for k, start in enumerate(range(0, len(texts), shard_docs)):
            part = texts[start:start + shard_docs]
            table = pa.table({"id": list(range(start, start + len(part))), "text": part})
            pq.write_table(table, d / f"{k:04d}.parquet")
    return root


def _refuse_scripts(monkeypatch, served: Path | None, calls: list) -> None:
    """datasets as it behaves for the seed's `oscar` on the hub: the script is refused; the parquet revision is
    served from ``served`` (a local copy of the conversion's layout), or fails like a missing branch."""
    import datasets

    from clp_transfer.data import sources as prepare_sources

    real = datasets.load_dataset

    def fake(path, name=None, **kw):
        calls.append((path, name, dict(kw)))
        if kw.get("revision") != prepare_sources.PARQUET_REVISION:
            raise RuntimeError("Dataset scripts are no longer supported, but found oscar.py")
        if served is None:
            raise FileNotFoundError("Revision 'refs/convert/parquet' does not exist for dataset 'oscar'")
        kw.pop("revision")
        return real(str(served), name, **kw)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(prepare_sources, "hub_unreachable", lambda timeout=5.0: None)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("split_dir", ["partial-train", "train"])
def test_script_dataset_falls_back_to_the_parquet_conversion(tmp_path, docs, monkeypatch, caplog, split_dir):
    english = [f"English document {i}." for i in range(30)]
    served = _parquet_conversion(tmp_path / "conv", {"unshuffled_deduplicated_de": docs,
                                                     "unshuffled_deduplicated_en": english}, split_dir, 7)
    calls: list = []
    _refuse_scripts(monkeypatch, served, calls)
    n = sum(map(nbytes, docs[:12]))
    m = sum(map(nbytes, docs[12:20]))
    r = prepare(tmp_path / "o", n / MB, valid_size_mb=m / MB, dataset_name="oscar",
                dataset_config_name="unshuffled_deduplicated_de", progress=False)
    # the same first-N / next-M documents, in order, across shard files, from the config's directory only
    assert read_split(r.path, "train") == docs[:12] and read_split(r.path, "valid") == docs[12:20]
    assert calls[0] == ("oscar", "unshuffled_deduplicated_de", {"split": "train", "streaming": True})
    assert calls[1][2] == {"data_dir": "unshuffled_deduplicated_de", "split": "train",
                           "revision": "refs/convert/parquet", "streaming": True}
    assert r.stats["source"]["revision"] == "refs/convert/parquet"
    assert r.stats["source"]["data_dir"] == "unshuffled_deduplicated_de"
    assert "parquet conversion" in caplog.text


def test_parquet_conversion_that_ends_early_warns(tmp_path, docs, monkeypatch, caplog):
    served = _parquet_conversion(tmp_path / "conv", {"unshuffled_deduplicated_de": docs[:5]}, "partial-train", 2)
    _refuse_scripts(monkeypatch, served, [])
    r = prepare(tmp_path / "o", 1.0, dataset_name="oscar", dataset_config_name="unshuffled_deduplicated_de",
                progress=False)
    assert read_split(r.path, "train") == docs[:5] and r.stats["source_exhausted"]
    assert "holds only the first part" in caplog.text and "--files" in caplog.text


def test_script_dataset_without_a_conversion_says_what_to_do(tmp_path, monkeypatch, capsys):
    _refuse_scripts(monkeypatch, None, [])
    assert run("--dataset_name", "oscar", "--dataset_config_name", "unshuffled_deduplicated_de",
               "--output_dir", str(tmp_path / "out"), "--subsample_size_mb", "4096") == 2
    err = capsys.readouterr().err
    assert "loading script" in err and "refs/convert/parquet" in err and "does not exist" in err
    assert "--files" in err and "datasets<3" in err
    assert "oscar/tree/refs%2Fconvert%2Fparquet/unshuffled_deduplicated_de" in err
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------------------------- bad input
def assert_nothing_written(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_empty_input_fails(tmp_path, caplog):
    (tmp_path / "e.txt").write_text("\n \n")
    assert run("--files", str(tmp_path / "e.txt"), "--output_dir", str(tmp_path / "out"),
               "--subsample_size_mb", "1") == 2
    assert_nothing_written(tmp_path)


def test_missing_column_fails(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(["x"], key="content"))
    assert run("--files", str(tmp_path / "a.jsonl"), "--output_dir", str(tmp_path / "out"),
               "--subsample_size_mb", "1") == 2
    assert "no column 'text'" in capsys.readouterr().err
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    assert run("--files", str(tmp_path / "b.parquet"), "--output_dir", str(tmp_path / "out"),
               "--subsample_size_mb", "1") == 2
    assert "'body'" in capsys.readouterr().err
    assert_nothing_written(tmp_path)


def test_invalid_utf8_is_skipped_and_counted_or_fails_with_strict(tmp_path, capsys):
    (tmp_path / "b.txt").write_bytes(b"gut\n\xff\xfe kaputt\nauch gut\n")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n{"text": "\\ud800"}\nnot json\n')
    assert run("--files", str(tmp_path / "b.txt"), "--output_dir", str(tmp_path / "out"),
               "--subsample_size_mb", "1", "--strict") == 2
    assert "not valid UTF-8" in capsys.readouterr().err
    assert_nothing_written(tmp_path)
    assert run("--files", str(tmp_path / "b.txt"), str(tmp_path / "b.jsonl"), "--output_dir", str(tmp_path / "out"),
               "--subsample_size_mb", "1") == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["skipped"] == {"empty": 0, "invalid_utf8": 3, "malformed": 1}
    assert read_split(tmp_path / "out", "train") == ["gut", "auch gut", "ok"]


def test_subsample_larger_than_source_warns_with_sizes(tmp_path, caplog):
    write_lines(tmp_path / "s.txt", ["x" * 100] * 3)
    with caplog.at_level("WARNING"):
        assert run("--files", str(tmp_path / "s.txt"), "--output_dir", str(tmp_path / "out"),
                   "--subsample_size_mb", "2") == 0
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "source ended" in msg and "2.000 MB asked" in msg and "EMPTY" in msg
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["source_exhausted"] is True and stats["splits"]["train"]["bytes"] == 300


def test_existing_output_needs_overwrite(tmp_path, capsys):
    src = write_lines(tmp_path / "s.txt", ["eins", "zwei"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    args = ["--files", str(src), "--output_dir", str(tmp_path / "out"), "--subsample_size_mb", "1"]
    assert run(*args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert run(*args, "--overwrite") == 0
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "stats.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--tokenizer", "does/not/exist"], "does not exist"),
    (["--tokenizer", "./nope"], "does not exist"),
    (["--block_size", "128"], "--block_size needs --tokenizer"),
    (["--dataset_name", "oscar"], "exactly one source"),
    (["--valid_size_mb", "-1"], "--valid_size_mb must be >= 0"),
])
def test_bad_flags_fail_clearly(tmp_path, capsys, extra, message):
    src = write_lines(tmp_path / "s.txt", ["eins"])
    assert run("--files", str(src), "--output_dir", str(tmp_path / "out"), "--subsample_size_mb", "1", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert_nothing_written(tmp_path)


def test_missing_inputs_fail_clearly(tmp_path, capsys):
    assert run("--files", str(tmp_path / "nope.txt"), "--output_dir", str(tmp_path / "out"),
               "--subsample_size_mb", "1") == 2
    assert "does not exist" in capsys.readouterr().err
    assert run("--files", str(tmp_path / "*.jsonl"), "--output_dir", str(tmp_path / "out"),
               "--subsample_size_mb", "1") == 2
    assert "no supported files match" in capsys.readouterr().err
    (tmp_path / "x.csv").write_text("a,b\n")
    assert run("--files", str(tmp_path / "x.csv"), "--output_dir", str(tmp_path / "out"),
               "--subsample_size_mb", "1") == 2
    assert "unsupported file type" in capsys.readouterr().err
    assert run("--output_dir", str(tmp_path / "out"), "--files", str(tmp_path / "x.csv")) == 2
    assert "missing required flags: --subsample_size_mb" in capsys.readouterr().err
    assert_nothing_written(tmp_path)


def test_hub_dataset_offline_fails_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert run("--dataset_name", "oscar", "--dataset_config_name", "unshuffled_deduplicated_de",
               "--output_dir", str(tmp_path / "out"), "--subsample_size_mb", "4096") == 2
    err = capsys.readouterr().err
    assert "cannot stream dataset 'oscar'" in err and "--files" in err
    assert_nothing_written(tmp_path)


# -------------------------------------------------------------------------------- interruption and restart
def test_interrupted_run_leaves_nothing_and_restart_cleans_up(tmp_path, docs, tok_dir, monkeypatch):
    src = write_lines(tmp_path / "s.txt", docs)
    args = ["--files", str(src), "--output_dir", str(tmp_path / "out"), "--subsample_size_mb", "0.002",
            "--tokenizer", str(tok_dir), "--num_proc", "1"]
    monkeypatch.setattr(prepare_mod, "CHUNK_BYTES", 200)
    calls = {"n": 0}
    original = ShardWriter.write

    def flaky(self, ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, ids)

    monkeypatch.setattr(ShardWriter, "write", flaky)
    assert run(*args) == 130
    assert_nothing_written(tmp_path)
    monkeypatch.setattr(ShardWriter, "write", original)

    # A run killed hard (no cleanup) leaves a temporary directory whose owner is gone: the next run removes it.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / ".out.tmp-deadbeef"
    stale.mkdir()
    (stale / "train.jsonl").write_text('{"text": "half"}\n')
    (stale / ".prepare-owner.json").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    assert run(*args) == 0
    assert not stale.exists() and (tmp_path / "out" / "stats.json").is_file()


def test_yaml_configs_mirror_the_dataclass():
    from clp_transfer.config import from_dict, load_yaml

    files = sorted((REPO / "configs" / "prepare").glob("*.yaml"))
    assert files
    for f in files:
        cfg = from_dict(PrepareConfig, load_yaml(f), where=str(f))
        assert cfg.subsample_size_mb > 0
    seed = from_dict(PrepareConfig, load_yaml(REPO / "configs" / "prepare" / "oscar_de.yaml"))
    assert (seed.dataset_name, seed.subsample_size_mb, seed.valid_size_mb) == ("oscar", 4096, 409.6)


# ---------------------------------------------------------------------------------------- the seed command
def _shim(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "prepare.py", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=120)


def test_seed_command_runs_on_local_files(tmp_path, docs, tok_dir):
    src = write_lines(tmp_path / "s.txt", docs)
    out = tmp_path / "oscar_de"
    # The seed's flag style (--flag=value), local files instead of the hub, tokenized by 2 worker processes.
    r = _shim(f"--files={src}", f"--output_dir={out}", "--subsample_size_mb=0.002", f"--tokenizer={tok_dir}",
              "--num_proc=2", "--block_size=16")
    assert r.returncode == 0, r.stderr
    n = round(0.002 * MB)
    train, valid = read_split(out, "train"), read_split(out, "valid")
    assert (train, valid) == expected_split(docs, n, round(0.0002 * MB))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["train"]["documents"] == len(train) and stats["run"]["num_proc"] == 2
    shards = TokenShards(out, "train")
    assert shards.index.num_documents == len(train)
    assert int((shards.read(0, len(shards)) == shards.index.eos_token_id).sum()) == len(train)


def test_seed_command_as_written_fails_clearly_offline(tmp_path):
    r = _shim("--dataset_name=oscar", "--dataset_config_name=unshuffled_deduplicated_de",
              f"--output_dir={tmp_path / 'oscar_de'}", "--subsample_size_mb=4096")
    assert r.returncode == 2
    assert "cannot stream dataset 'oscar'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "oscar_de").exists()


# ------------------------------------------------------------------------------ the block reader of .txt lines
def _reference_txt_lines(data: bytes) -> tuple[list[tuple[str, int]], int, int]:
    """The plain line-by-line reading rule: (documents, empty lines, invalid lines)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline ends the last line; it does not start an empty one
    docs, empty, invalid = [], 0, 0
    for raw in lines:
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            invalid += 1
            continue
        if not text or text.isspace():
            empty += 1
        else:
            docs.append((text, len(raw)))
    return docs, empty, invalid


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(st.sampled_from(["Haus", "Straße", " ", "\n", "\r\n", "\t", "ä€😀", "x" * 7, "\xff", "\r"]),
                   max_size=40),
    bom=st.booleans(),
    block=st.sampled_from([1, 2, 3, 5, 8, 64, 1 << 22]),
)
def test_txt_lines_block_reader_matches_line_by_line(tmp_path, monkeypatch, parts, bom, block):
    from clp_transfer.data import sources as prepare_sources
    from clp_transfer.data.sources import SkipCounts, file_documents

    data = (b"\xef\xbb\xbf" if bom else b"") + b"".join(
        b"\xff\xfe" if p == "\xff" else p.encode("utf-8") for p in parts)
    path = tmp_path / f"b{block}.txt"
    path.write_bytes(data)
    monkeypatch.setattr(prepare_sources, "_BLOCK_BYTES", block)
    counts = SkipCounts()
    got = list(file_documents(path, "text", "lines", counts, strict=False))
    want, empty, invalid = _reference_txt_lines(data)
    assert got == want
    assert counts.empty == empty and counts.invalid_utf8 == invalid


def test_use_rust_threads_sizes_the_pool_and_warns_when_parallelism_is_off(monkeypatch, caplog):
    from clp_transfer.data.encode import use_rust_threads

    for name in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(name, "x")  # so that monkeypatch restores the original state afterwards
        monkeypatch.delenv(name)
    use_rust_threads(3)
    assert os.environ["RAYON_NUM_THREADS"] == "3" and "TOKENIZERS_PARALLELISM" not in os.environ
    use_rust_threads(5)
    assert os.environ["RAYON_NUM_THREADS"] == "3"  # the user's (or first) setting is kept
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with caplog.at_level("WARNING"):
        use_rust_threads(2)
    assert "runs on one thread" in caplog.text
