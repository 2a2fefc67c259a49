"""Procrustes + Umeyama recover a known map exactly; soft clip and the α schedule keep their promises."""

import numpy as np
import pytest
from scipy.stats import ortho_group

from lmsurgeon.merge.align import fit_alignment, soft_clip
from lmsurgeon.merge.blend import alpha_schedule, blend_rows, centred_cosine


def _known_map(n, d_D, d_B, seed=0):
    """Y = s (X − μ) R + ν with R semi-orthogonal (d_D × d_B); for d_D > d_B the extra donor directions are
    uncorrelated with the mapped ones (the one case where zero-padding's U Vᵀ would be exact too)."""
    rng = np.random.default_rng(seed)
    d = max(d_D, d_B)
    Q = ortho_group.rvs(d, random_state=seed)
    R = Q[:d_D, :d_B] if d_D <= d_B else Q[:d_B, :d_D].T  # RRᵀ = I or RᵀR = I
    X = rng.normal(size=(n, d_D)) * np.linspace(3, 1, d_D) + rng.normal(size=d_D)
    if d_D > d_B:  # keep only the component of X in span(R) correlated with Y; the rest orthogonal noise
        P = R @ R.T
        Xc = X - X.mean(0)
        Z = Xc @ (np.eye(d_D) - P)
        Z -= (Xc @ P) @ np.linalg.lstsq(Xc @ P, Z, rcond=None)[0]  # decorrelate the extra directions
        X = X.mean(0) + Xc @ P + Z
    s, nu = 1.7, rng.normal(size=d_B)
    Y = s * (X - X.mean(0)) @ R + nu
    return X, Y, R, s


@pytest.mark.parametrize("d_D,d_B", [(24, 24), (16, 32), (32, 16)])
def test_procrustes_and_umeyama_recover_known_rotation_and_scale(d_D, d_B):
    X, Y, R, s = _known_map(400, d_D, d_B)
    ali = fit_alignment(X, Y)
    assert ali.s == pytest.approx(s, rel=1e-10)
    np.testing.assert_allclose(ali.map(X), Y, atol=1e-9)
    np.testing.assert_allclose(ali.R @ ali.R.T if d_D <= d_B else ali.R.T @ ali.R, np.eye(min(d_D, d_B)), atol=1e-10)
    assert ali.residual < 1e-10


def test_alignment_into_a_wider_base_matches_an_independent_svd_reference():
    """d_D < d_B: R = U Vᵀ of X_cᵀ Y_c is the exact least-squares fit, s = tr(Σ)/‖X_c R‖²."""
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(200, 12)), rng.normal(size=(200, 20))
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    U, S, Vt = np.linalg.svd(Xc.T @ Yc, full_matrices=False)
    R = U @ Vt
    s = S.sum() / np.linalg.norm(Xc @ R) ** 2
    ali = fit_alignment(X, Y)
    np.testing.assert_allclose(ali.R, R, atol=1e-10)
    assert ali.s == pytest.approx(s, rel=1e-10)


def test_alignment_from_a_wider_donor_is_the_polar_factor_of_the_least_squares_map():
    """d_D > d_B: no closed form; R = polar(X_c⁺ Y_c) (see lmsurgeon.tokens.procrustes for why not zero-padding)."""
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(200, 20)), rng.normal(size=(200, 12))
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    U, _, Vt = np.linalg.svd(np.linalg.pinv(Xc) @ Yc, full_matrices=False)
    R = U @ Vt
    ali = fit_alignment(X, Y)
    np.testing.assert_allclose(ali.R, R, atol=1e-10)
    assert ali.s == pytest.approx(np.sum((Xc @ R) * Yc) / np.linalg.norm(Xc @ R) ** 2, rel=1e-10)


def test_soft_clip_is_identity_below_the_knee_and_bounded_above():
    rng = np.random.default_rng(1)
    Y = rng.normal(size=(50, 8))
    E = Y * np.linspace(0.5, 10, 50)[:, None]
    K_q = 1.0
    out = soft_clip(E, Y, K_q)
    n, k = np.linalg.norm(E, axis=1), np.maximum(np.linalg.norm(Y, axis=1), K_q)
    n_out = np.linalg.norm(out, axis=1)
    below = n <= k
    np.testing.assert_array_equal(out[below], E[below])
    assert np.all(n_out[~below] <= 1.25 * k[~below] * (1 + 1e-12))
    assert np.all(n_out[~below] > k[~below])
    np.testing.assert_allclose(centred_cosine(out, E, np.zeros(8)), 1.0)


def test_alpha_schedule_goes_from_floor_to_cap_over_the_selected_rows():
    c = np.array([0.9, 0.3, 0.7, 0.55, 0.8, 0.62])
    sched = alpha_schedule(c, k=4, min_tau=0.5, alpha_floor=0.05, alpha_cap=0.9, gamma=12.0)
    assert sched.rows.tolist() == [0, 2, 4, 5]
    a = dict(zip(sched.rows.tolist(), sched.alpha.tolist(), strict=True))
    assert a[5] == pytest.approx(0.05)
    assert a[0] == pytest.approx(0.9)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731 - the spec's σ, written out independently
    ref = 0.05 + 0.85 * (sig(12 * (0.7 - 0.62)) - 0.5) / (sig(12 * (0.9 - 0.62)) - 0.5)
    assert a[2] == pytest.approx(ref, rel=1e-12)


def test_blend_with_alpha_zero_or_identical_rows_changes_nothing():
    Y = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_array_equal(blend_rows(Y, Y, np.full(5, 0.7)), Y)
    np.testing.assert_array_equal(blend_rows(Y, Y * 3, np.zeros(5)), Y)


def test_a_stage_built_a_block_of_rows_at_a_time_keeps_one_mapped_copy_and_gives_the_direct_numbers():
    """The pool keeps the mapped rows (float32) and one soft-clip factor per row; blocks of 3 rows give what
    the float64 formulas give on the whole pool, for the clipped and unclipped rows and both cosines."""
    import torch

    from lmsurgeon.merge.run import _build_stage
    from lmsurgeon.merge.vocab import SharedVocab

    rng = np.random.default_rng(5)
    W = torch.from_numpy(rng.normal(size=(40, 12)).astype(np.float32))
    D = rng.normal(size=(30, 8))
    D[5:25] = W.numpy()[3:23] @ rng.normal(size=(12, 8)) * 0.5 + 0.1 * D[5:25]  # donor rows of the shared tokens
    D[[7, 10, 16]] *= 6.0  # outliers: mapped beyond the base's norms, so the clip acts on them
    D = D.astype(np.float32)
    shared = SharedVocab(list(range(3, 23)), list(range(5, 25)), {})
    omp = ([30, 31, 33], rng.normal(size=(3, 8)))
    st = _build_stage("A", W, D, shared, 0.99, omp, omp_k=4, chunk_rows=3)
    whole = _build_stage("A", W, D, shared, 0.99, omp, omp_k=4, chunk_rows=10**6)
    assert not hasattr(st, "E_tilde") and st.mapped.dtype == np.float32 and st.mapped.shape == (23, 12)
    rows = np.arange(23)
    for clip in (False, True):
        np.testing.assert_array_equal(st.E_rows(clip, rows), whole.E_rows(clip, rows))
        np.testing.assert_array_equal(st.cos[clip], whole.cos[clip])
    # the float64 reference: map, clip and compare the whole pool at once
    from lmsurgeon.merge.omp import omp_rows

    X, Y = D[5:25].astype(np.float64), W.numpy()[3:23].astype(np.float64)
    ali = fit_alignment(X, Y)
    pool = np.concatenate([ali.map(X), omp_rows(X, Y, omp[1], 4)])
    base = W.numpy()[st.idx.numpy()].astype(np.float64)
    K_q = float(np.quantile(np.linalg.norm(W.numpy().astype(np.float64), axis=1), 0.99))
    clipped = soft_clip(pool, base, K_q)
    assert (np.linalg.norm(clipped, axis=1) < np.linalg.norm(pool, axis=1) - 1e-9).any()
    np.testing.assert_allclose(st.E_rows(False, rows), pool, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st.E_rows(True, rows), clipped, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st.cos[True], centred_cosine(clipped, base, ali.mu_Y), atol=1e-5)
    np.testing.assert_array_equal(st.Y_rows(rows), base.astype(np.float32))
