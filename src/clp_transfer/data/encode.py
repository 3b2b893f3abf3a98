"""Fast, exact tokenization of document batches for ``prepare``: Rust ``tokenizers`` + a piece cache.

:class:`Encoder` turns a list of documents into one flat id array with an EOS id after every document. It
runs in ``prepare``'s worker processes (or in-process for ``num_proc=1``); only ``numpy``, ``tokenizers`` and
``regex`` are imported here, so spawning a worker is cheap.

Two paths give identical ids:

- **backend**: ``Tokenizer.encode_batch_fast`` of the tokenizer's Rust backend. Always correct.
- **piece cache** (the default for tokenizers that allow it; ``--no-piece_cache`` turns it off): a tokenizer
  whose normaliser is absent (or NFC) and whose pre-tokenizer is a sequence of regex splits (byte-level BPE:
  GPT-2, GPT-NeoX/Pythia, Llama 3, SmolLM, ...) maps every pre-token ("piece", e.g. ``" Haus"``) to ids
  independently of its neighbours. We split documents with the same patterns (the ``regex`` module), encode
  each distinct piece once with the backend, and assemble documents by a vectorised gather from the cache.
  Most of the backend's time goes to pre-tokenization and BPE merges, and natural text repeats its words
  (Heaps' law: the share of new words falls as the corpus grows), so most words are looked up. Learning a new
  word costs about five times encoding it, so a chunk in which more than ``bypass_new_fraction`` of the words
  are new (random strings, hashes) goes to the backend whole and teaches the cache nothing. Measurements are
  in ``benchmarks/README.md``.

  Exactness is checked, not assumed: every character is checked once against the backend's own
  pre-tokenizer (and normaliser) before a document containing it takes the cached path (the two regex engines
  may disagree on characters that are new in one Unicode version); every new piece is checked to be a single
  pre-token on its own; documents that fail any check (or are not NFC under an NFC normaliser) go to the
  backend. The cache holds at most ``max_cached_pieces`` entries (about 200 bytes each) and starts over when
  full, so memory is bounded whatever the corpus.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import sys
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Same matches, factored so that the regex engine tries fewer alternatives per position (~15% faster).
_EQUIVALENT = {
    GPT2_PATTERN: r"""'(?:s|t|re|ve|m|ll|d)| ?(?:\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+)|\s+(?!\S)|\s+""",
}
# Each character is checked in these contexts (letters, digits, spaces, newlines, contractions, repeats).
_CHECK_TEMPLATE = "X aX1X X  X'X\nX!X.XXy 1X 'X\r\nX\tXX"
_EOS_KEY = None  # cache key of the pseudo-piece "EOS" (never a str, so never a real piece)
# Constructs under which a piece could split differently alone than in its document: lookbehind, positive
# lookahead, anchors and word boundaries. (Negative lookahead such as GPT-2's \s+(?!\S) is safe.)
_CONTEXT_SENSITIVE = re.compile(r"\(\?<|\(\?=|\\[bBAZzG]|(?<![\[\\])\^|(?<!\\)\$")


@dataclass(frozen=True)
class EncoderSpec:
    """Everything a worker needs to rebuild the encoder (picklable)."""

    tokenizer_json: str
    """The Rust backend, serialised (``Tokenizer.to_str()``)."""
    eos_token_id: int
    """Written after every document."""
    dtype: str
    """uint16 or uint32."""
    split_special_tokens: bool = True
    """Text that spells a special token (``<|endoftext|>``) is tokenized as text, not as the special id."""
    split_patterns: tuple[str, ...] | None = None
    """Regex split steps of the piece cache, or None for the backend only (see :func:`plan_piece_cache`)."""
    nfc: bool = False
    """The tokenizer normalises to NFC (the piece cache then only takes documents that are NFC already)."""
    max_cached_pieces: int = 500_000
    """Bound of the cache (words + pieces) per process, about 200 bytes each; it starts over when full."""
    bypass_new_fraction: float = 0.3
    """A chunk in which more than this share of the words is new to the cache goes to the backend as a whole:
    learning a word costs several times encoding it, and the cached path breaks even at ~18% new words
    (benchmarks/bench_piece_cache.py); natural German starts at ~22% in its first MB and falls from there."""
    bypass_after_chunks: int = 2
    """The bypass applies once this many chunks have taken the cached path, so that a cold cache always learns
    from its first chunks (else text whose first chunk is above the bypass share would never warm it up)..."""
    bypass_always_fraction: float = 0.6
    """... unless more than this share of the chunk's words is new (random strings, hashes): then even the
    first chunks go to the backend, and the cache neither pays for nor stores words that never come back."""


def load_backend(spec_json: str, split_special_tokens: bool):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(spec_json)
    tok.no_truncation()
    tok.no_padding()
    tok.encode_special_tokens = bool(split_special_tokens)
    return tok


def plan_piece_cache(tokenizer_json: str, split_special_tokens: bool) -> tuple[tuple[str, ...] | None, bool, str]:
    """``(split_patterns, nfc, reason)``: how the piece cache can emulate this tokenizer, or None and why not."""
    import regex

    spec = json.loads(tokenizer_json)
    normalizer = spec.get("normalizer")
    nfc = False
    if normalizer is not None:
        if normalizer.get("type") == "NFC":
            nfc = True
        else:
            return None, False, f"normalizer {normalizer.get('type')} is applied to whole documents"
    model = spec.get("model") or {}
    if model.get("dropout"):
        return None, False, "BPE dropout makes tokenization random"
    for added in spec.get("added_tokens") or []:
        if not added.get("special"):
            return None, False, f"added token {added.get('content')!r} is matched across pieces"
        if not split_special_tokens:
            return None, False, "special tokens are matched in text (--no-split_special_tokens)"
    pre = spec.get("pre_tokenizer")
    if pre is None:
        return None, False, "no pre-tokenizer (documents are single pieces)"
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    patterns: list[str] = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                return None, False, "ByteLevel(add_prefix_space=True) depends on the piece position"
            if step.get("use_regex", True):
                patterns.append(GPT2_PATTERN)
        elif kind == "Split":
            if step.get("behavior") != "Isolated" or step.get("invert"):
                return None, False, f"Split(behavior={step.get('behavior')}, invert={step.get('invert')})"
            pat = step.get("pattern") or {}
            if "Regex" in pat:
                patterns.append(pat["Regex"])
            elif "String" in pat:
                patterns.append(regex.escape(pat["String"]))
            else:
                return None, False, f"Split pattern {pat!r}"
        elif kind == "Digits":
            patterns.append(r"\p{N}|\P{N}+" if step.get("individual_digits") else r"\p{N}+|\P{N}+")
        else:
            return None, False, f"pre-tokenizer {kind} is not emulated"
    if not patterns:
        return None, False, "no splitting pre-tokenizer"
    for p in patterns:
        try:
            compiled = regex.compile(p)
        except Exception as e:  # onig syntax that the regex module does not take
            return None, False, f"pattern {p!r} does not compile in Python ({e})"
        if compiled.groups:
            return None, False, f"pattern {p!r} has capturing groups"
        if _CONTEXT_SENSITIVE.search(p):
            return None, False, f"pattern {p!r} looks behind, looks ahead positively or uses anchors"
    return tuple(patterns), nfc, "ok"


class Encoder:
    """Documents -> flat ids with EOS after each; identical results with or without the piece cache."""

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        self.backend = load_backend(spec.tokenizer_json, spec.split_special_tokens)
        self.dtype = np.dtype(spec.dtype)
        self.limit = np.iinfo(self.dtype).max
        self.eos = int(spec.eos_token_id)
        self._fast_backend = hasattr(self.backend, "encode_batch_fast")
        self.cache_enabled = spec.split_patterns is not None
        self.stats = {"cached_docs": 0, "backend_docs": 0, "cache_resets": 0, "bypassed_chunks": 0}
        self._learned_chunks = 0  # chunks that took the cached path (the warm-up counts these)
        if self.cache_enabled:
            import regex

            # A gap alternative reproduces "Isolated" splitting for patterns that do not cover every character.
            self._patterns = [
                regex.compile(_EQUIVALENT[p]) if p in _EQUIVALENT else regex.compile(f"(?:{p})|(?:(?!(?:{p}))[\\s\\S])+")
                for p in spec.split_patterns  # type: ignore[union-attr]
            ]
            self._pre = self.backend.pre_tokenizer
            self._normalizer = self.backend.normalizer
            self._safe_chars: set[str] = set()
            self._unsafe_chars: set[str] = set()
            self._unchecked_re = re.compile(r"[\s\S]")  # characters not checked yet (all, at first)
            self._unsafe_re: re.Pattern | None = None
            # Byte-level (GPT-2) splitting always has a pre-token boundary before a space that is followed by a
            # non-space, and what lies between two such boundaries is split the same alone as in context (see
            # docs/prepare.md). So whole words (" Haus,") can be cached; documents where a space is followed by
            # whitespace or ends the text fall back to piece keys.
            self._word_units = tuple(spec.split_patterns or ()) == (GPT2_PATTERN,)
            ws = regex.compile(r"\s")  # whitespace as the splitting engine sees it (all of it is below U+3001)
            ws_class = "".join(re.escape(chr(c)) for c in range(0x3001) if ws.match(chr(c)))
            self._space_guard = re.compile(f" (?:[{ws_class}]|\\Z)")
            self._reset_cache()

    # ------------------------------------------------------------------------------------------------ backend
    def backend_ids(self, texts: list[str]) -> list[list[int]]:
        if self._fast_backend:
            encs = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        else:  # pragma: no cover - tokenizers < 0.20
            encs = self.backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encs]

    def _backend_array(self, texts: list[str]) -> np.ndarray:
        ids = self.backend_ids(texts)
        for x in ids:
            x.append(self.eos)
        n = sum(map(len, ids))
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=n)

    # ------------------------------------------------------------------------------------------ piece cache
    def _reset_cache(self) -> None:
        self._pieces = _IdTable()  # piece -> ids (checked to be one pre-token on its own)
        self._bad_pieces: set[str] = set()
        self._units = _IdTable()  # unit key -> ids; str k = " " + k, (k,) = k itself, None = EOS
        self._units.add([_EOS_KEY], np.array([self.eos], dtype=np.int64), np.array([1], dtype=np.int64))
        self._bad_units: set[Any] = set()

    def pieces(self, text: str) -> list[str]:
        first, *rest = self._patterns
        out = first.findall(text)
        for pat in rest:
            out = [q for p in out for q in pat.findall(p)]
        return out

    def _char_ok(self, c: str) -> bool:
        s = _CHECK_TEMPLATE.replace("X", c)
        try:
            ref = [o for _, o in self._pre.pre_tokenize_str(s)]
        except Exception:
            return False
        mine, pos = [], 0
        for p in self.pieces(s):
            if p:
                mine.append((pos, pos + len(p)))
                pos += len(p)
        if ref != mine:
            return False
        if self.spec.nfc:
            return self._normalizer.normalize_str(s) == unicodedata.normalize("NFC", s)
        return True

    def _check_chars(self, joined: str) -> None:
        if not self._unchecked_re.search(joined):
            return
        for c in set(self._unchecked_re.findall(joined)):
            (self._safe_chars if self._char_ok(c) else self._unsafe_chars).add(c)
        self._unchecked_re = re.compile(_char_class(self._safe_chars | self._unsafe_chars, negate=True))
        if self._unsafe_chars:
            self._unsafe_re = re.compile(_char_class(self._unsafe_chars))

    def _add_pieces(self, new: list[str]) -> None:
        encs = self.backend.encode_batch(new, add_special_tokens=False)  # word ids tell us the pre-tokens
        good, ids = [], []
        for p, e in zip(new, encs):
            if any(w != 0 for w in e.word_ids):
                self._bad_pieces.add(p)  # not a single pre-token on its own: its documents go to the backend
            else:
                good.append(p)
                ids.append(e.ids)
        if good:
            lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))
            self._pieces.add(good, flat, lens)

    def _add_units(self, new: list[Any]) -> None:
        literals = [k[0] if type(k) is tuple else " " + k for k in new]
        piece_lists = [self.pieces(t) for t in literals]
        seen = set(itertools.chain.from_iterable(piece_lists))
        missing = seen.difference(self._pieces.index).difference(self._bad_pieces)
        if missing:
            self._add_pieces(list(missing))
        keys = new
        if self._bad_pieces and not self._bad_pieces.isdisjoint(seen):
            good = [self._bad_pieces.isdisjoint(pl) for pl in piece_lists]
            self._bad_units.update(k for k, g in zip(new, good) if not g)
            keys = [k for k, g in zip(new, good) if g]
            piece_lists = [pl for pl, g in zip(piece_lists, good) if g]
        if not keys:
            return
        flat, piece_lens = self._pieces.ids(list(itertools.chain.from_iterable(piece_lists)))
        owner = np.repeat(np.arange(len(keys)), [len(pl) for pl in piece_lists])
        unit_lens = np.bincount(owner, weights=piece_lens, minlength=len(keys)).astype(np.int64)
        self._units.add(keys, flat, unit_lens)

    def _lookup(self, keys: list[Any]) -> np.ndarray:
        """Cache rows of ``keys``, -1 where a key is not cached."""
        return np.fromiter(map(self._units.index.get, keys, itertools.repeat(-1)), dtype=np.int64, count=len(keys))

    def _doc_keys(self, text: str) -> list[Any]:
        """Unit keys of a document: words split at spaces when that is provably exact, else its pieces."""
        if self._word_units and not self._space_guard.search(text):
            keys: list[Any] = text.split(" ")
            keys[0] = (keys[0],)
            return keys
        return [(p,) for p in self.pieces(text)]

    def _cached_array(self, texts: list[str]) -> np.ndarray:
        joined = "".join(texts)
        self._check_chars(joined)
        ok = [True] * len(texts)
        if self._unsafe_re is not None and self._unsafe_re.search(joined):
            ok = [self._unsafe_chars.isdisjoint(t) for t in texts]
        if self.spec.nfc:
            ok = [o and unicodedata.is_normalized("NFC", t) for o, t in zip(ok, texts)]
        doc_keys = [self._doc_keys(t) if o else [] for t, o in zip(texts, ok)]
        # One lookup pass over the keys of every cacheable document, EOS after each: pid = row of the key in the
        # cache, -1 if it is not there. Shape: (keys + documents,).
        ok_docs = [i for i, o in enumerate(ok) if o]
        sizes = [len(doc_keys[i]) + 1 for i in ok_docs]  # keys + EOS of each cacheable document
        flat: list[Any] = []
        for i in ok_docs:
            flat += doc_keys[i]
            flat.append(_EOS_KEY)
        pid = self._lookup(flat)
        miss = np.flatnonzero(pid < 0)
        if len(miss):
            new = {flat[j] for j in miss.tolist()}
            words = len(flat) - len(ok_docs)
            limit = self.spec.bypass_new_fraction if self._learned_chunks >= self.spec.bypass_after_chunks else \
                self.spec.bypass_always_fraction
            if len(new) > limit * words:
                self.stats["bypassed_chunks"] += 1
                self.stats["backend_docs"] += len(texts)
                return self._backend_array(texts)
            if len(self._units) + len(self._pieces) + len(new) > self.spec.max_cached_pieces:
                self.stats["cache_resets"] += 1
                self._reset_cache()
                pid = self._lookup(flat)
                miss = np.flatnonzero(pid < 0)
                new = {flat[j] for j in miss.tolist()}
            new.difference_update(self._bad_units)
            if new:
                self._add_units(list(new))
            pid[miss] = self._lookup([flat[j] for j in miss.tolist()])
            unknown = pid < 0  # bad units (not a single pre-token alone): their documents go to the backend
            if unknown.any():
                doc_of = np.repeat(np.arange(len(ok_docs)), sizes)
                for d in np.unique(doc_of[unknown]).tolist():
                    ok[ok_docs[d]] = False
        self._learned_chunks += 1
        start = dict(zip(ok_docs, itertools.accumulate(sizes, initial=0)))
        parts = []
        for good, run in itertools.groupby(range(len(texts)), key=ok.__getitem__):
            idx = list(run)
            if good:  # consecutive cacheable documents: one contiguous slice of pid
                self.stats["cached_docs"] += len(idx)
                last = idx[-1]
                parts.append(self._units.gather(pid[start[idx[0]] : start[last] + len(doc_keys[last]) + 1])[0])
            else:
                self.stats["backend_docs"] += len(idx)
                parts.append(self._backend_array([texts[i] for i in idx]))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # ------------------------------------------------------------------------------------------------ public
    def encode(self, texts: list[str]) -> np.ndarray:
        """Ids of ``texts`` in order, EOS after each document, as ``spec.dtype``."""
        if not texts:
            return np.zeros(0, dtype=self.dtype)
        if self.cache_enabled:
            ids = self._cached_array(texts)
        else:
            self.stats["backend_docs"] += len(texts)
            ids = self._backend_array(texts)
        if ids.size and int(ids.max()) > self.limit:
            raise ValueError(f"token id {int(ids.max())} does not fit {self.dtype}")
        return ids.astype(self.dtype)


class _IdTable:
    """key -> token ids, stored flat, so that the ids of many keys are gathered in one vectorised step."""

    def __init__(self) -> None:
        self.index: dict[Any, int] = {}
        self.flat = np.zeros(1 << 16, dtype=np.uint32)
        self.start = np.zeros(1 << 12, dtype=np.int64)
        self.len = np.zeros(1 << 12, dtype=np.int32)
        self.n = 0
        self.nflat = 0

    def __len__(self) -> int:
        return self.n

    def add(self, keys: list[Any], flat: np.ndarray, lens: np.ndarray) -> None:
        k, total = len(keys), len(flat)
        if self.n + k > len(self.start):
            cap = max(self.n + k, 2 * len(self.start))
            self.start = np.resize(self.start, cap)
            self.len = np.resize(self.len, cap)
        if self.nflat + total > len(self.flat):
            self.flat = np.resize(self.flat, max(self.nflat + total, 2 * len(self.flat)))
        self.flat[self.nflat : self.nflat + total] = flat
        self.start[self.n : self.n + k] = self.nflat + np.cumsum(lens) - lens
        self.len[self.n : self.n + k] = lens
        self.index.update(zip(keys, range(self.n, self.n + k)))
        self.n += k
        self.nflat += total

    def ids(self, keys: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(the ids of ``keys`` concatenated in order, the number of ids of each key)."""
        return self.gather(np.fromiter(map(self.index.__getitem__, keys), dtype=np.int64, count=len(keys)))

    def gather(self, pid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the ids of rows ``pid`` concatenated in order, the number of ids of each row)."""
        lens = self.len[pid]
        if not len(pid):
            return np.zeros(0, dtype=np.int64), lens
        ends = np.cumsum(lens)
        idx = np.arange(int(ends[-1]), dtype=np.int64) + np.repeat(self.start[pid] - (ends - lens), lens)
        return self.flat[idx], lens


def _char_class(chars: set[str], negate: bool = False) -> str:
    return "[" + ("^" if negate else "") + "".join(re.escape(c) for c in sorted(chars)) + "]"


def use_rust_threads(n: int) -> None:
    """Let the Rust tokenizer encode batches on ``n`` threads of its (rayon) pool.

    The pool size is read once, when the process first encodes in parallel, so this must come first; a size
    set by the user (``RAYON_NUM_THREADS``) is kept. ``TOKENIZERS_PARALLELISM=false`` in the environment turns
    the pool off (tokenization then runs on one thread, with a warning); unset, the pool is on."""
    os.environ.setdefault("RAYON_NUM_THREADS", str(n))
    flag = os.environ.get("TOKENIZERS_PARALLELISM")
    if flag is not None and flag.strip().lower() in ("0", "false", "off", "no"):
        logging.getLogger(__name__).warning(
            "TOKENIZERS_PARALLELISM=%s: the tokenizer runs on one thread; unset it (or use --parallelism "
            "processes) to use %d cores", flag, n)


# ---------------------------------------------------------------------------------------------- worker side
_ENCODER: Encoder | None = None


PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal the kernel sends when the parent dies


def die_with_parent(parent_pid: int | None) -> None:
    """Make this worker process exit when its parent dies, even by SIGKILL (no cleanup runs there).

    On Linux the kernel delivers SIGKILL to the worker (``prctl(PR_SET_PDEATHSIG)``); the parent-pid check
    afterwards covers a parent that died before the call. Elsewhere a daemon thread polls the parent pid.
    """
    if parent_pid is None:
        return
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent is already gone
    if not armed:
        import threading
        import time

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="clp-parent-watch", daemon=True).start()


def init_worker(spec: EncoderSpec, parent_pid: int | None = None) -> None:
    """Pool initializer: one single-threaded encoder per process; Ctrl-C is left to the parent, and the
    worker dies with its parent (``parent_pid``, see :func:`die_with_parent`)."""
    global _ENCODER
    die_with_parent(parent_pid)
    # One process per core: no rayon thread pool inside workers (set before the first encode builds it).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _ENCODER = Encoder(spec)


def encode_in_worker(texts: list[str]) -> np.ndarray:
    assert _ENCODER is not None, "init_worker was not called"
    return _ENCODER.encode(texts)
