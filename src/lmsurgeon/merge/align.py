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


def fit_alignment(X: np.ndarray, Y: np.ndarray, proper_rotation: bool = False) -> Alignment:
    """Fit (μ_X, μ_Y, R, s) on shared rows X (n × d_D, donor) and Y (n × d_B, base)."""
    fit = fit_similarity(X, Y, proper_rotation)
    return Alignment(**{f.name: getattr(fit, f.name) for f in fields(fit)})


def norm_quantile(norms: np.ndarray, q: float = 0.99) -> float:
    """K_q: the q-quantile of the base matrix's row norms (given as the vector of norms)."""
    return float(np.quantile(norms, q))


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
