"""The statistics of methods.md (§L2, §L7.3), one implementation each, all in float64.

Undefined values (a constant vector's correlation) are ``nan``, never 0, so a report cannot mistake "no
information" for "no correlation". p-values are carried as natural logs so that z = 40 does not underflow.
"""

from __future__ import annotations

import numpy as np
from scipy import special, stats

N_SHUFFLES = 200


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).ravel()


def cosine(a, b) -> float:
    """Raw cosine a·b/(‖a‖‖b‖); nan when either vector is zero."""
    a, b = _f64(a), _f64(b)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float("nan")


def pearson(a, b) -> float:
    """Centered cosine (Pearson r); nan for a constant vector."""
    a, b = _f64(a), _f64(b)
    return cosine(a - a.mean(), b - b.mean()) if np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")


def spearman(a, b) -> float:
    """Pearson of average ranks (ties share their mean rank)."""
    return pearson(stats.rankdata(_f64(a)), stats.rankdata(_f64(b)))


def rel_l2(a, b) -> float:
    """Symmetric relative distance 2‖a−b‖/(‖a‖+‖b‖) (the one-sided ‖a−b‖/‖a‖ depends on argument order)."""
    a, b = _f64(a), _f64(b)
    den = np.linalg.norm(a) + np.linalg.norm(b)
    return float(2 * np.linalg.norm(a - b) / den) if den > 0 else float("nan")


def shuffled_expectation(a, b) -> float:
    """E[cos(a, Pb)] over uniform permutations P: d·ā·b̄/(‖a‖‖b‖) = what the cosine sees of the value distribution."""
    a, b = _f64(a), _f64(b)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a.size * a.mean() * b.mean() / den) if den > 0 else float("nan")


def shuffled_control(a, b, seed: int = 0, n: int = N_SHUFFLES) -> dict:
    """Closed-form expectation plus Monte-Carlo mean/std of cos(a, Pb) over ``n`` seeded shuffles."""
    a, b = _f64(a), _f64(b)
    rng = np.random.default_rng(seed)
    sims = np.array([cosine(a, b[rng.permutation(b.size)]) for _ in range(n)])
    return {"expected": shuffled_expectation(a, b), "mean": float(sims.mean()), "std": float(sims.std()), "n": n}


def unit_norm(X: np.ndarray, axis: int) -> np.ndarray:
    """X with its vectors along ``axis`` scaled to unit norm (zero vectors left as they are).

    Rows (``axis=1``) of unit norm make a per-item scale, such as a folded norm gain, unable to move a CKA or a
    cosine matching; columns (``axis=0``) likewise for a per-input scale."""
    n = np.linalg.norm(X, axis=axis, keepdims=True)
    return X / np.where(n > 0, n, 1.0)


def gain_summary(g) -> dict:
    """mean/std/cv/min/max of a gain vector (cv = std/|mean|, the quantity that bounds what raw cosine can say)."""
    g = _f64(g)
    m, s = float(g.mean()), float(g.std())
    return {
        "mean": m,
        "std": s,
        "cv": s / abs(m) if m != 0 else float("nan"),
        "min": float(g.min()),
        "max": float(g.max()),
    }


# -- p-values in log space -------------------------------------------------------------------------------
def log_p_from_z(z: float) -> float:
    """Natural log of the one-sided p = P(N(0,1) ≥ z), finite for any finite z."""
    return float(stats.norm.logsf(z))


def z_from_log_p(log_p: float) -> float:
    """The z whose one-sided p has log ``log_p`` (inverse of :func:`log_p_from_z`, stable for tiny p)."""
    if not np.isfinite(log_p):
        return float("nan") if np.isnan(log_p) else float("inf")
    return float(-special.ndtri_exp(min(log_p, 0.0)))


def sidak_z(z: float, looks: int) -> float:
    """The z of the best of ``looks`` independent tries whose best scored ``z``: p' = 1 − (1 − p)^looks (Šidák).

    Computed from log(1 − p) while p is not tiny, and as log p + log(looks) (Šidák's limit) when it is, so it
    stays finite and monotone for any finite z (methods.md §L7.1.4)."""
    log_p = log_p_from_z(z)
    if looks <= 1 or not np.isfinite(log_p):
        return z
    if log_p < -30.0:
        return z_from_log_p(log_p + float(np.log(looks)))
    log_q = float(stats.norm.logcdf(z))  # log(1 − p) = log Φ(z)
    if z <= 0:  # Φ(z') = (1 − p)^looks, exact in log space however small
        return float(special.ndtri_exp(looks * log_q))
    return z_from_log_p(float(np.log(-np.expm1(looks * log_q))))


def neg_log10_p(log_p: float) -> float:
    return float(-log_p / np.log(10)) if np.isfinite(log_p) else float("nan")


def spearman_z(rho: float, n: int) -> float:
    """Analytic z of a rank correlation under independence: ρ·√(n−1)."""
    return float(rho * np.sqrt(n - 1)) if n > 1 and np.isfinite(rho) else float("nan")


def fisher_log_p(log_ps) -> float:
    """Fisher's combination of L one-sided p-values, exactly, in log space.

    X = −2 Σ log p_l follows χ² with 2L degrees of freedom, whose survival function has the closed form
    e^{−X/2} Σ_{k<L} (X/2)^k / k!; summing the log terms with logsumexp keeps it finite where ``chi2.logsf``
    returns −inf.
    """
    lp = np.asarray([v for v in log_ps if np.isfinite(v)], dtype=np.float64)
    if lp.size == 0:
        return float("nan")
    half_x = -lp.sum()
    if half_x <= 0:
        return 0.0
    k = np.arange(lp.size)
    return float(min(0.0, -half_x + special.logsumexp(k * np.log(half_x) - special.gammaln(k + 1))))


def z_against(s: float, mean: float, std: float) -> float:
    """(s − μ₀)/max(σ₀, 0.001): a statistic measured in standard deviations of a stated null."""
    if not all(np.isfinite([s, mean, std])):
        return float("nan")
    return float((s - mean) / max(std, 1e-3))
