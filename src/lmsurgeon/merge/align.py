"""Donor → base row map: centring, orthogonal Procrustes, Umeyama scale (spec §2.2), soft clip (§2.3).

One code path for every pair of widths: the centred matrices are zero-padded to max(d_D, d_B), scipy's
orthogonal_procrustes gives Q = U Vᵀ of the padded problem and tr(Σ), and R = Q[:d_D, :d_B].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import orthogonal_procrustes


@dataclass
class Alignment:
    """map(x) = s (x − μ_X) R + μ_Y, with the fit diagnostics the report shows."""

    mu_X: np.ndarray  # (d_D,)
    mu_Y: np.ndarray  # (d_B,)
    R: np.ndarray  # (d_D, d_B), semi-orthogonal
    s: float
    n: int
    residual: float  # ‖s X_c R − Y_c‖_F / ‖Y_c‖_F
    retained_energy: float  # ‖X_c R‖_F² / ‖X_c‖_F²

    def map(self, X: np.ndarray) -> np.ndarray:
        """Donor rows (m × d_D) → base space (m × d_B)."""
        return self.s * (np.asarray(X, dtype=self.R.dtype) - self.mu_X) @ self.R + self.mu_Y

    def summary(self) -> dict:
        return {"n": self.n, "s": self.s, "residual": self.residual, "retained_energy": self.retained_energy,
                "d_donor": int(self.R.shape[0]), "d_base": int(self.R.shape[1])}


def fit_alignment(X: np.ndarray, Y: np.ndarray, proper_rotation: bool = False) -> Alignment:
    """Fit (μ_X, μ_Y, R, s) on shared rows X (n × d_D, donor) and Y (n × d_B, base)."""
    X = np.asarray(X)
    Y = np.asarray(Y)
    dtype = np.result_type(X.dtype, Y.dtype, np.float32)
    X, Y = X.astype(dtype, copy=False), Y.astype(dtype, copy=False)
    n, d_D = X.shape
    d_B = Y.shape[1]
    mu_X, mu_Y = X.mean(axis=0), Y.mean(axis=0)
    X_c, Y_c = X - mu_X, Y - mu_Y
    if proper_rotation:
        R, trace_sigma = _procrustes_proper(X_c, Y_c)
    else:
        d = max(d_D, d_B)
        Xp = np.zeros((n, d), dtype=dtype)
        Yp = np.zeros((n, d), dtype=dtype)
        Xp[:, :d_D], Yp[:, :d_B] = X_c, Y_c
        Q, trace_sigma = orthogonal_procrustes(Xp, Yp)  # Q = U Vᵀ of Xpᵀ Yp, trace_sigma = tr(Σ)
        R = Q[:d_D, :d_B]
    XR = X_c @ R
    energy = float(np.sum(XR.astype(np.float64) ** 2))
    s = float(trace_sigma) / energy if energy > 0 else 1.0
    y_norm = float(np.linalg.norm(Y_c))
    residual = float(np.linalg.norm(s * XR - Y_c)) / y_norm if y_norm > 0 else 0.0
    x_energy = float(np.sum(X_c.astype(np.float64) ** 2))
    return Alignment(mu_X, mu_Y, R, s, n, residual, energy / x_energy if x_energy > 0 else 1.0)


def _procrustes_proper(X_c: np.ndarray, Y_c: np.ndarray) -> tuple[np.ndarray, float]:
    """R = U diag(1,…,1, sign det UVᵀ) Vᵀ (no reflections; square case only makes sense)."""
    M = X_c.T @ Y_c  # d_D × d_B
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    D = np.ones_like(S)
    if U.shape[0] == Vt.shape[1]:
        D[-1] = np.sign(np.linalg.det(U @ Vt)) or 1.0
    return (U * D) @ Vt, float(np.sum(S * D))


def norm_quantile(W: np.ndarray, q: float = 0.99) -> float:
    """K_q: the q-quantile of the base matrix's row norms."""
    return float(np.quantile(np.linalg.norm(W, axis=1), q))


def soft_clip(E_tilde: np.ndarray, Y: np.ndarray, K_q: float, ratio: float = 1.25) -> np.ndarray:
    """Shrink over-long mapped rows smoothly: identity up to k_i = max(‖y_i‖, K_q), bounded by 1.25·k_i."""
    n = np.linalg.norm(E_tilde, axis=1)
    k = np.maximum(np.linalg.norm(Y, axis=1), K_q)
    u = ratio * k
    over = n > k
    n_new = n.copy()
    n_new[over] = k[over] + (u[over] - k[over]) * np.tanh((n[over] - k[over]) / (u[over] - k[over]))
    scale = np.ones_like(n)
    scale[over] = n_new[over] / n[over]
    return E_tilde * scale[:, None]
