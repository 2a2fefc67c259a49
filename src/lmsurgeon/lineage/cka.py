"""Unbiased linear CKA (methods.md §L7.2.1) from feature matrices or from n×n Gram matrices, whichever side is
cheaper (methods.md §L7.2.3), and the layer comparison built on it: a layer×layer CKA matrix, the layer map it
gives, and its item-permutation null.

Items are rows: X is [n, p], Y is [n, q]; K = XXᵀ, L = YYᵀ with zeroed diagonals K̃, L̃.
HSIC₁(K,L) = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − (2/(n−2))·1ᵀK̃L̃1] / (n(n−3)).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from lmsurgeon.lineage.results import LayerMap, Null


class Grams:
    """The pieces of K̃ one HSIC needs, precomputed once per matrix (a layer is compared with many).

    The cheaper side is kept: with fewer items than features (awm on a wide model: 1024 sampled residual
    dimensions against 12,288 query rows) the n×n matrix K̃ itself (one product XXᵀ per layer, then O(n²) per
    comparison); otherwise the features X (tr(K̃L̃) through XᵀY, O(n·p·q) per comparison, never forming n×n).
    A float32 X stays float32 for its product (the budgeted weight tests read float32); every sum is float64.
    """

    def __init__(self, X: np.ndarray):
        X = np.asarray(X)
        self.n, p = X.shape
        if self.n <= p:
            K = X @ X.T if X.dtype == np.float32 else X.astype(np.float64) @ X.T.astype(np.float64)
            self.diag = np.diag(K).astype(np.float64)  # K_ii
            np.fill_diagonal(K, 0.0)
            self.K: np.ndarray | None = K
            self.X: np.ndarray | None = None
            self.row_sums = K.sum(axis=1, dtype=np.float64)  # K̃1, [n]
        else:
            self.X = X.astype(np.float64)
            self.K = None
            self.diag = np.einsum("ij,ij->i", self.X, self.X)
            self.row_sums = self.X @ self.X.sum(axis=0) - self.diag
        self.total = float(self.row_sums.sum())  # 1ᵀK̃1
        self.self_hsic = hsic1(self, self)

    def permuted(self, p: np.ndarray) -> Grams:
        """The same matrix with its items reordered by ``p`` (the item-permutation null): HSIC(K,K) is
        invariant, and on the n×n side the permutation is K̃[p][:, p], no new product."""
        if self.X is not None:
            return Grams(self.X[p])
        out = object.__new__(Grams)
        assert self.K is not None
        out.n, out.X, out.K = self.n, None, self.K[np.ix_(p, p)]
        out.diag, out.row_sums, out.total, out.self_hsic = self.diag[p], self.row_sums[p], self.total, self.self_hsic
        return out

    def gram(self) -> np.ndarray:
        """K̃ (zero diagonal), formed from X when this side keeps features."""
        if self.K is not None:
            return self.K
        assert self.X is not None
        K = self.X @ self.X.T
        np.fill_diagonal(K, 0.0)
        return K


def hsic1(A: Grams, B: Grams) -> float:
    """Unbiased HSIC estimator of Song et al. (2012); tr(K̃L̃) as Σ K̃∘L̃ on the n×n side, else as
    ‖XᵀY‖²_F − Σ K_ii L_ii."""
    n = A.n
    if n < 4 or B.n != n:
        return float("nan")
    if A.X is not None and B.X is not None:
        cross = A.X.T @ B.X
        tr = float(np.sum(cross * cross) - A.diag @ B.diag)
    else:
        tr = float(np.einsum("ij,ij->", A.gram(), B.gram(), dtype=np.float64))
    return (tr + A.total * B.total / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(A.row_sums @ B.row_sums)) / (
        n * (n - 3)
    )


def cka(X, Y) -> float:
    """CKA = HSIC₁(K,L)/√(HSIC₁(K,K)·HSIC₁(L,L)); nan when either self-term is not positive."""
    return cka_grams(Grams(X), Grams(Y))


def cka_grams(A: Grams, B: Grams) -> float:
    """:func:`cka` of two precomputed matrices."""
    den = A.self_hsic * B.self_hsic
    return float(hsic1(A, B) / np.sqrt(den)) if den > 0 else float("nan")


# -- layers ------------------------------------------------------------------------------------------------
# A model's layers are given per view (awm: "q" and "k" weights; act_cka: one view, the hidden states) as
# ``{view: [Grams of layer 0, Grams of layer 1, ...]}``; the CKA of two layers is the mean over the views.


def layer_cka(GA: dict[str, list[Grams]], GB: dict[str, list[Grams]], i: int, j: int) -> float:
    """Mean over the views of CKA(layer i of A, layer j of B)."""
    return float(np.mean([cka_grams(GA[v][i], GB[v][j]) for v in GA]))


def cka_matrix(GA: dict[str, list[Grams]], GB: dict[str, list[Grams]]) -> np.ndarray:
    """M[i, j] = :func:`layer_cka` (i, j) for every layer i of A and j of B, [L_A, L_B]."""
    view = next(iter(GA))
    return np.array([[layer_cka(GA, GB, i, j) for j in range(len(GB[view]))] for i in range(len(GA[view]))])


def layer_map(M: np.ndarray) -> LayerMap:
    """Assignment maximising Σ M over matched layers: the shallower model's layers into the deeper one's,
    as (layer of A, layer of B) sorted by A's layer."""
    rows, cols = linear_sum_assignment(np.nan_to_num(M, nan=-1.0), maximize=True)
    return sorted(zip(rows.tolist(), cols.tolist(), strict=True))


def matched_mean(M: np.ndarray, pairs: LayerMap) -> float:
    """The statistic of a layer comparison: mean M over the matched layer pairs."""
    return float(np.mean([M[i, j] for i, j in pairs]))


def item_permutation_null(
    GA: dict[str, list[Grams]], GB: dict[str, list[Grams]], pairs: LayerMap, seed: int, n: int, items: str
) -> Null:
    """:func:`matched_mean` with B's items randomly permuted (``n`` seeded draws): the chance level of items
    that do not correspond. ``items`` names them for the null's source."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        p = rng.permutation(next(iter(GA.values()))[0].n)
        vals.append(np.mean([np.mean([cka_grams(GA[v][i], GB[v][j].permuted(p)) for v in GA]) for i, j in pairs]))
    return Null.of(vals, f"{n} random {items} permutations")
