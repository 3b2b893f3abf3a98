"""The packed token shard format shared by ``prepare`` (writer), ``train`` and ``perplexity`` (readers).

Layout of a prepared data directory::

    data_dir/
      train.jsonl  valid.jsonl          raw documents, one JSON object {"text": ...} per line
      stats.json                        counts per split, tokenizer, source, seed
      tokens/train/index.json           ShardIndex (below)
      tokens/train/00000.bin ...        token ids, native little-endian uint16 or uint32, documents
      tokens/valid/...                  concatenated with one EOS token after each document

Readers memory-map the shards, so a corpus of billions of tokens costs no RAM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ClpError

FORMAT_NAME = "clp-transfer-shards"
FORMAT_VERSION = 1


def tokenizer_fingerprint(tokenizer: Any, below: int | None = None) -> str:
    """A stable hash of what decides token ids: vocabulary, merges, normalisation and added tokens.

    Two tokenizers with the same fingerprint map every text to the same ids, so shards made with one can
    be read by a model trained with the other. ``below``: leave out added tokens with ids >= ``below`` -
    tokens appended after a vocabulary of ``below`` ids, such as the chat control tokens a transfer carries
    into the helper's tokenizer - which gives the fingerprint of the tokenizer before they were added.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        payload: Any = {k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model", "added_tokens")}
        if below is not None:
            payload["added_tokens"] = [t for t in payload["added_tokens"] or [] if t["id"] < below]
    else:  # slow tokenizer: the vocabulary is the best we have
        payload = sorted((t, i) for t, i in tokenizer.get_vocab().items() if below is None or i < below)
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class ShardInfo:
    file: str
    """Shard file name, relative to the index."""
    num_tokens: int
    """Token ids in this shard."""


@dataclass
class ShardIndex:
    """``index.json`` of one split's token shards."""

    dtype: str
    """numpy dtype of the ids: uint16 or uint32."""
    tokenizer_name: str
    """Name or path of the tokenizer that produced the ids."""
    tokenizer_hash: str
    """:func:`tokenizer_fingerprint` of that tokenizer."""
    vocab_size: int
    """len(tokenizer) when the shards were written."""
    eos_token_id: int
    """Separator written after every document."""
    num_documents: int
    """Documents in the split."""
    num_bytes: int
    """UTF-8 bytes of the documents' text (separators not counted); the denominator of bits per byte."""
    num_tokens: int
    """Total ids over all shards, separators included."""
    shards: list[ShardInfo] = field(default_factory=list)
    """Shard files in order."""
    block_size: int | None = None
    """Block size suggested at prepare time (readers may choose another)."""
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardIndex":
        d = dict(d)
        if d.get("format") != FORMAT_NAME:
            raise ClpError(f"not a {FORMAT_NAME} index (format={d.get('format')!r})")
        d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def split_dir(data_dir: str | Path, split: str) -> Path:
    """Where the shards of ``split`` live; accepts a data dir, its ``tokens`` dir or the split dir itself."""
    p = Path(data_dir)
    for cand in (p / "tokens" / split, p / split, p):
        if (cand / "index.json").is_file():
            return cand
    raise ClpError(
        f"no token shards for split {split!r} under {str(p)!r} (expected {p}/tokens/{split}/index.json); "
        "run `clp-transfer prepare --tokenizer ...` first"
    )


class TokenShards:
    """Read-only view of one split: ``len(shards)`` ids, sliceable like one long array.

    >>> s = TokenShards("data/oscar_de", "valid")   # doctest: +SKIP
    >>> s.read(0, 513)                               # first 513 ids as int64 numpy
    """

    def __init__(self, data_dir: str | Path, split: str = "train") -> None:
        self.dir = split_dir(data_dir, split)
        self.split = split
        self.index = ShardIndex.from_dict(json.loads((self.dir / "index.json").read_text(encoding="utf-8")))
        dtype = np.dtype(self.index.dtype)
        self._arrays = []
        for s in self.index.shards:
            path = self.dir / s.file
            if not path.is_file():
                raise ClpError(f"shard {str(path)!r} listed in the index is missing")
            arr = np.memmap(path, dtype=dtype, mode="r") if s.num_tokens else np.zeros(0, dtype=dtype)
            if len(arr) != s.num_tokens:
                raise ClpError(f"shard {str(path)!r} holds {len(arr)} ids, the index says {s.num_tokens}")
            self._arrays.append(arr)
        self._starts = np.cumsum([0] + [len(a) for a in self._arrays])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """ids[start:start+length] as int64, crossing shard boundaries when needed."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"range {start}:{start + length} outside 0:{len(self)}")
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        while filled < length:
            k = int(np.searchsorted(self._starts, pos, side="right") - 1)
            off = pos - int(self._starts[k])
            take = min(length - filled, len(self._arrays[k]) - off)
            out[filled : filled + take] = self._arrays[k][off : off + take]
            filled += take
            pos += take
        return out

    def num_blocks(self, block_size: int) -> int:
        """Non-overlapping blocks of ``block_size`` ids (the tail shorter than a block is dropped)."""
        return len(self) // block_size

    def block(self, i: int, block_size: int) -> np.ndarray:
        return self.read(i * block_size, block_size)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Fail clearly when the shards were made with another tokenizer than ``tokenizer``.

        A tokenizer that only appends tokens after the shards' vocabulary (a transferred instruct model's
        chat control tokens) is accepted: every id in the shards means the same token in both.
        """
        fp = tokenizer_fingerprint(tokenizer)
        if fp != self.index.tokenizer_hash and \
                tokenizer_fingerprint(tokenizer, below=self.index.vocab_size) != self.index.tokenizer_hash:
            raise ClpError(
                f"the shards in {str(self.dir)!r} were made with tokenizer {self.index.tokenizer_name!r} "
                f"(hash {self.index.tokenizer_hash}), not with the model's tokenizer (hash {fp}); "
                "re-run `clp-transfer prepare --tokenizer <model dir>`"
            )


class ShardWriter:
    """Append token ids to one split's shards; :meth:`close` writes ``index.json`` last.

    A split directory without ``index.json`` is incomplete, and readers (:func:`split_dir`) do not see it.
    Shards are ``00000.bin``, ``00001.bin``, ... of at most ``max_shard_tokens`` ids each; a document may
    continue into the next shard (readers see one long array).

    >>> with ShardWriter(d, dtype="uint16", tokenizer_name="t", tokenizer_hash="h", vocab_size=100,
    ...                  eos_token_id=0) as w:            # doctest: +SKIP
    ...     w.write(np.array([5, 6, 0], dtype=np.uint16))
    ...     w.finish(num_documents=1, num_bytes=7)
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        dtype: str | np.dtype,
        tokenizer_name: str,
        tokenizer_hash: str,
        vocab_size: int,
        eos_token_id: int,
        block_size: int | None = None,
        max_shard_tokens: int = 2**27,
    ) -> None:
        if max_shard_tokens <= 0:
            raise ValueError("max_shard_tokens must be positive")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.max_shard_tokens = int(max_shard_tokens)
        self.index = ShardIndex(
            dtype=self.dtype.name, tokenizer_name=tokenizer_name, tokenizer_hash=tokenizer_hash,
            vocab_size=int(vocab_size), eos_token_id=int(eos_token_id), num_documents=0, num_bytes=0,
            num_tokens=0, block_size=block_size,
        )
        self._file: Any = None
        self._in_shard = 0
        self.closed = False

    def _open_next(self) -> None:
        self._close_shard()
        name = f"{len(self.index.shards):05d}.bin"
        self._file = open(self.dir / name, "wb")
        self.index.shards.append(ShardInfo(file=name, num_tokens=0))
        self._in_shard = 0

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def write(self, ids: np.ndarray) -> None:
        """Append ``ids`` (any integer dtype; values must fit the shard dtype)."""
        ids = np.asarray(ids)
        if ids.dtype != self.dtype:
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) > np.iinfo(self.dtype).max):
                raise ValueError(f"token ids outside the range of {self.dtype}")
            ids = ids.astype(self.dtype)
        ids = np.ascontiguousarray(ids)
        pos = 0
        while pos < len(ids):
            if self._file is None or self._in_shard >= self.max_shard_tokens:
                self._open_next()
            take = min(len(ids) - pos, self.max_shard_tokens - self._in_shard)
            self._file.write(memoryview(ids[pos : pos + take]).cast("B"))
            self._in_shard += take
            self.index.shards[-1].num_tokens += take
            self.index.num_tokens += take
            pos += take

    def finish(self, num_documents: int, num_bytes: int) -> ShardIndex:
        """Close the last shard and write ``index.json`` (the split is complete from then on)."""
        self._close_shard()
        self.index.num_documents = int(num_documents)
        self.index.num_bytes = int(num_bytes)
        tmp = self.dir / ".index.json.tmp"
        tmp.write_text(self.index.to_json(), encoding="utf-8")
        os.replace(tmp, self.dir / "index.json")
        self.closed = True
        return self.index

    def abort(self) -> None:
        """Close open files without writing the index."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.closed:
            self.abort()
