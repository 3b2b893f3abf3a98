"""The maths of the transfer: target embedding matrices from source rows and helper similarities.

Pure tensor code, no file I/O, so every method can be tested on random matrices. Notation (shapes):

- ``E_s``  source input embeddings            [V_s, d]
- ``O_s``  source output embeddings (untied)   [V_s, d]  (``None`` when tied)
- ``E_h``  helper input embeddings by target id [V_t, d_h]
- shared target ids ``S`` (their source row is known), missing target ids ``M``.

A *weighted* method gives every missing token a convex combination of the **source** rows of shared tokens,
with weights from similarity in the **helper** space; the untied head gets the same weights applied to its
own rows, so row ``i`` of every output matrix always belongs to target token ``i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import ClpError, NonFiniteEmbeddingsError
from ..registry import Registry

CHUNK = 1024  # missing tokens per similarity block: [CHUNK, |S|] floats at a time


@dataclass
class EmbeddingProblem:
    """Inputs of a transfer method. All id tensors index target ids unless named otherwise."""

    source_input: torch.Tensor
    """E_s [V_s, d]."""
    source_id: torch.Tensor
    """[V_t] long: source row that target id i copies, or -1 when the token is new."""
    target_rows: int
    """Rows of the target matrices (>= V_t; extra rows are vocabulary padding)."""
    source_output: torch.Tensor | None = None
    """O_s [V_s, d] for untied heads, else None."""
    helper_input: torch.Tensor | None = None
    """E_h [V_t, d_h]: the helper's embeddings, indexed by target id (required by similarity methods)."""
    pieces: list[list[int]] | None = None
    """Per target id, the source ids of its pieces under the source vocabulary (required by FVT)."""
    source_padding_ids: list[int] = field(default_factory=list)
    """Source rows that no token uses (padding); their mean fills the target's padding rows."""
    calibration_hidden: torch.Tensor | None = None
    """H [N, d]: final (normalised) hidden states of the target model - source body, this method's input rows
    without calibration - at N positions of target-language text. Optional; filled by the I/O code only when
    the method calibrates (``calibrate > 0``)."""
    token_counts: torch.Tensor | None = None
    """c [V_t]: how often each target token occurs in target-language text (target tokenizer). Optional, as
    ``calibration_hidden``."""

    def __post_init__(self) -> None:
        v_t = self.source_id.shape[0]
        if self.target_rows < v_t:
            raise ClpError(f"target_rows={self.target_rows} is smaller than the target vocabulary ({v_t})")
        if self.helper_input is not None and self.helper_input.shape[0] < v_t:
            raise ClpError(
                f"helper embeddings have {self.helper_input.shape[0]} rows but the target tokenizer has {v_t} "
                "tokens: the helper tokenizer does not match the helper model"
            )
        if self.source_output is not None and self.source_output.shape != self.source_input.shape:
            raise ClpError("source input and output embeddings differ in shape")
        if (self.calibration_hidden is None) != (self.token_counts is None):
            raise ClpError("calibration needs both calibration_hidden and token_counts")
        if self.calibration_hidden is not None:
            if self.calibration_hidden.dim() != 2 or self.calibration_hidden.shape[1] != self.source_input.shape[1]:
                raise ClpError(f"calibration_hidden must be [N, {self.source_input.shape[1]}], "
                               f"got {list(self.calibration_hidden.shape)}")
            if self.token_counts.shape != (v_t,):
                raise ClpError(f"token_counts must have one entry per target token ({v_t}), "
                               f"got {list(self.token_counts.shape)}")

    @property
    def shared(self) -> torch.Tensor:
        return torch.nonzero(self.source_id >= 0).flatten()

    @property
    def missing(self) -> torch.Tensor:
        return torch.nonzero(self.source_id < 0).flatten()


@dataclass
class NewRows:
    """What a method returns for the missing ids (in the order of ``problem.missing``)."""

    input: torch.Tensor
    """[|M|, d] new input rows."""
    output: torch.Tensor | None = None
    """[|M|, d] new output rows (untied heads only)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Method-specific statistics for the report."""


@dataclass
class EmbeddingSolution:
    input: torch.Tensor
    """[target_rows, d] target input embeddings, in the source dtype."""
    output: torch.Tensor | None
    """[target_rows, d] target output embeddings for untied heads."""
    stats: dict[str, Any]


@dataclass
class MethodSpec:
    fn: Callable[..., NewRows]
    description: str
    needs_helper: bool = False
    needs_pieces: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)

    def wants_pieces(self, params: dict[str, Any]) -> bool:
        """Whether the I/O code should decompose target tokens into source pieces for these parameters."""
        return self.needs_pieces or float(params.get("pieces_weight", 0)) > 0

    def wants_calibration(self, params: dict[str, Any]) -> bool:
        """Whether these parameters ask for the output calibration (token counts + hidden states)."""
        return float(params.get("calibrate", 0)) > 0


METHODS: Registry[MethodSpec] = Registry("transfer method")


def register(name: str, description: str, needs_helper: bool = False, needs_pieces: bool = False, **defaults):
    def deco(fn):
        METHODS.add(name, MethodSpec(fn, description, needs_helper, needs_pieces, dict(defaults)))
        return fn

    return deco


# --------------------------------------------------------------------------------------------- weights


def sparsemax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean projection of ``z`` onto the probability simplex (Martins & Astudillo 2016): sparse weights."""
    z_sorted, _ = torch.sort(z, dim=dim, descending=True)
    cumsum = z_sorted.cumsum(dim) - 1
    k = torch.arange(1, z.shape[dim] + 1, device=z.device, dtype=z.dtype)
    shape = [1] * z.dim()
    shape[dim] = -1
    k = k.view(shape)
    support = (k * z_sorted > cumsum).to(z.dtype)
    k_z = support.sum(dim=dim, keepdim=True)
    tau = cumsum.gather(dim, (k_z - 1).long()) / k_z
    return torch.clamp(z - tau, min=0)


def sparsemax_topk(z: torch.Tensor, k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparsemax of each row of ``z`` [c, n] as (indices [c, k'], weights [c, k']), without sorting whole rows.

    Sparsemax keeps exactly the entries above a threshold tau, so when a row's k-th largest value is already
    <= tau over its top k, nothing outside the top k can be in the support and the top-k result is exact. Rows
    whose support might be wider are recomputed with a larger k (x4 each round, up to n). Weights of padding
    columns are 0. Same result as :func:`sparsemax`, at the cost of a top-k instead of a full sort.
    """
    n = z.shape[1]
    k = max(1, min(k, n))
    while True:
        vals, idx = z.topk(k, dim=1)  # [c, k], sorted descending
        cumsum = vals.cumsum(1) - 1
        r = torch.arange(1, k + 1, device=z.device, dtype=z.dtype)
        k_z = (r * vals > cumsum).sum(1, keepdim=True)
        tau = cumsum.gather(1, k_z - 1) / k_z.to(z.dtype)
        exact = (vals[:, -1:] <= tau).all() or k == n
        if exact:
            return idx, torch.clamp(vals - tau, min=0)
        k = min(n, 4 * k)


def _cosine_blocks(helper: torch.Tensor, missing: torch.Tensor, shared: torch.Tensor, center: bool = False):
    """Yield (slice, cos [c, |S|]) blocks of cosines between missing and shared tokens in the helper space."""
    h = helper.float()
    if center:
        h = h - h[shared].mean(0, keepdim=True)
    h = torch.nn.functional.normalize(h, dim=-1)
    h_shared = h[shared]  # [|S|, d_h]
    for start in range(0, len(missing), CHUNK):
        sl = slice(start, start + CHUNK)
        yield sl, h[missing[sl]] @ h_shared.T  # [c, |S|]


def _combine(weights_idx: torch.Tensor | None, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ_j weights[i, j] · rows[weights_idx[i, j]] -> [c, d].

    ``weights_idx=None`` means dense weights over all rows ([c, |S|] @ [|S|, d]); otherwise sparse
    index/value pairs ([c, k]), gathered as [c, k, d] - cheap for small k.
    """
    if weights_idx is None:
        return weights @ rows.float()
    return torch.einsum("ck,ckd->cd", weights, rows[weights_idx].float())


def _apply_weights(problem: EmbeddingProblem, weight_fn, center: bool = False) -> NewRows:
    """Run ``weight_fn(cos [c, |S|]) -> (idx [c, k], w [c, k])`` block by block and combine source rows."""
    shared, missing = problem.shared, problem.missing
    src_of_shared = problem.source_id[shared]
    e_rows = problem.source_input[src_of_shared].float()  # [|S|, d]
    o_rows = problem.source_output[src_of_shared].float() if problem.source_output is not None else None
    d = problem.source_input.shape[1]
    new_in = torch.empty(len(missing), d, dtype=torch.float32)
    new_out = torch.empty(len(missing), d, dtype=torch.float32) if o_rows is not None else None
    support, max_w, neg = [], [], 0
    for sl, cos in _cosine_blocks(problem.helper_input, missing, shared, center=center):
        idx, w = weight_fn(cos)
        new_in[sl] = _combine(idx, w, e_rows)
        if new_out is not None:
            new_out[sl] = _combine(idx, w, o_rows)
        support.append((w != 0).sum(1).float())
        max_w.append(w.max(1).values)
        neg += int((w < 0).sum())
    info = {}
    if support:
        info = {
            "mean_support": float(torch.cat(support).mean()),
            "mean_max_weight": float(torch.cat(max_w).mean()),
            "negative_weights": neg,
        }
    return NewRows(new_in, new_out, info)


def _rescale_norms(rows: torch.Tensor, target_norm: torch.Tensor) -> torch.Tensor:
    norms = rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return rows * (target_norm / norms)


# --------------------------------------------------------------------------------------------- methods


@register("clp-original", "the published CLP rule: signed cosine weights over all shared tokens / their sum",
          needs_helper=True)
def clp_original(problem: EmbeddingProblem, generator: torch.Generator | None = None) -> NewRows:
    # Reproduced exactly, defects included: signed weights, dense over every shared token, no normalisation
    # of the sum's sign. Kept for comparison.
    def weights(cos: torch.Tensor):
        return None, cos / cos.sum(dim=1, keepdim=True)  # dense over all shared tokens

    return _apply_weights(problem, weights)


def similarity_rows(
    problem: EmbeddingProblem,
    weighting: str = "topk_softmax",
    top_k: int = 10,
    temperature: float = 0.05,
    rescale_norms: bool = False,
    center: bool = False,
) -> NewRows:
    """CLP's similarity part: each new row [d] is a convex mix of the source rows of the ``top_k`` shared
    tokens most similar to it in the helper space (cosines [|M|, |S|], computed block-wise).

    ``weighting``: ``topk_softmax`` = softmax(cos / temperature) over the top-k; ``sparsemax`` = sparsemax
    of cos / temperature over all shared tokens (sparse by construction); ``topk_uniform`` = plain mean of
    the top-k. Weights are non-negative and sum to one, so new rows stay inside the cloud of source rows.
    ``rescale_norms`` scales each new row to the weighted mean norm of the rows it mixes (averaging shrinks
    norms). ``center`` subtracts the mean helper vector before cosines.
    """
    if temperature <= 0:
        raise ClpError("temperature must be positive")
    n_shared = int((problem.source_id >= 0).sum())
    k = max(1, min(top_k, n_shared))

    def weights(cos: torch.Tensor):
        if weighting == "topk_softmax":
            vals, idx = cos.topk(k, dim=1)
            return idx, torch.softmax(vals / temperature, dim=1)
        if weighting == "topk_uniform":
            _, idx = cos.topk(k, dim=1)
            return idx, torch.full(idx.shape, 1.0 / k)
        if weighting == "sparsemax":
            idx, vals = sparsemax_topk(cos / temperature)
            kk = max(1, int((vals > 0).sum(1).max()))
            if kk > 64:  # wide support: a dense matmul is cheaper than gathering [c, kk, d]
                w = torch.zeros_like(cos).scatter_(1, idx, vals)
                return None, w / w.sum(1, keepdim=True)
            vals, idx = vals[:, :kk], idx[:, :kk]  # already sorted: the support comes first
            return idx, vals / vals.sum(1, keepdim=True)
        raise ClpError(f"unknown weighting {weighting!r}; choose topk_softmax, topk_uniform or sparsemax")

    rows = _apply_weights(problem, weights, center=center)
    if rescale_norms:
        # Target norm of each new row: the weighted mean norm of its source rows, recomputed block-wise.
        shared = problem.shared
        src = problem.source_id[shared]
        norms_in = problem.source_input[src].float().norm(dim=-1)
        norms_out = problem.source_output[src].float().norm(dim=-1) if problem.source_output is not None else None
        missing = problem.missing
        for sl, cos in _cosine_blocks(problem.helper_input, missing, shared, center=center):
            idx, w = weights(cos)
            rows.input[sl] = _rescale_norms(rows.input[sl], _combine(idx, w, norms_in[:, None]))
            if rows.output is not None:
                rows.output[sl] = _rescale_norms(rows.output[sl], _combine(idx, w, norms_out[:, None]))
    return rows


@register("clp", "CLP with sparse weights and output calibration (the measured winner): each new row is a sparse "
          "convex mix of the source rows of helper-similar shared tokens (sparsemax; pieces_weight mixes in the "
          "token's own pieces, FVT), then the output side is calibrated to token frequencies of target text", needs_helper=True,
          pieces_weight=0.0, weighting="sparsemax", top_k=10, temperature=0.05, rescale_norms=False,
          center=False, calibrate=1.0, calibrate_shared=True)
def clp(
    problem: EmbeddingProblem,
    generator: torch.Generator | None = None,
    pieces_weight: float = 0.0,
    weighting: str = "sparsemax",
    top_k: int = 10,
    temperature: float = 0.05,
    rescale_norms: bool = False,
    center: bool = False,
) -> NewRows:
    """new row [d] = pieces_weight * FVT row + (1 - pieces_weight) * similarity row.

    The FVT row is the mean source row of the token's pieces under the source vocabulary
    (``problem.pieces``); the similarity row is the CLP rule with sparse weights (see :func:`similarity_rows`
    for ``weighting``, ``top_k``, ``temperature``, ``rescale_norms``, ``center``). Tokens no source piece
    covers (e.g. single bytes the source vocabulary lacks) take the similarity row alone, whatever
    ``pieces_weight``. The default (``pieces_weight=0``, sparsemax, calibrated) won on the dev split; the
    previous default was ``pieces_weight=0, weighting=topk_softmax, calibrate=0``.
    The calibration parameters ``calibrate`` / ``calibrate_shared`` are applied by
    :func:`compute_target_embeddings` after the rows are assembled (see :func:`calibrate_frequencies`).
    """
    if not 0 <= pieces_weight <= 1:
        raise ClpError("pieces_weight must lie in [0, 1]")
    if pieces_weight > 0 and problem.pieces is None:
        raise ClpError("clp with pieces_weight > 0 needs the decomposition of target tokens into source pieces")
    has_pieces = _has_pieces(problem)
    if bool((pieces_weight * has_pieces == 1).all()):  # the similarity part has no weight anywhere: skip the cosines
        return fvt(problem, generator)
    sim = similarity_rows(problem, weighting, top_k, temperature, rescale_norms, center)
    pie = fvt(problem, generator) if pieces_weight > 0 else None
    return mix_pieces(problem, sim, pie, pieces_weight)


def _has_pieces(problem: EmbeddingProblem) -> torch.Tensor:
    """[|M|] 1.0 where the source vocabulary spells the new token (it has pieces), else 0.0."""
    return torch.tensor([bool(problem.pieces and problem.pieces[t]) for t in problem.missing.tolist()],
                        dtype=torch.float32)


def mix_pieces(problem: EmbeddingProblem, sim: NewRows, pie: NewRows | None, pieces_weight: float) -> NewRows:
    """``pieces_weight`` · FVT rows ``pie`` + (1 - ``pieces_weight``) · similarity rows ``sim`` ([|M|, d] each);
    a token without source pieces keeps its similarity row whatever the weight (clp's rule)."""
    has_pieces = _has_pieces(problem)
    info: dict[str, Any] = {"no_pieces": int((has_pieces == 0).sum())}
    w = (pieces_weight * has_pieces)[:, None]  # [|M|, 1]
    if pie is None or bool((w == 0).all()):
        return NewRows(sim.input, sim.output, {**sim.info, **info})

    def mix(x, y):
        return None if x is None else w * x + (1 - w) * y

    return NewRows(mix(pie.input, sim.input), mix(pie.output, sim.output), {**sim.info, **info})


@register("fvt", "fast vocabulary transfer: mean of the source rows of the token's pieces under the source "
          "vocabulary", needs_pieces=True)
def fvt(problem: EmbeddingProblem, generator: torch.Generator | None = None) -> NewRows:
    missing = problem.missing.tolist()
    shared_src = problem.source_id[problem.shared]
    mean_in = problem.source_input[shared_src].float().mean(0)
    mean_out = problem.source_output[shared_src].float().mean(0) if problem.source_output is not None else None
    d = problem.source_input.shape[1]
    new_in = torch.empty(len(missing), d)
    new_out = torch.empty(len(missing), d) if mean_out is not None else None
    fallback = 0
    for r, tid in enumerate(missing):
        ids = problem.pieces[tid] if problem.pieces else []
        if ids:
            new_in[r] = problem.source_input[ids].float().mean(0)
            if new_out is not None:
                new_out[r] = problem.source_output[ids].float().mean(0)
        else:  # no source piece covers it (e.g. a byte the source lacks): the mean shared row
            fallback += 1
            new_in[r] = mean_in
            if new_out is not None:
                new_out[r] = mean_out
    return NewRows(new_in, new_out, {"no_pieces_fallback": fallback})


def _fit_ridge_map(problem: EmbeddingProblem, ridge: float) -> torch.Tensor:
    """W [d_h + 1, d] minimising ||[H_S 1] W - E_S||² + ridge·||W||² over the shared tokens."""
    shared = problem.shared
    h = problem.helper_input[shared].float()
    h = torch.cat([h, torch.ones(len(h), 1)], dim=1)  # a bias column
    target = problem.source_input[problem.source_id[shared]].float()
    gram = h.T @ h + ridge * len(h) * torch.eye(h.shape[1])
    return torch.linalg.solve(gram, h.T @ target)


@register("map", "a linear map from the helper space to the source space, fitted by ridge regression on the "
          "shared tokens, applied to the new tokens", needs_helper=True, ridge=0.01)
def linear_map(problem: EmbeddingProblem, generator: torch.Generator | None = None, ridge: float = 0.01) -> NewRows:
    missing = problem.missing
    h_m = torch.cat([problem.helper_input[missing].float(), torch.ones(len(missing), 1)], dim=1)
    new_in = h_m @ _fit_ridge_map(problem, ridge)
    new_out = None
    if problem.source_output is not None:
        out_problem = EmbeddingProblem(problem.source_output, problem.source_id, problem.target_rows,
                                       helper_input=problem.helper_input)
        new_out = h_m @ _fit_ridge_map(out_problem, ridge)
    return NewRows(new_in, new_out)


@register("hybrid", "a mix of FVT (the token's own pieces) and CLP (helper-similar shared tokens): "
          "alpha * fvt + (1 - alpha) * clp", needs_helper=True, needs_pieces=True, alpha=0.5, top_k=10,
          temperature=0.05)
def hybrid(problem: EmbeddingProblem, generator: torch.Generator | None = None, alpha: float = 0.5,
           top_k: int = 10, temperature: float = 0.05) -> NewRows:
    if not 0 <= alpha <= 1:
        raise ClpError("alpha must lie in [0, 1]")
    a = fvt(problem, generator)
    b = similarity_rows(problem, top_k=top_k, temperature=temperature)
    # Tokens with no pieces fall back to the mean row in FVT: use CLP alone for them.
    has_pieces = torch.tensor([bool(problem.pieces[t]) for t in problem.missing.tolist()]).float()[:, None]
    w = alpha * has_pieces

    def mix(x, y):
        return None if x is None else w * x + (1 - w) * y

    return NewRows(mix(a.input, b.input), mix(a.output, b.output), {**a.info, **b.info})


@register("mean", "every new token gets the mean of the shared source rows")
def mean_init(problem: EmbeddingProblem, generator: torch.Generator | None = None) -> NewRows:
    shared_src = problem.source_id[problem.shared]
    m = len(problem.missing)
    new_in = problem.source_input[shared_src].float().mean(0).expand(m, -1).clone()
    new_out = None
    if problem.source_output is not None:
        new_out = problem.source_output[shared_src].float().mean(0).expand(m, -1).clone()
    return NewRows(new_in, new_out)


def random_std(init: str, rows: int, dim: int, std: float) -> float:
    if init == "small_init":  # Nguyen & Salazar (2019), as used by GPT-NeoX
        return math.sqrt(2.0 / (5.0 * dim))
    if init == "xavier_normal":
        return math.sqrt(2.0 / (rows + dim))
    if init == "normal":
        return std
    raise ClpError(f"unknown random init {init!r}; choose small_init, xavier_normal or normal")


@register("random", "random new rows (the study project's baselines: small_init, xavier_normal, normal)",
          init="small_init", std=0.02)
def random_init(
    problem: EmbeddingProblem, generator: torch.Generator | None = None, init: str = "small_init", std: float = 0.02
) -> NewRows:
    m, d = len(problem.missing), problem.source_input.shape[1]
    s = random_std(init, problem.target_rows, d, std)
    new_in = torch.randn(m, d, generator=generator) * s
    new_out = torch.randn(m, d, generator=generator) * s if problem.source_output is not None else None
    return NewRows(new_in, new_out, {"std": s})


# --------------------------------------------------------------------------------------------- omp

OMP_BLOCK = 1024  # new tokens per OMP block: [1024, |S|] correlations and [1024, k, d_h] picked atoms at a time
SCREEN_MIN_ATOMS = 1024  # below this many atoms the exact float32 product is cheap: no bfloat16 screen
SCREEN_CHUNK = 64  # atoms per chunk of the screen's candidate search (chunk maxima first, then entries)
SCREEN_MAX_CHUNKS = 48  # a row with more candidate chunks than this falls back to the exact product
GRAM_MAX_ENTRIES = 1 << 25  # the atoms' Gram matrix is precomputed up to 2^25 floats (128 MB, ~5800 atoms)
_BF16_U = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits, round to nearest)


@dataclass
class OmpAtoms:
    """The atoms [n, d_h] of a pursuit, prepared once for every block of targets (:func:`prepare_atoms`)."""

    a32: torch.Tensor
    """[n, d_h] float32 atoms: the exact correlations and the refits use these."""
    sq: torch.Tensor
    """[n] squared norms."""
    screen: torch.Tensor | None = None
    """[n', d_h] bfloat16 copy of the atoms sorted by decreasing norm (n' = n padded to a multiple of
    SCREEN_CHUNK with zero rows), or None: exact float32 correlations of every atom at every step."""
    screen_t: torch.Tensor | None = None
    """[d_h, n'] its transpose, contiguous: the layout the screen's product runs fastest with."""
    order: torch.Tensor | None = None
    """[n'] atom id of each screen row (padding rows: 0)."""
    position: torch.Tensor | None = None
    """[n] screen row of each atom id."""
    chunk_delta: torch.Tensor | None = None
    """[n' / SCREEN_CHUNK] max |a - bf16(a)| over each chunk of screen rows: the rounding of the atoms."""
    chunk_norm: torch.Tensor | None = None
    """[n' / SCREEN_CHUNK] max |bf16(a)| over each chunk (sorting by norm keeps these close to each atom's)."""
    gram: torch.Tensor | None = None
    """[n, n] float32 Gram matrix a32 @ a32.T (None when too large): the refit's new Gram entries by lookup."""


def prepare_atoms(atoms: torch.Tensor, screen: bool | None = None, gram: bool | None = None) -> OmpAtoms:
    """What every block of :func:`omp_select` over these ``atoms`` [n, d_h] reuses.

    ``screen`` (None: on from :data:`SCREEN_MIN_ATOMS` atoms) keeps a bfloat16 copy for the correlation
    screen of :func:`_screened_best`; ``gram`` (None: on up to :data:`GRAM_MAX_ENTRIES`) precomputes the Gram
    matrix, so a step reads the picked atoms' inner products with the new one instead of recomputing them.
    """
    a32 = atoms.float().contiguous()
    n = a32.shape[0]
    out = OmpAtoms(a32=a32, sq=(a32 * a32).sum(1))
    if screen if screen is not None else n >= SCREEN_MIN_ATOMS:
        order = torch.argsort(out.sq, descending=True, stable=True)
        low = a32[order].to(torch.bfloat16)
        pad = -n % SCREEN_CHUNK
        delta = (a32[order] - low.float()).norm(dim=1)
        norm = low.float().norm(dim=1)
        out.screen = torch.cat([low, low.new_zeros(pad, low.shape[1])])
        out.screen_t = out.screen.T.contiguous()
        out.order = torch.cat([order, order.new_zeros(pad)])
        out.position = torch.empty(n, dtype=torch.long).scatter_(0, order, torch.arange(n))
        out.chunk_delta = torch.cat([delta, delta.new_zeros(pad)]).view(-1, SCREEN_CHUNK).amax(1)
        out.chunk_norm = torch.cat([norm, norm.new_zeros(pad)]).view(-1, SCREEN_CHUNK).amax(1)
    if gram if gram is not None else n * n <= GRAM_MAX_ENTRIES:
        out.gram = a32 @ a32.T
    return out


def _exact_best(r: torch.Tensor, a32: torch.Tensor, idx: torch.Tensor, nonneg: bool):
    """(score [c], atom [c]) maximising |a·r| (``nonneg``: a·r) over the atoms [n, d_h] not in ``idx`` [c, i]:
    one float32 product of every atom with every residual."""
    corr = r @ a32.T  # [c, n]
    if not nonneg:
        corr.abs_()
    _exclude(corr, idx, -math.inf)
    return corr.max(1)


def _exclude(scores: torch.Tensor, idx: torch.Tensor, value: float) -> None:
    """Set ``scores[row, idx[row]]`` [c, n] to ``value`` in place: a fill through the flat view (scatter_ on a
    [c, n] bfloat16 or int16 tensor is ~50x slower here)."""
    flat = (torch.arange(scores.shape[0])[:, None] * scores.shape[1] + idx).flatten()
    scores.view(-1).index_fill_(0, flat, value)


def _exact_scores(r: torch.Tensor, a32: torch.Tensor, rows: torch.Tensor, atoms: torch.Tensor, nonneg: bool):
    """Float32 scores |a·r| (``nonneg``: a·r) of the (row, atom) pairs ``rows``, ``atoms`` [p]."""
    out = (a32.index_select(0, atoms) * r.index_select(0, rows)).sum(1)
    return out if nonneg else out.abs_()


def _screen_keys(r: torch.Tensor, atoms: OmpAtoms, idx: torch.Tensor, nonneg: bool, out: torch.Tensor | None = None):
    """The screen's scores as sortable int16 keys: (keys [c, n'], their maxima per chunk of SCREEN_CHUNK
    atoms [c, n' / SCREEN_CHUNK], the bfloat16 residuals [c, d_h]).

    One bfloat16 product ``bf16(r) @ screen.T``; its bits are then read as int16, where a non-negative
    bfloat16 orders exactly as its bit pattern. |s| is the pattern with the sign bit cleared (``nonneg``:
    negative scores become +0, which only ever adds candidates); padding rows and the atoms already picked
    get -1, below every score. Integer reductions are several times faster than bfloat16 ones on CPUs.
    ``out``: a bfloat16 buffer of at least [c, n'] for the product (a fresh 10 MB tensor every step costs
    page faults).
    """
    c, n = r.shape[0], atoms.a32.shape[0]
    low_r = r.to(torch.bfloat16)
    keys = torch.mm(low_r, atoms.screen_t, out=None if out is None else out[:c]).view(torch.int16)  # [c, n']
    if nonneg:
        keys.clamp_min_(0)
    else:
        keys.bitwise_and_(0x7FFF)
    keys[:, n:] = -1  # padding rows
    _exclude(keys, atoms.position[idx], -1)  # the atoms already picked
    return keys, keys.view(c, -1, SCREEN_CHUNK).amax(2), low_r


def _screen_threshold(r: torch.Tensor, low_r: torch.Tensor, atoms: OmpAtoms, lower: torch.Tensor) -> torch.Tensor:
    """int16 keys [c, n' / SCREEN_CHUNK]: per row and chunk, the smallest screened key an atom of that chunk
    can have and still reach the true score ``lower`` [c] (see :func:`_screened_best`); rounded down."""
    acc = r.shape[1] * 2.0 ** -23  # float32 accumulation over d_h products (generous)
    rho = (r - low_r.float()).norm(dim=1) + acc * low_r.float().norm(dim=1)
    err = r.norm(dim=1)[:, None] * atoms.chunk_delta + rho[:, None] * atoms.chunk_norm  # [c, n' / chunk]
    need = lower[:, None] - err
    u2 = 2 * _BF16_U
    thr = torch.where(need >= 0, need / (1 + u2), need / (1 - u2))
    thr = (thr - thr.abs() * 2.0 ** -7).clamp_min(0).to(torch.bfloat16)  # rounded down: bf16 drops nothing
    return thr.view(torch.int16)


def _screened_best(r: torch.Tensor, atoms: OmpAtoms, idx: torch.Tensor, nonneg: bool,
                   out: torch.Tensor | None = None):
    """:func:`_exact_best` through a bfloat16 screen: the same atoms (up to exact float ties), less work.

    The screen scores every atom in bfloat16 (one [c, d_h] x [d_h, n] product, several times faster than
    float32 on CPUs with bfloat16 dot products; :func:`_screen_keys`). Each row's screened best atom is
    scored exactly (L, a true score); an atom j can only beat it if its screened score s_j obeys
    ``s_j·(1 + 2u) + e_j >= L``, where ``e_j = |r|·|a_j - bf16(a_j)| + |bf16(a_j)|·(|r - bf16(r)| + float32
    accumulation)`` bounds the error of the screened product rigorously (Cauchy-Schwarz; u = bfloat16
    roundoff of the output). The bound is taken per chunk of SCREEN_CHUNK atoms sorted by norm (so it stays
    close to each atom's); chunks whose maximum passes are searched, and every passing atom is scored
    exactly. Rows with too many candidate chunks (residual ~0, many near-ties) take the exact product instead.
    """
    c, n = r.shape[0], atoms.a32.shape[0]
    keys, chunk_max, low_r = _screen_keys(r, atoms, idx, nonneg, out)
    n_chunks = chunk_max.shape[1]
    top_chunk = chunk_max.argmax(1)
    flat = keys.view(-1, SCREEN_CHUNK)
    top = top_chunk * SCREEN_CHUNK + flat.index_select(0, torch.arange(c) * n_chunks + top_chunk).argmax(1)
    everyone = torch.arange(c)
    lower = (atoms.a32.index_select(0, atoms.order[top]) * r).sum(1)  # [c] a true score
    if not nonneg:
        lower.abs_()
    thr = _screen_threshold(r, low_r, atoms, lower)
    hot = chunk_max >= thr
    wide = hot.sum(1) > SCREEN_MAX_CHUNKS
    rows, cols = torch.nonzero(hot & ~wide[:, None], as_tuple=True)
    pair = rows * n_chunks + cols
    sub, col = torch.nonzero(flat.index_select(0, pair) >= thr.view(-1).index_select(0, pair)[:, None],
                             as_tuple=True)
    cand_row = torch.cat([everyone, rows.index_select(0, sub)])
    cand_atom = torch.cat([atoms.order[top], atoms.order[cols.index_select(0, sub) * SCREEN_CHUNK + col]])
    exact = torch.cat([lower, _exact_scores(r, atoms.a32, cand_row[c:], cand_atom[c:], nonneg)])
    best = torch.full((c,), -math.inf).scatter_reduce(0, cand_row, exact, "amax")
    hit = exact == best[cand_row]  # the lowest atom id among exact ties, as torch.max would
    atom = torch.full((c,), n, dtype=torch.long).scatter_reduce(0, cand_row[hit], cand_atom[hit], "amin")
    if bool(wide.any()):
        w = torch.nonzero(wide).flatten()
        best[w], atom[w] = _exact_best(r[w], atoms.a32, idx[w], nonneg)
    return best, atom


def _best_atoms(r: torch.Tensor, atoms: OmpAtoms, idx: torch.Tensor, nonneg: bool,
                out: torch.Tensor | None = None):
    """(score [c], atom [c]) maximising |a·r| (``nonneg``: a·r) over the atoms not in ``idx`` [c, i]
    (``out``: the screen's buffer, see :func:`_screen_keys`)."""
    if atoms.screen is None:
        return _exact_best(r, atoms.a32, idx, nonneg)
    return _screened_best(r, atoms, idx, nonneg, out)


def _gram_entries(prepared: OmpAtoms, j: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[m, i] inner products of the atoms ``j`` [m] with the picked atoms ``idx`` [m, i]: looked up in the
    precomputed Gram matrix (through its flat view), else computed."""
    if prepared.gram is not None:
        n = prepared.gram.shape[0]
        return prepared.gram.view(-1).index_select(0, (j[:, None] * n + idx).flatten()).view(idx.shape)
    a32 = prepared.a32
    return torch.bmm(a32[idx], a32.index_select(0, j)[:, :, None])[..., 0]


def _weighted_atoms(idx: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ_l weights[m, l] · rows[idx[m, l]] -> [m, d]: an embedding bag, reading the (cache-resident) rows
    in place instead of gathering a [m, l, d] copy."""
    if idx.shape[1] == 0:
        return rows.new_zeros(idx.shape[0], rows.shape[1])
    return torch.nn.functional.embedding_bag(idx, rows, per_sample_weights=weights.to(rows.dtype), mode="sum")


def omp_select(
    atoms: torch.Tensor | OmpAtoms, targets: torch.Tensor, k: int = 64, ridge: float = 0.0, nonneg: bool = False,
    tol: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit of every row of ``targets`` [c, d_h] over the rows of ``atoms`` [n, d_h]
    (a tensor, or :func:`prepare_atoms` of one when several blocks of targets share the atoms).

    For each target, greedily up to ``k`` times: pick the atom most correlated with the current residual
    (largest ``|a·r|``; with ``nonneg`` the largest positive ``a·r``), then refit the coefficients of all
    picked atoms by least squares, ``min_x |y - Σ x_j a_j|² + ridge·|x|²``. The refit is incremental: the
    Cholesky factor L of the picked atoms' Gram matrix (+ ridge) gains one row per step (a triangular solve
    of the support's size; its new Gram entries are looked up when the Gram matrix is precomputed), ``z =
    L⁻¹ A_I y`` gains one entry, and the residual moves along one new direction, ``r -= z_i·q`` with ``q =
    (a - A_I v) / d``, ``v = L⁻ᵀ w`` (QR-style: the rounding of an update scales with the residual, not
    with y). ``A_I v`` is an embedding bag over the atoms (read in place, no [c, k, d_h] copies of picked
    atoms or directions), so no step solves afresh. (An explicit L⁻¹ instead of the triangular solves was
    tried: faster products, but it loses accuracy on badly scaled atoms.) The atom search is exact; with
    many atoms it goes through a bfloat16 screen (:func:`_screened_best`). All c targets advance together as float32 batched tensors,
    only the targets still running take part in a step; the coefficients on the final support are then
    solved once in float64 (:func:`_solve_support`). A target stops early when its residual is ~0
    (``|r|² <= tol·|y|²``), when no atom correlates with it, or when the next atom lies (numerically) in the
    span of the picked ones; unused slots get index 0 and weight 0. With ``nonneg`` the coefficients are
    refit on the support under ``x >= 0`` (:func:`_nnls_support`).

    Returns ``(idx [c, k'], coef [c, k'] float64)`` with ``k' = min(k, n)``.
    """
    prepared = atoms if isinstance(atoms, OmpAtoms) else prepare_atoms(atoms)
    a32, sq = prepared.a32, prepared.sq
    n, c = a32.shape[0], targets.shape[0]
    k = max(1, min(int(k), n))
    idx_out = torch.zeros(c, k, dtype=torch.long)
    size_out = torch.zeros(c, dtype=torch.long)  # atoms picked per target
    # Working state of the targets still running (row ``rows[m]`` of the block); rows that stop are written
    # to the outputs and dropped, so later steps neither compute nor copy them.
    rows = torch.arange(c)
    y = targets.float()  # [m, d_h]
    tiny = tol * (y * y).sum(1)
    idx = torch.zeros(c, k, dtype=torch.long)
    chol = torch.eye(k).repeat(c, 1, 1)  # lower Cholesky factor L of G_I + ridge·I (identity in unused slots)
    z = torch.zeros(c, k)  # L z = A_I y
    r = y.clone()  # [m, d_h] residual y - A_I x, x = L⁻ᵀ z
    screen_out = None if prepared.screen is None else torch.empty(c, prepared.screen.shape[0], dtype=torch.bfloat16)
    step = torch.ones(c, k)  # [-L⁻ᵀ w, 1]: the weights of the new residual direction over the picked atoms
    for i in range(k):
        best, j = _best_atoms(r, prepared, idx[:, :i], nonneg, screen_out)
        g = _gram_entries(prepared, j, idx[:, :i])
        # one copy of the factor's slice: both triangular solves then take it as it is (transposed flags)
        lc = chol[:, :i, :i].contiguous()
        w = torch.linalg.solve_triangular(lc, g[..., None], upper=False)[..., 0]  # L⁻¹ g
        d2 = sq[j] + ridge - (w * w).sum(1)
        go = (best > 0) & (d2 > 1e-6 * (sq[j] + ridge)) & ((r * r).sum(1) > tiny)
        if not bool(go.all()):
            stop = ~go
            idx_out[rows[stop]], size_out[rows[stop]] = idx[stop], i
            rows, y, tiny, idx, chol, lc, z, r, step, j, w, d2 = (
                t[go] for t in (rows, y, tiny, idx, chol, lc, z, r, step, j, w, d2))
            if len(rows) == 0:
                break
        d = d2.sqrt()
        v = torch.linalg.solve_triangular(lc.mT, w[..., None], upper=True)[..., 0]  # L⁻ᵀ w
        chol[:, i, :i] = w
        chol[:, i, i] = d
        # L gains the row [wᵀ, d]; z_i = (a·y - w·z) / d
        zi = ((a32.index_select(0, j) * y).sum(1) - (w * z[:, :i]).sum(1)) / d
        z[:, i] = zi
        idx[:, i] = j
        # x = L⁻ᵀ z moves by z_i / d · [-v, 1], so r moves by z_i along q = (a - A_I v) / d (QR-style: the
        # rounding of each update scales with the residual, not with y)
        step[:, :i] = -v
        r -= (zi / d)[:, None] * _weighted_atoms(idx[:, : i + 1], step[:, : i + 1], a32)
    idx_out[rows], size_out[rows] = idx, k  # the targets that ran every step
    coef = _solve_support(a32, idx_out, size_out, targets, ridge)
    if nonneg:
        coef = _nnls_support(_support_atoms(a32, idx_out, size_out).double(), targets.double(), coef, ridge)
    return idx_out, coef


def _support_atoms(a32: torch.Tensor, idx: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """[c, k, d_h] the atoms ``idx`` [c, k] picked for each target, zero rows in the unused slots (from
    ``size`` [c] on)."""
    used = torch.arange(idx.shape[1]) < size[:, None]
    return a32.index_select(0, idx.flatten()).view(*idx.shape, -1) * used[..., None]


def _solve_support(a32: torch.Tensor, idx: torch.Tensor, size: torch.Tensor, targets: torch.Tensor,
                   ridge: float, rows: int = 64) -> torch.Tensor:
    """x [c, k] float64 = argmin |y - Σ_l x_l a_idx[l]|² + ridge·|x|² over each target's support (``idx``
    [c, k] of the atoms ``a32``, the first ``size`` [c] slots used; unused slots get x = 0) for ``targets`` y
    [c, d_h]: batched solves of the k x k normal equations in float64, ``rows`` targets at a time (so the
    float64 copies of their atoms stay in cache)."""
    k = idx.shape[1]
    eye = torch.eye(k, dtype=torch.float64)
    out = torch.empty(idx.shape, dtype=torch.float64)
    for s in range(0, idx.shape[0], rows):
        sl = slice(s, s + rows)
        p = _support_atoms(a32, idx[sl], size[sl]).double()
        unused = (torch.arange(k) >= size[sl, None]).double()
        gram = p @ p.transpose(1, 2) + ridge * eye + torch.diag_embed(unused)  # unused slots: 1 on the diagonal
        out[sl] = torch.linalg.solve(gram, torch.bmm(p, targets[sl].double()[:, :, None])[..., 0])
    return out


def _nnls_support(picked: torch.Tensor, y: torch.Tensor, start: torch.Tensor, ridge: float,
                  iters: int = 300) -> torch.Tensor:
    """Non-negative least squares on a fixed support, batched: ``min_{x>=0} |y - x @ picked|² + ridge·|x|²``.

    ``picked`` [c, k, d_h] atoms (zero rows = unused slots), ``y`` [c, d_h], ``start`` [c, k] the
    unconstrained solution (clamped at 0 as the warm start). Accelerated projected gradient (FISTA) with the
    exact step 1/λ_max of each target's Gram matrix; unused slots stay 0. Returns x [c, k] float64.
    """
    gram = picked @ picked.transpose(1, 2) + ridge * torch.eye(picked.shape[1], dtype=picked.dtype)  # [c, k, k]
    lin = torch.einsum("ckd,cd->ck", picked, y)  # [c, k]
    used = (picked.abs().sum(2) > 0).double()  # [c, k]
    step = 1.0 / torch.linalg.eigvalsh(gram)[:, -1:].clamp_min(1e-300)  # [c, 1]
    x = start.clamp_min(0) * used
    z, t = x.clone(), 1.0
    for _ in range(iters):
        grad = (gram @ z[..., None])[..., 0] - lin
        x_new = (z - step * grad).clamp_min(0) * used
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x


@register("omp", "orthogonal matching pursuit (the method of mergekit-tokensurgeon): each new token's helper "
          "vector is fitted by least squares on at most k greedily picked shared tokens' helper vectors, and the "
          "same coefficients mix their source rows; options: non-negative coefficients, ridge, normalised "
          "atoms, output calibration as clp's", needs_helper=True,
          k=64, nonneg=False, ridge=0.0, normalize=False, calibrate=0.0, calibrate_shared=True)
def omp(problem: EmbeddingProblem, generator: torch.Generator | None = None, k: int = 64, nonneg: bool = False,
        ridge: float = 0.0, normalize: bool = False) -> NewRows:
    """new row [d] = Σ_j x_j · E_s[j] over at most ``k`` shared tokens j, x from :func:`omp_select` in the
    helper space (helper row of the new token ≈ Σ_j x_j · helper row of j); an untied head gets the same x
    applied to its own rows.

    ``nonneg`` restricts x to >= 0; ``ridge`` adds ``ridge · mean |helper row|²`` · |x|² to the fit (scale-free);
    ``normalize`` fits unit-length helper rows (atoms and targets, the cosine geometry of ``clp``) instead of
    the raw ones. ``calibrate`` / ``calibrate_shared`` are applied afterwards as for ``clp``; the default
    (0) is the plain method, as mergekit runs it.
    """
    if k < 1:
        raise ClpError(f"omp needs k >= 1, got {k}")
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ClpError(f"omp needs a finite ridge >= 0, got {ridge}")
    shared, missing = problem.shared, problem.missing
    h = problem.helper_input.float()
    if normalize:
        h = torch.nn.functional.normalize(h, dim=-1)
    atoms = h[shared]  # [|S|, d_h]
    lam = ridge * float((atoms * atoms).sum(1).mean())
    src = problem.source_id[shared]
    e_rows = problem.source_input[src].float()  # [|S|, d]
    o_rows = problem.source_output[src].float() if problem.source_output is not None else None
    d = e_rows.shape[1]
    new_in = torch.empty(len(missing), d)
    new_out = torch.empty(len(missing), d) if o_rows is not None else None
    support, l1, residual, neg = [], [], [], 0
    prepared = prepare_atoms(atoms)  # once for every block: the bfloat16 screen's copy, the Gram matrix
    atoms64 = atoms.double()
    for start in range(0, len(missing), OMP_BLOCK):
        sl = slice(start, start + OMP_BLOCK)
        y = h[missing[sl]]  # [c, d_h]
        idx, x = omp_select(prepared, y, k, ridge=lam, nonneg=nonneg)
        fit = _weighted_atoms(idx, x, atoms64)
        residual.append((fit - y.double()).norm(dim=1) / y.double().norm(dim=1).clamp_min(1e-30))
        w = x.float()
        new_in[sl] = _weighted_atoms(idx, w, e_rows)
        if new_out is not None:
            new_out[sl] = _weighted_atoms(idx, w, o_rows)
        support.append((w != 0).sum(1).float())
        l1.append(w.abs().sum(1))
        neg += int((w < 0).sum())
    info: dict[str, Any] = {}
    if support:
        info = {"mean_support": float(torch.cat(support).mean()), "mean_abs_weight_sum": float(torch.cat(l1).mean()),
                "negative_weights": neg, "mean_relative_residual": float(torch.cat(residual).mean())}
    return NewRows(new_in, new_out, info)


@register("auto", "the default: measures instead of assuming - builds candidate rows (clp's similarity rows, the "
          "source's own pieces (FVT) and mixes of both, omp; each uncalibrated and calibrated) and keeps the one "
          "with the lowest bits per byte on held-out documents of the target text (clp_transfer.transfer.auto); "
          "without text, half FVT half clp, uncalibrated", needs_helper=True, needs_pieces=True,
          pieces_weights="0,0.5,1", calibrate_strengths="0,1", omp_k=8, screen_tokens=512, check_tokens=2048,
          fit_positions=1024, margin=0.05, finalists=2)
def auto_fallback(problem: EmbeddingProblem, generator: torch.Generator | None = None, **_: Any) -> NewRows:
    """Called directly (no target text to measure on): the fallback rows, half FVT half similarity rows
    (:data:`clp_transfer.transfer.auto.FALLBACK`); :func:`clp_transfer.transfer.embeddings.solve` runs the
    measured choice instead when it has target text."""
    return clp(problem, generator, pieces_weight=0.5)


# --------------------------------------------------------------------------------------------- calibration

CALIBRATION_PARAMS = ("calibrate", "calibrate_shared")
"""Method parameters that :func:`compute_target_embeddings` applies after assembling the rows."""


def mean_predicted_probability(head: torch.Tensor, hidden: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """p̄ [R]: the softmax over logits ``hidden @ head.T`` ([N, R]) averaged over the N positions."""
    head = head.float()
    total = torch.zeros(head.shape[0], dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        total += torch.softmax(hidden[start:start + chunk].float() @ head.T, dim=-1).sum(0)
    return total / hidden.shape[0]


def bias_direction(hidden: torch.Tensor) -> torch.Tensor:
    """u [d] = h̄ / |h̄|² with h̄ the mean of ``hidden`` [N, d]: adding ``b · u`` to an output row raises that
    token's logit by ``b`` on average over the positions - an emulated per-token bias for heads without one."""
    mean = hidden.float().mean(0)
    sq = float(mean @ mean)
    if sq <= 1e-12:
        raise ClpError("the calibration hidden states average to zero: no direction to emulate a bias with")
    return mean / sq


def calibrate_frequencies(
    head: torch.Tensor,
    hidden: torch.Tensor,
    counts: torch.Tensor,
    rows: torch.Tensor,
    strength: float = 1.0,
    smoothing: float = 0.5,
    max_shift: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift output rows so the model's mean predicted probability of each token approaches its frequency.

    ``head`` [R, d] output rows (R >= V_t; rows past V_t, e.g. padding, take part in the softmax but are never
    shifted); ``hidden`` [N, d] final hidden states at positions of target text; ``counts`` [V_t] token
    counts in target text; ``rows`` [k] the target ids to shift. With f = (counts + smoothing) normalised and
    p̄ = :func:`mean_predicted_probability`, token t gets the logit shift
    ``b_t = strength · clamp(log f_t - log p̄_t, ±max_shift)``, applied as ``row_t += b_t · u``
    (:func:`bias_direction`). With identical hidden states and ``strength=1`` the mean predicted
    distribution equals f exactly; in general this is one damped step towards the maximum-likelihood biases.
    Returns the new head [R, d] (float32) and the shifts b [V_t] (zero outside ``rows``).
    """
    v_t = counts.shape[0]
    f = counts.float().clamp_min(0) + smoothing
    f = f / f.sum()
    p_bar = mean_predicted_probability(head, hidden)[:v_t].clamp_min(1e-30)
    shift = torch.zeros(v_t)
    shift[rows] = (strength * (f.log() - p_bar.log()).clamp(-max_shift, max_shift))[rows]
    out = head.float().clone()
    out[:v_t] += shift[:, None] * bias_direction(hidden)[None, :]
    return out, shift


# --------------------------------------------------------------------------------------------- driver


def method_params(name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's defaults overridden by ``params``; unknown parameter names are an error."""
    spec = METHODS.get(name)
    merged = dict(spec.defaults)
    for k, v in (params or {}).items():
        if k not in spec.defaults:
            known = ", ".join(spec.defaults) or "none"
            raise ClpError(f"method {name!r} has no parameter {k!r} (known: {known})")
        merged[k] = _coerce(v, spec.defaults[k], k)
    for k, v in merged.items():
        check_param(name, k, v)
    return merged


@dataclass(frozen=True)
class ParamRange:
    """Allowed numbers of a method parameter: ``low`` (< or <=) value (<=) ``high``; ``None`` = unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def describe(self) -> str:
        if self.low is not None and self.high is not None and not self.low_open:
            return f"lie in [{self.low:g}, {self.high:g}]"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return "be " + " and ".join(parts)

    def holds(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or v <= self.high


# What every method's parameter of that name accepts (checked before any work). Numbers must also be finite.
PARAM_RULES: dict[str, ParamRange | tuple[str, ...]] = {
    "temperature": ParamRange(0, low_open=True),
    "top_k": ParamRange(1),
    "k": ParamRange(1),
    "pieces_weight": ParamRange(0, 1),
    "alpha": ParamRange(0, 1),
    "calibrate": ParamRange(0),
    "ridge": ParamRange(0),
    "std": ParamRange(0, low_open=True),
    "omp_k": ParamRange(0),
    "screen_tokens": ParamRange(1),
    "check_tokens": ParamRange(1),
    "fit_positions": ParamRange(1),
    "margin": ParamRange(0),
    "finalists": ParamRange(1),
    "weighting": ("topk_softmax", "topk_uniform", "sparsemax"),
    "init": ("small_init", "xavier_normal", "normal"),
}


NUMBER_LISTS: dict[str, ParamRange] = {"pieces_weights": ParamRange(0, 1), "calibrate_strengths": ParamRange(0)}
"""Parameters that are comma-separated lists of numbers (``auto``'s candidate grid), and each number's range."""


def parse_number_list(method: str, name: str, value: Any) -> list[float]:
    """A :data:`NUMBER_LISTS` parameter (``"0,0.5,1"``) as numbers, each checked against its range."""
    rule = NUMBER_LISTS[name]
    try:
        numbers = [float(v) for v in str(value).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ClpError(f"method {method!r}: {name} takes comma-separated numbers, e.g. 0,0.5,1; not {value!r}") from None
    if not numbers:
        raise ClpError(f"method {method!r}: {name} needs at least one number")
    for v in numbers:
        if not math.isfinite(v) or not rule.holds(v):
            raise ClpError(f"method {method!r}: each of {name} must {rule.describe()}, not {v:g}")
    return numbers


def check_param(method: str, name: str, value: Any) -> None:
    """Raise :class:`ClpError` for a parameter value that is not finite or outside :data:`PARAM_RULES`."""
    rule = PARAM_RULES.get(name)
    if name in NUMBER_LISTS:
        parse_number_list(method, name, value)
        return
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ClpError(f"method {method!r}: {name} must be a finite number, not {value}")
        if isinstance(rule, ParamRange) and not rule.holds(value):
            raise ClpError(f"method {method!r}: {name} must {rule.describe()}, not {value:g}")
    elif isinstance(rule, tuple) and value not in rule:
        raise ClpError(f"method {method!r}: {name} must be one of {', '.join(rule)}, not {value!r}")


def _coerce(value: Any, default: Any, name: str) -> Any:
    """Cast a user value (possibly a command-line string) to the type of the parameter's default."""
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ClpError(f"parameter {name!r} takes true or false, not {value!r}")
        return bool(value)
    if default is None:
        return value
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise ClpError(f"parameter {name!r} takes a {type(default).__name__}, not {value!r}") from None


def compute_target_embeddings(
    problem: EmbeddingProblem, method: str = "clp", params: dict[str, Any] | None = None, seed: int = 0
) -> EmbeddingSolution:
    """Target input (and untied output) embeddings: shared rows copied, missing rows from ``method``.

    Row ``i`` of each returned matrix belongs to target token ``i``; rows past the vocabulary (padding)
    get the mean of the source's padding rows, or zeros. The result has the source's dtype.

    Methods with a ``calibrate`` parameter > 0 then shift the output rows (the tied matrix, or the untied
    head) with :func:`calibrate_frequencies` - all target tokens, or only the new ones when
    ``calibrate_shared`` is false - provided ``problem.calibration_hidden`` and ``problem.token_counts`` are
    set; without them the calibration is skipped and the stats say so.
    """
    spec = METHODS.get(method)
    all_params = method_params(method, params)
    kwargs = {k: v for k, v in all_params.items() if k not in CALIBRATION_PARAMS}
    strength = float(all_params.get("calibrate", 0.0))
    if strength < 0:
        raise ClpError("calibrate must be >= 0 (0 switches the calibration off)")
    if spec.needs_helper and problem.helper_input is None:
        raise ClpError(f"method {method!r} needs the helper model's embeddings")
    if spec.needs_pieces and problem.pieces is None:
        raise ClpError(f"method {method!r} needs the decomposition of target tokens into source pieces")
    shared, missing = problem.shared, problem.missing
    if len(shared) == 0:
        raise ClpError(
            "the source and target vocabularies share no token, so nothing anchors the new embeddings; "
            "check that the helper is a model of a related script and tokenizer family"
        )
    d = problem.source_input.shape[1]
    # A private generator: the global RNG state neither influences nor is influenced by the transfer.
    gen = torch.Generator().manual_seed(seed)
    rows = spec.fn(problem, generator=gen, **kwargs) if len(missing) else NewRows(torch.empty(0, d))
    solution = assemble_solution(problem, method, all_params, rows)
    if strength > 0:
        return calibrate_solution(problem, solution)
    if solution.output is not None and len(missing):
        solution.stats.update(_norm_stats(problem, solution.input, solution.output))
    return solution


def assemble_solution(problem: EmbeddingProblem, method: str, all_params: dict[str, Any], rows: NewRows) -> EmbeddingSolution:
    """The full matrices from a method's new rows: shared rows copied from the source, the new ones from
    ``rows``, padding rows the mean of the source's padding rows (or zeros); uncalibrated, in the source dtype."""
    shared, missing = problem.shared, problem.missing
    dtype, d = problem.source_input.dtype, problem.source_input.shape[1]
    v_t = problem.source_id.shape[0]

    def assemble(source: torch.Tensor, new: torch.Tensor | None) -> torch.Tensor:
        out = torch.zeros(problem.target_rows, d, dtype=torch.float32)
        out[shared] = source[problem.source_id[shared]].float()
        if len(missing):
            out[missing] = new
        if problem.target_rows > v_t and problem.source_padding_ids:
            out[v_t:] = source[problem.source_padding_ids].float().mean(0)
        return out.to(dtype)

    target_in = assemble(problem.source_input, rows.input)
    target_out = assemble(problem.source_output, rows.output) if problem.source_output is not None else None
    _check_finite(method, target_in, target_out)
    stats = {
        "method": method,
        "params": all_params,
        "target_vocab_size": v_t,
        "target_rows": problem.target_rows,
        "shared": len(shared),
        "missing": len(missing),
        **_norm_stats(problem, target_in, None),
        **rows.info,
    }
    return EmbeddingSolution(target_in, target_out, stats)


def _check_finite(method: str, target_in: torch.Tensor, target_out: torch.Tensor | None) -> None:
    if not torch.isfinite(target_in).all() or (target_out is not None and not torch.isfinite(target_out).all()):
        raise NonFiniteEmbeddingsError(f"method {method!r} produced non-finite embeddings")


def _norm_stats(problem: EmbeddingProblem, target_in: torch.Tensor,
                target_out: torch.Tensor | None) -> dict[str, Any]:
    """Mean row norms of shared and new rows (input side; the untied head's ratio when ``target_out``)."""
    shared, missing = problem.shared, problem.missing

    def norm(x: torch.Tensor) -> float:
        return float(x.float().norm(dim=-1).mean()) if len(x) else float("nan")

    if target_out is not None:
        return {"norm_ratio_new_to_shared_output": norm(target_out[missing]) / norm(target_out[shared])}
    shared_norm = norm(target_in[shared])
    return {"mean_norm_shared_rows": shared_norm, "mean_norm_new_rows": norm(target_in[missing]),
            "norm_ratio_new_to_shared": norm(target_in[missing]) / shared_norm if len(missing) else None}


def calibrate_solution(problem: EmbeddingProblem, solution: EmbeddingSolution) -> EmbeddingSolution:
    """The output calibration as a step after the rows: shift the output side of ``solution`` (the untied
    head, or the tied matrix) with :func:`calibrate_frequencies`, using ``problem.calibration_hidden`` and
    ``problem.token_counts`` and the ``calibrate`` / ``calibrate_shared`` parameters in ``solution.stats``.

    All target tokens move, or only the new ones when ``calibrate_shared`` is false. Without calibration
    data (or with ``calibrate=0``) the rows stay and ``stats["calibration"]`` says why. The method's rows
    are not recomputed, so this costs one softmax pass over the hidden states.
    """
    params = solution.stats.get("params", {})
    strength = float(params.get("calibrate", 0.0))
    method = solution.stats.get("method", "?")
    v_t, missing = problem.source_id.shape[0], problem.missing
    target_in, target_out = solution.input, solution.output
    calibration: dict[str, Any] = {"applied": False}
    if strength > 0 and len(missing):
        if problem.calibration_hidden is None:
            calibration["skipped"] = "no calibration text (token counts and hidden states) was given"
        else:
            dtype = target_in.dtype
            # The output side: the untied head, or the tied matrix (then the input rows move with it).
            rows_to_shift = torch.arange(v_t) if params.get("calibrate_shared", True) else missing
            head, shift = calibrate_frequencies(target_out if target_out is not None else target_in,
                                                problem.calibration_hidden, problem.token_counts,
                                                rows_to_shift, strength)
            if target_out is not None:
                target_out = head.to(dtype)
            else:
                target_in = head.to(dtype)
            moved = shift[rows_to_shift]
            calibration = {"applied": True, "positions": int(problem.calibration_hidden.shape[0]),
                           "counted_tokens": int(problem.token_counts.sum()), "rows_shifted": len(rows_to_shift),
                           "mean_abs_shift": float(moved.abs().mean()), "mean_shift_new": float(shift[missing].mean())}
    _check_finite(method, target_in, target_out)
    stats = {**solution.stats, **_norm_stats(problem, target_in, None)}
    if strength > 0:
        stats["calibration"] = calibration
    if target_out is not None and len(missing):
        stats.update(_norm_stats(problem, target_in, target_out))
    return EmbeddingSolution(target_in, target_out, stats)
