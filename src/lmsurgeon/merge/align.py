"""Donor → base row map: centring, orthogonal Procrustes, Umeyama scale (methods.md §M2.2), soft clip (§M2.3).

The fit itself is ``lmsurgeon.tokens.procrustes`` (shared with lineage, which also decides how unequal widths
are handled: no zero-padding; a wider donor is projected by the polar factor of the least-squares map).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from lmsurgeon.tokens.procrustes import SimilarityMap, fit_similarity


@dataclass(frozen=True)
class Alignment(SimilarityMap):
    """map(x) = s (x − μ_X) R + μ_Y from donor rows (X, d_D wide) to base rows (Y, d_B wide)."""

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "s": self.s,
            "residual": self.residual,
            "retained_energy": self.retained_energy,
            "d_donor": int(self.R.shape[0]),
            "d_base": int(self.R.shape[1]),
        }


def fit_alignment(
    X: np.ndarray, Y: np.ndarray, proper_rotation: bool = False, dtype: np.dtype | type | None = None
) -> Alignment:
    """Fit (μ_X, μ_Y, R, s) on shared rows X (n × d_D, donor) and Y (n × d_B, base), computing in ``dtype``."""
    fit = fit_similarity(X, Y, proper_rotation, dtype=dtype)
    return Alignment(**{f.name: getattr(fit, f.name) for f in fields(fit)})


def norm_quantile(norms: np.ndarray, q: float = 0.99) -> float:
    """K_q: the q-quantile of the base matrix's row norms (given as the vector of norms)."""
    return float(np.quantile(norms, q))


def soft_clip_scale(mapped_norms: np.ndarray, base_norms: np.ndarray, K_q: float, ratio: float = 1.25) -> np.ndarray:
    """The soft clip's factor per row, from the mapped rows' norms n_i and the base rows' norms ‖y_i‖: 1 up to
    k_i = max(‖y_i‖, K_q), then n_i' / n_i with n_i' = k_i + (u_i − k_i) tanh((n_i − k_i) / (u_i − k_i)),
    which stays below u_i = 1.25 k_i.
    Kept apart from the rows so that a caller can store one factor per row instead of a clipped copy."""
    n = np.asarray(mapped_norms, dtype=np.float64)
    k = np.maximum(np.asarray(base_norms, dtype=np.float64), K_q)
    u = ratio * k
    over = n > k
    scale = np.ones_like(n)
    n_new = k[over] + (u[over] - k[over]) * np.tanh((n[over] - k[over]) / (u[over] - k[over]))
    scale[over] = n_new / n[over]
    return scale


def soft_clip(E_tilde: np.ndarray, Y: np.ndarray, K_q: float, ratio: float = 1.25) -> np.ndarray:
    """Shrink over-long mapped rows smoothly: identity up to k_i = max(‖y_i‖, K_q), bounded by 1.25·k_i."""
    scale = soft_clip_scale(np.linalg.norm(E_tilde, axis=1), np.linalg.norm(Y, axis=1), K_q, ratio)
    return E_tilde * scale[:, None]
