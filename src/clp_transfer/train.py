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
from typing import Any

import numpy as np
import torch

from .atomic import atomic_directory, atomic_write_json, atomic_write_text
from .config import add_dataclass_arguments, build_config, load_yaml, to_yaml
from .errors import ClpError
from .eval_loading import context_length
from .schedule import (BlockOrder, Phase, micro_batch_samples, phase_at, plan_phases, samples_before,
                       steps_for_tokens)
from .shards import TokenShards
from .train_config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")
# Settings that decide which batches and updates a run makes: a resumed run must not change them.
RESUME_KEYS = ("model", "data", "from_scratch", "model_config", "seed", "per_device_train_batch_size",
               "gradient_accumulation_steps", "block_size", "embedding_tuning_ratio", "embedding_batch_size",
               "max_steps", "max_tokens")
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

    from .modeling import load_tokenizer, resolve_model

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
        if phase.name == "embedding-tuning":
            if g["kind"] == "embedding":
                peak = cfg.embedding_learning_rate
            else:
                peak = 0.0 if cfg.embedding_freeze_body else cfg.learning_rate
        else:
            peak = cfg.learning_rate
        g["lr"] = peak * f
        top = max(top, g["lr"])
    return top


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
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if occupied and not (cfg.resume or cfg.overwrite):
        what = "another run" if (run_dir / "run_config.yaml").is_file() else "files"
        raise ClpError(f"--output_dir {str(run_dir)!r} holds {what}; pass --resume to continue it or --overwrite "
                       "to replace it (nothing was changed)")
    if cfg.resume and occupied:
        saved = run_dir / "run_config.yaml"
        if saved.is_file():
            old = load_yaml(saved)
            changed = [k for k in RESUME_KEYS if k in old and old[k] != getattr(cfg, k)]
            if changed:
                diffs = ", ".join(f"{k}: {old[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
                raise ClpError(f"--resume with settings that change the run ({diffs}); resuming would not "
                               "continue the same training. Use the original settings or a new --output_dir")
        ckpts = _checkpoints(run_dir)
        if ckpts:
            return ckpts[-1][1]
        log.warning("--resume: no complete checkpoint in %s, starting from step 0", run_dir)
        return None
    return None


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
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# --------------------------------------------------------------------------------------------- the loop


def _total_steps(cfg: TrainConfig, world: int) -> int:
    if not cfg.max_tokens:
        return cfg.max_steps
    bs1 = cfg.embedding_batch_size or cfg.per_device_train_batch_size
    per = world * cfg.gradient_accumulation_steps * cfg.block_size  # type: ignore[operator]
    return steps_for_tokens(cfg.max_tokens, cfg.embedding_tuning_ratio, bs1 * per, cfg.per_device_train_batch_size * per)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) continued pretraining; see the module docstring for what is written where."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg = dataclasses.replace(config, report_to=list(config.report_to))
    cfg.validate()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    from .modeling import default_device

    # cpu=True when no accelerator exists: that is what lets accelerate run DDP over gloo on CPU processes.
    accelerator = Accelerator(mixed_precision=mp, cpu=default_device().type == "cpu",
                              dynamo_backend="inductor" if cfg.torch_compile else None)
    if accelerator.distributed_type.name == "DEEPSPEED" and cfg.gradient_accumulation_steps > 1:
        raise ClpError("under DeepSpeed run with --gradient_accumulation_steps 1 (raise --per_device_train_batch_size "
                       "instead): DeepSpeed accumulates on its own and would scale the loss twice")
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    distributed = world > 1

    run_dir = Path(cfg.output_dir)  # type: ignore[arg-type]
    resume_from = prepare_run_dir(cfg, is_main)

    train_shards = TokenShards(cfg.data, "train")  # type: ignore[arg-type]
    try:
        valid_shards: TokenShards | None = TokenShards(cfg.data, "valid")  # type: ignore[arg-type]
    except ClpError:
        valid_shards = None
        log.warning("no validation shards in %s: no evaluation", cfg.data)
    set_seed(cfg.seed)
    model, tokenizer, model_name = load_model_and_tokenizer(cfg)
    ctx = context_length(model)
    if cfg.block_size is None:
        cfg.block_size = min(x for x in (train_shards.index.block_size or 1024, ctx or 10**9))
    block = int(cfg.block_size)
    check_data(model, tokenizer, train_shards, valid_shards, block)
    if cfg.overwrite and is_main:
        clear_run_dir(run_dir)
    accelerator.wait_for_everyone()

    total_steps = _total_steps(cfg, world)
    min_ratio = cfg.min_lr / cfg.learning_rate
    phases = plan_phases(total_steps, cfg.embedding_tuning_ratio, cfg.per_device_train_batch_size,
                         cfg.embedding_batch_size, cfg.lr_scheduler_type, cfg.embedding_lr_scheduler_type,
                         cfg.warmup_ratio, cfg.embedding_warmup_ratio, min_ratio)
    order = BlockOrder(train_shards.num_blocks(block), cfg.seed)
    accum = cfg.gradient_accumulation_steps

    embeddings = embedding_parameters(model)
    optimizer = make_optimizer(parameter_groups(model, embeddings, cfg), cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    embeddings = embedding_parameters(raw)  # same tensors after placement on the device
    emb_ids = {id(p) for p in embeddings}
    body_params = [p for p in raw.parameters() if id(p) not in emb_ids]

    start_step = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = json.loads((resume_from / "trainer_state.json").read_text(encoding="utf-8"))
        start_step = int(state["step"])
        log.info("resumed from %s (step %d)", resume_from, start_step)
    if is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "run_config.yaml", to_yaml(cfg))
    runlog = RunLog(run_dir / "logs", cfg.report_to, start_step if resume_from else None,
                    dataclasses.asdict(cfg)) if is_main else None

    eval_ids = None
    if valid_shards is not None and valid_shards.num_blocks(block) == 0:
        log.warning("the validation split is shorter than one block of %d tokens: no evaluation", block)
        valid_shards = None
    if valid_shards is not None:
        n_eval = min(valid_shards.num_blocks(block), cfg.eval_batches * cfg.per_device_eval_batch_size)
        eval_ids = np.arange(n_eval)  # the first blocks of the split: the same subset at every evaluation

    if is_main:
        log.info("training %s on %s: %d steps (%s), %d process(es), block %d, device %s, precision %s",
                 model_name, cfg.data, total_steps, " + ".join(f"{p.name} {p.steps}" for p in phases), world,
                 block, accelerator.device, mp)
    fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)

    def save_checkpoint(step: int) -> None:
        ck_dir = run_dir / "checkpoints"
        tmp = ck_dir / f".step-{step:06d}.tmp"
        if is_main and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if is_main:
            tokens = samples_before(phases, step, world, accum) * block
            atomic_write_json(tmp / "trainer_state.json", {"step": step, "tokens": tokens, "total_steps": total_steps})
            final = ck_dir / f"step-{step:06d}"
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for _, old in _checkpoints(run_dir)[: -max(1, cfg.save_total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    model.train()
    current_phase: Phase | None = None
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
               disable=not (is_main and cfg.progress))
    loss_sum = torch.zeros((), device=accelerator.device)  # summed on device; read only at logging steps
    loss_count = 0
    t_log, tokens_at_log = time.perf_counter(), samples_before(phases, start_step, world, accum) * block
    last_eval: dict[str, float] | None = None
    for step in range(start_step, total_steps):
        phase = phase_at(phases, step)
        if phase is not current_phase:
            if current_phase is not None and runlog is not None:
                runlog.write({"step": step, "tokens": samples_before(phases, step, world, accum) * block,
                              "event": "phase_end", "phase": current_phase.name})
            set_trainable(raw, embeddings, body_trainable=not (phase.name == "embedding-tuning"
                                                               and cfg.embedding_freeze_body),
                          distributed=distributed)
            current_phase = phase
            log.info("phase %s: steps %d-%d, batch %d", phase.name, phase.start, phase.end - 1, phase.batch_size)
        lr = set_learning_rates(optimizer, phase, step, cfg)
        first = samples_before(phases, step, world, accum)
        for micro in range(accum):
            s0, n = micro_batch_samples(first, micro, accelerator.process_index, world, phase.batch_size)
            x = torch.from_numpy(np.stack([train_shards.block(int(b), block) for b in order.blocks(s0, n)]))
            x = x.to(accelerator.device, non_blocking=True)
            sync = micro == accum - 1
            ctx_mgr = accelerator.no_sync(model) if (distributed and not sync) else contextlib.nullcontext()
            with ctx_mgr:
                with accelerator.autocast():
                    loss = model(input_ids=x, labels=x).loss
                accelerator.backward(loss / accum)
            loss_sum += loss.detach().float()
            loss_count += 1
        if phase.name == "embedding-tuning" and cfg.embedding_freeze_body:
            for p in body_params:
                p.grad = None  # frozen body: AdamW skips parameters without gradient
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_([p for p in raw.parameters() if p.grad is not None],
                                                    cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        bar.update(1)

        if done % cfg.logging_steps == 0 or done == total_steps:
            mean_loss = accelerator.reduce(loss_sum / max(1, loss_count), "mean").item()
            loss_sum.zero_()
            loss_count = 0
            now = time.perf_counter()
            tokens = samples_before(phases, done, world, accum) * block
            record = {"step": done, "loss": mean_loss, "lr": lr, "tokens": tokens,
                      "tokens_per_s": (tokens - tokens_at_log) / max(1e-9, now - t_log), "phase": phase.name}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            t_log, tokens_at_log = now, tokens
            if not math.isfinite(mean_loss):
                ck = _checkpoints(run_dir)
                where = f"the last good checkpoint is {ck[-1][1]}" if ck else "no checkpoint was written yet"
                raise ClpError(f"the training loss became {mean_loss} at step {done} (phase {phase.name}); "
                               f"stopping; {where}. Lower --learning_rate/--embedding_learning_rate or check the data")
            if runlog is not None:
                runlog.write(record)
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if eval_ids is not None and cfg.eval_steps and done % cfg.eval_steps == 0:
            last_eval = evaluate_blocks(model, valid_shards, eval_ids, block, cfg.per_device_eval_batch_size,
                                        accelerator)
            if runlog is not None:
                runlog.write({"step": done, "tokens": samples_before(phases, done, world, accum) * block,
                              **last_eval})
        if cfg.save_steps and done % cfg.save_steps == 0 and done < total_steps:
            if loss_count and not math.isfinite(float(loss_sum)):
                raise ClpError(f"the training loss became {float(loss_sum)} before step {done}; stopping before "
                               "writing a checkpoint of a broken model")
            save_checkpoint(done)
        if fault_step and done == fault_step:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()

    final_eval = None
    if cfg.final_eval and valid_shards is not None:
        all_ids = np.arange(valid_shards.num_blocks(block))
        final_eval = evaluate_blocks(model, valid_shards, all_ids, block, cfg.per_device_eval_batch_size, accelerator)
        final_eval = {k.replace("eval_", "final_eval_"): v for k, v in final_eval.items()}
        if runlog is not None:
            runlog.write({"step": total_steps, "tokens": samples_before(phases, total_steps, world, accum) * block,
                          **final_eval})

    final_dir = run_dir / "final"
    state_dict = accelerator.get_state_dict(model)
    if is_main:
        with atomic_directory(final_dir, overwrite=True) as tmp:
            raw.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            atomic_write_text(tmp / "train_config.yaml", to_yaml(cfg))
        tokens_seen = samples_before(phases, total_steps, world, accum) * block
        atomic_write_json(run_dir / "results.json", {
            "model": model_name, "data": cfg.data, "steps": total_steps, "tokens_seen": tokens_seen,
            "phases": [dataclasses.asdict(p) for p in phases], "final_eval": final_eval,
            "last_eval": last_eval, "resumed_from_step": start_step if resume_from else None,
            "processes": world, "mixed_precision": mp,
        })
        from .model_card import write_model_card  # final/README.md: the hub model card, from the records above

        write_model_card(final_dir, "train", run_dir=run_dir)
    accelerator.wait_for_everyone()
    plot = None
    if runlog is not None:
        runlog.close()
        plot = plot_learning_curves(runlog.path, run_dir / "logs" / "loss.png", title=f"{model_name}")
        log.info("final model: %s; log: %s; plot: %s", final_dir, runlog.path, plot)
    accelerator.end_training()
    return TrainResult(run_dir, final_dir, run_dir / "logs" / "train_log.jsonl", plot, total_steps,
                       samples_before(phases, total_steps, world, accum) * block, final_eval,
                       start_step if resume_from else None)


# --------------------------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with TrainConfig fields (flags given here override it)")
    add_dataclass_arguments(parser, TrainConfig)


def cli_main(args: argparse.Namespace) -> int:
    cfg = build_config(TrainConfig, args, getattr(args, "config", None))
    result = train(cfg)
    summary = f"trained {result.steps} steps, {result.tokens_seen:,} tokens"
    if result.final_eval:
        summary += (f"; validation loss {result.final_eval['final_eval_loss']:.4f}, "
                    f"bits per byte {result.final_eval['final_eval_bpb']:.4f}")
    print(f"{summary}\nmodel: {result.final_dir}\nlog: {result.log_path}"
          + (f"\nplot: {result.plot_path}" if result.plot_path else ""))
    return 0


__all__ = ["TrainConfig", "TrainResult", "train"]
