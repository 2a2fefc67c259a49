"""Cosine gate and logistic alpha schedule (methods.md §M2.4): which rows move, and how far toward the donor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def centred_cosine(E_tilde: np.ndarray, Y: np.ndarray, mu_Y: np.ndarray) -> np.ndarray:
    """c_i = cos(ẽ_i − μ_Y, y_i − μ_Y); a zero row gets cosine 0."""
    a = (E_tilde - mu_Y).astype(np.float64)
    b = (Y - mu_Y).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    num = np.sum(a * b, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


@dataclass
class Schedule:
    """Selected pool positions and their blend rates α (donor weight)."""

    rows: np.ndarray  # positions in the pool, int64
    alpha: np.ndarray  # float64, same length
    tau: float
    c_max: float


def _sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def alpha_schedule(
    c: np.ndarray, k: int, min_tau: float, alpha_floor: float, alpha_cap: float, gamma: float = 12.0
) -> Schedule:
    """Kset = top-k of {c_i ≥ min_tau} (ties → lower position); α from floor (weakest) to cap (strongest)."""
    c = np.asarray(c, dtype=np.float64)
    eligible = np.flatnonzero(c >= min_tau)
    order = eligible[np.lexsort((eligible, -c[eligible]))]  # descending c, then ascending position
    rows = np.sort(order[: max(int(k), 0)])
    if rows.size == 0:
        return Schedule(rows, np.zeros(0), float("nan"), float("nan"))
    cs = c[rows]
    tau, c_max = float(cs.min()), float(cs.max())
    if c_max - tau < 1e-6:
        return Schedule(rows, np.full(rows.size, alpha_cap, dtype=np.float64), tau, c_max)
    shape = (_sigmoid(gamma * (cs - tau)) - 0.5) / (_sigmoid(gamma * (c_max - tau)) - 0.5)
    return Schedule(rows, alpha_floor + (alpha_cap - alpha_floor) * shape, tau, c_max)


def blend_rows(Y: np.ndarray, E_tilde: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """y_i' = y_i + α_i (ẽ_i − y_i) in float32."""
    Y32 = np.asarray(Y, dtype=np.float32)
    return Y32 + np.asarray(alpha, dtype=np.float32)[:, None] * (np.asarray(E_tilde, dtype=np.float32) - Y32)
