"""Every lineage statistic against an independent float64 numpy/scipy reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from scipy.stats import ortho_group

from lmsurgeon.lineage import stats
from lmsurgeon.lineage.align import align_residual, canonical_token
from lmsurgeon.lineage.cka import Grams, cka, hsic1
from lmsurgeon.lineage.naive import depth_map, monotone_map
from lmsurgeon.lineage.results import Null, TestResult
from lmsurgeon.lineage.verdict import verdict

rng = np.random.default_rng(0)
A = 1.0 + 0.1 * rng.standard_normal(200)
B = 1.0 + 0.1 * rng.standard_normal(200)


def test_cosine_pearson_spearman_match_numpy_and_scipy():
    assert stats.cosine(A, B) == pytest.approx(A @ B / np.sqrt(A @ A) / np.sqrt(B @ B), abs=1e-14)
    assert stats.pearson(A, B) == pytest.approx(np.corrcoef(A, B)[0, 1], abs=1e-12)
    ties = np.round(B, 1)
    assert stats.spearman(A, ties) == pytest.approx(sps.spearmanr(A, ties).statistic, abs=1e-12)


def test_raw_cosine_identity_of_spec_section_2():
    r = stats.pearson(A, B)
    sa, sb, ma, mb = A.std(), B.std(), A.mean(), B.mean()
    rhs = (r * sa * sb + ma * mb) / np.sqrt((sa**2 + ma**2) * (sb**2 + mb**2))
    assert stats.cosine(A, B) == pytest.approx(rhs, abs=1e-12)
    cva, cvb = sa / ma, sb / mb
    assert stats.cosine(A, B) == pytest.approx((1 + r * cva * cvb) / np.sqrt((1 + cva**2) * (1 + cvb**2)), abs=1e-12)


def test_shuffled_control_closed_form_matches_monte_carlo():
    sh = stats.shuffled_control(A, B, seed=1, n=2000)
    cva, cvb = A.std() / A.mean(), B.std() / B.mean()
    assert sh["expected"] == pytest.approx(1 / np.sqrt((1 + cva**2) * (1 + cvb**2)), abs=1e-12)
    assert sh["mean"] == pytest.approx(sh["expected"], abs=3 * sh["std"] / np.sqrt(2000) + 1e-9)


def test_constant_vectors_give_undefined_not_zero():
    c = np.ones(50)
    assert np.isnan(stats.pearson(c, B[:50]))
    assert np.isnan(stats.spearman(c, B[:50]))
    assert np.isnan(stats.cosine(np.zeros(5), np.ones(5)))
    assert np.isnan(stats.gain_summary(np.zeros(4))["cv"])


def test_symmetric_relative_l2():
    assert stats.rel_l2(A, B) == pytest.approx(2 * np.linalg.norm(A - B) / (np.linalg.norm(A) + np.linalg.norm(B)))
    assert stats.rel_l2(A, B) == stats.rel_l2(B, A)


def test_fisher_log_p_matches_chi2_where_finite_and_stays_finite_beyond():
    lps = np.log([0.03, 0.2, 0.5, 1e-4])
    ref = sps.chi2.logsf(-2 * lps.sum(), 2 * lps.size)
    assert stats.fisher_log_p(lps) == pytest.approx(ref, rel=1e-10)
    huge = [stats.log_p_from_z(40.0)] * 6  # chi2.logsf gives -inf here
    combined = stats.fisher_log_p(huge)
    assert np.isfinite(combined)
    assert combined < -4000


@pytest.mark.parametrize("z", [-2.0, 0.0, 1.5, 8.0, 38.0])
def test_z_and_log_p_round_trip_against_norm_isf(z):
    lp = stats.log_p_from_z(z)
    assert stats.z_from_log_p(lp) == pytest.approx(z, abs=1e-8)
    if z < 30:
        assert sps.norm.isf(np.exp(lp)) == pytest.approx(z, abs=1e-6)
    assert stats.neg_log10_p(lp) == pytest.approx(-sps.norm.logsf(z) / np.log(10))


def _hsic_direct(K, L):
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (
        np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ K @ L @ one
    ) / (n * (n - 3))


def test_unbiased_hsic_without_gram_matrices_matches_direct_gram_code():
    X, Y = rng.standard_normal((30, 7)), rng.standard_normal((30, 11))
    assert hsic1(Grams(X), Grams(Y)) == pytest.approx(_hsic_direct(X @ X.T, Y @ Y.T), abs=1e-10)
    ref = _hsic_direct(X @ X.T, Y @ Y.T) / np.sqrt(_hsic_direct(X @ X.T, X @ X.T) * _hsic_direct(Y @ Y.T, Y @ Y.T))
    assert cka(X, Y) == pytest.approx(ref, abs=1e-10)


def test_cka_is_one_under_orthogonal_feature_maps():
    X = rng.standard_normal((40, 12))
    assert cka(X, X @ ortho_group.rvs(12, random_state=3)) == pytest.approx(1.0, abs=1e-10)


def test_planted_permutation_and_signs_are_recovered():
    E_A = rng.standard_normal((500, 24))
    perm, s = rng.permutation(24), rng.choice([-1.0, 1.0], 24)
    E_B = E_A[:, perm] * s + 0.01 * rng.standard_normal((500, 24))
    al = align_residual(E_A, E_B)
    np.testing.assert_array_equal(al.perm, perm)
    np.testing.assert_array_equal(al.sign, s)


def test_tokens_are_canonicalised_across_conventions():
    assert canonical_token("Ġthe", False) == canonical_token("▁the", False) == canonical_token("the", True)
    assert canonical_token("##ing", True) == canonical_token("ing", False)
    assert canonical_token("<0x41>", False) == "A"
    assert canonical_token("[CLS]", True) is None
    assert canonical_token("<s>", False) is None


def test_relative_depth_pairs_nearest_t_and_monotone_map_maximises_sum():
    assert depth_map(3, 5) == [(0, 0), (1, 2), (2, 4)]
    assert depth_map(4, 4) == [(i, i) for i in range(4)]
    R = np.array([[0.9, 0.1, 0.0, 0.0], [0.0, 0.0, 0.2, 0.8]])
    assert monotone_map(R) == [(0, 0), (1, 3)]
    assert monotone_map(R.T) == [(0, 0), (3, 1)]


def _applies(name: str, z: float, **kw) -> TestResult:
    return TestResult(name, applies=True, z=z, **kw)


@pytest.mark.parametrize(
    "zs,want",
    [
        ((13.0, 6.0), "derived"),
        ((1.0, -0.5), "independent"),
        ((6.0, 1.0), "inconclusive"),
        ((4.0, 4.0), "inconclusive"),
    ],
)
def test_verdict_thresholds(zs, want):
    tests = [_applies(n, z) for n, z in zip(("awm", "phi_u"), zs, strict=True)]
    assert verdict(tests).label == want


def test_verdict_without_applicable_tests_is_inconclusive_and_naive_never_counts():
    v = verdict([TestResult.not_applicable("awm", "only 3 shared tokens"), _applies("act_cka", 50.0)])
    assert v.label == "inconclusive"
    assert "awm: only 3 shared tokens" in v.reasons


def _mlp_outputs(seed: int, n_items: int = 400, d: int = 24, m: int = 64):
    """Gate and up outputs of a random gated MLP on random inputs: [n_items, m] each."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((n_items, d))
    return x @ g.standard_normal((m, d)).T, x @ g.standard_normal((m, d)).T, x


def test_phi_match_recovers_a_planted_unit_permutation_and_its_analytic_z():
    from lmsurgeon.lineage.activations import match_rho

    gate, up, _ = _mlp_outputs(0)
    perm = np.random.default_rng(1).permutation(gate.shape[1])
    noise = np.random.default_rng(2).standard_normal(gate.shape) * 0.05
    rho, n = match_rho(gate, up, gate[:, perm] + noise, up[:, perm] + noise, None)
    assert rho == pytest.approx(1.0)
    assert n == 64
    assert stats.spearman_z(rho, n) == pytest.approx(np.sqrt(63))


def test_phi_match_of_unrelated_mlps_on_the_same_inputs_is_null():
    from lmsurgeon.lineage.activations import match_rho

    gate, up, x = _mlp_outputs(0)
    g = np.random.default_rng(7)
    gate_b, up_b = x @ g.standard_normal((80, 24)).T, x @ g.standard_normal((80, 24)).T  # other width too
    rho, n = match_rho(gate, up, gate_b, up_b, None)
    assert 32 < n <= 64  # B units matched in both views
    assert abs(stats.spearman_z(rho, n)) < 4


def test_phi_match_is_unchanged_by_a_rotation_of_the_inputs():
    """Outputs only see W x: rotating the residual basis (x → Qx, W → WQᵀ) leaves every activation, and ρ, alone."""
    from lmsurgeon.lineage.activations import match_rho

    gate, up, x = _mlp_outputs(3)
    g = np.random.default_rng(4)
    Wg, Wu = g.standard_normal((64, 24)), g.standard_normal((64, 24))
    Q = ortho_group.rvs(24, random_state=5)
    base = match_rho(gate, up, x @ Wg.T, x @ Wu.T, None)
    rotated = match_rho(gate, up, (x @ Q.T) @ (Wg @ Q.T).T, (x @ Q.T) @ (Wu @ Q.T).T, None)
    assert rotated[0] == pytest.approx(base[0], abs=1e-12)


@pytest.mark.parametrize("d_b", [24, 16])
def test_procrustes_alignment_recovers_a_planted_rotation_same_and_narrower_width(d_b):
    from lmsurgeon.lineage.align import align_rotation

    E_A = np.random.default_rng(0).standard_normal((500, 24)) + 3.0  # offset: centring must handle it
    R = ortho_group.rvs(24, random_state=1)[:, :d_b]
    al = align_rotation(E_A, E_A @ R)
    np.testing.assert_allclose(al.rotation, R, atol=1e-10)
    assert al.mean_abs_corr == pytest.approx(1.0)
    assert al.method == "procrustes"
    W = np.random.default_rng(2).standard_normal((7, 24))  # a reader of A's residual stream
    np.testing.assert_allclose(al.a_in(W), W @ R, atol=1e-12)


def test_awm_z_is_against_independents_unless_the_wrong_layer_guard_is_not_cleared():
    from lmsurgeon.lineage.awm import guarded_z

    independents = Null("independents", 0.1, 0.025, 10)
    guard = Null("wrong layer maps", 0.3, 0.1, 200)
    z, null = guarded_z(0.99, independents, guard)  # clears the guard by 6.9σ: independents' z
    assert null is independents
    assert z == pytest.approx((0.99 - 0.1) / 0.025)
    z, null = guarded_z(0.35, independents, guard)  # far above independents, not above other layers
    assert null is guard
    assert z == pytest.approx(0.5)
    z, null = guarded_z(0.05, independents, guard)  # below both: the lower z either way
    assert z == pytest.approx(min((0.05 - 0.1) / 0.025, (0.05 - 0.3) / 0.1))
    assert guarded_z(0.99, None, guard)[1] is guard


def test_rotation_hint_only_when_activations_match_and_weights_were_aligned_by_permutation():
    tests = [_applies("awm", 0.5, align="permutation"), _applies("phi_match", 20.0)]
    v = verdict(tests)
    assert v.label == "inconclusive"
    assert "--align procrustes" in v.reasons[-1]
    tests[0].align = "procrustes"
    assert not any("--align" in r for r in verdict(tests).reasons)


def _cka_direct(X, Y):
    K, L = X @ X.T, Y @ Y.T
    return _hsic_direct(K, L) / np.sqrt(_hsic_direct(K, K) * _hsic_direct(L, L))


def test_layer_cka_matrix_is_the_mean_over_views_of_direct_gram_cka_and_maps_the_best_layers():
    from lmsurgeon.lineage.cka import cka_matrix, layer_map, matched_mean

    g = np.random.default_rng(8)
    A = {v: [g.standard_normal((20, 6)) for _ in range(3)] for v in ("q", "k")}
    B = {v: [A[v][2] + 0.05 * g.standard_normal((20, 6)), g.standard_normal((20, 6))] for v in ("q", "k")}
    M = cka_matrix({v: [Grams(x) for x in A[v]] for v in A}, {v: [Grams(x) for x in B[v]] for v in B})
    ref = np.array([[np.mean([_cka_direct(A[v][i], B[v][j]) for v in ("q", "k")]) for j in range(2)] for i in range(3)])
    np.testing.assert_allclose(M, ref, atol=1e-10)
    pairs = layer_map(M)
    assert (2, 0) in pairs  # B's layer 0 is A's layer 2, perturbed
    assert matched_mean(M, pairs) == pytest.approx(np.mean([M[i, j] for i, j in pairs]))


def test_phi_u_layer_rho_recovers_a_planted_unit_permutation_of_the_mlp_weights():
    from lmsurgeon.lineage.align import Alignment
    from lmsurgeon.lineage.phi_u import layer_rho

    g = np.random.default_rng(9)
    d, m = 16, 48
    up, down = g.standard_normal((m, d)), g.standard_normal((d, m))  # [units, d], [d, units]
    perm = g.permutation(m)
    identity = Alignment(np.arange(d), np.ones(d), 1.0, 0)
    rho, n = layer_rho(up, down, up[perm] * 3.0, down[:, perm], identity, None)  # a global scale: same units
    assert rho == pytest.approx(1.0)
    assert n == m
    rho_ind, n_ind = layer_rho(up, down, g.standard_normal((m, d)), g.standard_normal((d, m)), identity, None)
    assert abs(stats.spearman_z(rho_ind, n_ind)) < 4


def test_one_evaded_test_cannot_turn_a_strongly_derived_pair_independent():
    """Per-head maps defeat awm at no cost: the others still decide, and the verdict says what was evaded."""
    tests = [_applies("awm", 0.4), _applies("phi_u", 20.0), _applies("circuits", 30.0), _applies("phi_match", 25.0)]
    v = verdict(tests)
    assert v.label == "derived"
    assert v.evaded == ["awm"]
    assert (v.decisive_test, v.decisive_z) == ("phi_match", 25.0)
    assert (v.strongest_test, v.strongest_z) == ("circuits", 30.0)
    assert any(s.startswith("per-head maps") for s in v.suggested)


def test_one_positive_test_alone_never_decides():
    """A single high z with no second test at T_lo: inconclusive, never derived; below T_hi: independent."""
    lone = verdict([_applies("awm", 8.3), _applies("phi_u", -0.1), _applies("circuits", 0.5)])
    assert lone.label == "inconclusive"
    assert (lone.decisive_test, lone.decisive_z) == ("circuits", 0.5)
    weak = verdict([_applies("awm", 4.0), _applies("phi_u", -0.1), _applies("circuits", 0.5)])
    assert weak.label == "independent"
    assert verdict([_applies("circuits", 6.0)]).label == "derived"  # the only applicable test decides alone


def test_rotation_is_suggested_from_the_automatic_alignment_evidence():
    from lmsurgeon.lineage.results import AlignmentFacts

    facts = AlignmentFacts("procrustes", False, 4000, 0.99, "auto", {"chosen": "procrustes", "margin_z": 40.0})
    v = verdict([_applies("awm", 30.0), _applies("circuits", 30.0)], facts)
    assert v.label == "derived"
    assert v.suggested[0].startswith("rotation") and "40.0" in v.suggested[0]
    unrotated = AlignmentFacts("permutation", False, 4000, 0.99, "auto", {"chosen": "permutation", "margin_z": -9})
    assert verdict([_applies("awm", 30.0), _applies("circuits", 30.0)], unrotated).suggested == []


def test_rotation_is_suggested_only_when_the_weights_were_compared_and_failed():
    from lmsurgeon.lineage.results import AlignmentFacts

    facts = AlignmentFacts("permutation", False, 4000, 0.99, "auto", {"chosen": "permutation", "margin_z": -9})
    rotated = verdict([_applies("phi_match", 20.0), _applies("awm", 0.5), _applies("phi_u", 1.0)], facts)
    assert rotated.suggested and rotated.suggested[0].startswith("rotation")
    assert verdict([_applies("phi_match", 20.0)], facts).suggested == []  # no weight test run: nothing evaded


def test_paired_column_cosines_is_the_diagonal_of_the_full_matrix():
    """Against float64 numpy: Pearson of each column pair, computed directly."""
    from lmsurgeon.lineage.align import column_cosines, paired_column_cosines

    rng = np.random.default_rng(3)
    A = rng.standard_normal((300, 24)) + 5.0
    B = 0.7 * A + rng.standard_normal((300, 24))
    expected = [np.corrcoef(A[:, j], B[:, j])[0, 1] for j in range(24)]
    np.testing.assert_allclose(paired_column_cosines(A, B), expected, rtol=1e-12)
    np.testing.assert_allclose(paired_column_cosines(A, B), np.diag(column_cosines(A, B)), rtol=1e-12)
