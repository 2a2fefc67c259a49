"""φ_U-style MLP test (spec §7.3): do up-rows and down-columns pick the same unit correspondence?

Unit permutations defeat Zhu et al.'s "matched index vs identity" statistic, so each MLP unit of B is matched to
one of A twice, independently: by its (aligned, column-normalised) up_proj row → σ_in, and by its aligned
down_proj column → σ_out. For separately initialised models the two matchings are unrelated (ρ ≈ 0); for a
shared history they coincide (ρ = 1) whatever permutation was applied.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from lmsurgeon.lineage.align import Alignment
from lmsurgeon.lineage.stats import fisher_log_p, log_p_from_z, neg_log10_p, spearman, spearman_z, z_from_log_p

MAX_UNITS = 4096


def _unit(X: np.ndarray, axis: int) -> np.ndarray:
    n = np.linalg.norm(X, axis=axis, keepdims=True)
    return X / np.where(n > 0, n, 1.0)


def match_units(U_A: np.ndarray, U_B: np.ndarray) -> np.ndarray:
    """σ[j] = A unit matched to B unit j by maximal total cosine of their rows (rectangular if widths differ)."""
    C = _unit(U_A, 1) @ _unit(U_B, 1).T                       # [m_A, m_B]
    rows, cols = linear_sum_assignment(C, maximize=True)
    sigma = np.full(U_B.shape[0], -1, dtype=np.int64)
    sigma[cols] = rows
    return sigma


def layer_rho(up_a, down_a, up_b, down_b, al: Alignment, units: np.ndarray | None) -> tuple[float, int]:
    """ρ_l = Spearman(σ_in, σ_out) over B's (optionally subsampled) units."""
    upA = _unit(al.a_in(up_a), 0)                          # columns unit-normalised: folded gains cancel
    upB = _unit(al.b_in(up_b), 0)
    dnA = al.a_out(down_a).T                               # units as rows: [m_A, d_B]
    dnB = al.b_out(down_b).T
    if units is not None:
        upB, dnB = upB[units], dnB[units]
    s_in, s_out = match_units(upA, upB), match_units(dnA, dnB)
    ok = (s_in >= 0) & (s_out >= 0)
    return spearman(s_in[ok], s_out[ok]), int(ok.sum())


def combine_layers(name: str, per_layer: list[dict], null_source: str) -> dict:
    """A test result from per-layer ρ_l and z_l: log p_l, Fisher's combination, and z from the combined p."""
    log_ps = []
    for p in per_layer:
        lp = log_p_from_z(p["z"]) if np.isfinite(p["z"]) else float("nan")
        p["neg_log10_p"] = neg_log10_p(lp)
        log_ps.append(lp)
    log_p = fisher_log_p(log_ps)
    return {"name": name, "applies": True, "reason": "",
            "statistic": float(np.nanmean([p["rho"] for p in per_layer])) if per_layer else float("nan"),
            "z": z_from_log_p(log_p), "neg_log10_p": neg_log10_p(log_p),
            "null": {"source": null_source, "mean": 0.0, "std": 1.0, "n": len(per_layer)},
            "per_layer": per_layer}


def phi_u_test(layout_a, layout_b, al: Alignment, pairs: list[tuple[int, int]], seed: int = 0,
               max_units: int = MAX_UNITS) -> dict:
    """Per matched layer pair ρ_l, z_l = ρ_l√(n_l−1), log p_l; Fisher over layers; z from the combined p."""
    rng = np.random.default_rng(seed)
    per_layer = []
    for i, j in pairs:
        la, lb = layout_a.layers[i], layout_b.layers[j]
        up_b = layout_b.read("up", lb)
        units = np.sort(rng.choice(up_b.shape[0], max_units, replace=False)) if up_b.shape[0] > max_units else None
        rho, n = layer_rho(layout_a.read("up", la), layout_a.read("down", la), up_b, layout_b.read("down", lb),
                           al, units)
        per_layer.append({"a": la, "b": lb, "rho": rho, "n_units": n, "z": spearman_z(rho, n)})
    return combine_layers("phi_u", per_layer,
                          "analytic: rho*sqrt(n-1) ~ N(0,1) under independent matchings; Fisher over layers")
