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
        U, _, Vt = np.linalg.svd(X_c.T @ Y_c, full_matrices=False)  # M = X_cᵀ Y_c [d_X, d_Y]
        if d_X == d_Y:
            U[:, -1] *= np.sign(np.linalg.det(U @ Vt)) or 1.0
        return U @ Vt
    T = np.linalg.lstsq(X_c, Y_c, rcond=None)[0]  # [d_X, d_Y] least-squares map
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


def fit_similarity(X: np.ndarray, Y: np.ndarray, proper_rotation: bool = False) -> SimilarityMap:
    """Centre the paired rows X [n, d_X] and Y [n, d_Y], then fit R (:func:`orthogonal_map`) and s (Umeyama).

    Computes in the wider of the inputs' float types (at least float32); pass float64 for exact maps."""
    X, Y = np.asarray(X), np.asarray(Y)
    dtype = np.result_type(X.dtype, Y.dtype, np.float32)
    X, Y = X.astype(dtype, copy=False), Y.astype(dtype, copy=False)
    mu_X, mu_Y = X.mean(axis=0), Y.mean(axis=0)
    X_c, Y_c = X - mu_X, Y - mu_Y
    R = orthogonal_map(X_c, Y_c, proper_rotation).astype(dtype, copy=False)
    s = umeyama_scale(X_c, Y_c, R)
    XR = X_c @ R
    y_norm = float(np.linalg.norm(Y_c))
    residual = float(np.linalg.norm(s * XR - Y_c)) / y_norm if y_norm > 0 else 0.0
    x_energy = float(np.sum(X_c.astype(np.float64) ** 2))
    energy = float(np.sum(XR.astype(np.float64) ** 2))
    return SimilarityMap(mu_X, mu_Y, R, s, X.shape[0], residual, energy / x_energy if x_energy > 0 else 1.0)
