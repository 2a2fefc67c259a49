"""Sparse-coding initialisation of non-shared rows (methods.md §M8.2, tokensurgeon's method).

A base token outside S gets the donor vector v (mean donor row of its donor tokenisation); orthogonal matching
pursuit writes v ≈ Σ_j w_j X[j] over k anchors of S, and the candidate is ẽ = Σ_j w_j Y[j]. The coefficients
live in token space, so the donor and base widths may differ.
"""

from __future__ import annotations

import numpy as np


def omp(
    D: np.ndarray, v: np.ndarray, k: int = 64, tol: float = 1e-10, norms: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Orthogonal matching pursuit: columns `D[:, j]` are the atoms (d × n); returns (support, weights).

    Each step adds the atom most correlated with the residual, then refits all weights by least squares.
    ``norms``: the atoms' norms, when the caller codes many vectors over the same atoms.
    """
    D = np.asarray(D, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if norms is None:
        norms = _atom_norms(D)
    support: list[int] = []
    r = v.copy()
    w = np.zeros(0)
    for _ in range(min(k, D.shape[1])):
        if np.linalg.norm(r) <= tol * max(np.linalg.norm(v), 1e-300):
            break
        corr = np.abs(D.T @ r) / norms
        corr[support] = -1.0
        support.append(int(np.argmax(corr)))
        w, *_ = np.linalg.lstsq(D[:, support], v, rcond=None)
        r = v - D[:, support] @ w
    return np.asarray(support, dtype=np.int64), w


def omp_rows(X: np.ndarray, Y: np.ndarray, V: np.ndarray, k: int = 64) -> np.ndarray:
    """Candidates ẽ (m × d_B) for donor vectors V (m × d_D) over anchors X (n × d_D) → Y (n × d_B)."""
    out = np.zeros((V.shape[0], Y.shape[1]), dtype=np.float64)
    Xt = np.asarray(X, dtype=np.float64).T
    Y64 = np.asarray(Y, dtype=np.float64)  # once, not per row: at 4,096 anchors × 4,096 wide, 128 MB a copy
    norms = _atom_norms(Xt)
    for i, v in enumerate(V):
        support, w = omp(Xt, v, k, norms=norms)
        if support.size:
            out[i] = w @ Y64[support]
    return out


def _atom_norms(D: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(D, axis=0)
    norms[norms == 0] = 1.0
    return norms


def donor_vectors(texts: list[str], donor_tokenizer, E_D, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """v = mean donor row of each text's donor tokenisation; returns (vectors, mask of decodable ones).

    ``E_D`` is anything indexed by an id array (an array, or the merge's row-reading ``DonorMatrix``): the rows
    of ``chunk`` texts are read at once, so a donor table is read by the rows its texts use, in few reads.
    """
    V = np.zeros((len(texts), E_D.shape[1]), dtype=np.float64)
    ok = np.zeros(len(texts), dtype=bool)
    encodings = donor_tokenizer.encode_batch(texts, add_special_tokens=False)
    for a in range(0, len(texts), chunk):
        part = [[j for j in enc.ids if j < E_D.shape[0]] for enc in encodings[a : a + chunk]]
        need = np.unique(np.fromiter((j for ids in part for j in ids), dtype=np.int64))
        if not need.size:
            continue
        rows = E_D[need]
        for i, ids in enumerate(part, start=a):
            if ids:
                V[i] = rows[np.searchsorted(need, ids)].mean(axis=0)
                ok[i] = True
    return V, ok
