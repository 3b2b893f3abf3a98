"""``helper``: train a small target-language model (tokenizer + causal LM) from plain text.

CLP-Transfer needs a small model in the target language whose tokenizer becomes the target vocabulary and
whose embeddings measure similarity between target tokens. Many languages have no such model; this stage
builds one from text files:

1. read documents: ``.txt`` (one document per line) or ``.jsonl`` (one ``{"text": ...}`` object per line),
   either optionally gzipped;
2. train a tokenizer of the chosen family (:func:`clp_transfer.tiny.train_tokenizer`);
3. tokenize every document, append the end-of-text token, concatenate and cut into blocks of ``block_size``;
4. train a small model (:func:`clp_transfer.tiny.tiny_model`) with the Hugging Face ``Trainer`` for a number of
   steps, epochs or minutes of wall-clock time; with a time budget the cosine learning-rate schedule runs on
   elapsed time, so it reaches its floor when the budget runs out;
5. write model (safetensors), tokenizer and ``helper_report.json`` into a temporary directory and rename it
   into place.

``--kind embeddings`` builds a helper *space* instead - the tokenizer plus skip-gram token vectors, in
minutes (:mod:`clp_transfer.transfer.helper_space`); ``transfer --helper`` takes either.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import logging
import math
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..atomic import atomic_directory, check_output_path, claim_output
from ..config import add_dataclass_arguments, build_config, require_flags
from ..errors import ClpError

log = logging.getLogger(__name__)

REPORT_NAME = "helper_report.json"

# Same choices as clp_transfer.tiny (kept here so that `clp-transfer helper --help` does not import torch;
# tests/test_helper.py checks they agree).
TokenizerKind = Literal["bpe", "sentencepiece", "wordpiece"]
Architecture = Literal["gpt2", "gpt_neox", "llama"]


@dataclass
class HelperConfig:
    """Everything ``clp-transfer helper`` takes."""

    text: list[str]
    """Text files in the target language: .txt (one document per line) or .jsonl ({"text": ...} per line),
    optionally gzipped (.txt.gz, .jsonl.gz)."""
    output_dir: str
    """Directory for the helper model (safetensors), its tokenizer and helper_report.json."""
    vocab_size: int = 16000
    """Size of the tokenizer's vocabulary, special tokens included."""
    tokenizer_kind: TokenizerKind = "bpe"
    """Tokenizer family: byte-level BPE (GPT-2/Llama 3 style), sentencepiece-style BPE with byte fallback,
    or wordpiece."""
    min_frequency: int = 2
    """Minimum count of a pair for the tokenizer trainer to merge it."""
    architecture: Architecture = "gpt2"
    """Model architecture (transformers model type)."""
    hidden_size: int = 256
    """Width of the model (embedding dimension)."""
    num_layers: int = 4
    """Number of transformer layers."""
    num_heads: int = 4
    """Number of attention heads; must divide hidden_size."""
    intermediate_size: int | None = None
    """Width of the MLP (default: 4 x hidden_size)."""
    block_size: int = 256
    """Training sequence length in tokens (documents are packed into blocks; also the model's context)."""
    batch_size: int = 8
    """Blocks per optimiser step."""
    learning_rate: float = 1e-3
    """Peak learning rate (AdamW)."""
    final_lr_ratio: float = 0.1
    """The cosine schedule decays the learning rate to this fraction of its peak."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to biases and norms)."""
    time_budget_minutes: float | None = None
    """Stop training after this many minutes of wall-clock time (tokenizer training and saving not counted);
    the learning-rate schedule follows elapsed time."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (whichever of steps and time budget comes first)."""
    epochs: float = 1.0
    """Passes over the text, used only when neither max_steps nor time_budget_minutes is given (--kind
    embeddings: skip-gram passes instead of the default CPU budget, --cpu_minutes 3)."""
    logging_steps: int = 50
    """Log the training loss every this many steps (also the window of the reported final loss)."""
    num_threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""
    torch_compile: bool = False
    """Compile the model with torch.compile (about 2x faster on CPU after a compile of about a minute)."""
    seed: int = 0
    """Seed for model initialisation and data order."""
    overwrite: bool = False
    """Replace an existing output directory."""
    language: list[str] = field(default_factory=list)
    """Language code(s) of the text (e.g. de), written into the model card; transfer and train pass it on."""


# ------------------------------------------------------------------------------------------------ text


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def read_documents(paths: list[str | Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """Documents from text files, with one info dict (path, documents, bytes, sha256) per file."""
    if not paths:
        raise ClpError("no text files given; pass --text FILE [FILE ...]")
    docs: list[str] = []
    infos: list[dict[str, Any]] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise ClpError(f"text file {str(p)!r} does not exist")
        if path.is_dir():
            raise ClpError(f"text file {str(p)!r} is a directory; pass the files in it (e.g. {p}/*.txt)")
        raw = data = path.read_bytes()
        if path.name.endswith(".gz"):
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as e:
                raise ClpError(f"text file {str(p)!r} ends in .gz but is not a valid gzip file ({e})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ClpError(
                f"text file {str(p)!r} is not UTF-8 (invalid byte 0x{raw[e.start]:02x} at offset {e.start}); "
                "convert it first, e.g. iconv -f latin1 -t utf-8"
            ) from None
        text = text.removeprefix("\ufeff")
        if _strip_gz(path.name).endswith(".jsonl"):
            file_docs = _jsonl_documents(text, str(p))
        else:
            file_docs = [line.strip() for line in text.splitlines() if line.strip()]
        if not file_docs:
            raise ClpError(f"text file {str(p)!r} holds no text; check the path or leave it out")
        docs.extend(file_docs)
        infos.append({"path": str(path), "documents": len(file_docs),
                      "bytes": sum(len(d.encode("utf-8")) for d in file_docs),
                      "sha256": hashlib.sha256(data).hexdigest()})
    return docs, infos


def _jsonl_documents(text: str, where: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ClpError(f"{where}, line {lineno}: not a JSON object ({e.msg}); .jsonl files need one "
                           '{"text": ...} object per line') from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ClpError(f'{where}, line {lineno}: expected an object with a string field "text"')
        if obj["text"].strip():
            docs.append(obj["text"].strip())
    return docs


# ------------------------------------------------------------------------------------------ training


def _check(cfg: HelperConfig) -> None:
    if cfg.hidden_size % cfg.num_heads:
        raise ClpError(f"--hidden_size {cfg.hidden_size} must be a multiple of --num_heads {cfg.num_heads}")
    positive = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
                "num_heads": cfg.num_heads, "block_size": cfg.block_size, "batch_size": cfg.batch_size,
                "learning_rate": cfg.learning_rate, "epochs": cfg.epochs, "logging_steps": cfg.logging_steps}
    for opt in ("time_budget_minutes", "max_steps", "num_threads", "intermediate_size"):
        if getattr(cfg, opt) is not None:
            positive[opt] = getattr(cfg, opt)
    for name, value in positive.items():
        if value <= 0:
            raise ClpError(f"--{name} must be positive (got {value})")
    if cfg.block_size < 2:
        raise ClpError("--block_size must be at least 2 tokens")
    if not 0 <= cfg.final_lr_ratio <= 1:
        raise ClpError(f"--final_lr_ratio must be between 0 and 1 (got {cfg.final_lr_ratio})")
    if cfg.warmup_steps < 0 or cfg.weight_decay < 0:
        raise ClpError("--warmup_steps and --weight_decay must not be negative")


def _pack(tokenizer, docs: list[str], block_size: int):
    """Token ids of all documents, each followed by the end-of-text token, cut into [n, block_size] blocks."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer
    pieces = []
    chunk = 2000
    for i in tqdm(range(0, len(docs), chunk), desc="tokenizing", unit="chunk", disable=len(docs) <= chunk):
        for enc in backend.encode_batch(docs[i:i + chunk], add_special_tokens=False):
            pieces.append(np.asarray(enc.ids + [eos], dtype=np.int64))
    ids = np.concatenate(pieces)
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ClpError(f"the text gives {len(ids)} tokens, fewer than one block of --block_size {block_size}; "
                       "give more text or a smaller --block_size")
    return torch.from_numpy(ids[: n_blocks * block_size].reshape(n_blocks, block_size).copy()), int(len(ids))


class _Clock:
    """Elapsed training time and the step at which warm-up ended (shared by schedule and callback)."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.warmup_end_s: float | None = None

    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else time.perf_counter() - self.t0


def _lr_factor(step: int, cfg: HelperConfig, total_steps: int | None, clock: _Clock) -> float:
    """Linear warm-up, then cosine from 1 to ``final_lr_ratio`` over steps or over the time budget."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = 0.0
    if total_steps:
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.time_budget_minutes:
        if clock.warmup_end_s is None:
            clock.warmup_end_s = clock.elapsed()
        budget = cfg.time_budget_minutes * 60
        progress = max(progress, (clock.elapsed() - clock.warmup_end_s) / max(1e-9, budget - clock.warmup_end_s))
    progress = min(1.0, max(0.0, progress))
    return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_helper(config: HelperConfig) -> Path:
    """Train tokenizer and model from ``config.text`` and save them into ``config.output_dir``.

    The output is claimed for the whole run: refused when it overlaps the text files, locked against a
    second run on it."""
    _check(config)
    with claim_output(config.output_dir, config.overwrite, list(config.text), "output directory"):
        return _train_helper(config)


def _train_helper(config: HelperConfig) -> Path:
    import torch

    from ..tiny import train_tokenizer

    cfg = config
    t_start = time.perf_counter()
    _check(cfg)
    out = check_output_path(cfg.output_dir, cfg.overwrite, what="output directory")
    docs, files = read_documents(cfg.text)
    n_bytes = sum(f["bytes"] for f in files)
    log.info("helper: %d documents, %.1f MB of text from %d file(s)", len(docs), n_bytes / 1e6, len(files))

    threads_before = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        t0 = time.perf_counter()
        tokenizer = train_tokenizer(docs, cfg.vocab_size, cfg.tokenizer_kind, min_frequency=cfg.min_frequency)
        tokenizer.model_max_length = cfg.block_size
        tokenizer_s = time.perf_counter() - t0
        log.info("helper: trained a %s tokenizer of %d tokens in %.1f s", cfg.tokenizer_kind, len(tokenizer),
                 tokenizer_s)
        blocks, n_tokens = _pack(tokenizer, docs, cfg.block_size)
        del docs
        log.info("helper: %d tokens (%.2f bytes per token), %d blocks of %d", n_tokens, n_bytes / n_tokens,
                 blocks.shape[0], cfg.block_size)
        model, sizes = _helper_model(cfg, tokenizer)
        fit = _fit(cfg, model, blocks)
        model.eval()
        model.config.use_cache = True
        report = {
            "kind": "clp-transfer helper",
            "config": dataclasses.asdict(cfg),
            "data": {"files": files, "documents": sum(f["documents"] for f in files), "bytes": n_bytes,
                     "tokens": n_tokens, "bytes_per_token": round(n_bytes / n_tokens, 4),
                     "blocks": int(blocks.shape[0])},
            "tokenizer": {"kind": cfg.tokenizer_kind, "vocab_size": len(tokenizer),
                          "train_seconds": round(tokenizer_s, 2)},
            "model": {"architecture": cfg.architecture, **sizes, "tied": bool(model.config.tie_word_embeddings)},
            "training": fit.report(cfg, blocks.numel()),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "versions": _versions(),
        }
        with atomic_directory(out, overwrite=cfg.overwrite) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            from ..model_card import write_model_card  # README.md: the hub model card, built from the report

            write_model_card(tmp, "helper")
    finally:
        torch.set_num_threads(threads_before)
    log.info("helper: %s", summary(report, out))
    return out


def _helper_model(cfg: HelperConfig, tokenizer: Any) -> tuple[Any, dict[str, int]]:
    """The small model to train, and its parameter counts for the report."""
    from ..tiny import tiny_model

    model = tiny_model(cfg.architecture, tokenizer, seed=cfg.seed, hidden_size=cfg.hidden_size,
                       num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                       max_position_embeddings=cfg.block_size, intermediate_size=cfg.intermediate_size)
    n_params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    n_embed = emb.numel() + (head.weight.numel() if head is not None and head.weight is not emb else 0)
    log.info("helper: %s model with %.2fM parameters (%.2fM in token embeddings)", cfg.architecture,
             n_params / 1e6, n_embed / 1e6)
    model.train()
    return model, {"parameters": n_params, "embedding_parameters": n_embed,
                   "non_embedding_parameters": n_params - n_embed}


@dataclass
class _Fit:
    """What the training saw, filled in by the trainer's hooks."""

    clock: "_Clock"
    losses: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    history: list[list[float]] = field(default_factory=list)
    stopped_by: str | None = None
    steps: int = 0
    mean_loss: float = float("nan")
    seconds: float = 0.0

    def window(self, logging_steps: int) -> list[float]:
        return self.losses[-logging_steps:]

    def report(self, cfg: HelperConfig, block_tokens: int) -> dict[str, Any]:
        import torch

        window = self.window(cfg.logging_steps)
        return {
            "steps": self.steps,
            "tokens": self.tokens_seen,
            "epochs": round(self.tokens_seen / (block_tokens or 1), 4),
            "final_loss": round(sum(window) / max(1, len(window)), 4),
            "final_loss_window_steps": len(window),
            "mean_loss": round(self.mean_loss, 4),
            "seconds": round(self.seconds, 1),
            "tokens_per_second": round(self.tokens_seen / max(self.seconds, 1e-9), 1),
            "stopped_by": self.stopped_by,
            "num_threads": torch.get_num_threads(),
            "loss_history": self.history,
        }


def _fit(cfg: HelperConfig, model: Any, blocks: Any) -> _Fit:
    """Train ``model`` on ``blocks`` with the Hugging Face ``Trainer`` for the configured steps, epochs or
    minutes; the learning-rate schedule is :func:`_lr_factor`."""
    from transformers import default_data_collator
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    fit = _Fit(_Clock())
    with tempfile.TemporaryDirectory(prefix="clp-helper-trainer-") as scratch:
        trainer = _trainer_class(cfg, fit)(model=model, args=_training_arguments(cfg, scratch),
                                           train_dataset=_Blocks(blocks), data_collator=default_data_collator,
                                           callbacks=[_budget_callback(cfg, fit)])
        for cb in (PrinterCallback, ProgressCallback):  # progress goes through logging instead
            trainer.remove_callback(cb)
        result = trainer.train()
    fit.seconds = fit.clock.elapsed()
    fit.steps = int(result.global_step)
    fit.mean_loss = float(result.training_loss)
    if fit.stopped_by is None:
        fit.stopped_by = "max_steps" if cfg.max_steps else "epochs"
    window = fit.window(cfg.logging_steps)
    if not fit.history or fit.history[-1][0] != fit.steps:
        fit.history.append([fit.steps, round(sum(window) / max(1, len(window)), 4)])
    return fit


def _training_arguments(cfg: HelperConfig, scratch: str) -> Any:
    import torch
    from transformers import TrainingArguments

    if cfg.max_steps:
        max_steps, epochs = cfg.max_steps, 1.0
    elif cfg.time_budget_minutes:
        max_steps, epochs = 10**9, 1.0  # the callback stops it
    else:
        max_steps, epochs = -1, cfg.epochs
    return TrainingArguments(
        output_dir=scratch,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        max_steps=max_steps,
        num_train_epochs=epochs,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        torch_compile=cfg.torch_compile,
    )


def _budget_callback(cfg: HelperConfig, fit: _Fit) -> Any:
    """Starts the clock, stops at the time budget, logs the mean loss of each logging window."""
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            fit.clock.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cfg.time_budget_minutes and fit.clock.elapsed() >= cfg.time_budget_minutes * 60:
                fit.stopped_by = "time_budget"
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            window = fit.losses[-args.logging_steps:] or [float(logs["loss"])]
            loss = sum(window) / len(window)
            fit.history.append([state.global_step, round(loss, 4)])
            el = fit.clock.elapsed()
            log.info("helper: step %d, loss %.3f, lr %.2e, %.0f tokens/s, %.0f s", state.global_step, loss,
                     logs.get("learning_rate", float("nan")), fit.tokens_seen / max(el, 1e-9), el)

    return Budget()


def _trainer_class(cfg: HelperConfig, fit: _Fit) -> type:
    """A ``Trainer`` with the helper's learning-rate schedule that records every training loss."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import Trainer

    class HelperTrainer(Trainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                total = cfg.max_steps or (None if cfg.time_budget_minutes else num_training_steps)
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer,
                                             lambda step: _lr_factor(step, cfg, total, fit.clock))
            return self.lr_scheduler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            if model.training:
                loss = result[0] if return_outputs else result
                fit.losses.append(float(loss.detach()))
                fit.tokens_seen += int(inputs["input_ids"].numel())
            return result

    return HelperTrainer


class _Blocks:
    """A map-style dataset over packed token blocks (labels = inputs; the model shifts them)."""

    def __init__(self, blocks) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.blocks[i]
        return {"input_ids": row, "labels": row}


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def summary(report: dict[str, Any], path: Path) -> str:
    t, m = report["training"], report["model"]
    return (
        f"Trained a {m['parameters'] / 1e6:.2f}M-parameter {m['architecture']} helper with a "
        f"{report['tokenizer']['vocab_size']}-token {report['tokenizer']['kind']} tokenizer on "
        f"{report['data']['bytes'] / 1e6:.1f} MB of text: {t['steps']} steps, {t['tokens']:,} tokens "
        f"({t['epochs']:.2f} epochs) in {t['seconds']:.0f} s (stopped by {t['stopped_by'].replace('_', ' ')}), "
        f"final loss {t['final_loss']:.3f}. Wrote {path}."
    )


# ------------------------------------------------------------------------------------------------- CLI


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    from .helper_space import SpaceConfig

    parser.add_argument("--kind", choices=["model", "embeddings"], default="model",
                        help="model: tokenizer + small causal LM (default); embeddings: tokenizer + skip-gram "
                             "token vectors, a helper space built in minutes (clp_transfer.transfer.helper_space)")
    add_dataclass_arguments(parser, HelperConfig)
    group = parser.add_argument_group("--kind embeddings only")
    add_dataclass_arguments(group, SpaceConfig, skip=tuple(_fields(HelperConfig)))


def cli_main(args: argparse.Namespace) -> int:
    from . import helper_space

    given = set(vars(args)) - {"kind", "config"}
    own, other = (_fields(helper_space.SpaceConfig), _fields(HelperConfig))
    if args.kind == "model":
        own, other = other, own
    stray = sorted(given & (other - own))
    if stray:
        raise ClpError(f"--{stray[0]} does not apply to --kind {args.kind}")
    if args.kind == "embeddings":
        return helper_space.cli_main(args)
    require_flags(HelperConfig, args)
    cfg = build_config(HelperConfig, args)
    train_helper(cfg)  # logs its one-paragraph summary to stderr
    return 0
