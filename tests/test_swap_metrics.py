"""Trans, Dep, r, δ' against explicit float64 compositions; disjoint-subspace layers give Dep = δ' = 0."""

import numpy as np

from lmsurgeon.swap.metrics import context_mix, delta_linear, dep, fit_A, r_metric, trans


def test_delta_linear_commutator_equals_explicit_composition():
    rng = np.random.default_rng(0)
    X, Ai, Aj = rng.normal(size=(20, 6)), rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    L = lambda x, A: x + x @ A  # noqa: E731
    ref = np.mean(np.linalg.norm(L(L(X, Ai), Aj) - L(L(X, Aj), Ai), axis=1) / np.linalg.norm(X, axis=1))
    assert abs(delta_linear(X, Ai, Aj) - ref) < 1e-10


def test_trans_dep_r_match_numpy_definitions():
    rng = np.random.default_rng(1)
    Ai, Aj = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s = lambda M: np.linalg.svd(M, compute_uv=False)[0]  # noqa: E731
    t_i, t_j = np.sqrt((Ai ** 2).sum() / 5), np.sqrt((Aj ** 2).sum() / 5)
    d_ij, d_ji = s(Ai @ Aj) / (s(Ai) * s(Aj)), s(Aj @ Ai) / (s(Ai) * s(Aj))
    assert abs(trans(Ai) - t_i) < 1e-10 and abs(dep(Ai, Aj) - d_ij) < 1e-10
    assert abs(r_metric(Ai, Aj) - t_i * t_j * (d_ij + d_ji)) < 1e-10
    assert trans(np.zeros((5, 5))) == 0 and r_metric(np.zeros((5, 5)), Aj) == 0


def test_disjoint_subspace_layers_have_zero_dep_and_zero_delta_linear():
    rng = np.random.default_rng(2)
    Ai, Aj = np.zeros((6, 6)), np.zeros((6, 6))
    Ai[:3, :3], Aj[3:, 3:] = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    X = rng.normal(size=(30, 6))
    assert dep(Ai, Aj) == 0 and dep(Aj, Ai) == 0 and r_metric(Ai, Aj) == 0
    assert delta_linear(X, Ai, Aj) == 0


def test_least_squares_recovers_planted_A_from_context_mixed_input():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 8))
    A = rng.normal(size=(8, 8))
    Xh = context_mix(X)
    assert np.allclose(Xh[0], X[0]) and np.allclose(Xh[5], X[2:6].mean(0))
    Y = Xh @ A
    assert np.allclose(fit_A(Xh.T @ Xh, Xh.T @ Y, ridge=0.0), A, atol=1e-8)


def test_block_influence_and_angular_distance_on_known_vectors():
    from lmsurgeon.swap.metrics import angular_distance, block_influence

    X = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert abs(block_influence(X, X)) < 1e-12
    assert abs(block_influence(X, np.array([[0.0, 1.0], [0.0, 5.0]])) - 0.5) < 1e-12
    assert abs(angular_distance(np.array([1.0, 0.0]), np.array([0.0, 3.0])) - 0.5) < 1e-12
    assert abs(angular_distance(np.array([1.0, 1.0]), np.array([-2.0, -2.0])) - 1.0) < 1e-12


def test_trans_dep_r_match_numpy_on_rank_deficient_and_zero_matrices():
    from lmsurgeon.swap.run import assemble  # noqa: F401  (import check: the pair table uses these functions)

    rng = np.random.default_rng(4)
    U = rng.normal(size=(6, 2))
    Ai, Aj = U @ rng.normal(size=(2, 6)), rng.normal(size=(6, 1)) @ rng.normal(size=(1, 6))
    s = lambda M: np.linalg.svd(M, compute_uv=False)[0]  # noqa: E731
    assert abs(dep(Ai, Aj) - s(Ai @ Aj) / (s(Ai) * s(Aj))) < 1e-10
    assert abs(trans(Ai) - np.sqrt(np.trace(Ai.T @ Ai) / 6)) < 1e-10
    Z = np.zeros((6, 6))
    assert dep(Z, Aj) == 0 and dep(Aj, Z) == 0 and r_metric(Z, Z) == 0
    assert dep(Ai * 1e-20, Aj, floor=1e-12 * s(Aj)) == 0  # below the floor: Dep := 0 (spec §5.2)


def test_context_mix_batch_equals_row_reference_and_padding_never_enters():
    import torch

    from lmsurgeon.swap.metrics import context_mix_batch

    rng = np.random.default_rng(5)
    X = rng.normal(size=(2, 9, 4))
    X[1, 6:] = 1e6  # padding after 6 real tokens
    out = context_mix_batch(torch.from_numpy(X)).numpy()
    assert np.allclose(out[0], context_mix(X[0]), atol=1e-12)
    assert np.allclose(out[1, :6], context_mix(X[1, :6]), atol=1e-12)
    assert np.allclose(out[1, 0], X[1, 0]) and np.allclose(out[1, 2], X[1, :3].mean(0))


def test_padded_batch_gives_the_same_normal_sums_as_unpadded_rows():
    import torch

    from lmsurgeon.swap.linear import accumulate, new_sums

    rng = np.random.default_rng(6)
    rows = [rng.normal(size=(7, 3)), rng.normal(size=(4, 3))]
    nxt = [r + np.tanh(r) for r in rows]
    h0 = torch.zeros(2, 7, 3, dtype=torch.float64)
    h1 = torch.zeros(2, 7, 3, dtype=torch.float64)
    sel = torch.zeros(2, 7, dtype=torch.bool)
    for k, (r, n) in enumerate(zip(rows, nxt, strict=True)):
        h0[k, :len(r)], h1[k, :len(r)], sel[k, :len(r)] = torch.from_numpy(r), torch.from_numpy(n), True
    h0[1, 4:], h1[1, 4:] = 99.0, -99.0
    padded = new_sums(1, 3, "cpu")
    accumulate(padded, [h0, h1], sel, 4)
    G = sum(context_mix(r).T @ context_mix(r) for r in rows)
    C = sum(context_mix(r).T @ (n - r) for r, n in zip(rows, nxt, strict=True))
    assert np.allclose(padded[0].G.numpy(), G, atol=1e-12) and np.allclose(padded[0].C.numpy(), C, atol=1e-12)
    assert padded[0].n == 11


def test_normal_equations_with_small_ridge_match_lstsq_and_r2_from_sums_matches_direct():
    from lmsurgeon.swap.metrics import fit_residual, r_squared

    rng = np.random.default_rng(7)
    X = rng.normal(size=(300, 6))
    Y = X @ rng.normal(size=(6, 6)) + 0.3 * rng.normal(size=(300, 6))
    G, C = X.T @ X, X.T @ Y
    A = fit_A(G, C, ridge=1e-9)
    assert np.allclose(A, np.linalg.lstsq(X, Y, rcond=None)[0], atol=1e-7)
    direct = 1 - ((X @ A - Y) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum()
    assert abs(r_squared(fit_residual(A, G, C, (Y * Y).sum()), (Y * Y).sum(), Y.sum(0), 300) - direct) < 1e-10


def test_spearman_bootstrap_matches_scipy_per_resample_and_counts_degenerate():
    from scipy.stats import spearmanr

    from lmsurgeon.swap.stats import _rowwise_spearman, spearman_ci

    rng = np.random.default_rng(8)
    X, Y = rng.integers(0, 4, size=(50, 8)).astype(float), rng.normal(size=(50, 8))
    got = _rowwise_spearman(X, Y)
    for k in range(50):
        ref = spearmanr(X[k], Y[k]).statistic if np.ptp(X[k]) > 0 else np.nan
        assert (np.isnan(got[k]) and np.isnan(ref)) or abs(got[k] - ref) < 1e-12
    x = np.arange(3.0)  # 1 in 9 resamples repeats one pair only: ρ undefined, dropped and counted
    res = spearman_ci(x, x ** 3, n_boot=900, seed=0)
    assert abs(res["rho"] - 1) < 1e-12 and np.allclose(res["ci"], [1.0, 1.0]) and 60 < res["n_degenerate"] < 150
    assert spearman_ci([1, None, 3, 4], [2, 5, float("nan"), 1], n_boot=10)["n"] == 2
