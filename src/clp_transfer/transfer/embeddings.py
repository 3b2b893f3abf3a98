"""The transfer in memory: embedding matrices and two vocabularies in, new matrices and a typed report out.

No file I/O and no model is loaded: this is what :func:`clp_transfer.transfer.pipeline` runs between reading the
checkpoints and writing the target model, and what a notebook calls with matrices it already holds::

    from clp_transfer import transfer_embeddings

    result = transfer_embeddings(source_input, helper_input, source_tokenizer, helper_tokenizer)
    result.input            # [V_t (padded), d] target input embeddings, row i = target token i
    result.report.matching  # how many target tokens reuse a source row, how many are new

Three steps, each usable on its own: :func:`match_tokens` (vocabulary matching), :func:`build_problem`
(the :class:`~clp_transfer.transfer.methods.EmbeddingProblem` of a method) and :func:`solve` (the method's rows, then
the optional output calibration as a separate step on those rows).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

import torch

from ..errors import ClpError
from .methods import (METHODS, EmbeddingProblem, EmbeddingSolution, calibrate_solution, compute_target_embeddings,
                      method_params)
from .tokens import TokenMatch, VocabInfo, decompose, detect_style, match_vocabularies

log = logging.getLogger(__name__)

VocabLike = Union[VocabInfo, Mapping[str, int], Any]
"""A Hugging Face tokenizer, a ``{token: id}`` dict, or a :class:`~clp_transfer.transfer.tokens.VocabInfo`."""


@dataclass
class CalibrationStats:
    """What the output calibration needs, measured on target-language text."""

    hidden: torch.Tensor
    """[N, d] final (normalised) hidden states of the target model (source body, uncalibrated target input
    rows) at N positions of target text."""
    counts: torch.Tensor
    """[V_t] how often each target token occurs in target text."""


Calibration = Union[CalibrationStats, Callable[[torch.Tensor], Any]]
"""Calibration statistics, or a function of the uncalibrated input rows [R, d] that returns them (as
:class:`CalibrationStats` or a ``(hidden, counts)`` pair): the hidden states depend on those rows. Method
``auto`` needs a :class:`~clp_transfer.transfer.calibration.TargetText` (which is such a function and also
scores candidates on held-out documents)."""


@dataclass
class TransferProblem:
    """A method's problem together with what the report and the checkpoint writer need to know."""

    problem: EmbeddingProblem
    """The tensors the method sees (no calibration data yet)."""
    method: str
    """Registered method name."""
    params: dict[str, Any]
    """The method's parameters: its defaults overridden by the user's, checked once."""
    match: TokenMatch
    """Target id -> source id (or -1) and the rule that matched it."""
    source_vocab: VocabInfo
    """The source vocabulary."""
    target_vocab: VocabInfo
    """The target vocabulary (the helper's tokenizer)."""
    padded_to_multiple_of: int | None
    """The multiple the target rows were padded to, if any."""


@dataclass
class EmbeddingReport:
    """What :func:`transfer_embeddings` did, as typed fields (``to_dict`` gives plain JSON values)."""

    method: str
    """Method name."""
    params: dict[str, Any]
    """The parameters the method ran with (defaults included)."""
    seed: int
    """Seed of the method's private random generator."""
    canonical_matching: bool
    """Whether tokens were matched by canonical bytes across tokenizer families."""
    matching: dict[str, int]
    """Counts of target tokens by match rule (``shared``, ``missing``, ``exact``, ``canonical``, ...)."""
    new_token_ids: list[int]
    """Target ids that got new rows (no source row)."""
    new_rows: dict[str, Any]
    """The method's statistics of the new rows (norms, calibration, method-specific entries)."""
    source_vocab_size: int
    """Tokens of the source vocabulary."""
    source_rows: int
    """Rows of the source embedding matrix."""
    target_vocab_size: int
    """Tokens of the target vocabulary."""
    target_rows: int
    """Rows of the new matrices (vocabulary, reserved rows and padding)."""
    padded_to_multiple_of: int | None
    """The multiple the rows were padded to, if any."""
    helper_rows: int | None
    """Rows of the helper embeddings the method used (None when it needs no helper)."""
    source_tokenizer_style: str
    """Tokenizer family of the source."""
    target_tokenizer_style: str
    """Tokenizer family of the target."""
    tokens_without_pieces: int | None = None
    """New tokens the source vocabulary cannot spell (only when the method used piece decompositions)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per step (``match_s``, ``compute_s``, ``calibration_s``)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TransferredEmbeddings:
    """The result of :func:`transfer_embeddings`."""

    input: torch.Tensor
    """[target_rows, d] target input embeddings in the source dtype; row i belongs to target token i."""
    output: torch.Tensor | None
    """[target_rows, d] target output embeddings (untied heads only)."""
    report: EmbeddingReport
    """What was done."""
    problem: TransferProblem
    """The problem that was solved (vocabularies, match, the method's tensors)."""


def vocab_info(vocab: VocabLike) -> VocabInfo:
    """A :class:`VocabInfo` from a tokenizer, a ``{token: id}`` dict or a VocabInfo."""
    if isinstance(vocab, VocabInfo):
        return vocab
    if isinstance(vocab, Mapping):
        tokens: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
        for tok, i in vocab.items():
            tokens[int(i)] = tok
        return VocabInfo(tokens, detect_style((t for t in tokens if t), None))
    return VocabInfo.from_tokenizer(vocab)


def padded_rows(vocab_len: int, source_rows: int, source_vocab_len: int, multiple: int | None) -> tuple[int, int | None]:
    """Rows of the target matrices: the vocabulary, padded like the source was (64/128) or as asked."""
    if multiple is None and source_rows > source_vocab_len:
        for m in (128, 64):
            if source_rows % m == 0:
                multiple = m
                break
    if multiple:
        return -(-vocab_len // multiple) * multiple, multiple
    return vocab_len, None


def match_tokens(source_vocab: VocabLike, target_vocab: VocabLike, canonical: bool = True) -> TokenMatch:
    """Match every target token to a source token (canonically across tokenizer families, unless
    ``canonical`` is false); refuses vocabularies that share no ordinary token."""
    source, target = vocab_info(source_vocab), vocab_info(target_vocab)
    match = match_vocabularies(target, source, canonical=canonical)
    counts = match.counts()
    if counts["shared"] - counts["special_role"] - counts["special_text"] <= 0:
        raise ClpError(
            f"the helper's tokenizer shares no ordinary token with the source's ({len(target)} vs "
            f"{len(source)} tokens): the transfer has nothing to anchor the new embeddings on"
        )
    return match


def build_problem(source_input: torch.Tensor, helper_input: torch.Tensor | None, source_vocab: VocabLike,
                  target_vocab: VocabLike, *, source_output: torch.Tensor | None = None, method: str = "clp",
                  params: Mapping[str, Any] | None = None, canonical_matching: bool = True,
                  pad_to_multiple_of: int | None = None, match: TokenMatch | None = None,
                  extra_rows: int = 0) -> TransferProblem:
    """Everything ``method`` needs, from the matrices and vocabularies; the arguments are those of
    :func:`transfer_embeddings`. The method's rows are not computed yet (:func:`solve` does)."""
    spec = METHODS.get(method)
    merged = method_params(method, dict(params or {}))
    source, target = vocab_info(source_vocab), vocab_info(target_vocab)
    if match is None:
        match = match_tokens(source, target, canonical_matching)
    rows, multiple = padded_rows(len(target) + extra_rows, source_input.shape[0], len(source), pad_to_multiple_of)
    helper = helper_input[: len(target)] if spec.needs_helper and helper_input is not None else None
    problem = EmbeddingProblem(
        source_input=source_input,
        source_id=torch.tensor(match.source_id, dtype=torch.long),
        target_rows=rows,
        source_output=source_output,
        helper_input=helper,
        pieces=decompose(target, source) if spec.wants_pieces(merged) else None,
        source_padding_ids=list(range(len(source), source_input.shape[0])),
    )
    return TransferProblem(problem, method, merged, match, source, target, multiple)


def solve(task: TransferProblem, seed: int = 0, calibration: Calibration | None = None,
          timings: dict[str, float] | None = None) -> EmbeddingSolution:
    """The method's rows (one solve), then the output calibration as a step on those rows when the method
    asks for it (``calibrate > 0``) and there are new tokens."""
    timings = {} if timings is None else timings
    t = time.perf_counter()
    if task.method == "auto":
        from .auto import choose

        probe = calibration if hasattr(calibration, "bits_per_byte") else None
        if calibration is not None and probe is None:
            log.warning("method auto was given calibration statistics but no way to score candidates (pass a "
                        "TargetText): using the fallback rows")
        solution = choose(task.problem, task.params, probe, seed)
        timings["compute_s"] = time.perf_counter() - t
        return solution
    solution = compute_target_embeddings(task.problem, task.method, task.params, seed=seed)
    timings["compute_s"] = time.perf_counter() - t
    if not (METHODS.get(task.method).wants_calibration(task.params) and task.match.missing_ids):
        return solution
    if calibration is None:
        log.warning("method %r calibrates the output side to target-text token frequencies, but no "
                    "calibration text was given (--calibration_text): calibration skipped (pass target-language "
                    "text, or --params calibrate=0 to silence this)", task.method)
        return solution
    t = time.perf_counter()
    stats = calibration(solution.input) if callable(calibration) else calibration
    hidden, counts = (stats.hidden, stats.counts) if isinstance(stats, CalibrationStats) else stats
    calibrated = dataclasses.replace(task.problem, calibration_hidden=hidden, token_counts=counts)
    solution = calibrate_solution(calibrated, solution)
    timings["calibration_s"] = time.perf_counter() - t
    return solution


def transfer_embeddings(
    source_input: torch.Tensor,
    helper_input: torch.Tensor | None,
    source_tokenizer: VocabLike,
    target_tokenizer: VocabLike,
    *,
    source_output: torch.Tensor | None = None,
    method: str = "clp",
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    canonical_matching: bool = True,
    pad_to_multiple_of: int | None = None,
    calibration: Calibration | None = None,
    match: TokenMatch | None = None,
    extra_rows: int = 0,
) -> TransferredEmbeddings:
    """CLP-Transfer on tensors: new input (and untied output) embeddings for the target vocabulary.

    Args:
        source_input: E_s [V_s, d], the source model's input embeddings.
        helper_input: E_h [V_t, d_h], the helper's input embeddings by target id (``None`` for methods that
            need no helper, e.g. ``fvt`` or ``random``).
        source_tokenizer: the source vocabulary (tokenizer, ``{token: id}`` dict or VocabInfo).
        target_tokenizer: the target vocabulary, i.e. the helper's tokenizer.
        source_output: O_s [V_s, d] for a model with an untied output head, else ``None``.
        method: a registered method (``clp`` by default on tensors; see ``clp-transfer transfer --list-methods``).
            ``auto``, the default of ``clp-transfer transfer``, measures its candidates on target text, so it
            needs ``calibration`` to be a :class:`~clp_transfer.transfer.calibration.TargetText` (source model
            directory + text); without one it uses its fallback rows.
        params: method parameters overriding its defaults, e.g. ``{"top_k": 20}``.
        seed: seed of the method's private random generator (the global RNG is not touched).
        canonical_matching: match tokens by canonical bytes across tokenizer families.
        pad_to_multiple_of: pad the rows to a multiple (default: as the source was padded).
        calibration: statistics for the output calibration of methods with ``calibrate > 0``, or a function
            of the uncalibrated input rows that measures them; without it the calibration is skipped.
        match: a precomputed :func:`match_tokens` result (saves matching twice).
        extra_rows: rows to reserve after the target vocabulary (tokens the caller adds later).

    Returns:
        The matrices (row i = target token i, in the source dtype) and an :class:`EmbeddingReport`.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    task = build_problem(source_input, helper_input, source_tokenizer, target_tokenizer,
                         source_output=source_output, method=method, params=params,
                         canonical_matching=canonical_matching, pad_to_multiple_of=pad_to_multiple_of,
                         match=match, extra_rows=extra_rows)
    timings["match_s"] = time.perf_counter() - t
    solution = solve(task, seed, calibration, timings)
    return TransferredEmbeddings(solution.input, solution.output, _report(task, solution, seed, canonical_matching,
                                                                         timings), task)


def _report(task: TransferProblem, solution: EmbeddingSolution, seed: int, canonical: bool,
            timings: dict[str, float]) -> EmbeddingReport:
    problem, match = task.problem, task.match
    pieces = problem.pieces
    return EmbeddingReport(
        method=task.method,
        params=solution.stats.get("params", {}),
        seed=seed,
        canonical_matching=canonical,
        matching=match.counts(),
        new_token_ids=match.missing_ids,
        new_rows={k: v for k, v in solution.stats.items() if k not in ("params", "method")},
        source_vocab_size=len(task.source_vocab),
        source_rows=int(problem.source_input.shape[0]),
        target_vocab_size=len(task.target_vocab),
        target_rows=problem.target_rows,
        padded_to_multiple_of=task.padded_to_multiple_of,
        helper_rows=int(problem.helper_input.shape[0]) if problem.helper_input is not None else None,
        source_tokenizer_style=task.source_vocab.style.value,
        target_tokenizer_style=task.target_vocab.style.value,
        tokens_without_pieces=sum(1 for i in match.missing_ids if not pieces[i]) if pieces is not None else None,
        timings=timings,
    )
