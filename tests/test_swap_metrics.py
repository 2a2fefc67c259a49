"""The equation functions the analysis runs (Trans, Dep, r, δ', BI, angular distance, X̂, the fit) against
float64 numpy references written independently here; and the eval pass's streamed means against the same
references computed on all tokens at once."""

import numpy as np
import pytest
import torch

from lmsurgeon.swap.engine import Batch, eval_pass, finish
from lmsurgeon.swap.linear import LinearFit
from lmsurgeon.swap.metrics import (
    angle_per_row,
    angular_distance,
    block_influence,
    context_mix_batch,
    cosine_per_token,
    delta_linear,
    delta_linear_per_token,
    dep,
    fit_A,
    r_metric,
    trans,
)
from tests.swap_models import ToyModel


def ref_context_mix(X: np.ndarray, window: int = 4) -> np.ndarray:
    """X̂_t = mean of X_{t−window+1…t} clipped at the row start, by an explicit loop; X: [T, d] one row."""
    return np.stack([X[max(0, t - window + 1) : t + 1].mean(0) for t in range(X.shape[0])])


def ref_spectral(M: np.ndarray) -> float:
    return float(np.linalg.svd(M, compute_uv=False)[0])


def ref_trans(A: np.ndarray) -> float:
    return float(np.sqrt((A**2).sum() / A.shape[0]))


def ref_dep(Ai: np.ndarray, Aj: np.ndarray) -> float:
    return ref_spectral(Ai @ Aj) / (ref_spectral(Ai) * ref_spectral(Aj))


def ref_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([x @ y / np.sqrt((x @ x) * (y @ y)) for x, y in zip(a, b, strict=True)])


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x)


def test_delta_linear_equals_explicit_composition_of_the_linear_layers():
    rng = np.random.default_rng(0)
    X, Ai, Aj = rng.normal(size=(20, 6)), rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    L = lambda x, A: x + x @ A  # noqa: E731  L'(x) = x + xA (eq. 15)
    per_token = np.linalg.norm(L(L(X, Ai), Aj) - L(L(X, Aj), Ai), axis=1) / np.linalg.norm(X, axis=1)
    got = delta_linear_per_token(_t(X), _t(Ai), _t(Aj)).numpy()
    assert np.allclose(got, per_token, rtol=1e-10, atol=0)
    assert abs(delta_linear(_t(X), _t(Ai), _t(Aj)) - per_token.mean()) < 1e-10


def test_trans_dep_r_match_numpy_definitions():
    rng = np.random.default_rng(1)
    Ai, Aj = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    assert abs(trans(Ai) - ref_trans(Ai)) < 1e-10
    assert abs(dep(Ai, Aj) - ref_dep(Ai, Aj)) < 1e-10
    assert abs(dep(Aj, Ai) - ref_dep(Aj, Ai)) < 1e-10
    expected_r = ref_trans(Ai) * ref_trans(Aj) * (ref_dep(Ai, Aj) + ref_dep(Aj, Ai))
    assert abs(r_metric(Ai, Aj) - expected_r) < 1e-10
    norms = (float(np.linalg.norm(Ai, 2)), float(np.linalg.norm(Aj, 2)))  # given by the caller: the same Dep
    assert abs(dep(Ai, Aj, 0.0, norms) - ref_dep(Ai, Aj)) < 1e-10
    assert abs(dep(Aj, Ai, 0.0, norms[::-1]) - ref_dep(Aj, Ai)) < 1e-10


def test_zero_update_has_zero_trans_and_zero_r():
    Aj = np.random.default_rng(1).normal(size=(5, 5))
    assert trans(np.zeros((5, 5))) == 0.0
    assert r_metric(np.zeros((5, 5)), Aj) == 0.0


def test_disjoint_subspace_layers_have_zero_dep_and_zero_delta_linear():
    rng = np.random.default_rng(2)
    Ai, Aj = np.zeros((6, 6)), np.zeros((6, 6))
    Ai[:3, :3], Aj[3:, 3:] = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    X = rng.normal(size=(30, 6))
    assert dep(Ai, Aj) == 0.0
    assert dep(Aj, Ai) == 0.0
    assert r_metric(Ai, Aj) == 0.0
    assert delta_linear(_t(X), _t(Ai), _t(Aj)) == 0.0


def test_least_squares_recovers_planted_A_from_context_mixed_input():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 8))
    A = rng.normal(size=(8, 8))
    Xh = context_mix_batch(_t(X)[None])[0].numpy()
    Y = Xh @ A
    assert np.allclose(fit_A(Xh.T @ Xh, Xh.T @ Y, ridge=0.0), A, atol=1e-8)


def test_block_influence_and_angular_distance_on_known_vectors():
    X = _t(np.array([[1.0, 0.0], [0.0, 2.0]]))
    assert abs(block_influence(X, X)) < 1e-12  # an identity layer has no influence
    assert abs(block_influence(X, _t(np.array([[0.0, 1.0], [0.0, 5.0]]))) - 0.5) < 1e-12  # cos 0 and 1
    assert abs(angular_distance(_t(np.array([[1.0, 0.0]])), _t(np.array([[0.0, 3.0]]))) - 0.5) < 1e-12
    assert abs(angular_distance(_t(np.array([[1.0, 1.0]])), _t(np.array([[-2.0, -2.0]]))) - 1.0) < 1e-12


def test_cosine_and_angle_match_numpy_reference_including_nearly_parallel_rows():
    rng = np.random.default_rng(9)
    a = rng.normal(size=(40, 7))
    b = rng.normal(size=(40, 7))
    b[:10] = a[:10] + 1e-9 * rng.normal(size=(10, 7))  # nearly parallel
    assert np.allclose(cosine_per_token(_t(a), _t(b)).numpy(), ref_cos(a, b), rtol=0, atol=1e-14)
    u = a / np.linalg.norm(a, axis=1, keepdims=True)
    v = b / np.linalg.norm(b, axis=1, keepdims=True)
    chord = 2.0 * np.arcsin(np.linalg.norm(u - v, axis=1) / 2.0) / np.pi  # exact near 0, where arccos is not
    got = angle_per_row(_t(a), _t(b)).numpy()
    assert np.allclose(got[:10], chord[:10], rtol=1e-6, atol=0)  # arccos(u·v) would be off by 100 % here
    assert np.allclose(got[10:], np.arccos(ref_cos(a, b)[10:]) / np.pi, rtol=1e-12, atol=0)


def test_pair_table_of_the_analysis_matches_numpy_reference_on_random_rank_deficient_and_zero_matrices():
    from lmsurgeon.swap.run import assemble

    rng = np.random.default_rng(4)
    d = 6
    A = [
        rng.normal(size=(d, d)),
        rng.normal(size=(d, 2)) @ rng.normal(size=(2, d)),  # rank 2
        rng.normal(size=(d, 1)) @ rng.normal(size=(1, d)),  # rank 1
        np.zeros((d, d)),
    ]  # zero update: below the spectral-norm floor, Dep := 0
    L = len(A)
    fit = LinearFit(A=A, r2_fit=[1.0] * L, n_fit=1, ridge=0.0, window=4)
    ev = {
        "r2_eval": [1.0] * L,
        "bi": list(rng.uniform(size=L)),
        "ang1": [0.1] * L,
        "ang2": [0.1] * (L - 1),
        "delta": list(rng.uniform(size=L - 1)),
        "delta_linear": list(rng.uniform(size=L - 1)),
        "loss": None,
    }
    table = assemble(fit, ev, L, d, False, bootstrap=0, seed=0)
    for i, p in enumerate(table["pairs"]):
        ti, tj = ref_trans(A[i]), ref_trans(A[i + 1])
        zero = not A[i].any() or not A[i + 1].any()
        d_ij = 0.0 if zero else ref_dep(A[i], A[i + 1])
        d_ji = 0.0 if zero else ref_dep(A[i + 1], A[i])
        assert abs(p["trans_i"] - ti) < 1e-10
        assert abs(p["trans_j"] - tj) < 1e-10
        assert abs(p["dep_ij"] - d_ij) < 1e-10
        assert abs(p["dep_ji"] - d_ji) < 1e-10
        assert abs(p["r"] - ti * tj * (d_ij + d_ji)) < 1e-10
        assert p["dep_flagged"] == zero
        assert abs(p["bi"] - ev["bi"][i] * ev["bi"][i + 1]) < 1e-15


def test_dep_below_the_floor_is_zero():
    rng = np.random.default_rng(4)
    Ai, Aj = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    assert dep(Ai, Aj, floor=1e-12 * ref_spectral(Aj)) > 0.0
    assert dep(Ai * 1e-20, Aj, floor=1e-12 * ref_spectral(Aj)) == 0.0


def test_context_mix_batch_equals_row_reference_and_padding_never_enters():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(2, 9, 4))
    X[1, 6:] = 1e6  # padding after 6 real tokens
    out = context_mix_batch(_t(X)).numpy()
    assert np.allclose(out[0], ref_context_mix(X[0]), atol=1e-12)
    assert np.allclose(out[1, :6], ref_context_mix(X[1, :6]), atol=1e-12)


def test_padded_batch_gives_the_same_normal_sums_as_unpadded_rows():
    from lmsurgeon.swap.linear import accumulate, new_sums

    rng = np.random.default_rng(6)
    rows = [rng.normal(size=(7, 3)), rng.normal(size=(4, 3))]
    nxt = [r + np.tanh(r) for r in rows]
    h0 = torch.zeros(2, 7, 3, dtype=torch.float64)
    h1 = torch.zeros(2, 7, 3, dtype=torch.float64)
    sel = torch.zeros(2, 7, dtype=torch.bool)
    for k, (r, n) in enumerate(zip(rows, nxt, strict=True)):
        h0[k, : len(r)], h1[k, : len(r)], sel[k, : len(r)] = torch.from_numpy(r), torch.from_numpy(n), True
    h0[1, 4:], h1[1, 4:] = 99.0, -99.0
    padded = new_sums(1, 3, "cpu")
    accumulate(padded, [h0, h1], sel, 4)
    G = sum(ref_context_mix(r).T @ ref_context_mix(r) for r in rows)
    C = sum(ref_context_mix(r).T @ (n - r) for r, n in zip(rows, nxt, strict=True))
    assert np.allclose(padded[0].G.numpy(), G, atol=1e-12)
    assert np.allclose(padded[0].C.numpy(), C, atol=1e-12)
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


def test_the_fit_keeps_no_normal_sums_once_solved():
    """The d × d float64 sums (2 per layer: 11.5 GiB at 46 layers of width 4096) are freed after the solve;
    the fit keeps A_i, which still solves them."""
    import gc
    import weakref

    from lmsurgeon.swap.linear import accumulate, new_sums, solve

    rng = np.random.default_rng(3)
    h = [torch.from_numpy(rng.normal(size=(2, 9, 5))) for _ in range(4)]
    sums = new_sums(3, 5, "cpu")
    accumulate(sums, h, torch.ones(2, 9, dtype=torch.bool), window=2)
    expected = [fit_A(s.G.numpy(), s.C.numpy(), 1e-6) for s in sums]
    refs = [weakref.ref(m) for s in sums for m in (s.G, s.C)]
    fit = solve(sums, 1e-6, 2)
    del sums
    gc.collect()
    assert all(r() is None for r in refs)
    for got, want in zip(fit.A, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_spearman_bootstrap_matches_scipy_per_resample_and_counts_degenerate():
    from scipy.stats import spearmanr

    from lmsurgeon.swap.stats import _rowwise_spearman, spearman_ci

    rng = np.random.default_rng(8)
    X, Y = rng.integers(0, 4, size=(50, 8)).astype(float), rng.normal(size=(50, 8))
    got = _rowwise_spearman(X, Y)
    for k in range(50):
        if np.ptp(X[k]) == 0:
            assert np.isnan(got[k])
        else:
            assert abs(got[k] - spearmanr(X[k], Y[k]).statistic) < 1e-12
    x = np.arange(3.0)  # 1 in 9 resamples repeats one pair only: ρ undefined, dropped and counted
    res = spearman_ci(x, x**3, n_boot=900, seed=0)
    assert abs(res["rho"] - 1) < 1e-12
    assert np.allclose(res["ci"], [1.0, 1.0])
    assert 60 < res["n_degenerate"] < 150
    assert spearman_ci([1, None, 3, 4], [2, 5, float("nan"), 1], n_boot=10)["n"] == 2


def _toy_states(model: ToyModel, ids: torch.Tensor, n_real: list[int]) -> list[list[np.ndarray]]:
    """h[i] of every row (real tokens only) by numpy: x ↦ x + X̂(x)·M per layer, X̂ by the explicit loop."""
    E = model.embed.detach().numpy()
    states = []
    for row, n in zip(ids.numpy(), n_real, strict=True):
        x = E[row[:n]]
        hs = [x]
        for layer in model.layers:
            x = x + ref_context_mix(x) @ layer.M.numpy()
            hs.append(x)
        states.append(hs)
    return states


def test_eval_pass_streamed_bi_angular_and_delta_linear_equal_the_reference_on_all_tokens_at_once():
    g = torch.Generator().manual_seed(3)
    Ms = [0.4 * torch.randn(5, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    model = ToyModel(Ms)
    rng = np.random.default_rng(10)
    A = [rng.normal(size=(5, 5)) for _ in range(3)]
    batches, rows = [], []
    for seed, lengths in [(0, [9, 6]), (1, [7, 9, 4])]:
        ids = torch.randint(0, 50, (len(lengths), 9), generator=torch.Generator().manual_seed(seed))
        mask = (torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]).long()
        batches.append(Batch(ids, mask))
        rows += _toy_states(model, ids, lengths)
    fit = LinearFit(A=A, r2_fit=[0.0] * 3, n_fit=0, ridge=0.0, window=4)
    ev = finish(eval_pass(model, model.layers, ["layers"], batches, fit, None, 4, "cpu"), False)
    tokens = [np.concatenate([hs[i] for hs in rows]) for i in range(4)]  # every real token, layer by layer
    last = [np.stack([hs[i][-1] for hs in rows]) for i in range(4)]  # each row's last real token
    for i in range(3):
        assert abs(ev["bi"][i] - (1 - ref_cos(tokens[i], tokens[i + 1]).mean())) < 1e-12
        assert abs(ev["ang1"][i] - np.mean(np.arccos(ref_cos(last[i], last[i + 1])) / np.pi)) < 1e-10
    for i in range(2):
        assert abs(ev["ang2"][i] - np.mean(np.arccos(ref_cos(last[i], last[i + 2])) / np.pi)) < 1e-10
        Xhat = np.concatenate([ref_context_mix(hs[i]) for hs in rows])
        Lp = lambda x, M: x + x @ M  # noqa: E731
        diff = Lp(Lp(Xhat, A[i]), A[i + 1]) - Lp(Lp(Xhat, A[i + 1]), A[i])
        ref = np.mean(np.linalg.norm(diff, axis=1) / np.linalg.norm(Xhat, axis=1))
        assert abs(ev["delta_linear"][i] - ref) < 1e-10 * ref


def test_the_spectral_norm_of_wide_layers_and_of_their_product_matches_the_full_svd():
    """Past EXACT_NORM_WIDTH the norm comes from ARPACK's top singular value and ‖A B‖₂ from A(Bx): the same
    number as numpy's full SVD of the formed product, to 1e-10, including a pair with a near-tie at the top."""
    from lmsurgeon.swap.metrics import EXACT_NORM_WIDTH, spectral_norm

    d = EXACT_NORM_WIDTH + 88
    rng = np.random.default_rng(3)
    A, B = rng.normal(size=(d, d)) / np.sqrt(d), rng.normal(size=(d, d)) / np.sqrt(d)
    U, _, Vt = np.linalg.svd(rng.normal(size=(d, d)))
    tie = U @ np.diag(np.r_[2.0, 2.0 - 1e-6, np.linspace(1.0, 0.1, d - 2)]) @ Vt
    for M, N in ((A, None), (A, B), (tie, None), (tie, A)):
        want = np.linalg.norm(M if N is None else M @ N, 2)
        assert spectral_norm(M, N) == pytest.approx(want, rel=1e-10)
    exact = np.linalg.norm(A @ B, 2) / (np.linalg.norm(A, 2) * np.linalg.norm(B, 2))
    assert dep(A, B) == pytest.approx(exact, rel=1e-10)
