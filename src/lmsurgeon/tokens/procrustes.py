"""Orthogonal Procrustes with Umeyama scale: the rotation (and scale) that maps one set of rows onto another.

Lineage recovers the rotation between two residual streams from shared-token embedding rows (methods.md §L7.1);
merge maps donor embedding rows into the base's space (methods.md §M2.2). Both fit

    min over R, s   ‖s X_c R − Y_c‖_F      X_c [n, d_X], Y_c [n, d_Y] centred rows, R [d_X, d_Y] semi-orthogonal

and both call :func:`orthogonal_map`. How R is found depends on the widths, and this is the one place that
decides it:

* d_X = d_Y: ``scipy.linalg.orthogonal_procrustes``, R = U Vᵀ from X_cᵀ Y_c = U Σ Vᵀ, the exact minimiser.
* d_X < d_Y (an isometric embedding, R Rᵀ = I): ‖X_c R‖_F = ‖X_c‖_F whatever R is, so maximising tr(Rᵀ X_cᵀ Y_c)
  is the whole problem and the thin-SVD U Vᵀ is again the exact minimiser.
* d_X > d_Y (a projection, Rᵀ R = I): ‖X_c R‖_F now depends on which d_Y directions R keeps, so U Vᵀ is not the
  minimiser and there is no closed form. U Vᵀ (what zero-padding both sides to one width and running the square
  problem gives) is the polar factor of X_cᵀ Y_c = X_cᵀ X_c R₀ for Y_c = X_c R₀: it is pulled towards the
  high-variance directions of X and misses R₀ whenever the dropped directions correlate with the kept ones,
  however many rows there are. The polar factor of the least-squares map T = argmin ‖X_c T − Y_c‖_F is exact
  whenever Y is a rotated projection of X (T = s R₀) and consistent under noise, so that is what is used.
  No side is ever zero-padded. ``tests/test_tokens.py`` shows the padded fit's bias against float64 numpy.

The Umeyama scale is exact given R: s = tr(Rᵀ X_cᵀ Y_c) / ‖X_c R‖_F² (= tr(Σ) / ‖X_c R‖_F² when R = U Vᵀ).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import orthogonal_procrustes

CHUNK_ROWS = 8192


def orthogonal_map(X_c: np.ndarray, Y_c: np.ndarray, proper_rotation: bool = False) -> np.ndarray:
    """R [d_X, d_Y] with orthonormal rows (d_X ≤ d_Y) or columns (d_X > d_Y) such that X_c R ≈ Y_c.

    ``proper_rotation`` (equal widths only; a rectangular R has no determinant) excludes reflections:
    R = U diag(1, …, 1, sign det U Vᵀ) Vᵀ.
    """
    d_X, d_Y = X_c.shape[1], Y_c.shape[1]
    if d_X == d_Y and not proper_rotation:
        R, _ = orthogonal_procrustes(X_c, Y_c)
        return np.asarray(R)
    if d_X <= d_Y:
        return map_from_moments(X_c.T @ Y_c, None, proper_rotation)
    T = np.linalg.lstsq(X_c, Y_c, rcond=None)[0]  # [d_X, d_Y] least-squares map
    return _polar(T)


def map_from_moments(C_XY: np.ndarray, C_XX: np.ndarray | None, proper_rotation: bool = False) -> np.ndarray:
    """:func:`orthogonal_map` from the cross moment C_XY = X_cᵀ Y_c [d_X, d_Y] (and, for a wider X, its own
    moment C_XX = X_cᵀ X_c), which can be summed a block of rows at a time: what the rows themselves would give.

    For d_X > d_Y the least-squares map is the minimum-norm solution of the normal equations C_XX T = C_XY
    (pinv(X_cᵀ X_c) X_cᵀ = pinv(X_c)), whose conditioning is the square of X_c's: fine in float64 for embedding
    rows, which is why callers that use moments compute them in float64."""
    d_X, d_Y = C_XY.shape
    if d_X > d_Y:
        if C_XX is None:
            raise ValueError("a wider X needs its own moment C_XX")
        return _polar(np.linalg.lstsq(C_XX, C_XY, rcond=None)[0])
    U, _, Vt = np.linalg.svd(C_XY, full_matrices=False)
    if d_X == d_Y and proper_rotation:
        U[:, -1] *= np.sign(np.linalg.det(U @ Vt)) or 1.0
    return U @ Vt


def _polar(T: np.ndarray) -> np.ndarray:
    """The semi-orthogonal polar factor U Vᵀ of T = U Σ Vᵀ."""
    U, _, Vt = np.linalg.svd(T, full_matrices=False)
    return U @ Vt


def umeyama_scale(X_c: np.ndarray, Y_c: np.ndarray, R: np.ndarray) -> float:
    """s = tr(Rᵀ X_cᵀ Y_c) / ‖X_c R‖_F², the least-squares scale for a given R (1 when X_c R is zero)."""
    XR = (X_c @ R).astype(np.float64, copy=False)
    energy = float(np.sum(XR**2))
    return float(np.sum(XR * Y_c)) / energy if energy > 0 else 1.0


@dataclass(frozen=True)
class SimilarityMap:
    """map(x) = s (x − μ_X) R + μ_Y, with the fit diagnostics reports show."""

    mu_X: np.ndarray  # [d_X]
    mu_Y: np.ndarray  # [d_Y]
    R: np.ndarray  # [d_X, d_Y], semi-orthogonal
    s: float
    n: int
    residual: float  # ‖s X_c R − Y_c‖_F / ‖Y_c‖_F
    retained_energy: float  # ‖X_c R‖_F² / ‖X_c‖_F²

    def map(self, X: np.ndarray) -> np.ndarray:
        """Rows of X's space [m, d_X] → Y's space [m, d_Y]."""
        return self.s * (np.asarray(X, dtype=self.R.dtype) - self.mu_X) @ self.R + self.mu_Y


def fit_similarity(
    X: np.ndarray,
    Y: np.ndarray,
    proper_rotation: bool = False,
    dtype: np.dtype | type | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> SimilarityMap:
    """Centre the paired rows X [n, d_X] and Y [n, d_Y], then fit R (:func:`map_from_moments`) and s (Umeyama).

    Computes in ``dtype`` (default: the wider of the inputs' float types, at least float32; pass float64 for
    exact maps). Rows are taken ``chunk_rows`` at a time and never copied whole: the merge fits up to 50,000
    shared rows of 4,096-wide embeddings, where each float64 copy of X, Y, their centred forms and X R was
    1.6 GB (about 10 GB at once); now the working set is one block of rows and the d × d moments.
    Three passes over the rows: the means; C_XY (and C_XX) on centred rows; the exact residual ‖s X_c R − Y_c‖_F
    (the moment expansion would lose it to cancellation when the fit is exact). The scale is Umeyama's
    s = tr(Rᵀ C_XY) / tr(Rᵀ C_XX R), the same quantity as :func:`umeyama_scale`."""
    X, Y = np.asarray(X), np.asarray(Y)
    dt = np.dtype(dtype) if dtype is not None else np.result_type(X.dtype, Y.dtype, np.float32)
    n, d_X, d_Y = X.shape[0], X.shape[1], Y.shape[1]
    blocks = [slice(a, min(a + chunk_rows, n)) for a in range(0, n, chunk_rows)]
    mu_X = sum((X[b].astype(dt).sum(axis=0) for b in blocks), np.zeros(d_X, dt)) / max(n, 1)
    mu_Y = sum((Y[b].astype(dt).sum(axis=0) for b in blocks), np.zeros(d_Y, dt)) / max(n, 1)
    C_XY, C_XX = np.zeros((d_X, d_Y), dt), np.zeros((d_X, d_X), dt)
    for b in blocks:
        X_c = X[b].astype(dt) - mu_X
        C_XY += X_c.T @ (Y[b].astype(dt) - mu_Y)
        C_XX += X_c.T @ X_c
    R = map_from_moments(C_XY, C_XX, proper_rotation).astype(dt, copy=False)
    energy = float(np.sum((C_XX.astype(np.float64) @ R) * R))  # ‖X_c R‖_F²
    s = float(np.sum(R * C_XY, dtype=np.float64)) / energy if energy > 0 else 1.0
    miss = y_energy = 0.0
    for b in blocks:
        Y_c = Y[b].astype(dt) - mu_Y
        miss += float(np.sum((s * ((X[b].astype(dt) - mu_X) @ R) - Y_c).astype(np.float64) ** 2))
        y_energy += float(np.sum(Y_c.astype(np.float64) ** 2))
    x_energy = float(np.trace(C_XX.astype(np.float64)))
    residual = np.sqrt(miss / y_energy) if y_energy > 0 else 0.0
    return SimilarityMap(mu_X, mu_Y, R, s, n, float(residual), energy / x_energy if x_energy > 0 else 1.0)
