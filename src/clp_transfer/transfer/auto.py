"""``--method auto``: choose the initialisation by measuring it on target text, instead of assuming one.

Which rows are best at step 0 depends on the source. An English-only source (SmolLM2-135M) gains most from
the helper's similarities and from the output calibration; a source that already knows the target language
does better with its own pieces (FVT), and the calibration can hurt it (docs/research.md, issue 15). So the
default builds a small set of candidates from one problem and keeps the one with the lowest bits per byte on
held-out target documents:

1. **Families of rows**, sharing the work: the similarity rows (clp's sparsemax weights) and the FVT rows are
   computed once and mixed at each ``pieces_weights`` value by clp's rule (0: similarity rows only, 1: FVT
   rows, with similarity rows for the tokens no source pieces spell), plus ``omp`` (k = ``omp_k``).
2. **Calibration strengths**: each family with a strength > 0 is run once over ``fit_positions`` positions
   of the fit documents for the hidden states; every strength is then one cheap shift of the same rows.
3. **A screen, then finalists** on the check documents (whole documents the fit part never sees): every
   candidate is scored on the first ``screen_tokens`` tokens; unless the leader is ahead by ``margin`` bits
   per byte, the best ``finalists`` are scored on all ``check_tokens`` tokens. (Two finalists: on every
   benchmark source the final winner was among the screen's best two, and the screen's ranks 3-4 cost as
   much to check as the rest of the choice.) Scores are exact bits per byte
   (:meth:`TargetText.bits_per_byte`, the evaluation's scorer), ties go to the earlier candidate.
4. The winner is rebuilt exactly as its standalone method would be: a calibrated winner is recalibrated on
   the full ``calibration_tokens`` positions of *all* the text, check documents included (they were held
   out to choose, not to calibrate: on a tiny source the calibration sample alone moved the result by 0.04
   bits per byte). Every candidate's scores go into the report.

Without target text nothing can be measured: the fallback rows (uncalibrated, see :data:`FALLBACK`) are
used with a warning that says what the text would buy.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import ClpError
from .methods import (EmbeddingProblem, EmbeddingSolution, NewRows, assemble_solution, calibrate_solution,
                      compute_target_embeddings, fvt, method_params, mix_pieces, parse_number_list,
                      similarity_rows)

log = logging.getLogger(__name__)

FALLBACK: dict[str, Any] = {"pieces_weight": 0.5}
"""clp parameters used without target text (uncalibrated: the calibration needs the text). Half FVT, half
similarity rows was never the worst of the uncalibrated candidates on the benchmark sources (docs/research.md,
issue 15), while either pure form loses badly on one kind of source."""


SIMILARITY = {k: method_params("clp")[k] for k in ("weighting", "top_k", "temperature", "rescale_norms", "center")}
"""The similarity weights of the clp candidates: clp's defaults."""


class TextProbe(Protocol):
    """What the choice needs from target text (:class:`clp_transfer.transfer.calibration.TargetText`)."""

    def statistics(self, input_rows: torch.Tensor, positions: int | None = None,
                   all_documents: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [N, d], counts [V_t])`` on fit documents (or all of them) for these input rows."""

    def bits_per_byte(self, input_rows: torch.Tensor, output_rows: torch.Tensor | None = None,
                      max_tokens: int | None = None) -> float:
        """Exact bits per byte on the check documents (the first ``max_tokens`` predicted tokens)."""


@dataclass
class Candidate:
    """One initialisation the choice compares."""

    name: str
    """E.g. ``clp(pieces_weight=0.5)@1``: family, then ``@`` calibration strength."""
    family: str
    """The rows before calibration, e.g. ``clp(pieces_weight=0.5)``."""
    method: str
    """The standalone method that builds it (``clp`` or ``omp``)."""
    params: dict[str, Any]
    """That method's parameters (calibration included), so the winner can be rerun on its own."""
    calibrate: float
    """Calibration strength (0: uncalibrated)."""
    scores: dict[str, float] = field(default_factory=dict)
    """Bits per byte by round: ``screen`` (first ``screen_tokens`` check tokens), ``check`` (all of them)."""
    skipped: str | None = None
    """Why it was not scored (it failed to build), else None."""


def candidates(params: dict[str, Any]) -> list[Candidate]:
    """The candidate set of the ``auto`` parameters, in a fixed order (earlier wins ties)."""
    weights = parse_number_list("auto", "pieces_weights", params["pieces_weights"])
    strengths = parse_number_list("auto", "calibrate_strengths", params["calibrate_strengths"])
    # pieces_weight 1 is clp's rule, not the fvt method: a token without source pieces keeps its similarity
    # row instead of fvt's mean row, so the candidate is exactly the standalone `clp` run it names.
    families = [(f"clp(pieces_weight={w:g})", "clp", {"pieces_weight": w}) for w in weights]
    if int(params["omp_k"]) > 0:
        families.append((f"omp(k={int(params['omp_k'])})", "omp", {"k": int(params["omp_k"])}))
    out = []
    for family, method, fparams in families:
        for s in strengths:
            out.append(Candidate(f"{family}@{s:g}", family, method, {**fparams, "calibrate": s}, s))
    return out


def family_rows(problem: EmbeddingProblem, families: list[Candidate], seed: int) -> dict[str, EmbeddingSolution | str]:
    """Uncalibrated rows of every family (a string: why it failed). The similarity and FVT rows are computed
    once and mixed for every clp family; other methods run on their own."""
    out: dict[str, EmbeddingSolution | str] = {}
    cache: dict[str, NewRows | str] = {}

    def shared_rows(kind: str) -> NewRows | str:
        if kind not in cache:
            try:
                cache[kind] = _piece_rows(problem) if kind == "fvt" else similarity_rows(problem, **SIMILARITY)
            except ClpError as e:
                cache[kind] = str(e)
        return cache[kind]

    for c in families:
        if c.family in out:
            continue
        try:
            if c.method == "clp":
                w = float(c.params.get("pieces_weight", 0.0))
                sim = shared_rows("sim")
                pie = shared_rows("fvt") if w > 0 else None
                failed = [r for r in (sim, pie) if isinstance(r, str)]
                if failed:
                    raise ClpError(failed[0])
                rows = mix_pieces(problem, sim, pie, w)
                params = method_params(c.method, {k: v for k, v in c.params.items() if k != "calibrate"})
                out[c.family] = assemble_solution(problem, c.method, {**params, "calibrate": 0.0}, rows)
            else:
                out[c.family] = compute_target_embeddings(problem, c.method, {**c.params, "calibrate": 0.0}, seed)
        except ClpError as e:
            out[c.family] = str(e)
    return out


def _piece_rows(problem: EmbeddingProblem) -> NewRows:
    """FVT rows; a family built on them is pointless (and skipped) when no new token has source pieces."""
    if problem.pieces is None:
        raise ClpError("no decomposition of the target tokens into source pieces was made")
    if not any(problem.pieces[t] for t in problem.missing.tolist()):
        raise ClpError("no new token can be spelled with source pieces (e.g. another script)")
    return fvt(problem)


def calibrated(problem: EmbeddingProblem, base: EmbeddingSolution, stats: tuple[torch.Tensor, torch.Tensor],
               strength: float) -> EmbeddingSolution:
    """``base`` with the output calibration at ``strength`` (0: ``base`` itself)."""
    if strength == 0:
        return base
    hidden, counts = stats
    params = {**base.stats.get("params", {}), "calibrate": strength}
    solution = EmbeddingSolution(base.input, base.output, {**base.stats, "params": params})
    return calibrate_solution(dataclasses.replace(problem, calibration_hidden=hidden, token_counts=counts), solution)


def build_candidates(problem: EmbeddingProblem, cands: list[Candidate], rows: dict[str, EmbeddingSolution | str],
                     probe: TextProbe, fit_positions: int) -> dict[str, EmbeddingSolution]:
    """Every candidate's matrices from its family's uncalibrated ``rows`` (:func:`family_rows`); failures are
    recorded in ``Candidate.skipped`` and left out."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    built: dict[str, EmbeddingSolution] = {}
    for c in cands:
        base = rows[c.family]
        if isinstance(base, str):
            c.skipped = base
            log.info("auto: candidate %s skipped: %s", c.name, base)
            continue
        if c.calibrate > 0 and c.family not in stats:
            stats[c.family] = probe.statistics(base.input, fit_positions)
        built[c.name] = calibrated(problem, base, stats.get(c.family), c.calibrate)
    return built


def screen_and_check(cands: list[Candidate], built: dict[str, EmbeddingSolution], probe: TextProbe, screen_tokens: int,
          check_tokens: int, margin: float, finalists: int = 2) -> Candidate:
    """Screen everyone, then the best ``finalists`` on the whole check part (none when the leader is ahead by
    more than ``margin``); the winner."""
    alive = [c for c in cands if c.name in built]
    if not alive:
        raise ClpError("auto: no candidate initialisation could be built: " +
                       "; ".join(f"{c.name}: {c.skipped}" for c in cands))
    rounds = [("screen", screen_tokens), ("check", check_tokens)] if screen_tokens < check_tokens else \
        [("check", check_tokens)]
    for label, tokens in rounds:
        for c in alive:
            sol = built[c.name]
            c.scores[label] = probe.bits_per_byte(sol.input, sol.output, tokens)
        alive.sort(key=lambda c: c.scores[label])  # stable: earlier candidates win ties
        log.info("auto: %s round (%d tokens): %s", label, tokens,
                 ", ".join(f"{c.name} {c.scores[label]:.4f}" for c in alive))
        if len(alive) == 1 or alive[1].scores[label] - alive[0].scores[label] > margin:
            break
        alive = alive[: max(1, finalists)]
    return alive[0]


def choose(problem: EmbeddingProblem, params: dict[str, Any], probe: TextProbe | None,
           seed: int = 0) -> EmbeddingSolution:
    """The ``auto`` method: the best candidate on the probe's check documents (see the module docstring), or
    the fallback rows without a probe. ``stats["auto"]`` says what was chosen and why."""
    t0 = time.perf_counter()
    if probe is None:
        log.warning("method auto without target text (--text / --calibration_text): nothing to measure, so the "
                    "fallback rows %s are used, uncalibrated. Give a few MB of target-language text: the choice "
                    "between similarity rows, the source's own pieces and the output calibration is worth up to "
                    "~0.3 bits per byte at step 0 (docs/research.md)", FALLBACK)
        solution = compute_target_embeddings(problem, "clp", {**FALLBACK, "calibrate": 0.0}, seed)
        solution.stats["auto"] = {"choice": f"clp(pieces_weight={FALLBACK['pieces_weight']:g})@0",
                                  "reason": "no target text: fallback"}
        return solution
    cands = candidates(params)
    rows = family_rows(problem, cands, seed)
    built = build_candidates(problem, cands, rows, probe, int(params["fit_positions"]))
    winner = screen_and_check(cands, built, probe, int(params["screen_tokens"]), int(params["check_tokens"]),
                   float(params["margin"]), int(params["finalists"]))
    solution = built[winner.name]
    if winner.calibrate > 0:
        base = rows[winner.family]
        solution = calibrated(problem, base, probe.statistics(base.input, all_documents=True), winner.calibrate)
    solution.stats["auto"] = {
        "choice": winner.name, "method": winner.method, "params": winner.params,
        "auto_params": {k: params[k] for k in ("pieces_weights", "calibrate_strengths", "omp_k", "screen_tokens",
                                               "check_tokens", "fit_positions", "margin", "finalists")},
        "check_tokens": getattr(probe, "check_tokens", None),
        "check_documents": len(getattr(probe, "check_documents", []) or []),
        "candidates": [{"name": c.name, "method": c.method, "params": c.params, "scores": c.scores,
                        **({"skipped": c.skipped} if c.skipped else {})} for c in cands],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info("auto: chose %s (check bits per byte %s)", winner.name,
             ", ".join(f"{k} {v:.4f}" for k, v in winner.scores.items()))
    return solution
