"""A helper *space* built from target text: token vectors for CLP without a helper model.

CLP uses its helper model for one thing only: cosine similarities between target tokens. This module builds
such a space directly from target-language text, the way FOCUS and WECHSEL build theirs, in a CPU-time budget
of minutes instead of the ~20 CPU-minutes a useful helper LM needs:

1. read documents (:func:`clp_transfer.transfer.helper.read_documents`) and load the target tokenizer, or train one
   on the text (:func:`clp_transfer.tiny.train_tokenizer`, as ``clp-transfer helper`` does);
2. tokenize the text; every target token id becomes a "word" of a skip-gram model (word2vec with negative
   sampling, gensim) trained over the token sequences - no subword n-grams: the target tokens already are
   subwords, and the ids carry no spelling for n-grams to share;
3. tokens the training never saw (or saw fewer than ``min_count`` times) get a fallback vector
   (:func:`fill_unseen`): the mean of the vectors of their pieces - the fewest trained target tokens that
   spell the same bytes, word-start mark on the first piece; tokens without such pieces (special tokens,
   bytes absent from the text) get the zero vector, whose cosine with every token is 0, so it never
   attracts CLP's weight and a new token with it takes the plain mean of the shared rows;
4. write a *helper directory*: the target tokenizer, ``embeddings.safetensors`` (one tensor ``embeddings``
   [V_t, dim], float32) and ``helper_space.json`` (config, data, training and fallback statistics).

``clp-transfer transfer --helper DIR`` reads such a directory like a helper model (only the embedding matrix
is used either way), so every similarity method and the calibration work unchanged. ``transfer
--helper_text FILES [--target_tokenizer T]`` builds one on the fly.

Why gensim and skip-gram: gensim's word2vec trains from a Python iterable, so the token ids go in without a
temporary text file, and training can be cut into slices with an explicit learning-rate schedule - which is
what a CPU-time budget with a progress bar needs (fastText's ``train_unsupervised`` takes a file and a fixed
epoch count and trains in one opaque call). Its threads run inside this process, so ``time.process_time``
measures the whole build's CPU time, the unit of the budget; a CPU-time budget gives the same space on a
busy machine and an idle one, unlike a wall-clock budget. Skip-gram rather than CBOW: it gives rarer words
better vectors (Mikolov et al. 2013), and most of a 16k vocabulary is rare.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from ..atomic import atomic_directory, check_output_path
from ..errors import ClpError

log = logging.getLogger(__name__)

REPORT_NAME = "helper_space.json"
VECTORS_NAME = "embeddings.safetensors"
VECTORS_KEY = "embeddings"
KIND = "clp-transfer helper space"
DEFAULT_CPU_MINUTES = 3.0
SENTENCE_TOKENS = 1000  # gensim ignores words past 10,000 in a sentence; documents are cut into pieces
SLICE_TOKENS = 200_000  # tokens per training call: the granularity of budget checks and progress updates

TokenizerKind = Literal["bpe", "sentencepiece", "wordpiece"]


@dataclass
class SpaceConfig:
    """Everything ``clp-transfer helper --kind embeddings`` takes."""

    text: list[str]
    """Text files in the target language: .txt (one document per line) or .jsonl ({"text": ...} per line),
    optionally gzipped."""
    output_dir: str
    """Directory for the helper space: the target tokenizer, embeddings.safetensors and helper_space.json."""
    tokenizer: str | None = None
    """The target tokenizer (a directory or hub id with tokenizer files). Default: train one on the text with
    --vocab_size and --tokenizer_kind."""
    vocab_size: int = 16000
    """Size of the tokenizer trained when no --tokenizer is given, special tokens included."""
    tokenizer_kind: TokenizerKind = "bpe"
    """Family of the tokenizer trained when no --tokenizer is given."""
    min_frequency: int = 2
    """Minimum count of a pair for the tokenizer trainer to merge it."""
    dim: int = 100
    """Dimension of the token vectors."""
    window: int = 5
    """Skip-gram context window in tokens (each side)."""
    negative: int = 5
    """Negative samples per positive pair."""
    min_count: int = 3
    """Tokens seen fewer times in the trained text get the fallback vector (mean of their pieces) instead of
    their own noisy vector."""
    cpu_minutes: float | None = None
    """Budget of the whole build in CPU minutes (process time of all threads: reading, tokenizing and
    training; with 2 threads, 1 CPU-minute is about 30 s on an idle machine). Default 3, unless --epochs is
    given. The learning rate decays linearly over the budget."""
    epochs: float | None = None
    """Passes of skip-gram training over the text instead of a CPU budget (fractions allowed)."""
    learning_rate: float = 0.025
    """Initial skip-gram learning rate (decays linearly to 1e-4)."""
    num_threads: int | None = None
    """Training threads (default: all cores). With more than one the result is not bit-for-bit reproducible."""
    seed: int = 0
    """Seed of the vectors' initialisation and of the order of the text."""
    overwrite: bool = False
    """Replace an existing output directory."""


@dataclass
class HelperSpace:
    """A loaded helper space: what :func:`clp_transfer.transfer.pipeline.transfer` needs from a helper."""

    path: Path
    """The helper directory (gone already for a space built on the fly by ``transfer --helper_text``)."""
    vectors: Any
    """torch.Tensor [V_t, dim] float32: the vector of every target token id."""
    tokenizer: Any
    """The target tokenizer (transformers fast tokenizer)."""
    report: dict[str, Any]
    """The contents of helper_space.json."""


# ------------------------------------------------------------------------------------------- checks


def _check(cfg: SpaceConfig) -> None:
    if cfg.cpu_minutes is not None and cfg.epochs is not None:
        raise ClpError("give either --cpu_minutes or --epochs, not both")
    positive = {"dim": cfg.dim, "window": cfg.window, "negative": cfg.negative, "min_count": cfg.min_count,
                "vocab_size": cfg.vocab_size, "learning_rate": cfg.learning_rate}
    for opt in ("cpu_minutes", "epochs", "num_threads"):
        if getattr(cfg, opt) is not None:
            positive[opt] = getattr(cfg, opt)
    for name, value in positive.items():
        if value <= 0:
            raise ClpError(f"--{name} must be positive (got {value})")


def _ordinary_ids(vocab) -> list[int]:
    return [i for i, t in enumerate(vocab.tokens) if t is not None and i not in vocab.special_ids]


def _target_tokenizer(cfg: SpaceConfig, docs: list[str]) -> tuple[Any, dict[str, Any]]:
    """Load the given tokenizer, or train one on ``docs``; refuse one without ordinary tokens."""
    from ..models import load_tokenizer
    from .tokens import VocabInfo

    t = time.perf_counter()
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer, what="target tokenizer")
        info: dict[str, Any] = {"origin": cfg.tokenizer, "trained": False}
    else:
        from ..tiny import train_tokenizer

        tok = train_tokenizer(docs, cfg.vocab_size, cfg.tokenizer_kind, min_frequency=cfg.min_frequency)
        if len(tok) > cfg.vocab_size:
            raise ClpError(
                f"--vocab_size {cfg.vocab_size} is smaller than the {len(tok)} tokens a {cfg.tokenizer_kind} "
                "tokenizer always holds (its special tokens and base alphabet); give a larger --vocab_size "
                "(useful vocabularies have thousands of tokens)")
        info = {"origin": None, "trained": True, "kind": cfg.tokenizer_kind}
    vocab = VocabInfo.from_tokenizer(tok)
    ordinary = _ordinary_ids(vocab)
    if not ordinary:
        raise ClpError(f"the target tokenizer has {len(vocab)} tokens, all of them special (control) tokens: "
                       "there is nothing to build vectors for; use a real tokenizer or train one on the text")
    info.update(vocab_size=len(tok), ordinary_tokens=len(ordinary), style=vocab.style.value,
                seconds=round(time.perf_counter() - t, 2))
    return tok, info


# ----------------------------------------------------------------------------------------- tokenize


def token_sentences(tokenizer: Any, docs: list[str], special_ids: set[int]) -> list[list[int]]:
    """Target token ids of every document without special tokens, cut into pieces of <= SENTENCE_TOKENS."""
    from tqdm.auto import tqdm

    backend = tokenizer.backend_tokenizer
    out: list[list[int]] = []
    chunk = 2000
    for i in tqdm(range(0, len(docs), chunk), desc="tokenizing", unit="chunk", disable=len(docs) <= chunk):
        for enc in backend.encode_batch(docs[i:i + chunk], add_special_tokens=False):
            ids = [t for t in enc.ids if t not in special_ids]  # e.g. [UNK]: no context worth learning
            out.extend(ids[s:s + SENTENCE_TOKENS] for s in range(0, len(ids), SENTENCE_TOKENS))
    return [s for s in out if s]


# ------------------------------------------------------------------------------------------ training


class _Budget:
    """Progress in [0, 1] of a CPU-time or epoch budget, and the learning rate it implies."""

    def __init__(self, cfg: SpaceConfig, corpus_tokens: int, cpu_start: float) -> None:
        self.cpu_start = cpu_start
        self.cpu_s = None if cfg.epochs is not None else 60 * (cfg.cpu_minutes or DEFAULT_CPU_MINUTES)
        self.total_tokens = None if cfg.epochs is None else max(1, round(cfg.epochs * corpus_tokens))
        self.alpha0, self.alpha_min = cfg.learning_rate, 1e-4

    def cpu_used(self) -> float:
        return time.process_time() - self.cpu_start

    def progress(self, tokens_done: int) -> float:
        if self.total_tokens is not None:
            return min(1.0, tokens_done / self.total_tokens)
        return min(1.0, self.cpu_used() / self.cpu_s)

    def alpha(self, progress: float) -> float:
        return self.alpha_min + (self.alpha0 - self.alpha_min) * (1.0 - min(1.0, progress))


def _slices(sentences: list[list[str]], seed: int) -> Iterator[tuple[list[list[str]], int]]:
    """Endless (sentences, tokens) slices of about SLICE_TOKENS, epoch after epoch in one shuffled order."""
    import random

    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)  # the text is often sorted by source: spread every slice over it
    while True:
        batch: list[list[str]] = []
        n = 0
        for i in order:
            batch.append(sentences[i])
            n += len(sentences[i])
            if n >= SLICE_TOKENS:
                yield batch, n
                batch, n = [], 0
        if batch:
            yield batch, n


def train_skipgram(cfg: SpaceConfig, sentences: list[list[int]], vocab_size: int, cpu_start: float):
    """Skip-gram vectors [V_t, dim] for ``sentences`` of target ids within the budget of ``cfg``.

    Returns (vectors float32 tensor [V_t, dim], trained_counts long tensor [V_t]: occurrences each token had
    in the text that was actually trained on, stats dict). Rows of tokens that were never trained are zero.
    """
    import torch

    try:
        from gensim.models import Word2Vec
    except ImportError:
        raise ClpError("helper spaces need the 'gensim' package: pip install 'clp-transfer[textspace]'") from None

    names = [str(i) for i in range(vocab_size)]  # one shared str object per id: sentences hold references
    words = [[names[t] for t in s] for s in sentences]
    corpus_tokens = sum(len(s) for s in sentences)
    counts = torch.bincount(torch.tensor([t for s in sentences for t in s], dtype=torch.long), minlength=vocab_size)
    threads = cfg.num_threads or os.cpu_count() or 1
    model = Word2Vec(vector_size=cfg.dim, window=cfg.window, negative=cfg.negative, sg=1, min_count=1,
                     workers=threads, seed=cfg.seed, alpha=cfg.learning_rate, min_alpha=1e-4)
    model.build_vocab_from_freq({names[i]: int(c) for i, c in enumerate(counts.tolist()) if c > 0})
    budget = _Budget(cfg, corpus_tokens, cpu_start)
    trained = torch.zeros(vocab_size, dtype=torch.long)
    gensim_log = logging.getLogger("gensim")
    level = gensim_log.level
    gensim_log.setLevel(max(logging.WARNING, level))  # it logs every training call at INFO; the bar says enough
    try:
        done, calls, per_token = _train_slices(model, words, budget, trained, cfg.seed)
    finally:
        gensim_log.setLevel(level)
    vectors = torch.zeros(vocab_size, cfg.dim, dtype=torch.float32)
    seen = torch.nonzero(trained > 0).flatten()
    if len(seen):
        rows = [model.wv.key_to_index[names[i]] for i in seen.tolist()]
        vectors[seen] = torch.from_numpy(model.wv.vectors[rows]).float()
    stats = {"tokens_trained": done, "epochs": round(done / max(1, corpus_tokens), 3), "training_calls": calls,
             "threads": threads, "tokens_per_cpu_second": round(1 / per_token) if per_token else None}
    return vectors, trained, stats


def _train_slices(model, words: list[list[str]], budget: _Budget, trained, seed: int) -> tuple[int, int, float | None]:
    """Train ``model`` slice by slice until the budget is spent; count trained occurrences into ``trained``."""
    import torch
    from tqdm.auto import tqdm

    vocab_size = trained.shape[0]
    done, calls, per_token = 0, 0, None
    unit, total = ("CPU s", round(budget.cpu_s)) if budget.cpu_s else ("tokens", budget.total_tokens)
    bar = tqdm(total=total, desc="skip-gram", unit=unit, leave=False)
    for batch, n in _slices(words, seed):
        p0 = budget.progress(done)
        if calls and p0 >= 1.0:  # at least one slice, however small the budget
            break
        if budget.total_tokens is not None and done + n > budget.total_tokens:  # last, partial slice
            batch, n = _truncate(batch, budget.total_tokens - done)
        # Where the slice will end, for its learning-rate ramp: by tokens, or by the CPU rate measured so far.
        p1 = budget.progress(done + n) if budget.cpu_s is None else (
            min(1.0, p0 + (per_token * n / budget.cpu_s)) if per_token else p0)
        c = time.process_time()
        model.train(batch, total_examples=len(batch), total_words=n, epochs=1,
                    start_alpha=budget.alpha(p0), end_alpha=budget.alpha(p1))
        per_token = (time.process_time() - c) / n
        trained += torch.bincount(torch.tensor([int(w) for s in batch for w in s], dtype=torch.long),
                                  minlength=vocab_size)
        done += n
        calls += 1
        bar.update(round(budget.cpu_used()) - bar.n if budget.cpu_s else n)
    bar.close()
    return done, calls, per_token


def _truncate(batch: list[list[str]], n: int) -> tuple[list[list[str]], int]:
    out, left = [], n
    for s in batch:
        if left <= 0:
            break
        out.append(s[:left])
        left -= len(out[-1])
    return out, n - left


# ----------------------------------------------------------------------------------------- fallback


def fill_unseen(vectors, known, vocab) -> tuple[Any, dict[str, int]]:
    """Give every token without a trained vector the mean vector of its pieces, or zero.

    ``vectors`` [V_t, dim] float; ``known`` [V_t] bool: rows trained on enough occurrences; ``vocab`` the
    target :class:`~clp_transfer.transfer.tokens.VocabInfo` (its special tokens always count as unknown). A token's pieces are the fewest *known* target tokens
    that spell its bytes (:func:`clp_transfer.transfer.tokens.decompose` against the vocabulary of known tokens, so
    the word-start space stays on the first piece); bytes no known token covers are skipped. Unknown tokens
    with no pieces - special tokens, bytes absent from the text - get the zero vector: cosine 0 with every
    token, so CLP's sparse weights never pick them and a new token with it gets the mean of the shared rows.
    Returns the new matrix and counts {"trained", "from_pieces", "zero"}.
    """
    import torch

    from .tokens import VocabInfo, decompose

    out = vectors.clone()
    known = known.clone()
    known[sorted(vocab.special_ids)] = False  # never in the text (tokenized without them): a row here is noise
    known_list = known.tolist()
    unknown = [i for i, k in enumerate(known_list) if not k]
    out[unknown] = 0.0
    known_vocab = VocabInfo([t if k and i not in vocab.special_ids else None
                             for i, (t, k) in enumerate(zip(vocab.tokens, known_list))], vocab.style)
    sub = VocabInfo([vocab.tokens[i] for i in unknown], vocab.style,
                    {j for j, i in enumerate(unknown) if i in vocab.special_ids})
    from_pieces = 0
    for i, pieces in zip(unknown, decompose(sub, known_vocab) if unknown else []):
        if pieces:
            out[i] = vectors[torch.tensor(pieces)].mean(0)
            from_pieces += 1
    return out, {"trained": int(known.sum()), "from_pieces": from_pieces, "zero": len(unknown) - from_pieces}


# --------------------------------------------------------------------------------------------- build


def build_helper_space(config: SpaceConfig) -> Path:
    """Build token vectors for the target vocabulary from ``config.text``; write the helper directory."""
    import torch
    from safetensors.torch import save_file

    from .helper import read_documents
    from .tokens import VocabInfo

    cfg = config
    cpu0, wall0 = time.process_time(), time.perf_counter()
    _check(cfg)
    out = check_output_path(cfg.output_dir, cfg.overwrite, what="output directory")
    docs, files = read_documents(cfg.text)
    tokenizer, tok_info = _target_tokenizer(cfg, docs)
    vocab = VocabInfo.from_tokenizer(tokenizer)
    v_t = len(vocab)
    sentences = token_sentences(tokenizer, docs, vocab.special_ids)
    n_bytes = sum(f["bytes"] for f in files)
    del docs
    n_tokens = sum(len(s) for s in sentences)
    if n_tokens < 2:
        raise ClpError(
            f"the text ({n_bytes} bytes) contains {n_tokens} ordinary token(s) of the target tokenizer: everything "
            "else became special or unknown tokens. Give text in the tokenizer's language and script (or no "
            "--tokenizer, to train one on the text)")
    log.info("helper space: %d tokens (%.2f bytes per token) of %d target tokens", n_tokens, n_bytes / n_tokens, v_t)
    tokenize_cpu = time.process_time() - cpu0
    vectors, trained, stats = train_skipgram(cfg, sentences, v_t, cpu0)
    train_cpu = time.process_time() - cpu0 - tokenize_cpu
    vectors, fallback = fill_unseen(vectors, trained >= cfg.min_count, vocab)
    occurring = int((torch.bincount(torch.tensor([t for s in sentences for t in s]), minlength=v_t) > 0).sum())
    report = {
        "kind": KIND,
        "config": dataclasses.asdict(cfg),
        "data": {"files": files, "bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": round(n_bytes / n_tokens, 4),
                 "target_tokens_occurring": occurring},
        "tokenizer": tok_info,
        "training": {**stats, "algorithm": "skip-gram with negative sampling (gensim Word2Vec, sg=1)",
                     "budget": "epochs" if cfg.epochs is not None else "cpu_minutes",
                     "cpu_minutes_budget": None if cfg.epochs is not None else cfg.cpu_minutes or DEFAULT_CPU_MINUTES,
                     "tokenize_cpu_seconds": round(tokenize_cpu, 2), "train_cpu_seconds": round(train_cpu, 2)},
        "vectors": {"rows": v_t, "dim": cfg.dim, **fallback,
                    "fallback": "mean of the vectors of the token's pieces (fewest trained target tokens spelling "
                                "its bytes), else zero"},
        "cpu_seconds": round(time.process_time() - cpu0, 2),
        "wall_seconds": round(time.perf_counter() - wall0, 2),
        "versions": _versions(),
    }
    with atomic_directory(out, overwrite=cfg.overwrite) as tmp:
        tokenizer.save_pretrained(tmp)
        save_file({VECTORS_KEY: vectors.contiguous()}, tmp / VECTORS_NAME, metadata={"format": "pt", "kind": KIND})
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info("helper space: %s", summary(report, out))
    return out


def _versions() -> dict[str, str]:
    import gensim  # noqa: F811 - present: the training imported it
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "gensim": gensim.__version__}


def summary(report: dict[str, Any], path: Path | None) -> str:
    t, v = report["training"], report["vectors"]
    return (
        f"Built {v['rows']} token vectors (dim {v['dim']}) from {report['data']['bytes'] / 1e6:.1f} MB of text: "
        f"skip-gram over {t['tokens_trained']:,} tokens ({t['epochs']:.2f} epochs), {v['trained']} tokens trained, "
        f"{v['from_pieces']} from their pieces, {v['zero']} zero; {report['cpu_seconds']:.0f} CPU s "
        f"({report['wall_seconds']:.0f} s wall)." + (f" Wrote {path}." if path else "")
    )


# ---------------------------------------------------------------------------------------------- load


def is_helper_space(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`build_helper_space`."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / REPORT_NAME).is_file() and (p / VECTORS_NAME).is_file()


def load_helper_space(path: str | os.PathLike) -> HelperSpace:
    """Read a helper directory: vectors [V_t, dim], target tokenizer and report."""
    from safetensors import safe_open

    from ..models import load_tokenizer

    p = Path(path).expanduser()
    if not is_helper_space(p):
        raise ClpError(f"{str(path)!r} is not a helper space directory (no {REPORT_NAME} + {VECTORS_NAME})")
    report = json.loads((p / REPORT_NAME).read_text(encoding="utf-8"))
    with safe_open(p / VECTORS_NAME, "pt") as f:
        if VECTORS_KEY not in f.keys():
            raise ClpError(f"{str(p / VECTORS_NAME)!r} has no tensor {VECTORS_KEY!r}: rebuild the helper space")
        vectors = f.get_tensor(VECTORS_KEY).float()
    tokenizer = load_tokenizer(p, what="helper space")
    if vectors.dim() != 2 or vectors.shape[0] < len(tokenizer):
        raise ClpError(f"helper space {str(p)!r}: {list(vectors.shape)} vectors for {len(tokenizer)} tokens; "
                       "the files do not belong together, rebuild it")
    return HelperSpace(p, vectors, tokenizer, report)


def space_from_text(text: list[str], tokenizer: str | None = None, cpu_minutes: float | None = None,
                    seed: int = 0) -> HelperSpace:
    """Build a helper space in a temporary directory and return it loaded (``transfer --helper_text``)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="clp-helper-space-") as tmp:
        path = build_helper_space(SpaceConfig(text=list(text), output_dir=str(Path(tmp) / "space"),
                                              tokenizer=tokenizer, cpu_minutes=cpu_minutes, seed=seed))
        return load_helper_space(path)


# ----------------------------------------------------------------------------------------------- CLI


def cli_main(args: argparse.Namespace) -> int:
    """``clp-transfer helper --kind embeddings``: the flags of :class:`SpaceConfig` (see clp_transfer.transfer.helper)."""
    from ..config import from_dict

    names = {f.name for f in dataclasses.fields(SpaceConfig)}
    from ..config import require_flags

    require_flags(SpaceConfig, args)
    build_helper_space(from_dict(SpaceConfig, {k: v for k, v in vars(args).items() if k in names}, where="flags"))
    return 0
