"""Orthogonal matching pursuit (``omp``): properties on random matrices, and the method in the registry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clp_transfer.errors import ClpError
from clp_transfer.transfer.methods import (
    EmbeddingProblem,
    calibrate_frequencies,
    compute_target_embeddings,
    omp_select,
    prepare_atoms,
)

OPTIONS = [{}, {"nonneg": True}, {"ridge": 0.1}, {"normalize": True}, {"nonneg": True, "ridge": 0.05, "k": 3}]


def near_orthogonal_atoms(n: int, extra: int, seed: int, noise: float = 0.003) -> torch.Tensor:
    """[n, n + extra] atoms of norms in [0.8, 1.25] whose directions are nearly orthonormal (coherence ~noise):
    incoherent enough that OMP provably recovers the support of <= 6 atoms."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n + extra, n, generator=g, dtype=torch.float64))
    atoms = q.T + noise * torch.randn(n, n + extra, generator=g, dtype=torch.float64) / (n + extra) ** 0.5
    return atoms * (0.8 + 0.45 * torch.rand(n, 1, generator=g, dtype=torch.float64))


def sparse_target(atoms: torch.Tensor, s: int, seed: int, positive: bool = False):
    """(y [1, d_h], support [s], coef [s]): a combination of s atoms with coefficients of size 0.5..2."""
    g = torch.Generator().manual_seed(seed + 1)
    support = torch.randperm(atoms.shape[0], generator=g)[:s]
    coef = 0.5 + 1.5 * torch.rand(s, generator=g, dtype=torch.float64)
    if not positive:
        coef = coef * torch.where(torch.rand(s, generator=g) < 0.5, -1.0, 1.0).double()
    return (coef @ atoms[support])[None], support, coef


def reconstruction(atoms, idx, coef):
    return torch.einsum("ck,ckd->cd", coef, atoms.double()[idx])


def reference_omp(atoms: torch.Tensor, y: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
    """Textbook OMP for one target, a fresh least-squares solve per step (slow, float64): the oracle."""
    a, r, support = atoms.double(), y.double().clone(), []
    coef = torch.zeros(0, dtype=torch.float64)
    for _ in range(k):
        corr = (a @ r).abs()
        corr[support] = -1
        support.append(int(corr.argmax()))
        coef = torch.linalg.lstsq(a[support].T, y.double()[:, None]).solution[:, 0]
        r = y.double() - coef @ a[support]
    return support, coef


# ------------------------------------------------------------------------------------------ the pursuit


@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 40), extra=st.integers(0, 20), s=st.integers(1, 6), slack=st.integers(0, 5),
       seed=st.integers(0, 10_000), nonneg=st.booleans())
def test_a_target_in_the_span_of_k_atoms_is_reconstructed_exactly(n, extra, s, slack, seed, nonneg):
    atoms = near_orthogonal_atoms(n, extra, seed)
    s = min(s, n)
    y, support, coef = sparse_target(atoms, s, seed, positive=nonneg)
    k = s + slack
    idx, x = omp_select(atoms.float(), y.float(), k=k, nonneg=nonneg)
    assert idx.shape == x.shape == (1, min(k, n)) and x.dtype == torch.float64
    used = x[0] != 0
    assert int(used.sum()) <= k
    assert set(idx[0][used].tolist()) == set(support.tolist())  # it finds the atoms, and stops there
    fit = reconstruction(atoms.float(), idx, x)
    torch.testing.assert_close(fit, y, rtol=0, atol=1e-5 * float(y.norm()))
    order = {int(t): float(c) for t, c in zip(support, coef)}
    for t, c in zip(idx[0][used].tolist(), x[0][used].tolist()):
        assert abs(c - order[t]) < 1e-4


@settings(max_examples=25, deadline=None)
@given(n=st.integers(10, 60), dh=st.integers(2, 10), seed=st.integers(0, 10_000))
def test_k_at_least_the_dimension_reconstructs_any_target(n, dh, seed):
    g = torch.Generator().manual_seed(seed)
    atoms, y = torch.randn(n, dh, generator=g), torch.randn(5, dh, generator=g)
    idx, x = omp_select(atoms, y, k=dh + 3)
    assert ((x != 0).sum(1) <= dh).all()  # stops once the residual is zero: at most d_h atoms
    torch.testing.assert_close(reconstruction(atoms, idx, x), y.double(), rtol=0, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 50), dh=st.integers(2, 24), k=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_matches_textbook_omp(n, dh, k, seed):
    g = torch.Generator().manual_seed(seed)
    atoms, y = torch.randn(n, dh, generator=g, dtype=torch.float64), torch.randn(4, dh, generator=g, dtype=torch.float64)
    k_eff = min(k, n, dh)  # beyond d_h atoms the residual is 0 and the textbook loop picks arbitrary atoms
    idx, x = omp_select(atoms, y, k=k_eff)
    for row in range(4):
        support, coef = reference_omp(atoms, y[row], k_eff)
        used = x[row] != 0
        assert idx[row][used].tolist() == support[: int(used.sum())]
        if int(used.sum()) == k_eff:
            torch.testing.assert_close(x[row], coef, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fast_path_matches_textbook_omp_on_random_matrices(seed):
    # enough atoms for the bfloat16 screen and the Gram lookup (the defaults of prepare_atoms), against the
    # float64 textbook loop: the same atoms in the same order, the same coefficients
    g = torch.Generator().manual_seed(seed)
    atoms, y = torch.randn(1300, 40, generator=g), torch.randn(6, 40, generator=g)
    prepared = prepare_atoms(atoms)
    assert prepared.screen is not None and prepared.gram is not None
    idx, x = omp_select(prepared, y, k=10)
    for row in range(6):
        support, coef = reference_omp(atoms, y[row], 10)
        assert idx[row].tolist() == support
        torch.testing.assert_close(x[row], coef, rtol=1e-4, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), dh=st.integers(2, 16), k=st.integers(1, 10), ridge=st.floats(0.0, 3.0),
       nonneg=st.booleans(), seed=st.integers(0, 10_000))
def test_at_most_k_nonzeros_and_distinct_atoms(n, dh, k, ridge, nonneg, seed):
    g = torch.Generator().manual_seed(seed)
    idx, x = omp_select(torch.randn(n, dh, generator=g), torch.randn(7, dh, generator=g), k=k, ridge=ridge,
                        nonneg=nonneg)
    assert idx.shape == (7, min(k, n))
    assert ((x != 0).sum(1) <= k).all() and torch.isfinite(x).all()
    for row in range(7):
        chosen = idx[row][x[row] != 0].tolist()
        assert len(chosen) == len(set(chosen))
    if nonneg:
        assert (x >= 0).all()


def test_ridge_is_the_closed_form_ridge_fit_on_the_support():
    g = torch.Generator().manual_seed(3)
    atoms, y = torch.randn(50, 12, generator=g, dtype=torch.float64), torch.randn(6, 12, generator=g, dtype=torch.float64)
    for ridge in (0.0, 0.5, 4.0):
        idx, x = omp_select(atoms, y, k=5, ridge=ridge)
        for row in range(6):
            a = atoms[idx[row]]
            expect = torch.linalg.solve(a @ a.T + ridge * torch.eye(5, dtype=torch.float64), a @ y[row])
            torch.testing.assert_close(x[row], expect)
    _, plain = omp_select(atoms, y, k=5)
    _, shrunk = omp_select(atoms, y, k=5, ridge=50.0)
    assert shrunk.abs().sum() < plain.abs().sum()


def test_nonneg_fits_a_nonnegative_combination_and_is_optimal_on_its_support():
    atoms = near_orthogonal_atoms(30, 10, seed=5)
    y, support, _ = sparse_target(atoms, 4, seed=5, positive=True)
    idx, x = omp_select(atoms.float(), y.float(), k=6, nonneg=True)
    assert (x >= 0).all() and set(idx[0][x[0] != 0].tolist()) == set(support.tolist())
    torch.testing.assert_close(reconstruction(atoms.float(), idx, x), y, rtol=0, atol=1e-4)
    # on a random problem the projected gradient reaches the KKT point: gradient >= 0, = 0 where x > 0
    g = torch.Generator().manual_seed(1)
    a, t = torch.randn(40, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    idx, x = omp_select(a, t, k=6, nonneg=True)
    for row in range(3):
        p = a[idx[row]]  # the support, including atoms the constraint switched off
        grad = p @ (x[row] @ p - t[row])
        assert (grad > -1e-5).all() and (grad[x[row] > 0].abs() < 1e-5).all()


def test_deterministic():
    g = torch.Generator().manual_seed(0)
    atoms, y = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    a = omp_select(atoms, y, k=9, ridge=0.1)
    torch.manual_seed(123)
    b = omp_select(atoms, y, k=9, ridge=0.1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def mixed_problem(n: int, dh: int, c: int, seed: int, spread: float = 2.0):
    """Atoms of norms spread over 10^±spread (some exact duplicates, for ties) and targets of three kinds:
    random, in the span of 2 atoms (they stop early), and an exact multiple of one atom."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n, dh, generator=g) * 10 ** (spread * (2 * torch.rand(n, 1, generator=g) - 1))
    atoms[n - 5:] = atoms[atoms[: n - 5].norm(dim=1).topk(5).indices]  # twins of the 5 largest: exact ties
    y = torch.randn(c, dh, generator=g) * atoms.norm(dim=1).median()
    pick = torch.randint(0, n, (c, 2), generator=g)
    y[: c // 3] = 0.7 * atoms[pick[: c // 3, 0]] - 1.3 * atoms[pick[: c // 3, 1]]
    y[c // 3: c // 3 + 4] = 2.0 * atoms[:4]
    return atoms, y


@pytest.mark.parametrize("nonneg,ridge", [(False, 0.0), (True, 0.0), (False, 0.3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_bfloat16_screen_and_the_gram_lookup_change_nothing(nonneg, ridge, seed):
    # the screen is exact by construction (rigorous error bound, exact rescoring of every candidate):
    # the same atoms, the same coefficients as one float32 product of every atom at every step
    atoms, y = mixed_problem(n=700, dh=32, c=90, seed=seed)
    plain = omp_select(prepare_atoms(atoms, screen=False, gram=False), y, k=12, ridge=ridge, nonneg=nonneg)
    for screen, gram in [(True, True), (True, False), (False, True)]:
        got = omp_select(prepare_atoms(atoms, screen=screen, gram=gram), y, k=12, ridge=ridge, nonneg=nonneg)
        assert torch.equal(got[0], plain[0]), (screen, gram)
        torch.testing.assert_close(got[1], plain[1], rtol=1e-4, atol=1e-6)
    if ridge == 0:  # exact ties go to the lower id; then the residual is orthogonal to the twin
        used = plain[0][plain[1] != 0]
        big = atoms[:695].norm(dim=1).topk(5).indices
        assert not (used >= 695).any() and torch.isin(used, big).any()


def test_screen_chunks_and_fallback_rows():
    # more atoms than one screen chunk, a row whose residual is ~0 after one step (every atom is then a
    # candidate: the exact fallback) and a zero target; prepare_atoms is reused across blocks
    atoms, y = mixed_problem(n=1100, dh=20, c=40, seed=3, spread=0.5)
    y[5] = 0.0
    prepared = prepare_atoms(atoms)  # default: screen on from 1024 atoms, Gram matrix precomputed
    assert prepared.screen is not None and prepared.gram is not None
    assert prepared.screen.shape[0] % 64 == 0 and prepared.screen.dtype == torch.bfloat16
    exact = prepare_atoms(atoms, screen=False, gram=False)
    for block in (y[:20], y[20:]):
        a, b = omp_select(prepared, block, k=9), omp_select(exact, block, k=9)
        assert torch.equal(a[0], b[0])
        torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-6)
    _, x = omp_select(prepared, y[5:6], k=9)
    assert (x == 0).all()


# ------------------------------------------------------------------------------------------ the method


def problem(v_s=70, v_t=60, d=10, d_h=24, n_shared=30, untied=True, pad=0, seed=0, dtype=torch.float32,
            helper=None, source=None) -> EmbeddingProblem:
    g = torch.Generator().manual_seed(seed)
    source_id = torch.full((v_t,), -1)
    source_id[torch.randperm(v_t, generator=g)[:n_shared]] = torch.randperm(v_s, generator=g)[:n_shared]
    src = source if source is not None else torch.randn(v_s, d, generator=g)
    return EmbeddingProblem(
        source_input=src.to(dtype), source_id=source_id, target_rows=v_t + pad,
        source_output=(3 * src).to(dtype) if untied else None,
        helper_input=helper if helper is not None else torch.randn(v_t, d_h, generator=g),
        source_padding_ids=[v_s - 1],
    )


def test_new_rows_apply_the_helper_space_coefficients_to_the_source_rows():
    # helper rows of the new tokens are sparse combinations of shared helper rows; the source rows of the
    # shared tokens are those helper rows, so each new row must come out as its own helper row (x 3 in the head)
    v_t, n_shared = 60, 40
    atoms = near_orthogonal_atoms(n_shared, 8, seed=2).float()  # [40, 48]
    source_id = torch.full((v_t,), -1)
    source_id[:n_shared] = torch.arange(n_shared)
    helper = torch.zeros(v_t, 48)
    helper[:n_shared] = atoms
    g = torch.Generator().manual_seed(2)
    for t in range(n_shared, v_t):
        chosen = torch.randperm(n_shared, generator=g)[:3]
        helper[t] = torch.randn(3, generator=g) @ atoms[chosen]
    p = EmbeddingProblem(source_input=atoms, source_id=source_id, target_rows=v_t, source_output=3 * atoms,
                         helper_input=helper)
    sol = compute_target_embeddings(p, "omp", {"k": 5})
    torch.testing.assert_close(sol.input[n_shared:], helper[n_shared:], rtol=0, atol=1e-4)
    torch.testing.assert_close(sol.output[n_shared:], 3 * helper[n_shared:], rtol=0, atol=3e-4)
    assert sol.stats["mean_support"] == 3 and sol.stats["mean_relative_residual"] < 1e-5


@pytest.mark.parametrize("params", OPTIONS)
@settings(max_examples=10, deadline=None)
@given(n_shared=st.integers(1, 45), untied=st.booleans(), pad=st.sampled_from([0, 6]), seed=st.integers(0, 99))
def test_shared_rows_untouched_shapes_and_support(params, n_shared, untied, pad, seed):
    p = problem(n_shared=n_shared, untied=untied, pad=pad, seed=seed)
    sol = compute_target_embeddings(p, "omp", params)
    assert sol.input.shape == (60 + pad, 10) and (sol.output is not None) == untied
    assert torch.equal(sol.input[p.shared], p.source_input[p.source_id[p.shared]])
    if untied:
        assert sol.output.shape == sol.input.shape
        assert torch.equal(sol.output[p.shared], p.source_output[p.source_id[p.shared]])
    assert sol.stats["mean_support"] <= min(params.get("k", 64), n_shared)
    if params.get("nonneg"):
        assert sol.stats["negative_weights"] == 0
    if pad:
        torch.testing.assert_close(sol.input[60:], p.source_input[[69]].expand(pad, -1))


def test_untied_head_gets_the_same_coefficients_on_its_own_rows():
    p = problem(untied=True, seed=4)
    sol = compute_target_embeddings(p, "omp", {"k": 6})
    torch.testing.assert_close(sol.output[p.missing], 3 * sol.input[p.missing])  # head = 3 x source rows here


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_is_kept_and_seed_and_global_rng_do_not_matter(dtype):
    p = problem(dtype=dtype)
    torch.manual_seed(0)
    a = compute_target_embeddings(p, "omp", {"k": 8}, seed=1)
    torch.manual_seed(9)
    b = compute_target_embeddings(p, "omp", {"k": 8}, seed=2)
    assert a.input.dtype == dtype and a.output.dtype == dtype
    assert torch.equal(a.input, b.input) and torch.equal(a.output, b.output)


def test_normalize_ignores_the_length_of_helper_rows():
    p = problem(seed=6)
    scale = torch.rand(60, 1, generator=torch.Generator().manual_seed(1)) * 5 + 0.1
    q = problem(seed=6, helper=p.helper_input * scale)
    a = compute_target_embeddings(p, "omp", {"normalize": True, "k": 8})
    b = compute_target_embeddings(q, "omp", {"normalize": True, "k": 8})
    torch.testing.assert_close(a.input, b.input, rtol=1e-4, atol=1e-5)
    c = compute_target_embeddings(q, "omp", {"k": 8})
    assert not torch.allclose(a.input, c.input, atol=1e-3)


@pytest.mark.parametrize("untied", [True, False])
def test_calibrate_is_the_same_output_calibration_as_clp(untied):
    import dataclasses

    p = problem(untied=untied, seed=8)
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(32, 10, generator=g) + 1.0
    counts = torch.randint(0, 20, (60,), generator=g)
    q = dataclasses.replace(p, calibration_hidden=hidden, token_counts=counts)
    plain = compute_target_embeddings(q, "omp", {"k": 8})
    assert "calibration" not in plain.stats  # off by default, like mergekit
    cal = compute_target_embeddings(q, "omp", {"k": 8, "calibrate": 1.0})
    assert cal.stats["calibration"]["applied"] is True
    head = plain.output if untied else plain.input
    expect, _ = calibrate_frequencies(head, hidden, counts, torch.arange(60), 1.0)
    torch.testing.assert_close(cal.output if untied else cal.input, expect)
    if untied:
        assert torch.equal(cal.input, plain.input)
    skipped = compute_target_embeddings(p, "omp", {"k": 8, "calibrate": 1.0})
    assert skipped.stats["calibration"]["applied"] is False


def test_bad_parameters_fail_clearly():
    p = problem()
    for params, match in [({"k": 0}, "k must be >= 1"), ({"ridge": -1}, "ridge must be >= 0"), ({"ridge": float("nan")}, "ridge"),
                          ({"nonneg": "maybe"}, "true or false"), ({"kk": 3}, "no parameter 'kk'")]:
        with pytest.raises(ClpError, match=match):
            compute_target_embeddings(p, "omp", params)
