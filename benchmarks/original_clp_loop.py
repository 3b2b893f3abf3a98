"""A faithful re-implementation of the original CLP code's hot path, for benchmarks only (not the package).

What the study project's ``apply_clp`` did, reduced to the maths (no model loading): float64 random init of
the target matrix from the source mean/std, one batched cosine-similarity matrix between missing and
overlapping tokens in the helper space, then a Python loop over missing tokens, each a weighted average of
all overlapping source rows with weights ``cos / cos.sum()``.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarities, as sklearn's ``cosine_similarity`` computes them."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def original_clp_loop(
    source_embeddings: np.ndarray,  # [V_s, d] float32
    helper_embeddings: np.ndarray,  # [V_t, d_h] float32
    overlap_target_ids: np.ndarray,  # target ids of overlapping tokens
    overlap_source_ids: np.ndarray,  # their source ids
    missing_target_ids: np.ndarray,
    seed: int = 42,
    limit: int | None = None,
) -> np.ndarray:
    rng = np.random.RandomState(seed)
    v_t = helper_embeddings.shape[0]
    target = rng.normal(source_embeddings.mean(0), source_embeddings.std(0), (v_t, source_embeddings.shape[1]))
    target[overlap_target_ids] = source_embeddings[overlap_source_ids]
    overlapping_vecs = source_embeddings[overlap_source_ids]
    sims = cosine_matrix(helper_embeddings[missing_target_ids], helper_embeddings[overlap_target_ids])
    todo = missing_target_ids if limit is None else missing_target_ids[:limit]
    for i, tid in enumerate(tqdm(todo, desc="original loop", mininterval=5)):
        w = sims[i] / sims[i].sum()
        target[tid] = np.average(overlapping_vecs, axis=0, weights=w)
    return target
