"""Unbiased linear CKA (spec §7.2) from feature matrices, never forming the n×n Gram matrices.

Items are rows: X is [n, p], Y is [n, q]; K = XXᵀ, L = YYᵀ with zeroed diagonals K̃, L̃.
HSIC₁(K,L) = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − (2/(n−2))·1ᵀK̃L̃1] / (n(n−3)).
"""

from __future__ import annotations

import numpy as np


class Grams:
    """The pieces of K̃ one HSIC needs, precomputed once per matrix (a layer is compared with many)."""

    def __init__(self, X: np.ndarray):
        self.X = np.asarray(X, dtype=np.float64)
        self.n = self.X.shape[0]
        self.diag = np.einsum("ij,ij->i", self.X, self.X)            # K_ii
        self.row_sums = self.X @ self.X.sum(axis=0) - self.diag      # K̃1, [n]
        self.total = float(self.row_sums.sum())                      # 1ᵀK̃1
        self.self_hsic = hsic1(self, self)


def hsic1(A: Grams, B: Grams) -> float:
    """Unbiased HSIC estimator of Song et al. (2012) via tr(K̃L̃) = ‖XᵀY‖²_F − Σ K_ii L_ii."""
    n = A.n
    if n < 4 or B.n != n:
        return float("nan")
    cross = A.X.T @ B.X
    tr = float(np.sum(cross * cross) - A.diag @ B.diag)
    return (tr + A.total * B.total / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(A.row_sums @ B.row_sums)) \
        / (n * (n - 3))


def cka(X, Y) -> float:
    """CKA = HSIC₁(K,L)/√(HSIC₁(K,K)·HSIC₁(L,L)); nan when either self-term is not positive."""
    return cka_grams(Grams(X), Grams(Y))


def cka_grams(A: Grams, B: Grams) -> float:
    den = A.self_hsic * B.self_hsic
    return float(hsic1(A, B) / np.sqrt(den)) if den > 0 else float("nan")


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm: a per-item scale (a folded norm gain) then cannot move CKA."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)
