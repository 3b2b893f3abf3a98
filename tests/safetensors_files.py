"""Test helper shared by several test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


def tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in the model directory ``path``, by name."""
    out = {}
    for f in Path(path).glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out
