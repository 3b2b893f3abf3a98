"""Properties of the transfer maths on random matrices (no models, no files)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clp_transfer.errors import ClpError, UnknownNameError
from clp_transfer.transfer.methods import (
    METHODS,
    EmbeddingProblem,
    bias_direction,
    calibrate_frequencies,
    compute_target_embeddings,
    mean_predicted_probability,
    sparsemax,
)

SIM = {"pieces_weight": 0.0, "weighting": "topk_softmax"}  # clp's similarity part alone, top-k softmax


def make_problem(v_s=60, v_t=50, d=8, d_h=6, n_shared=20, untied=True, pad=0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    source_id = torch.full((v_t,), -1)
    source_id[torch.randperm(v_t, generator=g)[:n_shared]] = torch.randperm(v_s, generator=g)[:n_shared]
    pieces = [torch.randint(0, v_s, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist()
              for _ in range(v_t)]
    return EmbeddingProblem(
        source_input=torch.randn(v_s, d, generator=g).to(dtype),
        source_id=source_id,
        target_rows=v_t + pad,
        source_output=torch.randn(v_s, d, generator=g).to(dtype) if untied else None,
        helper_input=torch.randn(v_t, d_h, generator=g),
        pieces=pieces,
        source_padding_ids=[v_s - 1, v_s - 2],
    )


@pytest.mark.parametrize("method", METHODS.names())
@settings(max_examples=15, deadline=None)
@given(n_shared=st.integers(1, 40), untied=st.booleans(), pad=st.sampled_from([0, 14]), seed=st.integers(0, 99))
def test_every_method_keeps_shared_rows_shapes_and_finiteness(method, n_shared, untied, pad, seed):
    p = make_problem(n_shared=n_shared, untied=untied, pad=pad, seed=seed)
    sol = compute_target_embeddings(p, method, seed=seed)
    assert sol.input.shape == (p.target_rows, 8)
    assert (sol.output is not None) == untied
    assert torch.isfinite(sol.input).all()
    shared = p.shared
    torch.testing.assert_close(sol.input[shared], p.source_input[p.source_id[shared]], rtol=0, atol=0)
    if untied:
        assert sol.output.shape == sol.input.shape
        torch.testing.assert_close(sol.output[shared], p.source_output[p.source_id[shared]], rtol=0, atol=0)
    if pad:
        torch.testing.assert_close(sol.input[50:], p.source_input[[59, 58]].mean(0).expand(pad, -1))


@pytest.mark.parametrize("method", METHODS.names())
def test_methods_are_deterministic_and_ignore_the_global_rng(method):
    p = make_problem()
    torch.manual_seed(1)
    a = compute_target_embeddings(p, method, seed=3)
    torch.manual_seed(2)
    torch.rand(100)
    b = compute_target_embeddings(p, method, seed=3)
    assert torch.equal(a.input, b.input)
    state = torch.get_rng_state()
    compute_target_embeddings(p, method, seed=3)
    assert torch.equal(state, torch.get_rng_state())


def one_hot_problem(n_shared=12, v_t=30, d_h=5, seed=0, helper=None):
    """Source rows = identity, so a new row *is* its weight vector over the shared tokens."""
    g = torch.Generator().manual_seed(seed)
    source_id = torch.full((v_t,), -1)
    source_id[:n_shared] = torch.arange(n_shared)
    return EmbeddingProblem(
        source_input=torch.eye(n_shared),
        source_id=source_id,
        target_rows=v_t,
        source_output=torch.eye(n_shared) * 2,
        helper_input=helper if helper is not None else torch.randn(v_t, d_h, generator=g),
    )


@pytest.mark.parametrize("params", [
    {}, {"weighting": "sparsemax", "temperature": 0.1}, {"weighting": "topk_uniform", "top_k": 3},
    {"top_k": 100, "temperature": 1.0}, {"center": True},
])
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000))
def test_clp_rows_are_convex_combinations_of_shared_source_rows(params, seed):
    p = one_hot_problem(seed=seed)
    sol = compute_target_embeddings(p, "clp", {**SIM, **params})
    w = sol.input[p.missing]  # [|M|, |S|] = the weights
    assert (w >= -1e-7).all()
    torch.testing.assert_close(w.sum(1), torch.ones(len(w)))
    k = params.get("top_k", 10)
    if params.get("weighting", "topk_softmax") != "sparsemax":
        assert ((w > 0).sum(1) <= min(k, 12)).all()
    # the untied head gets the same weights, applied to its own rows
    torch.testing.assert_close(sol.output[p.missing], 2 * w)


def test_clp_puts_the_largest_weight_on_the_most_similar_shared_token():
    helper = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    p = one_hot_problem(helper=helper)
    w = compute_target_embeddings(p, "clp", SIM).input[p.missing]
    cos = torch.nn.functional.normalize(helper[p.missing], dim=1) @ torch.nn.functional.normalize(helper[:12], dim=1).T
    assert torch.equal(w.argmax(1), cos.argmax(1))


def test_clp_original_is_the_published_formula():
    p = one_hot_problem(seed=4)
    w = compute_target_embeddings(p, "clp-original").input[p.missing]
    h = p.helper_input
    for r, tid in enumerate(p.missing.tolist()):
        c = torch.stack([torch.nn.functional.cosine_similarity(h[tid], h[s], dim=0) for s in range(12)])
        torch.testing.assert_close(w[r], c / c.sum(), rtol=1e-4, atol=1e-5)


def test_clp_original_shows_its_defects_and_clp_does_not():
    # Centred helper vectors: cosines of either sign, their sum near zero -> huge rows and sign flips.
    g = torch.Generator().manual_seed(0)
    p = make_problem(n_shared=40, seed=0)
    p.helper_input = torch.randn(50, 6, generator=g)
    orig = compute_target_embeddings(p, "clp-original").stats
    ours = compute_target_embeddings(p, "clp", SIM).stats
    assert orig["negative_weights"] > 0 and ours["negative_weights"] == 0
    assert orig["norm_ratio_new_to_shared"] > 1.5 > ours["norm_ratio_new_to_shared"]


def test_rescale_norms_matches_the_norms_of_the_mixed_rows():
    p = make_problem(n_shared=30)
    plain = compute_target_embeddings(p, "clp", SIM).stats["norm_ratio_new_to_shared"]
    scaled = compute_target_embeddings(p, "clp", {**SIM, "rescale_norms": True}).stats["norm_ratio_new_to_shared"]
    assert plain < 0.9 and abs(scaled - 1) < 0.2


def test_fvt_is_the_mean_of_the_pieces():
    p = make_problem()
    sol = compute_target_embeddings(p, "fvt")
    for tid in p.missing.tolist():
        ids = p.pieces[tid]
        expect = p.source_input[ids].mean(0) if ids else p.source_input[p.source_id[p.shared]].mean(0)
        torch.testing.assert_close(sol.input[tid], expect)


def test_random_init_std_follows_the_seed_methods():
    p = make_problem(v_t=3000, n_shared=10, d=64)
    for init, std in [("small_init", (2 / (5 * 64)) ** 0.5), ("xavier_normal", (2 / (3000 + 64)) ** 0.5),
                      ("normal", 0.02)]:
        rows = compute_target_embeddings(p, "random", {"init": init}).input[p.missing]
        assert abs(rows.std().item() / std - 1) < 0.05, init


def test_dtype_is_kept():
    p = make_problem(dtype=torch.bfloat16)
    for m in METHODS:
        assert compute_target_embeddings(p, m).input.dtype == torch.bfloat16


def test_bad_input_errors():
    with pytest.raises(UnknownNameError, match="did you mean 'clp'"):
        compute_target_embeddings(make_problem(), "clpp")
    with pytest.raises(ClpError, match="no parameter 'topk'"):
        compute_target_embeddings(make_problem(), "clp", {"topk": 3})
    with pytest.raises(ClpError, match="share no token"):
        compute_target_embeddings(make_problem(n_shared=0), "clp")
    with pytest.raises(ClpError, match="does not match the helper model"):
        EmbeddingProblem(torch.randn(5, 2), torch.full((10,), -1), 10, helper_input=torch.randn(8, 2))
    with pytest.raises(ClpError, match="true or false"):
        compute_target_embeddings(make_problem(), "clp", {"rescale_norms": "maybe"})


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=20))
def test_sparsemax_is_a_sparse_distribution(values):
    z = torch.tensor([values])
    p = sparsemax(z)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    assert p.argmax() == z.argmax() or p.max() == p[0, z.argmax()]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.floats(0.01, 50.0), st.integers(1, 70), st.integers(0, 10_000))
def test_sparsemax_topk_equals_full_sparsemax(n, scale, k, seed):
    from clp_transfer.transfer.methods import sparsemax_topk

    z = torch.randn(6, n, generator=torch.Generator().manual_seed(seed)) * scale
    idx, w = sparsemax_topk(z, k=k)
    dense = torch.zeros_like(z).scatter_(1, idx, w)
    torch.testing.assert_close(dense, sparsemax(z), rtol=1e-5, atol=1e-6)


def test_linear_map_recovers_an_exact_linear_relation():
    g = torch.Generator().manual_seed(0)
    v_t, d_h, d = 80, 6, 4
    helper = torch.randn(v_t, d_h, generator=g)
    true_map = torch.randn(d_h, d, generator=g)
    source_id = torch.full((v_t,), -1)
    source_id[:50] = torch.arange(50)
    source = torch.zeros(60, d)
    source[:50] = helper[:50] @ true_map
    p = EmbeddingProblem(source, source_id, v_t, helper_input=helper)
    sol = compute_target_embeddings(p, "map", {"ridge": 1e-8})
    torch.testing.assert_close(sol.input[50:], helper[50:] @ true_map, rtol=1e-3, atol=1e-3)


def test_hybrid_interpolates_fvt_and_clp():
    p = make_problem(n_shared=30)
    f = compute_target_embeddings(p, "fvt").input
    c = compute_target_embeddings(p, "clp", SIM).input
    for alpha in (0.0, 1.0, 0.3):
        h = compute_target_embeddings(p, "hybrid", {"alpha": alpha}).input
        for tid in p.missing.tolist():
            a = alpha if p.pieces[tid] else 0.0
            torch.testing.assert_close(h[tid], a * f[tid] + (1 - a) * c[tid])


# ----------------------------------------------------------------------------- clp over pieces + calibration


def with_calibration(p: EmbeddingProblem, n=40, seed=0, hidden=None) -> EmbeddingProblem:
    g = torch.Generator().manual_seed(seed)
    d, v_t = p.source_input.shape[1], p.source_id.shape[0]
    if hidden is None:
        hidden = torch.randn(n, d, generator=g) + 2.0  # a common component, as final hidden states have
    counts = torch.randint(0, 50, (v_t,), generator=g).float()
    return dataclasses.replace(p, calibration_hidden=hidden, token_counts=counts)


@pytest.mark.parametrize("pieces_weight", [0.0, 0.4, 1.0])
def test_clp_mixes_its_pieces_and_similar_tokens(pieces_weight):
    p = make_problem(n_shared=30)
    fvt = compute_target_embeddings(p, "fvt").input
    sim = compute_target_embeddings(p, "clp", SIM).input
    got = compute_target_embeddings(p, "clp", {**SIM, "pieces_weight": pieces_weight, "calibrate": 0}).input
    for tid in p.missing.tolist():
        a = pieces_weight if p.pieces[tid] else 0.0  # no piece covers it (a byte the source lacks): similarity
        torch.testing.assert_close(got[tid], a * fvt[tid] + (1 - a) * sim[tid])


def test_clp_default_is_sparse_similarity_rows_plus_calibration():
    d = METHODS.get("clp").defaults
    assert d["pieces_weight"] == 0.0 and d["weighting"] == "sparsemax" and d["calibrate"] == 1.0
    p = make_problem(n_shared=30, untied=False)
    plain = compute_target_embeddings(p, "clp")  # no calibration data: calibration skipped, says so
    assert plain.stats["calibration"]["applied"] is False and "skipped" in plain.stats["calibration"]
    assert torch.equal(plain.input, compute_target_embeddings(p, "clp", {"calibrate": 0}).input)
    cal = compute_target_embeddings(with_calibration(p), "clp")
    assert cal.stats["calibration"]["applied"] is True
    assert not torch.equal(cal.input, plain.input)


@pytest.mark.parametrize("untied", [False, True])
@pytest.mark.parametrize("pad", [0, 14])
def test_calibration_with_identical_states_matches_the_frequencies_exactly(untied, pad):
    p = make_problem(n_shared=20, untied=untied, pad=pad)
    h = torch.randn(1, 8, generator=torch.Generator().manual_seed(1)).expand(30, -1).contiguous()
    q = with_calibration(p, hidden=h)
    sol = compute_target_embeddings(q, "clp", {"calibrate": 1.0})
    head = sol.output if untied else sol.input
    f = q.token_counts + 0.5
    p_bar = mean_predicted_probability(head, h)[:50]
    # the padding rows keep their share; the tokens' shares are in the ratio of their frequencies
    torch.testing.assert_close(p_bar / p_bar.sum(), f / f.sum(), rtol=1e-4, atol=1e-6)
    if untied:  # the input side is untouched when the head is separate
        assert torch.equal(sol.input, compute_target_embeddings(p, "clp", {"calibrate": 0}).input)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 99), untied=st.booleans(), strength=st.sampled_from([0.3, 0.7, 1.0]))
def test_calibration_moves_mean_predictions_towards_frequencies(seed, untied, strength):
    p = with_calibration(make_problem(n_shared=20, untied=untied, seed=seed), seed=seed)
    before = compute_target_embeddings(p, "clp", {"calibrate": 0})
    after = compute_target_embeddings(p, "clp", {"calibrate": strength})
    f = p.token_counts + 0.5
    f = f / f.sum()

    def kl(sol):
        q = mean_predicted_probability(sol.output if untied else sol.input, p.calibration_hidden)
        return float((f * (f / q).log()).sum())

    assert kl(after) < kl(before)
    assert torch.isfinite(after.input).all()


@pytest.mark.parametrize("untied", [False, True])
def test_calibration_of_new_rows_only_keeps_shared_rows(untied):
    p = with_calibration(make_problem(n_shared=25, untied=untied))
    sol = compute_target_embeddings(p, "clp", {"calibrate_shared": False})
    s = p.shared
    torch.testing.assert_close(sol.input[s], p.source_input[p.source_id[s]], rtol=0, atol=0)
    if untied:
        torch.testing.assert_close(sol.output[s], p.source_output[p.source_id[s]], rtol=0, atol=0)
    assert sol.stats["calibration"]["rows_shifted"] == len(p.missing)


def test_bias_direction_shifts_the_mean_logit_by_the_bias():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 8, generator=g) + 1.0
    head = torch.randn(10, 8, generator=g)
    counts = torch.arange(10.0)
    new, shift = calibrate_frequencies(head, h, counts, torch.arange(10), strength=0.5)
    torch.testing.assert_close((h @ new.T - h @ head.T).mean(0), shift)
    torch.testing.assert_close(h.mean(0) @ bias_direction(h), torch.tensor(1.0))


def test_calibrated_methods_are_deterministic():
    p = with_calibration(make_problem(n_shared=20, untied=False))
    a = compute_target_embeddings(p, "clp", seed=1)
    b = compute_target_embeddings(p, "clp", seed=1)
    assert torch.equal(a.input, b.input)


def test_calibration_input_errors():
    p = make_problem()
    with pytest.raises(ClpError, match="both calibration_hidden and token_counts"):
        dataclasses.replace(p, calibration_hidden=torch.randn(4, 8))
    with pytest.raises(ClpError, match=r"calibration_hidden must be \[N, 8\]"):
        dataclasses.replace(p, calibration_hidden=torch.randn(4, 7), token_counts=torch.ones(50))
    with pytest.raises(ClpError, match="one entry per target token"):
        dataclasses.replace(p, calibration_hidden=torch.randn(4, 8), token_counts=torch.ones(49))
    with pytest.raises(ClpError, match="calibrate must be >= 0"):
        compute_target_embeddings(p, "clp", {"calibrate": -1})
    with pytest.raises(ClpError, match="pieces_weight must lie in"):
        compute_target_embeddings(p, "clp", {"pieces_weight": 1.5})
    with pytest.raises(ClpError, match="needs the decomposition"):
        compute_target_embeddings(dataclasses.replace(p, pieces=None), "clp", {"pieces_weight": 1.0})
    with pytest.raises(ClpError, match="average to zero"):
        bias_direction(torch.zeros(3, 8))


def test_non_finite_rows_raise_their_own_error_class():
    from clp_transfer.errors import NonFiniteEmbeddingsError

    p = make_problem()
    p.source_input[p.source_id[p.shared[0]]] = float("nan")  # a shared source row poisons every mixture of it
    with pytest.raises(NonFiniteEmbeddingsError, match="non-finite embeddings"):
        compute_target_embeddings(p, "fvt")
    assert issubclass(NonFiniteEmbeddingsError, ClpError)  # the CLI still prints it as a user error
