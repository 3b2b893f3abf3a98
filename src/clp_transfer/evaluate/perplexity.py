"""``perplexity``: exact token perplexity, bits per byte and word perplexity of a causal LM on text.

Models with different tokenizers (source, helper, transferred target) can only be compared on the same
*text*, so this stage scores raw documents with each model's own tokenizer and reports measures that do not
depend on the vocabulary:

- ``bits_per_byte`` = total NLL in nats / ln 2 / UTF-8 bytes of the text scored,
- ``word_perplexity`` = exp(total NLL / words), words counted as lm-eval does (``len(re.split(r"\\s+", doc))``),
- and, for one model at a time, ``token_perplexity`` = exp(mean loss per token).

How a document is scored (the rule of lm-eval's ``loglikelihood_rolling``, so that ``bits_per_byte`` matches
lm-eval's on the same text and model):

1. It is encoded without special tokens. Its first token is conditioned on a *prefix* token that is never
   scored: the tokenizer's BOS token, or its EOS token when it has no BOS (GPT-2 style ``<|endoftext|>``).
2. Every token is predicted exactly once. The first window predicts the first ``block_size`` tokens; each
   further window predicts the next ``stride`` tokens with the ``block_size`` tokens before them as input
   (``stride == block_size``: disjoint windows, exactly lm-eval's; ``stride < block_size``: a sliding window
   that gives every prediction at least ``block_size - stride`` tokens of context).
3. Tokenizers whose own encoding starts with BOS (Llama, Gemma, Mistral) belong to models that expect BOS at
   the start of every input: there every window starts with BOS (not scored) followed by ``block_size - 1``
   tokens. A document that fits into one window is scored identically either way.

Documents are independent (no context crosses a document boundary), windows of many documents are packed into
padded batches of similar lengths (:func:`length_batches`), and everything is summed in float64. The optional
``new_token_mask`` (a boolean mask over the vocabulary, e.g. the tokens a transfer created) splits the loss by
the class of the *predicted* token.

The maths (:func:`plan_windows`, :func:`score_documents`, :func:`score_token_stream`) works on a loaded model;
:func:`perplexity` adds loading, reading text and writing JSON.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..atomic import atomic_write_json, check_output_path
from ..config import add_dataclass_arguments, build_config, require_flags, text_flag
from ..data import count_lines, read_documents, resolve_text_sources  # noqa: F401 (re-exported)
from ..errors import ClpError
from ..models import prefix_rule  # noqa: F401 (re-exported)
from ..models import (
    context_length,
    load_for_eval,
    model_device,
    new_token_mask_from_ids,
    read_new_token_ids,
)

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
DEFAULT_MAX_BLOCK = 2048
_WS = re.compile(r"\s+")


# --------------------------------------------------------------------------------------------- results


@dataclass
class ClassLoss:
    """Loss on the predicted tokens of one class (e.g. new vs shared tokens of a transfer)."""

    num_tokens: int
    nll: float
    """Sum of the NLL in nats."""
    mean_loss: float | None
    """nll / num_tokens (None when no token of the class was predicted)."""
    share_of_nll: float
    """Fraction of the total NLL that falls on this class."""


@dataclass
class PerplexityResult:
    """What :func:`perplexity` and :func:`score_documents` return; ``to_dict()`` is the JSON written."""

    num_documents: int
    """Documents scored (empty ones are skipped)."""
    num_tokens: int
    """Tokens predicted (prefix/BOS tokens excluded)."""
    num_bytes: int
    """UTF-8 bytes of the text scored."""
    num_words: int | None
    """Words of the text scored (lm-eval's count); None for a token stream."""
    nll: float
    """Total negative log-likelihood in nats."""
    mean_loss: float
    """nll / num_tokens (nats per token): the training loss."""
    token_perplexity: float
    """exp(mean_loss); only comparable between models with the same tokenizer."""
    bits_per_byte: float
    """nll / ln 2 / num_bytes; comparable across tokenizers."""
    byte_perplexity: float
    """exp(nll / num_bytes) = 2 ** bits_per_byte."""
    word_perplexity: float | None
    """exp(nll / num_words); comparable across tokenizers."""
    block_size: int
    stride: int
    prefix_token: str | None = None
    """Token the first token of each document is conditioned on (never scored)."""
    bos_every_window: bool = False
    """Whether every window starts with BOS (tokenizers that add BOS themselves)."""
    truncated: bool = False
    """True when max_tokens stopped the scoring before the end of the text."""
    bytes_estimated: bool = False
    """True when num_bytes is an estimate (token streams scored in part)."""
    token_classes: dict[str, ClassLoss] | None = None
    """Loss split by the class of the predicted token, when a mask was given."""
    num_windows: int = 0
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    model: str | None = None
    """The model scored (name or path as given)."""
    model_path: str | None = None
    """Absolute local directory of the model's weights, when loaded from disk."""
    data: str | None = None
    """What was scored (data dir and split, or files)."""
    kind: str = "perplexity"
    """Marks the JSON so that ``compare`` recognises it."""
    version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        words = f", word ppl {self.word_perplexity:.2f}" if self.word_perplexity is not None else ""
        classes = ""
        if self.token_classes:
            classes = "; " + ", ".join(
                f"loss on {k} tokens {v.mean_loss:.3f} ({v.num_tokens})" if v.mean_loss is not None
                else f"no {k} tokens" for k, v in self.token_classes.items()
            )
        return (
            f"{self.model or 'model'}: {self.bits_per_byte:.4f} bits/byte{words}, token ppl "
            f"{self.token_perplexity:.2f} (loss {self.mean_loss:.4f}) on {self.num_documents} documents, "
            f"{self.num_tokens} tokens, {self.num_bytes} bytes{' (truncated)' if self.truncated else ''}"
            f"{classes}; {self.elapsed_s:.1f} s"
        )


# --------------------------------------------------------------------------------------------- maths


def count_words(text: str) -> int:
    """Words as lm-eval counts them for ``word_perplexity``: ``len(re.split(r"\\s+", text))``."""
    return len(_WS.split(text))


def plan_windows(length: int, block_size: int, stride: int) -> np.ndarray:
    """Windows that predict every token of a sequence once; ``int64 [W, 3]`` rows ``(start, end, n_scored)``.

    ``seq`` has ``length`` ids; ``seq[0]`` is context only (the prefix), tokens ``seq[1:]`` are predicted.
    A window predicts targets ``seq[start+1 : end]`` from inputs ``seq[start : end-1]`` (at most
    ``block_size``), scoring its last ``n_scored`` targets. The first window starts at 0 and scores all its
    targets; each later one scores the ``stride`` targets after the previous window (fewer at the end).
    With ``bos_every_window`` (see :func:`window_arrays`) a window that does not start at 0 has ``seq[0]``
    (BOS) in place of its first input.
    """
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in 1..block_size ({block_size}), got {stride}")
    if length < 2:
        return np.zeros((0, 3), dtype=np.int64)
    e1 = min(block_size, length - 1) + 1
    k = -(-(length - e1) // stride)
    ends = np.minimum(e1 + stride * np.arange(k + 1, dtype=np.int64), length)
    n_scored = np.diff(ends, prepend=1)
    starts = np.maximum(ends - 1 - block_size, 0)
    return np.stack([starts, ends, n_scored], axis=1)


def window_arrays(seq: np.ndarray, window: Sequence[int], bos_every_window: bool) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of one window of :func:`plan_windows`."""
    start, end, _ = (int(v) for v in window)
    if bos_every_window and start > 0:
        inputs = np.concatenate([seq[:1], seq[start + 1 : end - 1]])
    else:
        inputs = seq[start : end - 1]
    return inputs, seq[start + 1 : end]


class _Totals:
    """Running sums over scored tokens (float64)."""

    def __init__(self, token_mask: torch.Tensor | None, names: tuple[str, str]) -> None:
        self.nll = 0.0
        self.tokens = 0
        self.windows = 0
        self.mask = token_mask
        self.names = names
        self.class_nll = [0.0, 0.0]
        self.class_tokens = [0, 0]

    def add(self, nll: torch.Tensor, targets: torch.Tensor) -> None:
        total, n = float(nll.sum(dtype=torch.float64)), int(nll.numel())
        self.nll += total
        self.tokens += n
        if self.mask is not None:
            is_in = self.mask[targets]
            n_in = int(is_in.sum())
            nll_in = float(nll[is_in].sum(dtype=torch.float64))
            self.class_nll[0] += nll_in
            self.class_tokens[0] += n_in
            self.class_nll[1] += total - nll_in
            self.class_tokens[1] += n - n_in

    def classes(self) -> dict[str, ClassLoss] | None:
        if self.mask is None:
            return None
        out = {}
        for i, name in enumerate(self.names):
            n, s = self.class_tokens[i], self.class_nll[i]
            out[name] = ClassLoss(n, s, s / n if n else None, s / self.nll if self.nll else 0.0)
        return out


def _forward_batch(
    model: Any,
    rows: list[tuple[np.ndarray, np.ndarray, int]],
    device: torch.device,
    totals: _Totals,
) -> None:
    """Score a batch of windows ``(inputs, targets, n_scored)``: one forward, NLL of the scored targets."""
    width = max(len(x) for x, _, _ in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    labels = np.full((len(rows), width), -100, dtype=np.int64)
    attn = np.zeros((len(rows), width), dtype=np.int64)
    for r, (x, y, n) in enumerate(rows):
        ids[r, : len(x)] = x
        attn[r, : len(x)] = 1
        labels[r, len(y) - n : len(y)] = y[len(y) - n :]
    ids_t = torch.from_numpy(ids).to(device)
    attn_t = torch.from_numpy(attn).to(device)
    labels_t = torch.from_numpy(labels).to(device)
    logits = model(input_ids=ids_t, attention_mask=attn_t, use_cache=False).logits
    keep = labels_t != -100
    targets = labels_t[keep]
    picked = logits[keep].float()  # [n, V]; float32 log-softmax whatever the model dtype
    nll = torch.logsumexp(picked, dim=-1) - picked.gather(1, targets[:, None]).squeeze(1)
    totals.add(nll.cpu(), targets.cpu())
    totals.windows += len(rows)


def _score_sequences(
    model: Any,
    seqs: list[np.ndarray],
    block_size: int,
    stride: int,
    batch_size: int,
    bos_every_window: bool,
    device: torch.device,
    totals: _Totals,
) -> None:
    """Plan the windows of many sequences, sort them by length and score them in padded batches."""
    rows: list[tuple[np.ndarray, np.ndarray, int]] = []
    for seq in seqs:
        for w in plan_windows(len(seq), block_size, stride):
            x, y = window_arrays(seq, w, bos_every_window)
            rows.append((x, y, int(w[2])))
    rows.sort(key=lambda r: -len(r[0]))
    for batch in length_batches([len(r[0]) for r in rows], batch_size):
        _forward_batch(model, [rows[i] for i in batch], device, totals)


MIN_BATCH_FILL = 0.9
"""A window joins a padded batch only if it is at least this fraction of the batch's longest: padding is
computed like real tokens, and on a CPU (where batching buys no parallelism a 300-token sequence does not
already have) a batch of mixed document ends cost up to twice the forward time of the same windows unpadded
(``benchmarks/bench_score_batching.py``: SmolLM2-135M on auto's 9 check documents, 1.73x)."""


def length_batches(lengths: Sequence[int], batch_size: int, min_fill: float = MIN_BATCH_FILL) -> list[list[int]]:
    """Consecutive batches of indices into ``lengths`` (sorted longest first), at most ``batch_size`` each and
    none padded by more than ``1 - min_fill`` of its width."""
    batches: list[list[int]] = []
    for i, n in enumerate(lengths):
        if batches and len(batches[-1]) < batch_size and n >= min_fill * lengths[batches[-1][0]]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _check_block(model: Any, block_size: int | None, stride: int | None) -> tuple[int, int]:
    ctx = context_length(model)
    if block_size is None:
        block_size = min(ctx or DEFAULT_MAX_BLOCK, DEFAULT_MAX_BLOCK)
    if block_size < 1:
        raise ClpError(f"block_size must be positive, got {block_size}")
    if ctx is not None and block_size > ctx:
        raise ClpError(f"block_size {block_size} exceeds the model's context length {ctx}; pass --block_size {ctx}")
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ClpError(f"stride must be between 1 and block_size ({block_size}), got {stride}")
    return block_size, stride


def _mask_for(model: Any, token_mask: torch.Tensor | None) -> torch.Tensor | None:
    if token_mask is None:
        return None
    mask = torch.as_tensor(token_mask, dtype=torch.bool).flatten().cpu()
    rows = vocab_rows(model)
    if mask.numel() < rows:  # padded vocabulary rows are never targets
        mask = torch.cat([mask, torch.zeros(rows - mask.numel(), dtype=torch.bool)])
    return mask


def vocab_rows(model: Any) -> int:
    """Rows of the output head (the logits' width), padding included."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.get_input_embeddings().weight.shape[0])


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _cut_document(tokenizer: Any, text: str, ids: list[int], keep: int) -> str:
    """The prefix of ``text`` covered by its first ``keep`` tokens (for exact bytes when max_tokens cuts)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if enc["input_ids"] == ids:
            return text[: enc["offset_mapping"][keep - 1][1]]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        pass
    return tokenizer.decode(ids[:keep])


def score_documents(
    model: Any,
    tokenizer: Any,
    docs: Iterable[str],
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    new_token_mask: torch.Tensor | None = None,
    class_names: tuple[str, str] = ("new", "shared"),
    progress: bool = True,
    total: int | None = None,
    chunk_documents: int = 256,
) -> PerplexityResult:
    """Score documents exactly (every token once) with a loaded model; see the module docstring for the rule.

    ``docs`` may be a generator (the text is streamed in chunks of ``chunk_documents``). ``max_tokens`` stops
    after that many predicted tokens; the document that crosses the limit is cut at a token boundary and only
    the bytes and words of its scored part are counted. ``new_token_mask`` (bool over the vocabulary) splits
    the loss into ``class_names[0]`` (mask True) and ``class_names[1]`` by the predicted token.
    """
    block_size, stride = _check_block(model, block_size, stride)
    if batch_size < 1:
        raise ClpError(f"batch_size must be positive, got {batch_size}")
    prefix, bos_every_window = prefix_rule(tokenizer)
    if prefix is None:
        log.warning("the tokenizer has neither BOS nor EOS: the first token of each document is context only")
    device = model_device(model)
    totals = _Totals(_mask_for(model, new_token_mask), class_names)
    n_docs = n_bytes = n_words = planned = 0
    truncated = False
    if total is None and hasattr(docs, "__len__"):
        total = len(docs)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    bar = tqdm(total=total, unit="doc", desc="perplexity", disable=not progress, dynamic_ncols=True)
    was_training = model.training
    model.eval()

    def flush(chunk: list[str]) -> None:
        nonlocal n_docs, n_bytes, n_words, planned, truncated
        remaining = None if max_tokens is None else max_tokens - planned
        done = _tokenize_chunk(chunk, tokenizer, prefix, remaining)
        n_docs, n_bytes, n_words = n_docs + done.n_docs, n_bytes + done.n_bytes, n_words + done.n_words
        planned += done.n_tokens
        truncated = done.truncated
        _score_sequences(model, done.seqs, block_size, stride, batch_size, bos_every_window, device, totals)
        bar.update(len(chunk))
        bar.set_postfix(tokens=totals.tokens, bpb=_bpb(totals.nll, n_bytes), refresh=False)

    try:
        with torch.inference_mode():
            chunk: list[str] = []
            for doc in _checked(docs):
                chunk.append(doc)
                if len(chunk) >= chunk_documents:
                    flush(chunk)
                    chunk = []
                    if truncated:
                        break
            if chunk and not truncated:
                flush(chunk)
    finally:
        bar.close()
        model.train(was_training)
    if totals.tokens == 0:
        raise ClpError("no text to score: every document is empty")
    elapsed = time.perf_counter() - t0
    return _result(totals, n_docs, n_bytes, n_words, block_size, stride,
                   tokenizer.convert_ids_to_tokens(prefix) if prefix is not None else None,
                   bos_every_window, truncated, elapsed)


def _checked(docs: Iterable[str]) -> Iterator[str]:
    for d in docs:
        if not isinstance(d, str):
            raise ClpError(f"documents must be strings, got {type(d).__name__}")
        yield d


def _bpb(nll: float, n_bytes: int) -> str:
    return f"{nll / LN2 / n_bytes:.4f}" if n_bytes else "-"


@dataclass
class _Chunk:
    seqs: list[np.ndarray]
    """``[prefix] + ids`` per document (just ``ids`` without a prefix)."""
    n_docs: int = 0
    n_bytes: int = 0
    n_words: int = 0
    n_tokens: int = 0
    """Tokens these sequences predict."""
    truncated: bool = False


def _tokenize_chunk(chunk: list[str], tokenizer: Any, prefix: int | None, remaining: int | None) -> _Chunk:
    """Tokenise documents into sequences and count their bytes and words, stopping after ``remaining``
    predicted tokens (the document crossing the limit is cut at a token boundary)."""
    texts = [t for t in chunk if t]
    encoded = _encode(tokenizer, texts) if texts else []
    out = _Chunk([])
    lost = 0 if prefix is not None else 1  # without a prefix, the first token is context only
    for text, ids in zip(texts, encoded):
        if len(ids) <= lost:
            continue
        if remaining is not None and remaining <= 0:
            out.truncated = True
            break
        scored = len(ids) - lost
        if remaining is not None and scored > remaining:
            keep = remaining + lost
            text, ids, scored = _cut_document(tokenizer, text, ids, keep), ids[:keep], remaining
            out.truncated = True
        out.seqs.append(_seq(prefix, ids))
        out.n_docs += 1
        out.n_bytes += len(text.encode("utf-8"))
        out.n_words += count_words(text)
        out.n_tokens += scored
        if remaining is not None:
            remaining -= scored
        if out.truncated:
            break
    return out


def _seq(prefix: int | None, ids: list[int]) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64)
    return np.concatenate([np.array([prefix], dtype=np.int64), arr]) if prefix is not None else arr


def _result(totals: _Totals, n_docs: int, n_bytes: int, n_words: int | None, block_size: int, stride: int,
            prefix: str | None, bos_every_window: bool, truncated: bool, elapsed: float,
            bytes_estimated: bool = False) -> PerplexityResult:
    nll, n = totals.nll, totals.tokens
    mean = nll / n
    return PerplexityResult(
        num_documents=n_docs,
        num_tokens=n,
        num_bytes=n_bytes,
        num_words=n_words,
        nll=nll,
        mean_loss=mean,
        token_perplexity=_exp(mean),
        bits_per_byte=nll / LN2 / n_bytes if n_bytes else float("nan"),
        byte_perplexity=_exp(nll / n_bytes) if n_bytes else float("nan"),
        word_perplexity=_exp(nll / n_words) if n_words else None,
        block_size=block_size,
        stride=stride,
        prefix_token=prefix,
        bos_every_window=bos_every_window,
        truncated=truncated,
        bytes_estimated=bytes_estimated,
        token_classes=totals.classes(),
        num_windows=totals.windows,
        elapsed_s=elapsed,
        tokens_per_s=n / elapsed if elapsed > 0 else 0.0,
    )


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def score_token_stream(
    model: Any,
    tokens: Any,
    block_size: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    num_bytes: int | None = None,
    new_token_mask: torch.Tensor | None = None,
    class_names: tuple[str, str] = ("new", "shared"),
    progress: bool = False,
) -> PerplexityResult:
    """Score a token-id stream in disjoint blocks (the trainer's quick eval): ``TokenShards`` or a 1-D array.

    The first id is context only; documents are not separated (the stream's EOS separators are scored like
    any token), so this matches the training loss, not :func:`score_documents`. Bits per byte use
    ``num_bytes`` of the whole stream (``TokenShards``: its index), scaled by the fraction of tokens scored
    when ``max_tokens`` cuts (then ``bytes_estimated`` is True).
    """
    from ..data import TokenShards

    block_size, stride = _check_block(model, block_size, None)
    if isinstance(tokens, TokenShards):
        total_len = len(tokens)
        num_bytes = tokens.index.num_bytes if num_bytes is None else num_bytes
        read = tokens.read
    else:
        arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
        total_len = len(arr)
        read = lambda s, n: arr[s : s + n]  # noqa: E731
    length = total_len if max_tokens is None else min(total_len, max_tokens + 1)
    if length < 2:
        raise ClpError("the token stream holds fewer than 2 ids: nothing to score")
    device = model_device(model)
    totals = _Totals(_mask_for(model, new_token_mask), class_names)
    t0 = time.perf_counter()
    windows = plan_windows(length, block_size, stride)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            bar = tqdm(total=len(windows), unit="block", desc="perplexity", disable=not progress)
            for i in range(0, len(windows), batch_size):
                rows = []
                for start, end, n in windows[i : i + batch_size]:
                    seq = read(int(start), int(end - start))
                    rows.append((seq[:-1], seq[1:], int(n)))
                _forward_batch(model, rows, device, totals)
                bar.update(len(rows))
            bar.close()
    finally:
        model.train(was_training)
    truncated = length < total_len
    if num_bytes is not None:
        scored_bytes = round(num_bytes * (totals.tokens / max(1, total_len - 1))) if truncated else num_bytes
    else:
        scored_bytes = 0
    return _result(totals, 0, scored_bytes, None, block_size, stride, None, False, truncated,
                   time.perf_counter() - t0, bytes_estimated=truncated)


# --------------------------------------------------------------------------------------------- API + CLI


@text_flag("text_files")
@dataclass
class PerplexityConfig:
    """Everything ``clp-transfer perplexity`` takes."""

    model: str
    """Model to score: local HF directory (safetensors), hub id or .gguf file."""
    data: str | None = None
    """Prepared data directory (from `clp-transfer prepare`); its <split>.jsonl documents are scored."""
    split: str = "valid"
    """Split of --data to score."""
    text_files: list[str] = field(default_factory=list)
    """Text files instead of --data: .txt (one document per line, blank lines skipped) or .jsonl; .gz ok."""
    text_key: str = "text"
    """Field holding the text in .jsonl files."""
    tokenizer: str | None = None
    """Tokenizer directory when the model directory has none."""
    block_size: int | None = None
    """Tokens per window (default: the model's context length, at most 2048)."""
    stride: int | None = None
    """Tokens predicted per window after the first; < block_size gives a sliding window (default: block_size)."""
    batch_size: int = 8
    """Windows per forward pass."""
    max_tokens: int | None = None
    """Stop after this many predicted tokens (default: the whole text)."""
    new_tokens: str = "auto"
    """Split the loss by predicted token class: JSON file with new token ids (a list, or transfer_report.json);
    'auto' uses the model's transfer_report.json when present; 'none' turns it off."""
    output: str | None = None
    """Write the result as JSON here (atomically)."""
    overwrite: bool = False
    """Replace an existing --output file."""
    device: str | None = None
    """cpu, cuda, cuda:1, mps (default: a GPU when there is one)."""
    dtype: str | None = None
    """auto (float32 on CPU, bfloat16 on capable GPUs), float32, bfloat16 or float16."""
    progress: bool = True
    """Show a progress bar."""
    allow_pickle: bool = False
    """Allow pickle checkpoints (*.bin); unsafe for files you do not trust."""
    trust_remote_code: bool = False
    """Allow models whose code lives in their repository."""


def perplexity(
    model: Any,
    tokenizer: Any = None,
    *,
    data: str | None = None,
    split: str = "valid",
    text_files: Sequence[str] | None = None,
    texts: Iterable[str] | None = None,
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    new_token_mask: torch.Tensor | None = None,
    output: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **load_options: Any,
) -> PerplexityResult:
    """Perplexity measures of ``model`` on a data split, text files or in-memory ``texts``.

    ``model`` is a path/hub id/.gguf (loaded safely; ``load_options``: tokenizer dir via ``tokenizer``,
    ``device``, ``dtype``, ``allow_pickle``, ``trust_remote_code``) or a loaded ``PreTrainedModel`` (then
    ``tokenizer`` is required). A path model with a ``transfer_report.json`` gets its loss split into new vs
    shared tokens unless ``new_tokens="none"``.

    >>> r = perplexity("out/target", data="data/oscar_de", block_size=512)   # doctest: +SKIP
    >>> r.bits_per_byte, r.word_perplexity, r.token_classes["new"].mean_loss  # doctest: +SKIP
    """
    if output:
        check_output_path(output, overwrite, "output file")
    sources = [x for x in (data, text_files or None, texts) if x is not None]
    if len(sources) != 1:
        raise ClpError("give exactly one of --data DIR or --text_files FILE... (API: data=, text_files= or texts=)")
    files: list[Path] = []
    if texts is None:
        files, desc = resolve_text_sources(data, split, text_files)
    else:
        desc = "texts"
    new_tokens = load_options.pop("new_tokens", "auto")
    text_key = load_options.pop("text_key", "text")
    if isinstance(model, (str, os.PathLike)):
        loaded = load_for_eval(model, tokenizer=tokenizer, **load_options)
        lm, tok, name = loaded.model, loaded.tokenizer, loaded.name
        model_path = str(Path(name).resolve()) if Path(name).exists() else None
        if new_token_mask is None and new_tokens not in (None, "none"):
            report = Path(new_tokens) if new_tokens != "auto" else (
                loaded.path / "transfer_report.json" if loaded.path else None)
            if report is not None and (new_tokens != "auto" or report.is_file()):
                new_token_mask = new_token_mask_from_ids(read_new_token_ids(report), vocab_rows(lm))
                log.info("splitting the loss by %d new tokens from %s", int(new_token_mask.sum()), report)
    else:
        if tokenizer is None:
            raise ClpError("pass the tokenizer together with a loaded model")
        if load_options:
            log.debug("ignoring load options %s for a loaded model", sorted(load_options))
        lm, tok, model_path = model, tokenizer, None
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    if texts is None:
        docs: Iterable[str] = (d for f in files for d in read_documents(f, text_key))
        total = count_lines(files) if progress else None
    else:
        docs, total = texts, None
    result = score_documents(lm, tok, docs, block_size=block_size, stride=stride, batch_size=batch_size,
                             max_tokens=max_tokens, new_token_mask=new_token_mask, progress=progress, total=total)
    result.model, result.model_path, result.data = str(name), model_path, desc
    if output:
        atomic_write_json(output, result.to_dict())
    return result


def run_perplexity(cfg: PerplexityConfig) -> PerplexityResult:
    return perplexity(
        cfg.model, cfg.tokenizer, data=cfg.data, split=cfg.split, text_files=cfg.text_files or None,
        block_size=cfg.block_size, stride=cfg.stride, batch_size=cfg.batch_size, max_tokens=cfg.max_tokens,
        output=cfg.output, overwrite=cfg.overwrite, progress=cfg.progress, new_tokens=cfg.new_tokens,
        text_key=cfg.text_key, device=cfg.device, dtype=cfg.dtype, allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
    )


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, PerplexityConfig)


def cli_main(args: argparse.Namespace) -> int:
    require_flags(PerplexityConfig, args)
    cfg = build_config(PerplexityConfig, args)
    result = run_perplexity(cfg)
    print(result.summary())
    if cfg.output:
        print(f"wrote {cfg.output}")
    return 0
