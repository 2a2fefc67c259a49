"""OMP finds an exact sparse code and agrees with a brute-force reference; it works across widths."""

import numpy as np

from lmsurgeon.merge.omp import omp, omp_rows


def test_omp_recovers_an_exact_sparse_code():
    rng = np.random.default_rng(0)
    D = rng.normal(size=(40, 100))
    w_true = np.zeros(100)
    w_true[[3, 17, 58]] = [1.5, -2.0, 0.7]
    support, w = omp(D, D @ w_true, k=64)
    assert sorted(support.tolist()) == [3, 17, 58]
    np.testing.assert_allclose(dict(zip(support.tolist(), w, strict=True))[17], -2.0, rtol=1e-10)


def test_omp_two_atoms_match_the_best_greedy_pair_by_brute_force():
    """With k=2 the second atom minimises the least-squares residual given the first (OMP's definition)."""
    rng = np.random.default_rng(1)
    D = rng.normal(size=(12, 30))
    v = rng.normal(size=12)
    support, w = omp(D, v, k=2)
    first = int(np.argmax(np.abs(D.T @ v) / np.linalg.norm(D, axis=0)))
    assert support[0] == first
    res = {
        j: np.linalg.norm(v - D[:, [first, j]] @ np.linalg.lstsq(D[:, [first, j]], v, rcond=None)[0])
        for j in range(30)
        if j != first
    }
    # OMP picks the atom most correlated with the residual; its refit residual is within the brute-force set
    r1 = v - D[:, [first]] @ np.linalg.lstsq(D[:, [first]], v, rcond=None)[0]
    second = max((j for j in range(30) if j != first), key=lambda j: abs(D[:, j] @ r1) / np.linalg.norm(D[:, j]))
    assert support[1] == second
    np.testing.assert_allclose(np.linalg.norm(v - D[:, support] @ w), res[second], rtol=1e-10)


def test_omp_rows_map_across_widths():
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(80, 16)), rng.normal(size=(80, 24))
    w = np.zeros(80)
    w[[1, 9]] = [0.5, 2.0]
    out = omp_rows(X, Y, (w @ X)[None], k=64)
    np.testing.assert_allclose(out[0], w @ Y, atol=1e-9)


def test_omp_rows_join_the_pool_of_a_real_merge(merge_pair):
    from lmsurgeon.merge import MergeSession

    s = MergeSession(
        str(merge_pair["llama"]), str(merge_pair["gpt2"]), merge_pair["texts"][:8], init_nonshared="omp", omp_k=8
    )
    assert len(s.omp["ids"]) > 0
    assert len(s.stage_a.idx) == len(s.shared.base_ids) + len(s.omp["ids"])
    assert len(s.stage_b.idx) == len(s.stage_a.idx)
    st = s.trial({"target_emb_frac": 1.0, "min_tau_emb": -1.0})
    assert st["stage_a"]["rows"] == len(s.stage_a.idx)


def test_omp_rows_equal_one_omp_per_row_with_float32_targets():
    """omp_rows codes every row over the same atoms (norms and float64 targets computed once): each row must be
    the single-vector OMP's combination of the targets, in float64."""
    rng = np.random.default_rng(5)
    X, Y = rng.normal(size=(60, 12)), rng.normal(size=(60, 20)).astype(np.float32)
    V = rng.normal(size=(7, 12))
    out = omp_rows(X, Y, V, k=5)
    for v, row in zip(V, out, strict=True):
        support, w = omp(X.T, v, 5)
        np.testing.assert_allclose(row, w @ Y.astype(np.float64)[support], rtol=1e-12, atol=1e-12)
