"""Configuration of ``clp-transfer train``: one dataclass, one docstring per field, mirrored by ``configs/train/*.yaml``.

Field names follow Hugging Face ``TrainingArguments`` wherever one exists, so ``--max_steps``,
``--learning_rate``, ``--per_device_train_batch_size`` ... mean what users expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ClpError

Schedule = Literal["cosine", "constant"]


@dataclass
class TrainConfig:
    model: str | None = None
    """Model to continue training: a transferred model directory, any HF causal LM (local directory or hub id),
    or with --from_scratch nothing (see --model_config)."""
    data: str | None = None
    """Data directory made by `clp-transfer prepare --tokenizer ...` (token shards of the train and valid splits)."""
    output_dir: str | None = None
    """Run directory: run_config.yaml, checkpoints/, logs/ (JSONL, TensorBoard, loss.png), final/ (the model)."""
    from_scratch: bool = False
    """Train the architecture of --model_config from random initialisation (the paper's baseline)."""
    model_config: str | None = None
    """With --from_scratch: a model directory or config.json whose architecture is trained from scratch."""
    tokenizer: str | None = None
    """Tokenizer directory (default: the model directory, or --model_config's directory with --from_scratch)."""
    overwrite: bool = False
    """Replace an existing run directory (otherwise a non-empty --output_dir is refused unless --resume)."""
    resume: bool = False
    """Continue from the latest checkpoint in --output_dir: model, optimizer, RNG states and data position."""

    max_steps: int = 1000
    """Optimizer steps of the whole run (both phases)."""
    max_tokens: int | None = None
    """Token budget of the whole run; when set it decides the number of steps and --max_steps is ignored."""
    per_device_train_batch_size: int = 8
    """Sequences per device per micro-batch (phase 2; phase 1 may use --embedding_batch_size)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    block_size: int | None = None
    """Tokens per training sequence (default: the block size given to prepare, capped by the model's context)."""

    learning_rate: float = 3e-4
    """Peak learning rate of phase 2 (full training)."""
    min_lr: float = 3e-5
    """Learning rate at the end of a cosine schedule (phase 1 ends at the same fraction of its own peak)."""
    lr_scheduler_type: Schedule = "cosine"
    """Schedule of phase 2 after warm-up: cosine decay to --min_lr, or constant."""
    warmup_ratio: float = 0.01
    """Fraction of phase 2's steps spent warming up linearly from 0."""
    warmup_steps: int | None = None
    """Warm-up steps of phase 2; when set it replaces --warmup_ratio (capped at the phase's length)."""
    weight_decay: float = 0.1
    """AdamW weight decay of matrices (norms and biases are never decayed)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (0 disables clipping)."""

    embedding_tuning_ratio: float = 0.0
    """Fraction of the steps spent in phase 1 ("embedding tuning"); 0 = no phase 1, 1 = only phase 1."""
    embedding_freeze_body: bool = True
    """Phase 1 trains only the input embeddings and an untied output head; with --no-embedding_freeze_body the
    body trains too, at --learning_rate, while the embeddings get --embedding_learning_rate ("accelerated start")."""
    embedding_learning_rate: float = 1e-3
    """Peak learning rate of the embeddings in phase 1."""
    embedding_batch_size: int | None = None
    """Per-device batch size in phase 1 (default: --per_device_train_batch_size)."""
    embedding_lr_scheduler_type: Schedule | None = None
    """Schedule of phase 1 (default: --lr_scheduler_type)."""
    embedding_warmup_ratio: float | None = None
    """Warm-up fraction of phase 1 (default: --warmup_ratio)."""
    embedding_tuning_rows: Literal["all", "new"] = "all"
    """Rows that learn in phase 1: all embedding rows, or only those of the tokens the transfer added (the
    shared rows stay as the source had them until phase 2). Needs the model's transfer_report.json."""
    new_token_lr_multiplier: float = 1.0
    """Learning rate of the rows of the tokens the transfer added, as a multiple of the rate of the other
    embedding rows, in every phase (a tied head shares these rows). Needs the model's transfer_report.json."""
    data_order: Literal["shuffled", "sequential"] = "shuffled"
    """shuffled = a seeded permutation of the blocks every epoch; sequential = the blocks in the order prepare
    wrote them (the documents' order), e.g. to train two tokenizers on the same text in the same order."""

    eval_steps: int = 200
    """Evaluate on the fixed validation subset every N steps (0 = never during training)."""
    eval_batches: int = 16
    """Size of the fixed validation subset, in batches of --per_device_eval_batch_size blocks (the same every time)."""
    per_device_eval_batch_size: int = 8
    """Blocks per evaluation batch."""
    final_eval: bool = True
    """Evaluate on the whole validation split at the end."""
    logging_steps: int = 10
    """Log loss, learning rate, tokens/s every N steps (JSONL, TensorBoard)."""
    save_steps: int = 500
    """Write a checkpoint every N steps (0 = only the final model)."""
    save_total_limit: int = 2
    """Checkpoints kept (the oldest are deleted)."""
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Loggers: jsonl (always written), tensorboard, wandb."""

    seed: int = 42
    """Seed of model init (--from_scratch), data order and dropout."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto = bf16 on GPUs that support it, fp32 elsewhere."""
    torch_compile: bool = False
    """Compile the model with torch.compile (inductor)."""
    allow_pickle: bool = False
    """Accept a model that only has pickle weights (can run arbitrary code)."""
    trust_remote_code: bool = False
    """Allow model code from the model repository."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def validate(self) -> None:
        """Reject contradictory or out-of-range settings before any work is done."""
        if not self.output_dir:
            raise ClpError("--output_dir is required")
        if not self.data:
            raise ClpError("--data is required (a directory made by `clp-transfer prepare --tokenizer ...`)")
        if self.from_scratch:
            if not (self.model_config or self.model):
                raise ClpError("--from_scratch needs --model_config (a model directory or config.json)")
        elif not self.model:
            raise ClpError("--model is required (or --from_scratch --model_config C)")
        if self.overwrite and self.resume:
            raise ClpError("--overwrite and --resume contradict each other; choose one")
        if self.max_steps <= 0 and not self.max_tokens:
            raise ClpError("--max_steps must be positive")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ClpError("--max_tokens must be positive")
        if not 0.0 <= self.embedding_tuning_ratio <= 1.0:
            raise ClpError("--embedding_tuning_ratio must lie in [0, 1]")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ClpError(f"--{name} must be positive")
        if self.embedding_batch_size is not None and self.embedding_batch_size <= 0:
            raise ClpError("--embedding_batch_size must be positive")
        if self.block_size is not None and self.block_size < 2:
            raise ClpError("--block_size must be at least 2")
        if self.learning_rate <= 0 or self.embedding_learning_rate <= 0:
            raise ClpError("learning rates must be positive")
        if not (math.isfinite(self.new_token_lr_multiplier) and self.new_token_lr_multiplier >= 0):
            raise ClpError("--new_token_lr_multiplier must be a finite number >= 0")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ClpError("--warmup_steps must be >= 0")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ClpError("--min_lr must lie in [0, --learning_rate]")
        unknown = set(self.report_to) - {"jsonl", "tensorboard", "wandb", "none"}
        if unknown:
            raise ClpError(f"unknown --report_to {sorted(unknown)}; choose from jsonl, tensorboard, wandb")
