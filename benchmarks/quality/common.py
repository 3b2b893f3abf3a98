"""Paths and small helpers shared by the initialisation-quality benchmark scripts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / "benchmarks" / ".cache" / "quality"
DEFAULT_CORPORA = REPO.parent / "shared" / "corpora"
SPLITS = ("helper_train", "dev", "test", "en_train")
COMMITTED_HELPER = REPO / "benchmarks" / "assets" / "helper-de-600"


def ensure_helper(cache: str | os.PathLike | None = None) -> Path:
    """``<cache>/helper-de``, the German helper of these benchmarks: copied from the committed
    ``benchmarks/assets/helper-de-600`` when the cache has none (``make_helper.py`` rebuilds it instead).
    The copy is made in a temporary directory and renamed into place, so an interrupted copy leaves no
    half helper behind; concurrent benchmark jobs wait for each other's copy."""
    import logging
    import shutil

    from clp_transfer.atomic import atomic_directory

    helper = cache_dir(cache) / "helper-de"
    if not (helper / "helper_report.json").exists() and (COMMITTED_HELPER / "helper_report.json").exists():
        logging.getLogger(__name__).info("helper: copying the committed %s into %s", COMMITTED_HELPER, helper)
        with atomic_directory(helper, overwrite=True, wait=True) as tmp:
            shutil.copytree(COMMITTED_HELPER, tmp, dirs_exist_ok=True)
    return helper


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path) if path else DEFAULT_CACHE


def splits_dir(cache: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache) / "splits"


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def jsonl_text(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def train_helper_logged(cfg: Any, root: Path, name: str) -> int:
    """Run ``clp-transfer helper`` on ``cfg`` (a ``HelperConfig``) with its log on stderr and in
    ``<root>/<name>.log``; 0 on success, 2 with a hint when the splits are missing (the make_* scripts)."""
    import logging

    from clp_transfer.errors import ClpError
    from clp_transfer.transfer.helper import train_helper

    root.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(), logging.FileHandler(root / f"{name}.log", encoding="utf-8")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers)
    try:
        train_helper(cfg)
    except ClpError as e:
        logging.getLogger(name).error("%s (did you run data.py first?)", e)
        return 2
    return 0
