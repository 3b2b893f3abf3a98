"""``prepare``: the pretraining corpus -> a train/valid split in order -> packed token shards.

The seed's first step, made fast and safe at scale::

    clp-transfer prepare --dataset_name oscar --dataset_config_name unshuffled_deduplicated_de \\
        --output_dir data/oscar_de --subsample_size_mb 4096 --tokenizer path/to/tokenizer

Split rule. Sizes count the UTF-8 bytes of the documents' text (1 MB = 2**20 bytes; separators, skipped
documents and JSON syntax are not counted). Lay the kept documents end to end in source order: a document
belongs to the split in which its *first byte* falls, train = [0, N), valid = [N, N + M), with
N = ``subsample_size_mb`` and M = ``valid_size_mb`` (default N / 10). So the document that crosses N stays in
train, train is the shortest prefix of documents holding at least N bytes, train + valid is the shortest prefix
holding at least N + M bytes, valid is what follows train in that prefix, and nothing is shuffled.

Outputs (``output_dir``, written to a temporary sibling and renamed into place when complete):

- ``train.jsonl``, ``valid.jsonl``: the documents, one ``{"text": ...}`` per line;
- with ``--tokenizer``: ``tokens/<split>/index.json`` + ``NNNNN.bin`` (:mod:`clp_transfer.data.shards`), the ids of
  every document followed by EOS, uint16 when the vocabulary fits, else uint32;
- ``stats.json``: documents, bytes, tokens and tokens per byte per split, tokenizer name and hash, source, seed.

Tokenization works on chunks of about 1 MB with a bounded number of chunks in flight, and the results are
written in order, so the output does not depend on ``num_proc`` and memory does not grow with the corpus.
By default (``--parallelism processes``) ``num_proc`` single-threaded worker processes each encode a whole
chunk: an exact word cache first (:mod:`clp_transfer.data.encode`; byte-level BPE tokenizers), then the
Rust tokenizer (``encode_batch_fast``, no offsets) for what it does not hold. ``--parallelism threads`` keeps
everything in one process: a background thread hands each chunk to the Rust tokenizer, which splits it over
``num_proc`` threads of its own pool and releases the GIL meanwhile, while the main thread reads and writes
(no worker start-up, less memory, but on 2 cores measured slower, and the word cache's Python code then
competes for the GIL).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from .. import __version__
from ..atomic import atomic_directory, check_disjoint, check_output_path, claim_output
from ..config import add_dataclass_arguments, build_config, require_flags, text_flag
from ..errors import ClpError
from .sources import FileSource, HubSource, SkipCounts, hub_offline, hub_unreachable, resolve_files
from .encode import EncoderSpec, plan_piece_cache
from .shards import ShardWriter, TokenShards, dtype_for_vocab, tokenizer_fingerprint

log = logging.getLogger(__name__)

MB = 2**20
SPLITS = ("train", "valid")
STATS_NAME = "stats.json"
STATS_FORMAT = "clp-transfer-prepare"
CHUNK_BYTES = 1 << 20
SPLIT_RULE = (
    "documents in source order; a document belongs to the split in which its first byte falls on the axis of "
    "concatenated UTF-8 text bytes: train [0, N), valid [N, N+M); the document crossing N stays in train"
)


@text_flag("files")
@dataclass
class PrepareConfig:
    """Everything ``clp-transfer prepare`` takes."""

    output_dir: str
    """Output directory: train.jsonl, valid.jsonl, stats.json and (with --tokenizer) tokens/<split>/."""
    subsample_size_mb: float
    """Training split size in MB of UTF-8 document text (1 MB = 2**20 bytes): whole documents are taken in
    source order until they hold at least this much (the document that crosses the limit stays in train)."""
    valid_size_mb: float | None = None
    """Validation split size in MB, taken from the documents right after the training split
    (default: a tenth of --subsample_size_mb)."""
    dataset_name: str | None = None
    """Dataset on the Hugging Face Hub (or a local dataset directory), streamed with datasets: nothing is
    downloaded in full. Needs network access for hub names. A script dataset (which datasets >= 3 refuses) is
    read from the hub's parquet conversion (revision refs/convert/parquet)."""
    dataset_config_name: str | None = None
    """Configuration of --dataset_name, e.g. unshuffled_deduplicated_de."""
    dataset_split: str = "train"
    """Split of --dataset_name to read."""
    files: list[str] = field(default_factory=list)
    """Local inputs instead of a hub dataset: files, directories or glob patterns of .txt, .jsonl, .json,
    .parquet, each optionally .gz/.bz2/.xz/.zst. Read in the order given; directories and globs in sorted
    path order."""
    txt_format: Literal["lines", "paragraphs"] = "lines"
    """How .txt files hold documents: one per line, or paragraphs separated by blank lines."""
    text_column: str = "text"
    """Column (JSON key) that holds the text in .jsonl/.json/.parquet files and hub datasets."""
    tokenizer: str | None = None
    """Tokenizer directory (AutoTokenizer.from_pretrained; a hub id needs network). Without it only the raw
    split is written."""
    block_size: int | None = None
    """Training block size, recorded in the shard index and stats (blocks per split); needs --tokenizer."""
    num_proc: int | None = None
    """Tokenizer threads or processes (default: all CPU cores available)."""
    parallelism: Literal["auto", "threads", "processes"] = "auto"
    """How num_proc > 1 is used. threads: the Rust tokenizer's own thread pool encodes each chunk while the
    main thread reads and writes (no worker start-up). processes: single-threaded worker processes.
    auto: processes (measured faster on 2 cores; threads use ~140 MB less memory; the piece cache's Python
    code would hold the GIL in threads)."""
    seed: int = 42
    """Recorded in stats.json for the pipeline's records; the split itself is deterministic and not shuffled."""
    strict: bool = False
    """Fail on a document that is not valid UTF-8 or a JSON line that does not parse, instead of skipping and
    counting it."""
    split_special_tokens: bool = True
    """Tokenize text that spells a special token (e.g. '<|endoftext|>') as plain text, so that only the
    separators written by prepare are EOS ids."""
    piece_cache: bool = True
    """An exact word/piece cache in front of the Rust tokenizer, for byte-level BPE tokenizers (GPT-2, Pythia,
    Llama 3, SmolLM, ...; others use the Rust tokenizer alone). The ids are identical either way (checked, see
    prepare_tokenize). Natural text repeats its words, so most of them are looked up instead of tokenized;
    chunks of text that hardly repeats (over 30% new words) go straight to the Rust tokenizer.
    benchmarks/README.md has the measurements; --no-piece_cache turns it off."""
    piece_cache_entries: int = 500_000
    """Entries (words and pieces) of the piece cache per worker, about 200 bytes each; starts over when full."""
    max_shard_tokens: int = 2**27
    """Ids per shard file."""
    overwrite: bool = False
    """Replace an existing output directory (the old one stays until the new one is complete)."""
    trust_remote_code: bool = False
    """Allow tokenizers whose code lives in their repository."""
    progress: bool = True
    """Show a progress bar (MB and tokens) on stderr."""


@dataclass
class PrepareResult:
    """What :func:`prepare` returns: where the data is, and its stats."""

    path: Path
    stats: dict[str, Any]

    def shards(self, split: str = "train") -> TokenShards:
        return TokenShards(self.path, split)

    def documents(self, split: str = "train") -> Iterator[str]:
        with open(self.path / f"{split}.jsonl", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


@dataclass
class _TokenizerInfo:
    name: str
    hash: str
    vocab_size: int
    eos_token_id: int
    dtype: str
    spec: EncoderSpec
    piece_cache_reason: str


# ------------------------------------------------------------------------------------------------ tokenizer
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_tokenizer_info(cfg: PrepareConfig) -> _TokenizerInfo:
    """Load ``cfg.tokenizer`` with AutoTokenizer and describe what the workers need."""
    name = str(cfg.tokenizer)
    path = Path(name).expanduser()
    if not path.exists():
        if not _HUB_ID.match(name) or name.startswith((".", "~")):
            raise ClpError(f"tokenizer path {name!r} does not exist; give a tokenizer directory (tokenizer.json ...)")
        reason = "offline mode is on (HF_HUB_OFFLINE)" if hub_offline() else hub_unreachable()
        if reason:
            raise ClpError(f"tokenizer {name!r} is not a local directory, and the Hugging Face Hub cannot be "
                           f"reached to download it: {reason}. Give the path of a tokenizer directory")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else name,
                                            trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        where = "directory" if path.exists() else "path, and it is not a local directory or a reachable hub id"
        raise ClpError(f"cannot load tokenizer {name!r} ({where}): {type(e).__name__}: {e}") from e
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ClpError(
            f"tokenizer {name!r} has no fast (Rust) backend; prepare needs one. Convert it once with "
            "transformers (AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(dir))"
        )
    if tok.eos_token_id is None:
        raise ClpError(f"tokenizer {name!r} has no EOS token; prepare writes one after every document")
    vocab_size = max(len(tok), backend.get_vocab_size(with_added_tokens=True))
    dtype = dtype_for_vocab(vocab_size).name
    tokenizer_json = backend.to_str()
    patterns, nfc, reason = plan_piece_cache(tokenizer_json, cfg.split_special_tokens)
    if not cfg.piece_cache:
        patterns, reason = None, "off (--no-piece_cache)"
    spec = EncoderSpec(
        tokenizer_json=tokenizer_json, eos_token_id=int(tok.eos_token_id), dtype=dtype,
        split_special_tokens=cfg.split_special_tokens, split_patterns=patterns, nfc=nfc,
        max_cached_pieces=cfg.piece_cache_entries,
    )
    log.info("tokenizer %s: %d tokens, ids as %s, EOS %d, piece cache: %s", name, vocab_size, dtype,
             tok.eos_token_id, "on" if patterns else f"off ({reason})")
    return _TokenizerInfo(name=name, hash=tokenizer_fingerprint(tok), vocab_size=vocab_size,
                          eos_token_id=int(tok.eos_token_id), dtype=dtype, spec=spec, piece_cache_reason=reason)


# ------------------------------------------------------------------------------------------- tokenization
class _ChunkRunner:
    """Encodes chunks in order, with a bounded number in flight: in the calling thread (num_proc=1), in one
    background thread driving the Rust tokenizer's thread pool ("threads"), or in worker processes."""

    def __init__(self, spec: EncoderSpec, num_proc: int, mode: str = "threads") -> None:
        self.num_proc = num_proc
        self.mode = "serial" if num_proc <= 1 else mode
        self.pending: collections.deque = collections.deque()
        self.executor = None
        self.encoder = None
        if self.mode == "processes":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            from .encode import init_worker

            self.max_in_flight = 2 * num_proc + 1
            self.executor = ProcessPoolExecutor(
                max_workers=num_proc, mp_context=multiprocessing.get_context("spawn"),
                initializer=init_worker, initargs=(spec, os.getpid()),
            )
            return
        from .encode import Encoder, use_rust_threads

        if self.mode == "threads":
            from concurrent.futures import ThreadPoolExecutor

            # Before the first parallel encode of this process builds the pool (later calls keep its size).
            use_rust_threads(num_proc)
            # One chunk encoding, two waiting: enough to keep the pool busy while the main thread writes.
            self.max_in_flight = 3
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clp-tokenize")
        self.encoder = Encoder(spec)

    def submit(self, tag: Any, texts: list[str]) -> Iterator[tuple[Any, Any]]:
        """Queue a chunk; yield the chunks that are done, in submission order."""
        if self.mode == "serial":
            yield tag, self.encoder.encode(texts)  # type: ignore[union-attr]
            return
        if self.mode == "threads":
            fut = self.executor.submit(self.encoder.encode, texts)  # type: ignore[union-attr]
        else:
            from .encode import encode_in_worker

            fut = self.executor.submit(encode_in_worker, texts)  # type: ignore[union-attr]
        self.pending.append((tag, fut))
        while len(self.pending) >= self.max_in_flight:
            yield self._pop()

    def drain(self) -> Iterator[tuple[Any, Any]]:
        while self.pending:
            yield self._pop()

    def _pop(self) -> tuple[Any, Any]:
        from concurrent.futures.process import BrokenProcessPool

        tag, fut = self.pending.popleft()
        try:
            return tag, fut.result()
        except BrokenProcessPool as e:
            raise ClpError(f"a tokenizer worker process died ({e}); if memory ran out, lower --num_proc") from e

    def close(self, ok: bool) -> None:
        if self.executor is None:
            return
        if self.mode == "threads":
            for _, fut in self.pending:
                fut.cancel()
            self.executor.shutdown(wait=True)  # a chunk being encoded cannot be interrupted; wait for it
            return
        if ok:
            self.executor.shutdown(wait=True)
            return
        for _, fut in self.pending:
            fut.cancel()
        procs = list(getattr(self.executor, "_processes", {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            with contextlib.suppress(Exception):
                p.terminate()


# ----------------------------------------------------------------------------------------------- the run
def _validate(cfg: PrepareConfig) -> None:
    if bool(cfg.dataset_name) == bool(cfg.files):
        raise ClpError("give exactly one source: --dataset_name NAME (hub, streamed) or --files PATH... (local)")
    if cfg.dataset_config_name and not cfg.dataset_name:
        raise ClpError("--dataset_config_name needs --dataset_name")
    if not cfg.subsample_size_mb or cfg.subsample_size_mb <= 0:
        raise ClpError(f"--subsample_size_mb must be positive (got {cfg.subsample_size_mb})")
    if cfg.valid_size_mb is not None and cfg.valid_size_mb < 0:
        raise ClpError(f"--valid_size_mb must be >= 0 (got {cfg.valid_size_mb})")
    if cfg.num_proc is not None and cfg.num_proc < 1:
        raise ClpError(f"--num_proc must be >= 1 (got {cfg.num_proc})")
    if cfg.block_size is not None and cfg.block_size < 1:
        raise ClpError(f"--block_size must be >= 1 (got {cfg.block_size})")
    if cfg.block_size is not None and not cfg.tokenizer:
        raise ClpError("--block_size needs --tokenizer (blocks are counted in tokens)")
    if cfg.piece_cache_entries < 1000:
        raise ClpError(f"--piece_cache_entries must be >= 1000 (got {cfg.piece_cache_entries})")
    if cfg.max_shard_tokens < 1:
        raise ClpError(f"--max_shard_tokens must be >= 1 (got {cfg.max_shard_tokens})")
    if cfg.parallelism not in ("auto", "threads", "processes"):
        raise ClpError(f"--parallelism must be auto, threads or processes (got {cfg.parallelism!r})")
    if cfg.txt_format not in ("lines", "paragraphs"):
        raise ClpError(f"--txt_format must be 'lines' or 'paragraphs' (got {cfg.txt_format!r})")


def parallelism_mode(cfg: PrepareConfig, spec: EncoderSpec) -> str:
    """``threads`` or ``processes`` for ``cfg.parallelism``; see :class:`PrepareConfig`."""
    if cfg.parallelism != "auto":
        return cfg.parallelism
    return "processes"


def default_num_proc() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def run_prepare(cfg: PrepareConfig) -> PrepareResult:
    """Run the whole stage from a config; see the module docstring.

    The output is claimed first: refused when it exists (without --overwrite) or overlaps an input, and
    locked, so a second run on it fails at once and temporaries of killed runs are removed.
    """
    _validate(cfg)
    with claim_output(cfg.output_dir, cfg.overwrite, [*(cfg.files or []), cfg.tokenizer], "output directory"):
        return _run_prepare(cfg)


def _run_prepare(cfg: PrepareConfig) -> PrepareResult:
    out = check_output_path(cfg.output_dir, cfg.overwrite, "output directory")
    valid_mb = cfg.subsample_size_mb / 10 if cfg.valid_size_mb is None else cfg.valid_size_mb
    n_train = int(round(cfg.subsample_size_mb * MB))
    n_total = n_train + int(round(valid_mb * MB))
    num_proc = cfg.num_proc or default_num_proc()

    source: FileSource | HubSource
    if cfg.files:
        source = FileSource(resolve_files(list(cfg.files)), cfg.text_column, cfg.txt_format)
        check_disjoint(out, source.files, "output directory")  # what directories and globs expanded to
        source_info: dict[str, Any] = {
            "type": "files", "files": [str(f) for f in source.files], "txt_format": cfg.txt_format,
            "text_column": cfg.text_column,
        }
    else:
        source = HubSource(str(cfg.dataset_name), cfg.dataset_config_name, cfg.dataset_split, cfg.text_column)
        source_info = {
            "type": "hub", "dataset_name": cfg.dataset_name, "dataset_config_name": cfg.dataset_config_name,
            "split": cfg.dataset_split, "text_column": cfg.text_column, "streaming": True,
        }
    tok = load_tokenizer_info(cfg) if cfg.tokenizer else None
    if isinstance(source, HubSource):
        source.open()  # fail before anything is written
        if source.revision:  # a script dataset, read from the hub's parquet conversion
            source_info.update(revision=source.revision, data_dir=cfg.dataset_config_name or "default")

    t0 = time.perf_counter()
    with atomic_directory(out, overwrite=cfg.overwrite) as tmp:
        stats = _write_splits(cfg, source, tok, tmp, n_train, n_total, num_proc)
        elapsed = time.perf_counter() - t0
        total_bytes = sum(s["bytes"] for s in stats["splits"].values())
        total_tokens = sum(s.get("tokens", 0) for s in stats["splits"].values())
        stats = {
            "format": STATS_FORMAT,
            "version": 1,
            "clp_transfer_version": __version__,
            "source": source_info,
            "seed": cfg.seed,
            "subsample_size_mb": cfg.subsample_size_mb,
            "valid_size_mb": valid_mb,
            "bytes_per_mb": MB,
            "split_rule": SPLIT_RULE,
            **stats,
            "tokenizer": None if tok is None else {
                "name": tok.name, "hash": tok.hash, "vocab_size": tok.vocab_size, "eos_token_id": tok.eos_token_id,
                "dtype": tok.dtype, "split_special_tokens": cfg.split_special_tokens,
                "piece_cache": tok.spec.split_patterns is not None, "piece_cache_note": tok.piece_cache_reason,
            },
            "block_size": cfg.block_size,
            "run": {
                "num_proc": num_proc if tok else 1,
                "parallelism": (parallelism_mode(cfg, tok.spec) if num_proc > 1 else "serial") if tok else None,
                "seconds": round(elapsed, 3),
                "mb_per_second": round(total_bytes / MB / max(elapsed, 1e-9), 3),
                "tokens_per_second": round(total_tokens / max(elapsed, 1e-9), 1) if tok else None,
            },
        }
        (tmp / STATS_NAME).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return PrepareResult(path=out, stats=stats)


def _write_splits(
    cfg: PrepareConfig, source: FileSource | HubSource, tok: _TokenizerInfo | None, tmp: Path,
    n_train: int, n_total: int, num_proc: int,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    counts = SkipCounts()
    docs = dict.fromkeys(SPLITS, 0)
    nbytes = dict.fromkeys(SPLITS, 0)
    tokens = dict.fromkeys(SPLITS, 0)
    raw = _RawSplits(tmp)
    writers: dict[str, ShardWriter] = {}
    runner: _ChunkRunner | None = None
    ok = False
    bar = tqdm(total=n_total, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare", dynamic_ncols=True,
               disable=not cfg.progress, mininterval=1.0)
    try:
        if tok is not None:
            writers.update(_shard_writers(cfg, tok, tmp))
            runner = _ChunkRunner(tok.spec, num_proc, parallelism_mode(cfg, tok.spec))

        def consume(done: Iterator[tuple[Any, Any]]) -> None:
            for (split, size), ids in done:
                writers[split].write(ids)
                tokens[split] += len(ids)
                bar.update(size)
                bar.set_postfix_str(f"{(tokens['train'] + tokens['valid']) / 1e6:.1f}M tokens", refresh=False)

        chunk: list[str] = []
        chunk_bytes = 0
        chunk_split = "train"
        pos = 0
        exhausted = True
        documents = source.documents(counts, cfg.strict)
        for text, size in documents:
            if pos >= n_total:
                exhausted = False
                break
            split = "train" if pos < n_train else "valid"
            if runner is not None and split != chunk_split and chunk:
                consume(runner.submit((chunk_split, chunk_bytes), chunk))
                chunk, chunk_bytes = [], 0
            chunk_split = split
            raw.add(split, text)
            docs[split] += 1
            nbytes[split] += size
            pos += size
            if runner is not None:
                chunk.append(text)
                chunk_bytes += size
                if chunk_bytes >= CHUNK_BYTES:
                    consume(runner.submit((split, chunk_bytes), chunk))
                    chunk, chunk_bytes = [], 0
            else:
                bar.update(size)
        if runner is not None:
            if chunk:
                consume(runner.submit((chunk_split, chunk_bytes), chunk))
            consume(runner.drain())
        raw.flush()
        if docs["train"] == 0:
            raise ClpError(f"the source holds no documents (skipped: {counts.as_dict()}); nothing was written")
        raw.sync()
        result = _finish_splits(cfg, source, tok, writers, counts, docs, nbytes, tokens,
                                exhausted and pos < n_total, n_train, n_total)
        ok = True
        return result
    finally:
        with contextlib.suppress(Exception):
            documents.close()  # type: ignore[possibly-undefined]
        bar.close()
        if runner is not None:
            runner.close(ok)
        raw.close()
        for w in writers.values():
            if not w.closed:
                w.abort()


class _RawSplits:
    """``train.jsonl`` and ``valid.jsonl`` being written: documents in order, one write per batch of lines
    (cheaper than a call per document)."""

    BATCH = 4096

    def __init__(self, tmp: Path) -> None:
        self.files = {s: open(tmp / f"{s}.jsonl", "w", encoding="utf-8", buffering=CHUNK_BYTES) for s in SPLITS}
        self.lines: list[str] = []
        self.split = "train"
        self.dumps = json.encoder.encode_basestring  # = JSONEncoder(ensure_ascii=False).encode of a str

    def add(self, split: str, text: str) -> None:
        if split != self.split:
            self.flush()
            self.split = split
        self.lines.append('{"text": ' + self.dumps(text) + "}\n")
        if len(self.lines) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        self.files[self.split].write("".join(self.lines))
        self.lines.clear()

    def sync(self) -> None:
        """Flush and fsync both files."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _shard_writers(cfg: PrepareConfig, tok: _TokenizerInfo, tmp: Path) -> dict[str, ShardWriter]:
    return {s: ShardWriter(tmp / "tokens" / s, dtype=tok.dtype, tokenizer_name=tok.name, tokenizer_hash=tok.hash,
                           vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, block_size=cfg.block_size,
                           max_shard_tokens=cfg.max_shard_tokens)
            for s in SPLITS}


def _finish_splits(cfg: PrepareConfig, source: FileSource | HubSource, tok: _TokenizerInfo | None,
                   writers: dict[str, ShardWriter], counts: SkipCounts, docs: dict[str, int], nbytes: dict[str, int],
                   tokens: dict[str, int], short: bool, n_train: int, n_total: int) -> dict[str, Any]:
    """Close the shard writers and describe the splits (``stats.json``'s ``splits``); warn when the source
    ended before the subsample was complete (``short``) or the validation split is empty."""
    split_stats: dict[str, Any] = {}
    first_doc = {"train": 0, "valid": docs["train"]}
    for s in SPLITS:
        st: dict[str, Any] = {
            "documents": docs[s], "bytes": nbytes[s], "mb": round(nbytes[s] / MB, 6),
            "source_documents": [first_doc[s], first_doc[s] + docs[s]],  # [first, end) among kept documents
        }
        if tok is not None:
            writers[s].finish(num_documents=docs[s], num_bytes=nbytes[s])
            text_tokens = tokens[s] - docs[s]
            st.update(
                tokens=tokens[s], text_tokens=text_tokens,
                tokens_per_byte=round(text_tokens / nbytes[s], 6) if nbytes[s] else None,
                bytes_per_token=round(nbytes[s] / text_tokens, 6) if text_tokens else None,
            )
            if cfg.block_size:
                st["blocks"] = tokens[s] // cfg.block_size
        split_stats[s] = st
    if short:
        want_t, want_v = n_train / MB, (n_total - n_train) / MB
        log.warning(
            "the source ended before the subsample was complete: train has %.3f MB of the %.3f MB asked, "
            "valid %.3f MB of %.3f MB (%d + %d documents)%s",
            nbytes["train"] / MB, want_t, nbytes["valid"] / MB, want_v, docs["train"], docs["valid"],
            "; the validation split is EMPTY" if docs["valid"] == 0 else "",
        )
        if getattr(source, "revision", None):
            log.warning("the source is the hub's parquet conversion (%s), which holds only the first part of "
                        "a large split; for more text pass the dataset's own files with --files",
                        source.revision)
    elif docs["valid"] == 0:
        log.warning("the validation split is empty (--valid_size_mb %.3f)", (n_total - n_train) / MB)
    return {"splits": split_stats, "source_exhausted": short, "skipped": counts.as_dict()}


def prepare(
    output_dir: str | os.PathLike,
    subsample_size_mb: float,
    *,
    files: list[str | os.PathLike] | str | os.PathLike | None = None,
    dataset_name: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    **kwargs: Any,
) -> PrepareResult:
    """Split a corpus into ``train``/``valid`` (first N MB, next M MB, in order) and tokenize it into shards.

    >>> r = prepare("data/de", 100, files=["corpus/*.txt.gz"], tokenizer="models/gpt2-de")  # doctest: +SKIP
    >>> r.stats["splits"]["train"]["tokens"], r.shards("valid").read(0, 513)                 # doctest: +SKIP

    Keyword arguments are the fields of :class:`PrepareConfig`.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    cfg = PrepareConfig(
        output_dir=str(output_dir), subsample_size_mb=subsample_size_mb, files=[str(f) for f in files or []],
        dataset_name=dataset_name, tokenizer=None if tokenizer is None else str(tokenizer), **kwargs,
    )
    return run_prepare(cfg)


# ---------------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Take the first --subsample_size_mb MB of a corpus (hub dataset, streamed, or local files) as the training "
        "split and the next --valid_size_mb MB as validation, whole documents in order; sizes are MB (2**20 "
        "bytes) of UTF-8 text. Writes train.jsonl/valid.jsonl, stats.json and, with --tokenizer, packed token "
        "shards (EOS after every document). Example: clp-transfer prepare --files corpus/*.txt.gz "
        "--output_dir data/de --subsample_size_mb 100 --tokenizer models/gpt2-de --block_size 512"
    )
    add_dataclass_arguments(parser, PrepareConfig)


class _Terminated(KeyboardInterrupt):
    pass


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so temporary outputs are removed."""
    def handler(signum, frame):  # noqa: ARG001
        raise _Terminated()

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def cli_main(args: argparse.Namespace) -> int:
    require_flags(PrepareConfig, args)
    cfg = build_config(PrepareConfig, args)
    with _sigterm_as_interrupt():
        result = run_prepare(cfg)
    st = result.stats
    for s in SPLITS:
        sp = st["splits"][s]
        tok = f", {sp['tokens']:,} tokens ({sp['tokens_per_byte']} tokens/byte)" if "tokens" in sp else ""
        print(f"{s}: {sp['documents']:,} documents, {sp['mb']:.2f} MB{tok}", file=sys.stderr)
    skipped = {k: v for k, v in st["skipped"].items() if v}
    if skipped:
        print(f"skipped: {skipped}", file=sys.stderr)
    print(f"wrote {result.path} in {st['run']['seconds']:.1f} s ({st['run']['mb_per_second']:.2f} MB/s)",
          file=sys.stderr)
    return 0

