"""Loading a model and its tokenizer for evaluation (``perplexity``, ``evaluate``).

Built on :mod:`clp_transfer.modeling`, which turns what the user names (local directory, hub id, ``.gguf``
file) into a local safetensors directory and refuses pickle checkpoints unless ``allow_pickle`` is set.
This module adds what evaluation needs on top: a clear error when the tokenizer is missing, the device and
dtype rule (float32 on CPU, bfloat16 on CUDA GPUs that support it), and reading the ids of the tokens a
transfer created (``transfer_report.json``) so that losses can be split by token class.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ClpError
from .modeling import default_device, default_dtype, load_tokenizer, resolve_model

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)
"""Any of these files in a directory means a tokenizer was saved there."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A model ready for scoring, with the tokenizer that goes with it."""

    model: Any
    """The ``PreTrainedModel`` in eval mode."""
    tokenizer: Any
    """Its tokenizer."""
    name: str
    """What the user named (path, hub id, .gguf file)."""
    path: Path | None
    """Local safetensors directory the weights came from (None for a model passed in memory)."""


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` -> float32 on CPU, bfloat16 on CUDA with bf16 support; else the named dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return default_dtype(device)
    try:
        return _DTYPES[name]
    except KeyError:
        raise ClpError(f"unknown dtype {name!r}; use one of auto, {', '.join(_DTYPES)}") from None


def parse_device(name: str | torch.device | None) -> torch.device:
    if name is None or name == "auto":
        return default_device()
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ClpError(f"unknown device {name!r}: {e}") from None


def has_tokenizer_files(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES)


def load_eval_tokenizer(model_dir: Path, tokenizer: str | None, name: str, trust_remote_code: bool = False):
    """The model's own tokenizer (or ``tokenizer`` when given); a missing one is a :class:`ClpError`."""
    where = Path(tokenizer) if tokenizer else model_dir
    if tokenizer is None and not has_tokenizer_files(model_dir):
        raise ClpError(
            f"model {name!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ... in "
            f"{str(model_dir)!r}); save the tokenizer next to the model (tokenizer.save_pretrained(dir)) or "
            "pass --tokenizer DIR"
        )
    if tokenizer is not None and Path(tokenizer).exists() and not has_tokenizer_files(tokenizer):
        raise ClpError(f"--tokenizer {tokenizer!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    return load_tokenizer(where, trust_remote_code, f"model {name!r}")


def load_for_eval(
    model: str | os.PathLike,
    tokenizer: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM for scoring: safetensors only (unless ``allow_pickle``), eval mode, on ``device``.

    The tokenizer is checked before the weights are read, so a directory without one fails fast.
    """
    from transformers import AutoModelForCausalLM

    name = str(model)
    files = resolve_model(name, "model", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    tok = load_eval_tokenizer(files.path, tokenizer, name, trust_remote_code)
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    log.info("loading %s (%s) on %s as %s", name, files.kind, dev, str(dt).replace("torch.", ""))
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            files.path, dtype=dt, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ClpError(f"cannot load model {name!r} from {str(files.path)!r}: {e}") from e
    lm.to(dev).eval()
    return LoadedModel(lm, tok, name, files.path)


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def context_length(model: Any) -> int | None:
    """Longest input the model's position scheme allows, from its config (None when it does not say).

    ``model`` is a model or its config.
    """
    config = getattr(model, "config", model)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def read_new_token_ids(path: str | os.PathLike) -> list[int]:
    """Ids of the tokens a transfer created, from ``transfer_report.json`` or a JSON list of ids."""
    p = Path(path)
    if p.is_dir():
        p = p / "transfer_report.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClpError(f"new-token file {str(p)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ClpError(f"new-token file {str(p)!r} is not JSON: {e}") from None
    ids = data.get("new_token_ids") if isinstance(data, dict) else data
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ClpError(
            f"{str(p)!r} must hold a JSON list of token ids or an object with 'new_token_ids' "
            "(as transfer_report.json does)"
        )
    return ids


def new_token_mask_from_ids(ids: list[int], vocab_rows: int) -> torch.Tensor:
    """Boolean mask over ``vocab_rows`` logits that is True at ``ids``."""
    mask = torch.zeros(vocab_rows, dtype=torch.bool)
    bad = [i for i in ids if not 0 <= i < vocab_rows]
    if bad:
        raise ClpError(f"new token ids {bad[:5]} are outside the model's {vocab_rows} vocabulary rows")
    if ids:
        mask[torch.tensor(ids, dtype=torch.long)] = True
    return mask
