"""Training phases, learning-rate schedules and the data order, as pure functions of the step.

Everything the trainer needs to know about "where am I" is a function of the optimizer step: which phase,
what learning rate, which samples. Nothing here holds state, so a resumed run recomputes exactly what an
uninterrupted run would have seen, and all of it is testable without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Phase:
    """A contiguous range of optimizer steps with its own schedule and batch size."""

    name: str
    """'embedding-tuning' (phase 1) or 'full' (phase 2)."""
    start: int
    """First step of the phase (0-based)."""
    steps: int
    """Number of optimizer steps in the phase."""
    batch_size: int
    """Per-device micro-batch size."""
    schedule: str
    """'cosine' (to min_ratio of the peak) or 'constant' after warm-up."""
    warmup_steps: int
    """Linear warm-up from 0 to the peak over this many steps."""
    min_ratio: float
    """End of the cosine as a fraction of the peak."""
    tunes_embeddings: bool = False
    """What the phase trains: True for phase 1, in which the embedding rows learn at their own rate (and the
    body only without ``--embedding_freeze_body``); False for full training."""

    @property
    def end(self) -> int:
        return self.start + self.steps

    def lr_factor(self, step: int) -> float:
        """Multiplier of the phase's peak learning rate at global ``step`` (which must lie in the phase)."""
        i = step - self.start
        if i < self.warmup_steps:
            return (i + 1) / (self.warmup_steps + 1)  # never exactly 0: the first step already learns
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.steps - self.warmup_steps - 1)
        progress = min(1.0, (i - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def plan_phases(
    total_steps: int,
    embedding_ratio: float,
    batch_size: int,
    embedding_batch_size: int | None,
    schedule: str,
    embedding_schedule: str | None,
    warmup_ratio: float,
    embedding_warmup_ratio: float | None,
    min_ratio: float,
    warmup_steps: int | None = None,
) -> list[Phase]:
    """Split ``total_steps`` into phase 1 (``round(ratio * total)`` steps) and phase 2 (the rest).

    ``warmup_steps``, when given, is phase 2's warm-up in steps (capped at the phase's length) instead of
    ``warmup_ratio`` of it.
    """
    n1 = min(total_steps, int(round(embedding_ratio * total_steps)))
    if embedding_ratio > 0 and n1 == 0:
        n1 = 1  # a requested phase 1 is never silently dropped
    phases: list[Phase] = []
    if n1:
        wr = warmup_ratio if embedding_warmup_ratio is None else embedding_warmup_ratio
        phases.append(Phase("embedding-tuning", 0, n1, embedding_batch_size or batch_size,
                            embedding_schedule or schedule, int(wr * n1), min_ratio, tunes_embeddings=True))
    n2 = total_steps - n1
    if n2:
        warm = int(warmup_ratio * n2) if warmup_steps is None else min(warmup_steps, n2 - 1)
        phases.append(Phase("full", n1, n2, batch_size, schedule, warm, min_ratio))
    return phases


def steps_for_tokens(max_tokens: int, embedding_ratio: float, tokens_per_step_1: int, tokens_per_step_2: int) -> int:
    """Smallest step count whose token budget (phase 1 share at its batch size, then phase 2) covers max_tokens."""
    per_step = embedding_ratio * tokens_per_step_1 + (1.0 - embedding_ratio) * tokens_per_step_2
    steps = max(1, math.ceil(max_tokens / per_step))
    return steps


def phase_at(phases: list[Phase], step: int) -> Phase:
    for p in phases:
        if p.start <= step < p.end:
            return p
    raise IndexError(f"step {step} lies outside the run (0..{phases[-1].end - 1})")


def samples_before(phases: list[Phase], step: int, world_size: int, accumulation: int) -> int:
    """Global sample index at which optimizer step ``step`` starts (samples of all devices counted)."""
    total = 0
    for p in phases:
        n = min(max(0, step - p.start), p.steps)
        total += n * p.batch_size * world_size * accumulation
    return total


class BlockOrder:
    """Which block of the corpus is global sample ``g``: a fresh seeded permutation every epoch.

    Sample ``g`` lies in epoch ``g // num_blocks``; its block is ``perm(epoch)[g % num_blocks]``, where
    ``perm(epoch)`` is drawn from ``numpy.random.default_rng((seed, epoch))`` - a pure function, so a resumed
    run, or another process, finds the same block for the same ``g``.

    With ``shuffle=False`` every epoch reads the blocks in corpus order (``perm`` is the identity): the order
    in which documents were written to the shards is the order in which they are learned, so two models with
    different tokenizers trained on the same documents see the same text in the same order.
    """

    def __init__(self, num_blocks: int, seed: int, shuffle: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.seed = seed
        self.shuffle = shuffle
        self._perm = lru_cache(maxsize=2)(self._permutation)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_blocks)
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_blocks)

    def blocks(self, start: int, count: int) -> np.ndarray:
        """Block indices of global samples ``start .. start+count-1``."""
        g = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(g // self.num_blocks):
            sel = (g // self.num_blocks) == epoch
            out[sel] = self._perm(int(epoch))[g[sel] % self.num_blocks]
        return out


def micro_batch_samples(step_start: int, micro: int, rank: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """(first global sample, count) of micro-batch ``micro`` on process ``rank`` within a step.

    The step's samples are laid out micro-batch by micro-batch, and within a micro-batch rank by rank, so a run
    on W processes with batch B sees, per micro-batch, exactly the samples of a run on 1 process with batch W*B.
    """
    return step_start + (micro * world_size + rank) * batch_size, batch_size
