"""Spearman ρ with percentile bootstrap CIs over layer pairs (methods.md §S10).

Adjacent pairs share a layer, so resampling pairs as if independent gives CIs that are optimistic; the report
says so. Resamples in which either side is constant (ρ undefined) are dropped and counted.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata, spearmanr


def spearman_ci(x, y, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """{rho, ci: [lo, hi], n, n_degenerate}; pairs where either value is missing (None/NaN) are left out."""
    x = np.asarray([np.nan if v is None else v for v in x], dtype=np.float64)
    y = np.asarray([np.nan if v is None else v for v in y], dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    out = {"rho": None, "ci": [None, None], "n": n, "n_degenerate": 0, "n_boot": n_boot}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    out["rho"] = float(spearmanr(x, y).statistic)
    if n_boot <= 0:
        return out
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    rho = _rowwise_spearman(x[idx], y[idx])
    good = np.isfinite(rho)
    out["n_degenerate"] = int((~good).sum())
    if good.any():
        alpha = (1.0 - level) / 2.0
        out["ci"] = [float(np.quantile(rho[good], alpha)), float(np.quantile(rho[good], 1.0 - alpha))]
    return out


def _rowwise_spearman(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Spearman ρ of each row pair (average ranks for ties, as scipy), NaN where a row is constant."""
    rx, ry = rankdata(X, axis=1), rankdata(Y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(1) / np.where(den > 0, den, 1.0), np.nan)
