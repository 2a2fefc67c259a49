"""The paper's equations, line by line (methods.md §S4, §S5, §S10), and the only implementation of each.

The analysis calls these functions; nothing recomputes them inline. Matrix statistics of the fitted A_i
(Trans, Dep, r, the least-squares solve) are numpy float64. Per-token statistics (X̂, δ', cos for Block
Influence, angular distance) are torch, because they run batch by batch on the model's device inside the eval
pass, which streams their sums over batches; the ``block_influence`` / ``angular_distance`` / ``delta_linear``
forms here are those same per-token functions averaged over one set of tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lmsurgeon.swap.config import RIDGE, WINDOW

# -- eq. 12: context-mixed input and the least-squares fit (numpy float64 for matrices) ----------------------


def context_mix_batch(X: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """X̂_{t} = mean of X_s over s ∈ {max(0, t−window+1), …, t}, for a right-padded batch X: [B, T, d].

    Each real position's window starts at the row's start (position 0, the first real one) and never reaches
    padding, which only follows it.
    """
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


# -- eqs. 13, 14, 1: Trans, Dep, r ---------------------------------------------------------------------------


def trans(A: np.ndarray) -> float:
    """Trans(i) = ‖A_i‖_F / √d (eq. 13)."""
    return float(np.linalg.norm(A, "fro") / np.sqrt(A.shape[0]))


EXACT_NORM_WIDTH = 512  # up to this width a spectral norm is a full SVD; wider, ARPACK's largest singular value


def spectral_norm(A: np.ndarray, B: np.ndarray | None = None) -> float:
    """‖A‖₂, or ‖A B‖₂ without forming the product.

    Why not ``np.linalg.norm(A, 2)`` everywhere: that is a full SVD, about 15 s at width 4,096 on two cores, and a
    swap table needs L + 2 (L − 1) of them (plus the d³ products): minutes at 8 layers, most of the analysis at 46.
    Only the largest singular value is needed, so wider matrices go to ARPACK (``scipy.sparse.linalg.svds``,
    k = 1, converged to machine precision, fixed start vector), with A B applied as A(Bx): O(d²) per step."""
    if max(A.shape) <= EXACT_NORM_WIDTH:
        return float(np.linalg.norm(A if B is None else A @ B, 2))
    from scipy.sparse.linalg import LinearOperator, svds

    op = (
        A
        if B is None
        else LinearOperator(
            (A.shape[0], B.shape[1]),
            matvec=lambda x: A @ (B @ x),
            rmatvec=lambda y: B.T @ (A.T @ y),
            dtype=np.result_type(A, B),
        )
    )
    return float(svds(op, k=1, return_singular_vectors=False, tol=0, random_state=0)[0])


def dep(Ai: np.ndarray, Aj: np.ndarray, floor: float = 0.0, norms: tuple[float, float] | None = None) -> float:
    """Dep(i, j) = ‖A_i A_j‖₂ / (‖A_i‖₂ ‖A_j‖₂) (eq. 14); 0 when either spectral norm is below floor.

    ``norms``: (‖A_i‖₂, ‖A_j‖₂) when the caller has them: a model's table needs every layer's norm once, not
    four times per pair (:func:`spectral_norm`)."""
    ni, nj = norms if norms is not None else (spectral_norm(Ai), spectral_norm(Aj))
    if ni <= floor or nj <= floor or ni == 0 or nj == 0:
        return 0.0
    return spectral_norm(Ai, Aj) / (ni * nj)


def r_of(trans_i: float, trans_j: float, dep_ij: float, dep_ji: float) -> float:
    """r(i, i+1) = Trans(i)·Trans(i+1)·(Dep(i, i+1) + Dep(i+1, i)) (eq. 1), from its four components."""
    return trans_i * trans_j * (dep_ij + dep_ji)


def r_metric(Ai: np.ndarray, Aj: np.ndarray, floor: float = 0.0) -> float:
    """r(i, i+1) of two fitted layers (eq. 1); ``floor`` as in :func:`dep`."""
    return r_of(trans(Ai), trans(Aj), dep(Ai, Aj, floor), dep(Aj, Ai, floor))


# -- eq. 16: linearised swap effect ---------------------------------------------------------------------------


def delta_linear_per_token(
    Xhat: torch.Tensor, Ai: torch.Tensor, Aj: torch.Tensor, XAi: torch.Tensor | None = None
) -> torch.Tensor:
    """‖X̂_t (A_iA_j − A_jA_i)‖₂ / ‖X̂_t‖₂ per token (inside eq. 16's expectation); Xhat: [N, d], A: [d, d].

    L'_j(L'_i(x)) − L'_i(L'_j(x)) = x(A_iA_j − A_jA_i) for L'(x) = x + xA, computed as (X̂A_i)A_j − (X̂A_j)A_i
    (``XAi``: X̂A_i when the caller has it): four N × d × d products instead of the d × d × d commutator, cheaper
    whenever fewer than d tokens are measured at a time, and no d × d matrix per pair kept through the pass
    (134 MB each in float64 at width 4,096)."""
    XAi = Xhat @ Ai if XAi is None else XAi
    return (XAi @ Aj - (Xhat @ Aj) @ Ai).norm(dim=-1) / Xhat.norm(dim=-1)


def delta_linear(Xhat: torch.Tensor, Ai: torch.Tensor, Aj: torch.Tensor) -> float:
    """δ'(i, i+1) = E_t ‖L'_j(L'_i(X̂))_t − L'_i(L'_j(X̂))_t‖ / ‖X̂_t‖ (eq. 16) over the tokens of Xhat."""
    return float(delta_linear_per_token(Xhat, Ai, Aj).mean())


# -- methods.md §S10: ShortGPT's Block Influence and Gromov et al.'s angular distance --------------------------------


def cosine_per_token(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_t, b_t) in float64 for rows a, b: [N, d]."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def block_influence(X_in: torch.Tensor, X_out: torch.Tensor) -> float:
    """ShortGPT BI(i) = 1 − E_t cos(X_{i,t}, X_{i+1,t}) over the real tokens X: [N, d]."""
    return float(1.0 - cosine_per_token(X_in, X_out).mean())


def angle_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a_r, b_r))/π per row (float64), in the atan2 form 2·atan2(‖u−v‖, ‖u+v‖) of unit vectors u, v.

    Equal to arccos(u·v) but accurate near cos = ±1, where arccos loses half the digits.
    """
    u = a.double() / a.double().norm(dim=-1, keepdim=True)
    v = b.double() / b.double().norm(dim=-1, keepdim=True)
    return 2.0 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1)) / math.pi


def angular_distance(x_a: torch.Tensor, x_b: torch.Tensor) -> float:
    """Gromov et al.: E_rows arccos(cos(x_a, x_b))/π, x the last real token of each row: [rows, d]."""
    return float(angle_per_row(x_a, x_b).mean())
