"""``clp-transfer train``: continued pretraining with the study project's embedding-tuning phases.

One loop for every device set-up: ``accelerate`` places the model (CPU, one GPU, or DDP/FSDP/DeepSpeed under
``accelerate launch`` / ``torchrun``) and saves/restores the full training state. What the loop adds:

* phase 1 "embedding tuning": only the input embeddings (and an untied output head) learn, at their own
  learning rate and optionally batch size; phase 2 trains everything (``schedule.plan_phases``);
* a data order that is a pure function of (seed, sample index), so ``--resume`` after a SIGKILL continues
  with exactly the batches an uninterrupted run would have seen (``schedule.BlockOrder``);
* checkpoints written to a temporary directory and renamed, the last K kept;
* no host synchronisation except at logging, evaluation and checkpoint steps.

Layout of ``--output_dir``::

    run_config.yaml            the TrainConfig of the run (checked on --resume)
    checkpoints/step-000500/   accelerate state (model.safetensors, optimizer, RNG) + trainer_state.json
    logs/train_log.jsonl       one object per logged step: step, loss, lr, tokens, tokens_per_s, ...
    logs/tensorboard/          the same scalars for TensorBoard
    logs/loss.png              learning curves
    final/                     the trained model (HF format, safetensors) + tokenizer + train_config.yaml
    results.json               final evaluation on the whole validation split
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..atomic import atomic_directory, atomic_write_json, atomic_write_text, check_disjoint, output_lock
from ..config import add_dataclass_arguments, build_config, load_yaml, to_yaml
from ..errors import ClpError
from ..models import context_length
from .schedule import (BlockOrder, Phase, micro_batch_samples, phase_at, plan_phases, samples_before,
                       steps_for_tokens)
from ..data import TokenShards
from .config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")
# Settings that decide which batches and updates a run makes: a resumed run must not change them.
RESUME_KEYS = ("model", "data", "from_scratch", "model_config", "seed", "per_device_train_batch_size",
               "gradient_accumulation_steps", "block_size", "embedding_tuning_ratio", "embedding_batch_size",
               "max_steps", "max_tokens", "data_order")
FAULT_ENV = "CLP_TRANSFER_FAULT_AT_STEP"  # tests: SIGKILL the process after this step (crash simulation)


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    output_dir: Path
    final_dir: Path
    log_path: Path
    plot_path: Path | None
    steps: int
    tokens_seen: int
    final_eval: dict[str, float] | None
    resumed_from: int | None


# ------------------------------------------------------------------------------------------- model and data


def load_model_and_tokenizer(cfg: TrainConfig) -> tuple[Any, Any, str]:
    """The model to train (fp32 weights; mixed precision is accelerate's autocast) and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import load_tokenizer, resolve_model

    if cfg.from_scratch:
        src = Path(cfg.model_config or cfg.model)  # type: ignore[arg-type]
        if not src.exists():
            raise ClpError(f"--model_config {str(src)!r} does not exist")
        config_dir = src.parent if src.is_file() else src
        config = AutoConfig.from_pretrained(str(src), trust_remote_code=cfg.trust_remote_code)
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
        tok_path = cfg.tokenizer or str(config_dir)
        name = f"from-scratch({src})"
    else:
        files = resolve_model(cfg.model, "model", allow_pickle=cfg.allow_pickle,  # type: ignore[arg-type]
                              trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(files.path, dtype=torch.float32,
                                                     trust_remote_code=cfg.trust_remote_code)
        tok_path = cfg.tokenizer or str(files.path)
        name = str(cfg.model)
    tokenizer = load_tokenizer(tok_path, trust_remote_code=cfg.trust_remote_code)
    return model, tokenizer, name


def check_data(model: Any, tokenizer: Any, train: TokenShards, valid: TokenShards | None, block_size: int) -> None:
    """Fail before training when data, tokenizer and model do not fit together."""
    for shards in (train, valid):
        if shards is not None:
            shards.check_tokenizer(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    if train.index.vocab_size > rows:
        raise ClpError(f"the data's vocabulary ({train.index.vocab_size} ids) is larger than the model's embedding "
                       f"({rows} rows): the model was not made for this tokenizer")
    ctx = context_length(model)
    if ctx is not None and block_size > ctx:
        raise ClpError(f"--block_size {block_size} exceeds the model's context length {ctx}")
    if train.num_blocks(block_size) == 0:
        raise ClpError(f"the training split holds {len(train)} tokens, fewer than one block of {block_size}")


def embedding_parameters(model: Any) -> list[torch.nn.Parameter]:
    """Input embedding matrix and, when untied, the output head - phase 1's trainable set, any architecture."""
    params = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not params[0]:
        params.append(out.weight)
    return params


def parameter_groups(model: Any, embeddings: list[torch.nn.Parameter], cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: embeddings / body, each split into decayed matrices and undecayed norms and biases."""
    emb_ids = {id(p) for p in embeddings}
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        kind = "embedding" if id(p) in emb_ids else "body"
        groups.setdefault((kind, p.ndim >= 2), []).append(p)
    return [
        {"params": ps, "kind": kind, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": 0.0}
        for (kind, decay), ps in sorted(groups.items())
    ]


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    try:  # fused kernels exist for CPU and CUDA in recent torch; one kernel launch instead of one per tensor
        return torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"), **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def set_learning_rates(optimizer: torch.optim.Optimizer, phase: Phase, step: int, cfg: TrainConfig) -> float:
    """Set every group's lr for ``step``; returns the lr of the group that is learning fastest."""
    f = phase.lr_factor(step)
    top = 0.0
    for g in optimizer.param_groups:
        if phase.tunes_embeddings:
            if g["kind"] == "embedding":
                peak = cfg.embedding_learning_rate
            else:
                peak = 0.0 if cfg.embedding_freeze_body else cfg.learning_rate
        else:
            peak = cfg.learning_rate
        g["lr"] = peak * f
        top = max(top, g["lr"])
    return top


def new_token_ids(model_dir: str | os.PathLike | None) -> list[int] | None:
    """Ids of the tokens a transfer added (``transfer_report.json`` beside the model), or None when unknown."""
    if model_dir is None:
        return None
    report = Path(model_dir) / "transfer_report.json"
    if not report.is_file():
        return None
    ids = json.loads(report.read_text(encoding="utf-8")).get("new_token_ids")
    return [int(i) for i in ids] if ids is not None else None


def row_lr_scales(cfg: TrainConfig, phase: Phase, rows: int, new_ids: list[int] | None) -> torch.Tensor | None:
    """Per-row learning-rate multipliers [rows] of the embedding matrices in ``phase``, or None (all 1).

    New rows get ``--new_token_lr_multiplier``; in phase 1 with ``--embedding_tuning_rows new`` the other rows
    get 0 (frozen). Row scaling acts on the update (see :func:`scale_row_updates`), so it works for any
    optimizer whose step is proportional to its learning rate, as AdamW's is (decoupled decay included).
    """
    freeze_shared = phase.tunes_embeddings and cfg.embedding_tuning_rows == "new"
    if cfg.new_token_lr_multiplier == 1.0 and not freeze_shared:
        return None
    if new_ids is None:
        raise ClpError("--new_token_lr_multiplier / --embedding_tuning_rows new need the ids of the new tokens: "
                       "the model directory has no transfer_report.json (train a model written by `transfer`)")
    scales = torch.full((rows,), 0.0 if freeze_shared else 1.0)
    scales[torch.tensor(new_ids, dtype=torch.long)] = cfg.new_token_lr_multiplier
    return scales


def scale_row_updates(params: list[torch.nn.Parameter], before: list[torch.Tensor], scales: torch.Tensor) -> None:
    """Rescale the update each embedding row just received: ``p = before + (p - before) * scales[row]``.

    ``scales`` [rows] is relative to the largest multiplier, at which the group's lr was set for this step.
    """
    with torch.no_grad():
        for p, b in zip(params, before):
            s = scales.to(device=p.device, dtype=p.dtype)[: p.shape[0], None]
            p.copy_(torch.addcmul(b, p - b, s))


def set_trainable(model: Any, embeddings: list[torch.nn.Parameter], body_trainable: bool, distributed: bool) -> None:
    """Freeze the body in phase 1 by requires_grad on one process (skips its weight gradients).

    Under DDP/FSDP the gradient reducer is built once over the trainable parameters, so there the body stays
    requires_grad and its gradients are discarded before the optimizer step instead (same updates).
    """
    if distributed:
        return
    emb = {id(p) for p in embeddings}
    for p in model.parameters():
        if id(p) not in emb:
            p.requires_grad_(body_trainable)


# ------------------------------------------------------------------------------------------- run directory


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prepare_run_dir(cfg: TrainConfig, is_main: bool) -> Path | None:
    """Check --output_dir against --resume/--overwrite; returns the checkpoint to resume from (or None)."""
    run_dir = Path(cfg.output_dir)  # type: ignore[arg-type]
    if is_main and (run_dir / "checkpoints").is_dir():
        for stale in (run_dir / "checkpoints").glob(".step-*.tmp"):  # a checkpoint a killed run was writing
            log.warning("removing %s, left behind by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if occupied and not (cfg.resume or cfg.overwrite):
        what = "another run" if (run_dir / "run_config.yaml").is_file() else "files"
        raise ClpError(f"--output_dir {str(run_dir)!r} holds {what}; pass --resume to continue it or --overwrite "
                       "to replace it (nothing was changed)")
    if cfg.resume and occupied:
        # block_size None is resolved from the data and the model later; it is compared once resolved.
        check_resume_settings(run_dir, cfg, pending=("block_size",) if cfg.block_size is None else ())
        ckpts = _checkpoints(run_dir)
        if ckpts:
            return ckpts[-1][1]
        log.warning("--resume: no complete checkpoint in %s, starting from step 0", run_dir)
        return None
    return None


def _same_setting(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key in ("model", "data", "model_config") and isinstance(old, str) and isinstance(new, str):
        return os.path.realpath(old) == os.path.realpath(new)  # ./m and /abs/m are one model
    return False


def check_resume_settings(run_dir: Path, cfg: TrainConfig, pending: tuple[str, ...] = ()) -> None:
    """--resume: refuse settings that differ from the saved (resolved) run_config.yaml, except ``pending``
    ones that are not resolved yet."""
    saved = run_dir / "run_config.yaml"
    if not saved.is_file():
        return
    old = load_yaml(saved)
    changed = [k for k in RESUME_KEYS
               if k in old and k not in pending and not _same_setting(k, old[k], getattr(cfg, k))]
    if changed:
        diffs = ", ".join(f"{k}: {old[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ClpError(f"--resume with settings that change the run ({diffs}); resuming would not "
                       "continue the same training. Use the original settings or a new --output_dir")


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why checkpoint directory ``ckpt`` cannot be resumed from (a truncated or corrupt file), or None.

    Cheap structural checks only: safetensors headers against the file size, torch zip archives' central
    directory (lost when a file is cut short), trainer_state.json.
    """
    import zipfile

    from ..models import safetensors_problem

    for f in sorted(ckpt.iterdir()):
        why = None
        if f.suffix == ".safetensors":
            why = safetensors_problem(f)
        elif f.suffix in (".bin", ".pt", ".pth") and not zipfile.is_zipfile(f):
            why = "not a complete torch archive (truncated?)"
        if why:
            return f"{f}: {why}"
    try:
        int(json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{ckpt / 'trainer_state.json'}: unreadable"
    return None


def load_checkpoint(accelerator: Any, run_dir: Path, latest: Path) -> tuple[Path, int]:
    """Restore the training state from ``latest``, or from the newest earlier checkpoint that is intact.

    A damaged checkpoint (e.g. a file cut short by a full disk) is skipped with a warning naming the file;
    when none is usable the error names every damaged file. Returns (checkpoint, its step).
    """
    damaged = []
    latest_step = int(CHECKPOINT_RE.match(latest.name).group(1))  # type: ignore[union-attr]
    for _, ck in reversed([c for c in _checkpoints(run_dir) if c[0] <= latest_step]):
        why = checkpoint_problem(ck)
        if why is None:
            try:
                accelerator.load_state(str(ck))
            except Exception as e:  # a corrupt file the structural check missed; the next one overwrites all
                why = f"{ck}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        if why is None:
            state = json.loads((ck / "trainer_state.json").read_text(encoding="utf-8"))
            return ck, int(state["step"])
        log.warning("--resume: checkpoint %s is damaged (%s); falling back to the previous one", ck.name, why)
        damaged.append(why)
    raise ClpError(f"--resume: no intact checkpoint in {str(run_dir / 'checkpoints')!r} ({'; '.join(damaged)}); "
                   "restore the file(s), delete the damaged checkpoint to start from step 0, or use --overwrite")


def last_good_checkpoint(run_dir: Path) -> str:
    """The NaN stop's pointer: the newest checkpoint whose recorded check loss is finite."""
    for _, ck in reversed(_checkpoints(run_dir)):
        try:
            state = json.loads((ck / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        loss = state.get("check_loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            return (f"the last good checkpoint is {ck} (finite weights; loss {loss:.4f} on a fixed "
                    f"{state.get('check_split', 'valid')} batch)")
    return "no checkpoint with finite weights and loss was written"


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: remove the old run, only once the new one has passed every check."""
    if run_dir.exists() and any(run_dir.iterdir()):
        aside = run_dir.parent / f".{run_dir.name}.old-{os.getpid()}"
        run_dir.rename(aside)  # rename first: an interruption leaves the old run recoverable, not half-deleted
        shutil.rmtree(aside, ignore_errors=True)


# --------------------------------------------------------------------------------------------- logging


class RunLog:
    """JSONL always; TensorBoard / W&B when asked (main process only)."""

    def __init__(self, log_dir: Path, report_to: list[str], resume_step: int | None, config: dict[str, Any]) -> None:
        self.path = log_dir / "train_log.jsonl"
        log_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            # Drop what the crashed run logged after its last checkpoint: those steps are about to be redone.
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(log_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; logging to JSONL only")
        self.wandb = None
        if "wandb" in report_to:
            try:
                import wandb
                self.wandb = wandb.init(project="clp-transfer", config=config, resume="allow")
            except ImportError as e:
                raise ClpError("--report_to wandb needs `pip install wandb`") from e

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_learning_curves(log_path: Path, png: Path, title: str = "") -> Path | None:
    """Training and validation loss against tokens seen, from the JSONL log."""
    records = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["tokens"], r["eval_loss"]) for r in records if "eval_loss" in r]
    from ..plotting import optional_pyplot

    plt = optional_pyplot("the learning-curve plot") if train or evals else None
    if plt is None:
        return None

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss (fixed subset)")
    phase_ends = [r["tokens"] for r in records if r.get("event") == "phase_end"]
    for x in phase_ends:
        ax.axvline(x, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "learning curve")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, png)
    return png


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_blocks(model: Any, shards: TokenShards, block_ids: np.ndarray, block_size: int, batch_size: int,
                    accelerator: Any) -> dict[str, float]:
    """Mean loss, perplexity and bits per byte over the given blocks, shared out across processes.

    Each block predicts ``block_size - 1`` tokens (as in training). Bits per byte divide the NLL by the bytes
    of the predicted tokens, taken pro rata from the split's byte count (the exact, document-level figure is
    ``clp-transfer perplexity``).
    """
    was_training = model.training
    model.eval()
    mine = block_ids[accelerator.process_index :: accelerator.num_processes]
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for i in range(0, len(mine), batch_size):
        x = torch.from_numpy(np.stack([shards.block(int(b), block_size) for b in mine[i : i + batch_size]]))
        x = x.to(accelerator.device)
        with accelerator.autocast():
            loss = model(input_ids=x, labels=x).loss
        n = x.shape[0] * (block_size - 1)
        nll += loss.double() * n
        count += n
    nll = accelerator.reduce(nll, "sum")
    count = accelerator.reduce(count, "sum")
    model.train(was_training)
    mean = float(nll / count) if count > 0 else float("nan")
    bytes_per_token = shards.index.num_bytes / max(1, len(shards))
    return {
        "eval_loss": mean,
        "eval_ppl": math.exp(min(mean, 700.0)),
        "eval_bpb": mean / math.log(2) / bytes_per_token if bytes_per_token else float("nan"),
        "eval_tokens": int(count),
    }


def checkpoint_check_loss(model: Any, raw: Any, accelerator: Any, shards: TokenShards, block_ids: np.ndarray,
                          block: int, batch_size: int, step: int, run_dir: Path,
                          recent_eval: dict[str, float] | None = None, split: str = "valid") -> float:
    """Validate the weights about to be checkpointed: every parameter finite, and a finite loss on a fixed
    batch (``recent_eval`` when an evaluation just ran at this step). Returns that loss; raises
    :class:`ClpError` - no checkpoint of a broken model is written - otherwise."""
    bad = sum(int(not bool(torch.isfinite(p).all())) for p in raw.parameters())
    bad = int(accelerator.reduce(torch.tensor(float(bad), device=accelerator.device), "sum").item())
    loss = float("nan")
    if not bad:
        loss = (recent_eval or evaluate_blocks(model, shards, block_ids, block, batch_size, accelerator))["eval_loss"]
    if bad or not math.isfinite(loss):
        what = (f"{bad} weight tensors became non-finite" if bad
                else f"the loss became {loss} on a fixed {split} batch")
        raise ClpError(f"{what} at step {step}; stopping before writing a checkpoint of a broken model; "
                       f"{last_good_checkpoint(run_dir)}. Lower --learning_rate/--embedding_learning_rate or "
                       "check the data")
    return float(loss)


# --------------------------------------------------------------------------------------------- the loop


def _total_steps(cfg: TrainConfig, world: int) -> int:
    if not cfg.max_tokens:
        return cfg.max_steps
    bs1 = cfg.embedding_batch_size or cfg.per_device_train_batch_size
    per = world * cfg.gradient_accumulation_steps * cfg.block_size  # type: ignore[operator]
    return steps_for_tokens(cfg.max_tokens, cfg.embedding_tuning_ratio, bs1 * per, cfg.per_device_train_batch_size * per)


def train(config: TrainConfig, eval_callback: Callable[[Any, int], dict[str, float]] | None = None) -> TrainResult:
    """Run (or resume) continued pretraining; see the module docstring for what is written where.

    --output_dir must not be or contain an input (--overwrite would delete it), and the main process holds
    its lock for the whole run: a second run on the same directory fails at once.

    ``eval_callback(model, step)`` (Python API only) runs at every evaluation step after the built-in
    evaluation, on every process, with the unwrapped model in eval mode; the numbers it returns are added to
    that step's evaluation record (e.g. exact bits per byte on held-out documents).
    """
    config.validate()
    inputs = [config.model, config.data, config.model_config, config.tokenizer]
    check_disjoint(config.output_dir, inputs, "--output_dir")  # type: ignore[arg-type]
    if int(os.environ.get("RANK", "0") or 0) != 0:  # other ranks of a torchrun/accelerate launch
        return _train(config, eval_callback)
    with output_lock(config.output_dir, "--output_dir"):  # type: ignore[arg-type]
        return _train(config, eval_callback)


@dataclass
class _Run:
    """The fixed facts of one training run, shared by the pieces of :func:`_train`."""

    cfg: TrainConfig
    accelerator: Any
    mixed_precision: str
    run_dir: Path
    phases: list[Phase]
    total_steps: int
    block: int

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def tokens_at(self, step: int) -> int:
        """Tokens trained on before optimizer step ``step`` (all processes)."""
        return samples_before(self.phases, step, self.world, self.cfg.gradient_accumulation_steps) * self.block


@dataclass
class _Parts:
    """The model being trained and what updates it."""

    model: Any
    """The model as the accelerator prepared it (wrapped under DDP)."""
    raw: Any
    """The unwrapped model."""
    tokenizer: Any
    name: str
    optimizer: Any
    embeddings: list[torch.Tensor]
    """The input embedding matrix (and an untied head)."""
    body_params: list[torch.Tensor]
    row_scales: dict[str, torch.Tensor | None]
    """Per phase name: per-row learning-rate multipliers of the embedding matrices, or None."""


@dataclass
class _Data:
    """The token shards a run reads and the fixed validation subsets."""

    train: TokenShards
    valid: TokenShards | None
    order: Any
    eval_ids: np.ndarray | None
    """Validation blocks of every evaluation (the first ones of the split), or None without evaluation."""
    check: tuple[TokenShards, np.ndarray, bool]
    """(shards, block ids, is validation) of the fixed batch every checkpoint is checked on."""


def _accelerator(cfg: TrainConfig) -> tuple[Any, str]:
    from accelerate import Accelerator

    from ..models import default_device

    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # cpu=True when no accelerator exists: that is what lets accelerate run DDP over gloo on CPU processes.
    accelerator = Accelerator(mixed_precision=mp, cpu=default_device().type == "cpu",
                              dynamo_backend="inductor" if cfg.torch_compile else None)
    if accelerator.distributed_type.name == "DEEPSPEED" and cfg.gradient_accumulation_steps > 1:
        raise ClpError("under DeepSpeed run with --gradient_accumulation_steps 1 (raise --per_device_train_batch_size "
                       "instead): DeepSpeed accumulates on its own and would scale the loss twice")
    return accelerator, mp


def _open_shards(cfg: TrainConfig) -> tuple[TokenShards, TokenShards | None]:
    train_shards = TokenShards(cfg.data, "train")  # type: ignore[arg-type]
    try:
        valid_shards: TokenShards | None = TokenShards(cfg.data, "valid")  # type: ignore[arg-type]
    except ClpError:
        valid_shards = None
        log.warning("no validation shards in %s: no evaluation", cfg.data)
    return train_shards, valid_shards


def _plan(cfg: TrainConfig, accelerator: Any, mp: str, run_dir: Path, train_shards: TokenShards) -> _Run:
    total_steps = _total_steps(cfg, accelerator.num_processes)
    phases = plan_phases(total_steps, cfg.embedding_tuning_ratio, cfg.per_device_train_batch_size,
                         cfg.embedding_batch_size, cfg.lr_scheduler_type, cfg.embedding_lr_scheduler_type,
                         cfg.warmup_ratio, cfg.embedding_warmup_ratio, cfg.min_lr / cfg.learning_rate,
                         warmup_steps=cfg.warmup_steps)
    return _Run(cfg, accelerator, mp, run_dir, phases, total_steps, int(cfg.block_size))  # type: ignore[arg-type]


def _prepare_parts(run: _Run, model: Any, tokenizer: Any, name: str) -> _Parts:
    """Optimizer, device placement, and the per-row learning rates of each phase."""
    cfg, accelerator = run.cfg, run.accelerator
    embeddings = embedding_parameters(model)
    optimizer = make_optimizer(parameter_groups(model, embeddings, cfg), cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    embeddings = embedding_parameters(raw)  # same tensors after placement on the device
    emb_ids = {id(p) for p in embeddings}
    body_params = [p for p in raw.parameters() if id(p) not in emb_ids]
    added_ids = new_token_ids(cfg.model if not cfg.from_scratch else None)
    rows = embeddings[0].shape[0]
    row_scales = {p.name: row_lr_scales(cfg, p, rows, added_ids) for p in run.phases}
    if any(v is not None for v in row_scales.values()) and accelerator.distributed_type.name in ("FSDP",
                                                                                              "DEEPSPEED"):
        raise ClpError("per-row learning rates (--new_token_lr_multiplier, --embedding_tuning_rows new) need whole "
                       "embedding matrices on every process: use DDP or one device, not FSDP/DeepSpeed")
    return _Parts(model, raw, tokenizer, name, optimizer, embeddings, body_params, row_scales)


def _data(run: _Run, train_shards: TokenShards, valid_shards: TokenShards | None) -> _Data:
    cfg, block = run.cfg, run.block
    order = BlockOrder(train_shards.num_blocks(block), cfg.seed, shuffle=cfg.data_order == "shuffled")
    eval_ids = None
    if valid_shards is not None and valid_shards.num_blocks(block) == 0:
        log.warning("the validation split is shorter than one block of %d tokens: no evaluation", block)
        valid_shards = None
    if valid_shards is not None:
        n_eval = min(valid_shards.num_blocks(block), cfg.eval_batches * cfg.per_device_eval_batch_size)
        eval_ids = np.arange(n_eval)  # the first blocks of the split: the same subset at every evaluation
    # The fixed batch every checkpoint is checked on before it is written (validation blocks when there are).
    use_valid = eval_ids is not None and len(eval_ids) > 0
    check_shards = valid_shards if use_valid else train_shards
    check_ids = (eval_ids if use_valid else np.arange(train_shards.num_blocks(block)))[  # type: ignore[index]
        : cfg.per_device_eval_batch_size]
    return _Data(train_shards, valid_shards, order, eval_ids, (check_shards, check_ids, use_valid))  # type: ignore[arg-type]


def _save_checkpoint(run: _Run, step: int, check_loss: float, use_valid: bool) -> None:
    """Write the full training state of ``step`` to a temporary directory, check it, rename it into place and
    keep the last ``save_total_limit`` checkpoints."""
    accelerator, is_main = run.accelerator, run.is_main
    ck_dir = run.run_dir / "checkpoints"
    tmp = ck_dir / f".step-{step:06d}.tmp"
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if is_main:
        atomic_write_json(tmp / "trainer_state.json", {"step": step, "tokens": run.tokens_at(step),
                                                       "total_steps": run.total_steps, "check_loss": check_loss,
                                                       "check_split": "valid" if use_valid else "train"})
        problem = checkpoint_problem(tmp)
        if problem:
            raise ClpError(f"the checkpoint just written is damaged ({problem}); is the disk full?")
        final = ck_dir / f"step-{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in _checkpoints(run.run_dir)[: -max(1, run.cfg.save_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _train(config: TrainConfig, eval_callback: Callable[[Any, int], dict[str, float]] | None = None) -> TrainResult:
    from accelerate.utils import set_seed

    cfg = dataclasses.replace(config, report_to=list(config.report_to))
    cfg.validate()
    accelerator, mp = _accelerator(cfg)
    is_main = accelerator.is_main_process
    run_dir = Path(cfg.output_dir)  # type: ignore[arg-type]
    resume_from = prepare_run_dir(cfg, is_main)
    train_shards, valid_shards = _open_shards(cfg)
    set_seed(cfg.seed)
    model, tokenizer, model_name = load_model_and_tokenizer(cfg)
    ctx = context_length(model)
    if cfg.block_size is None:
        cfg.block_size = min(x for x in (train_shards.index.block_size or 1024, ctx or 10**9))
    if resume_from is not None or (cfg.resume and (run_dir / "run_config.yaml").is_file()):
        check_resume_settings(run_dir, cfg)  # now with block_size resolved, as run_config.yaml has it
    check_data(model, tokenizer, train_shards, valid_shards, int(cfg.block_size))
    if cfg.overwrite and is_main:
        clear_run_dir(run_dir)
    accelerator.wait_for_everyone()

    run = _plan(cfg, accelerator, mp, run_dir, train_shards)
    parts = _prepare_parts(run, model, tokenizer, model_name)
    start_step = 0
    if resume_from is not None:
        resume_from, start_step = load_checkpoint(accelerator, run_dir, resume_from)
        log.info("resumed from %s (step %d)", resume_from, start_step)
    if is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "run_config.yaml", to_yaml(cfg))
    runlog = RunLog(run_dir / "logs", cfg.report_to, start_step if resume_from else None,
                    dataclasses.asdict(cfg)) if is_main else None
    data = _data(run, train_shards, valid_shards)
    if is_main:
        log.info("training %s on %s: %d steps (%s), %d process(es), block %d, device %s, precision %s",
                 model_name, cfg.data, run.total_steps, " + ".join(f"{p.name} {p.steps}" for p in run.phases),
                 run.world, run.block, accelerator.device, mp)
    last_eval = _loop(run, parts, data, runlog, start_step, eval_callback)
    return _finish(run, parts, data, runlog, last_eval, start_step if resume_from else None)


def _set_phase(run: _Run, parts: _Parts, phase: Phase, previous: Phase | None, step: int,
               runlog: RunLog | None) -> None:
    if previous is not None and runlog is not None:
        runlog.write({"step": step, "tokens": run.tokens_at(step), "event": "phase_end", "phase": previous.name})
    set_trainable(parts.raw, parts.embeddings,
                  body_trainable=not (phase.tunes_embeddings and run.cfg.embedding_freeze_body),
                  distributed=run.world > 1)
    log.info("phase %s: steps %d-%d, batch %d", phase.name, phase.start, phase.end - 1, phase.batch_size)


def _step_learning_rates(run: _Run, parts: _Parts, phase: Phase, step: int) -> tuple[float, torch.Tensor | None]:
    """Set the groups' learning rates for ``step``; with per-row rates the embedding groups run at the
    largest row rate and the returned row scales (<= 1) bring the other rows down."""
    lr = set_learning_rates(parts.optimizer, phase, step, run.cfg)
    row_scales = parts.row_scales[phase.name]
    if row_scales is not None:
        top_scale = float(row_scales.max())
        for g in parts.optimizer.param_groups:
            if g["kind"] == "embedding":
                g["lr"] *= top_scale
        row_scales = row_scales / top_scale if top_scale > 0 else row_scales
    return lr, row_scales


def _accumulate(run: _Run, parts: _Parts, data: _Data, phase: Phase, step: int, loss_sum: torch.Tensor) -> int:
    """Forward and backward over the micro-batches of ``step``; adds their losses to ``loss_sum``."""
    accelerator, accum, block = run.accelerator, run.cfg.gradient_accumulation_steps, run.block
    first = samples_before(run.phases, step, run.world, accum)
    for micro in range(accum):
        s0, n = micro_batch_samples(first, micro, accelerator.process_index, run.world, phase.batch_size)
        x = torch.from_numpy(np.stack([data.train.block(int(b), block) for b in data.order.blocks(s0, n)]))
        x = x.to(accelerator.device, non_blocking=True)
        sync = micro == accum - 1
        ctx_mgr = accelerator.no_sync(parts.model) if (run.world > 1 and not sync) else contextlib.nullcontext()
        with ctx_mgr:
            with accelerator.autocast():
                loss = parts.model(input_ids=x, labels=x).loss
            accelerator.backward(loss / accum)
        loss_sum += loss.detach().float()
    return accum


def _update(run: _Run, parts: _Parts, phase: Phase, row_scales: torch.Tensor | None) -> Any:
    """Clip, step the optimizer (per-row rates applied to the update), zero the gradients; the gradient norm."""
    if phase.tunes_embeddings and run.cfg.embedding_freeze_body:
        for p in parts.body_params:
            p.grad = None  # frozen body: AdamW skips parameters without gradient
    grad_norm = None
    if run.cfg.max_grad_norm > 0:
        grad_norm = run.accelerator.clip_grad_norm_([p for p in parts.raw.parameters() if p.grad is not None],
                                                    run.cfg.max_grad_norm)
    before = [p.detach().clone() for p in parts.embeddings] if row_scales is not None else None
    parts.optimizer.step()
    if before is not None:
        scale_row_updates(parts.embeddings, before, row_scales)
    parts.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _loop(run: _Run, parts: _Parts, data: _Data, runlog: RunLog | None, start_step: int,
          eval_callback: Callable[[Any, int], dict[str, float]] | None) -> dict[str, float] | None:
    """The optimizer steps from ``start_step``: logging, evaluation and checkpoints; the last evaluation."""
    from tqdm.auto import tqdm

    cfg, accelerator = run.cfg, run.accelerator
    fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
    parts.model.train()
    current_phase: Phase | None = None
    bar = tqdm(total=run.total_steps, initial=start_step, desc="train", unit="step",
               disable=not (run.is_main and cfg.progress))
    loss_sum = torch.zeros((), device=accelerator.device)  # summed on device; read only at logging steps
    loss_count = 0
    t_log, tokens_at_log = time.perf_counter(), run.tokens_at(start_step)
    last_eval: dict[str, float] | None = None
    for step in range(start_step, run.total_steps):
        phase = phase_at(run.phases, step)
        if phase is not current_phase:
            _set_phase(run, parts, phase, current_phase, step, runlog)
            current_phase = phase
        lr, row_scales = _step_learning_rates(run, parts, phase, step)
        loss_count += _accumulate(run, parts, data, phase, step, loss_sum)
        grad_norm = _update(run, parts, phase, row_scales)
        done = step + 1
        bar.update(1)
        if done % cfg.logging_steps == 0 or done == run.total_steps:
            mean_loss = accelerator.reduce(loss_sum / max(1, loss_count), "mean").item()
            loss_sum.zero_()
            loss_count = 0
            now, tokens = time.perf_counter(), run.tokens_at(done)
            record = {"step": done, "loss": mean_loss, "lr": lr, "tokens": tokens,
                      "tokens_per_s": (tokens - tokens_at_log) / max(1e-9, now - t_log), "phase": phase.name}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            t_log, tokens_at_log = now, tokens
            if not math.isfinite(mean_loss):
                where = last_good_checkpoint(run.run_dir)
                raise ClpError(f"the training loss became {mean_loss} at step {done} (phase {phase.name}); "
                               f"stopping; {where}. Lower --learning_rate/--embedding_learning_rate or check the data")
            if runlog is not None:
                runlog.write(record)
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        evaluated_now = data.eval_ids is not None and cfg.eval_steps and done % cfg.eval_steps == 0
        if evaluated_now:
            last_eval = _evaluate_now(run, parts, data, done, runlog, eval_callback)
        if cfg.save_steps and done % cfg.save_steps == 0 and done < run.total_steps:
            if loss_count and not math.isfinite(float(loss_sum)):
                raise ClpError(f"the training loss became {float(loss_sum)} before step {done}; stopping before "
                               f"writing a checkpoint of a broken model; {last_good_checkpoint(run.run_dir)}")
            shards, ids, use_valid = data.check
            _save_checkpoint(run, done, checkpoint_check_loss(
                parts.model, parts.raw, accelerator, shards, ids, run.block, cfg.per_device_eval_batch_size, done,
                run.run_dir, last_eval if evaluated_now else None, "valid" if use_valid else "train"), use_valid)
        if fault_step and done == fault_step:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    return last_eval


def _evaluate_now(run: _Run, parts: _Parts, data: _Data, done: int, runlog: RunLog | None,
                  eval_callback: Callable[[Any, int], dict[str, float]] | None) -> dict[str, float]:
    result = evaluate_blocks(parts.model, data.valid, data.eval_ids, run.block,  # type: ignore[arg-type]
                             run.cfg.per_device_eval_batch_size, run.accelerator)
    if eval_callback is not None:
        parts.raw.eval()
        result = {**result, **eval_callback(parts.raw, done)}
        parts.raw.train()
    if runlog is not None:
        runlog.write({"step": done, "tokens": run.tokens_at(done), **result})
    return result


def _finish(run: _Run, parts: _Parts, data: _Data, runlog: RunLog | None, last_eval: dict[str, float] | None,
            resumed_from: int | None) -> TrainResult:
    """The final evaluation on the whole validation split, ``final/`` with its model card, ``results.json``
    and the loss plot."""
    cfg, accelerator, run_dir = run.cfg, run.accelerator, run.run_dir
    final_eval = None
    if cfg.final_eval and data.valid is not None:
        all_ids = np.arange(data.valid.num_blocks(run.block))
        final_eval = evaluate_blocks(parts.model, data.valid, all_ids, run.block, cfg.per_device_eval_batch_size,
                                     accelerator)
        final_eval = {k.replace("eval_", "final_eval_"): v for k, v in final_eval.items()}
        if runlog is not None:
            runlog.write({"step": run.total_steps, "tokens": run.tokens_at(run.total_steps), **final_eval})
    final_dir = run_dir / "final"
    state_dict = accelerator.get_state_dict(parts.model)
    if run.is_main:
        with atomic_directory(final_dir, overwrite=True) as tmp:
            parts.raw.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            parts.tokenizer.save_pretrained(tmp)
            atomic_write_text(tmp / "train_config.yaml", to_yaml(cfg))
        atomic_write_json(run_dir / "results.json", {
            "model": parts.name, "data": cfg.data, "steps": run.total_steps,
            "tokens_seen": run.tokens_at(run.total_steps),
            "phases": [dataclasses.asdict(p) for p in run.phases], "final_eval": final_eval,
            "last_eval": last_eval, "resumed_from_step": resumed_from,
            "processes": run.world, "mixed_precision": run.mixed_precision,
        })
        from ..model_card import write_model_card  # final/README.md: the hub model card, from the records above

        write_model_card(final_dir, "train", run_dir=run_dir)
    accelerator.wait_for_everyone()
    plot = None
    if runlog is not None:
        runlog.close()
        plot = plot_learning_curves(runlog.path, run_dir / "logs" / "loss.png", title=f"{parts.name}")
        log.info("final model: %s; log: %s; plot: %s", final_dir, runlog.path, plot)
    accelerator.end_training()
    return TrainResult(run_dir, final_dir, run_dir / "logs" / "train_log.jsonl", plot, run.total_steps,
                       run.tokens_at(run.total_steps), final_eval, resumed_from)


# --------------------------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, TrainConfig)


def cli_main(args: argparse.Namespace) -> int:
    cfg = build_config(TrainConfig, args)
    result = train(cfg)
    summary = f"trained {result.steps} steps, {result.tokens_seen:,} tokens"
    if result.final_eval:
        summary += (f"; validation loss {result.final_eval['final_eval_loss']:.4f}, "
                    f"bits per byte {result.final_eval['final_eval_bpb']:.4f}")
    print(f"{summary}\nmodel: {result.final_dir}\nlog: {result.log_path}"
          + (f"\nplot: {result.plot_path}" if result.plot_path else ""))
    return 0


__all__ = ["TrainConfig", "TrainResult", "train"]
