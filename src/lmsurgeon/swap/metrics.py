"""The paper's equations, line by line (spec §5): X̂ (eq. 12), A_i by ridge least squares, Trans (13), Dep (14),
r (1), δ' (16) as a commutator. All float64."""

from __future__ import annotations

import numpy as np
import torch

WINDOW = 4
RIDGE = 1e-6


def context_mix(X: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """X̂_t = mean of X_s over s ∈ {max(0, t−window+1), …, t}; X: [T, d] real tokens of one row."""
    csum = np.cumsum(np.vstack([np.zeros((1, X.shape[1])), X]), axis=0)
    t = np.arange(X.shape[0])
    lo = np.maximum(0, t - window + 1)
    return (csum[t + 1] - csum[lo]) / (t + 1 - lo)[:, None]


def context_mix_batch(X: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """X̂ for a right-padded batch X: [B, T, d] (float64): each real position's window starts at the row's start
    (position 0, the first real one) and never reaches padding, which only follows it. Same as :func:`context_mix`."""
    csum = torch.nn.functional.pad(X.cumsum(dim=1), (0, 0, 1, 0))
    t = torch.arange(X.shape[1], device=X.device)
    lo = (t - window + 1).clamp(min=0)
    return (csum[:, t + 1] - csum[:, lo]) / (t + 1 - lo).to(X.dtype)[None, :, None]


def fit_A(G: np.ndarray, C: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """Solve (G + λ·tr(G)/d·I) A = C with G = X̂ᵀX̂, C = X̂ᵀY, Y = X_{i+1} − X_i (float64)."""
    d = G.shape[0]
    if ridge == 0:  # --ridge 0: minimum-norm least squares, well defined when X̂ is rank deficient
        return np.linalg.lstsq(G, C, rcond=None)[0]
    return np.linalg.solve(G + ridge * np.trace(G) / d * np.eye(d), C)


def r_squared(resid_sq: float, y_sq: float, y_sum: np.ndarray, n: int) -> float:
    """R² = 1 − ‖X̂A − Y‖_F² / ‖Y − Ȳ‖_F², from running sums (‖Y‖², ΣY, n) so no split is held in memory."""
    total = y_sq - float(y_sum @ y_sum) / max(n, 1)
    return float(1.0 - resid_sq / total) if total > 0 else float("nan")


def fit_residual(A: np.ndarray, G: np.ndarray, C: np.ndarray, y_sq: float) -> float:
    """‖X̂A − Y‖_F² = tr(AᵀGA) − 2·tr(AᵀC) + ‖Y‖², from the normal-equation sums of the fit split."""
    return float(np.sum(A * (G @ A)) - 2.0 * np.sum(A * C) + y_sq)


def trans(A: np.ndarray) -> float:
    """Trans(i) = ‖A_i‖_F / √d (eq. 13)."""
    return float(np.linalg.norm(A, "fro") / np.sqrt(A.shape[0]))


def dep(Ai: np.ndarray, Aj: np.ndarray, floor: float = 0.0) -> float:
    """Dep(i, j) = ‖A_i A_j‖₂ / (‖A_i‖₂ ‖A_j‖₂) (eq. 14); 0 when either spectral norm is below floor."""
    ni, nj = np.linalg.norm(Ai, 2), np.linalg.norm(Aj, 2)
    if ni <= floor or nj <= floor or ni == 0 or nj == 0:
        return 0.0
    return float(np.linalg.norm(Ai @ Aj, 2) / (ni * nj))


def r_metric(Ai: np.ndarray, Aj: np.ndarray) -> float:
    """r(i, i+1) = Trans(i)·Trans(i+1)·(Dep(i, i+1) + Dep(i+1, i)) (eq. 1)."""
    return trans(Ai) * trans(Aj) * (dep(Ai, Aj) + dep(Aj, Ai))


def delta_linear(Xhat: np.ndarray, Ai: np.ndarray, Aj: np.ndarray) -> float:
    """δ'(i, i+1) = E_t ‖X̂_t (A_iA_j − A_jA_i)‖ / ‖X̂_t‖ (eq. 16: L'_j(L'_i(x)) − L'_i(L'_j(x)))."""
    diff = Xhat @ (Ai @ Aj - Aj @ Ai)
    return float(np.mean(np.linalg.norm(diff, axis=1) / np.linalg.norm(Xhat, axis=1)))


def block_influence(X_in: np.ndarray, X_out: np.ndarray) -> float:
    """ShortGPT BI(i) = 1 − E_t cos(X_{i,t}, X_{i+1,t}) (spec §10); X: [T, d] real tokens."""
    cos = (X_in * X_out).sum(1) / (np.linalg.norm(X_in, axis=1) * np.linalg.norm(X_out, axis=1))
    return float(1.0 - cos.mean())


def angular_distance(x_a: np.ndarray, x_b: np.ndarray) -> float:
    """Gromov et al.: arccos(cos(x_a, x_b))/π for one row's last real token (spec §10)."""
    u, v = x_a / np.linalg.norm(x_a), x_b / np.linalg.norm(x_b)
    # 2·atan2(‖u−v‖, ‖u+v‖) equals arccos(u·v) but stays accurate near ±1, where arccos loses half the digits.
    return float(2.0 * np.arctan2(np.linalg.norm(u - v), np.linalg.norm(u + v)) / np.pi)
