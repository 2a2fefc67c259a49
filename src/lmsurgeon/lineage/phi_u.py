"""φ_U-style MLP test (methods.md §L7.3): do up-rows and down-columns pick the same unit correspondence?

Unit permutations defeat Zhu et al.'s "matched index vs identity" statistic, so each MLP unit of B is matched to
one of A twice, independently: by its (aligned, column-normalised) up_proj row → σ_in, and by its aligned
down_proj column → σ_out. For separately initialised models the two matchings are unrelated (ρ ≈ 0); for a
shared history they coincide (ρ = 1) whatever permutation was applied.

Mixture-of-experts layers (methods.md §L7.3.3): experts are matched by their aligned, column-normalised router rows; the
2 best-matched expert pairs and the shared expert (when both have one) each add a ρ to Fisher's combination.
A layer pair where one side is dense and the other MoE (GLM's first dense layers) is skipped.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from lmsurgeon.lineage.align import Alignment
from lmsurgeon.lineage.results import LayerMap, LayerRho, Null, TestResult
from lmsurgeon.lineage.stats import (
    fisher_log_p,
    log_p_from_z,
    neg_log10_p,
    spearman,
    spearman_z,
    unit_norm,
    z_from_log_p,
)

MAX_UNITS = 4096


def match_units(U_A: np.ndarray, U_B: np.ndarray) -> np.ndarray:
    """σ[j] = A unit matched to B unit j by maximal total cosine of their rows (rectangular if widths differ);
    −1 for a B unit left unmatched when B has more units than A."""
    C = unit_norm(U_A, axis=1) @ unit_norm(U_B, axis=1).T  # [m_A, m_B]
    rows, cols = linear_sum_assignment(C, maximize=True)
    sigma = np.full(U_B.shape[0], -1, dtype=np.int64)
    sigma[cols] = rows
    return sigma


def two_view_rho(
    view1_a: np.ndarray, view1_b: np.ndarray, view2_a: np.ndarray, view2_b: np.ndarray
) -> tuple[float, int]:
    """ρ = Spearman(σ₁, σ₂) of B's units matched to A's in two views (units as rows), and the number of B
    units matched in both. A shared history makes the two matchings coincide (ρ = 1) whatever permutation was
    applied; for separately initialised models they are unrelated (ρ ≈ 0, z = ρ√(n−1) ~ N(0, 1))."""
    s1, s2 = match_units(view1_a, view1_b), match_units(view2_a, view2_b)
    ok = (s1 >= 0) & (s2 >= 0)
    return spearman(s1[ok], s2[ok]), int(ok.sum())


def layer_rho(up_a, down_a, up_b, down_b, al: Alignment, units: np.ndarray | None) -> tuple[float, int]:
    """ρ_l = Spearman(σ_in, σ_out) over B's (optionally subsampled) units: the up rows and the down columns."""
    upA = unit_norm(al.a_in(up_a), axis=0)  # columns unit-normalised: folded gains cancel
    upB = unit_norm(al.b_in(up_b), axis=0)
    dnA = al.a_out(down_a).T  # units as rows: [m_A, d_B]
    dnB = al.b_out(down_b).T
    if units is not None:
        upB, dnB = upB[units], dnB[units]
    return two_view_rho(upA, upB, dnA, dnB)


ANALYTIC_NULL = "analytic: rho*sqrt(n-1) ~ N(0,1) under independent matchings; Fisher over layers"


def subsample_units(rng: np.random.Generator, m: int, max_units: int = MAX_UNITS) -> np.ndarray | None:
    """Sorted indices of ``max_units`` of B's ``m`` units chosen by seed, or None to keep them all."""
    return np.sort(rng.choice(m, max_units, replace=False)) if m > max_units else None


def combine_layers(name: str, per_layer: list[LayerRho], null_source: str = ANALYTIC_NULL) -> TestResult:
    """A test result from per-layer ρ_l and z_l: log p_l, Fisher's combination, and z from the combined p.

    The z is the analytic one: the standard normal quantile of Fisher's combined p (its null N(0, 1) over the
    L′ layer p-values); −log10 p comes from the combined log p itself, exact where z is huge."""
    log_ps = []
    for p in per_layer:
        lp = log_p_from_z(p.z) if np.isfinite(p.z) else float("nan")
        p.neg_log10_p = neg_log10_p(lp)
        log_ps.append(lp)
    log_p = fisher_log_p(log_ps)
    return TestResult(
        name,
        applies=True,
        statistic=float(np.nanmean([p.rho for p in per_layer])) if per_layer else float("nan"),
        z=z_from_log_p(log_p),
        neg_log10_p=neg_log10_p(log_p),
        null=Null(null_source, 0.0, 1.0, len(per_layer)),
        per_layer=per_layer,
    )


BEST_EXPERTS = 2


def mlp_kind(layout, layer: int) -> str | None:
    """``dense`` (up and down), ``moe`` (router and experts) or None when the layer has neither."""
    if layout.has("up", layer) and layout.has("down", layer):
        return "dense"
    if layout.has("router", layer) and layout.experts(layer, "experts.up"):
        return "moe"
    return None


def matched_experts(
    layout_a, layout_b, la: int, lb: int, al: Alignment, best: int = BEST_EXPERTS
) -> list[tuple[int, int, float]]:
    """(expert of A, expert of B, cosine) for the ``best`` best pairs of the router-row assignment: only their
    up/down matrices are read (methods.md §L7.2.3)."""
    ea, eb = layout_a.experts(la, "experts.up"), layout_b.experts(lb, "experts.up")
    Ra = unit_norm(al.a_in(layout_a.read("router", la))[ea], axis=0)  # column-normalised: folded gains cancel
    Rb = unit_norm(al.b_in(layout_b.read("router", lb))[eb], axis=0)
    C = unit_norm(Ra, axis=1) @ unit_norm(Rb, axis=1).T
    rows, cols = linear_sum_assignment(C, maximize=True)
    chosen = sorted(zip(rows, cols, strict=True), key=lambda rc: -C[rc])[:best]
    return [(ea[r], eb[c], float(C[r, c])) for r, c in chosen]


def mlp_blocks(layout_a, layout_b, la: int, lb: int, al: Alignment, best_experts: int = BEST_EXPERTS) -> list[dict]:
    """The (up, down) pairs to compare in one matched layer pair: the dense MLP, or matched experts + shared."""
    kind = mlp_kind(layout_a, la)
    if kind is None or kind != mlp_kind(layout_b, lb):
        return []
    if kind == "dense":
        return [{"block": "mlp", "roles": ("up", "down"), "experts": (None, None)}]
    blocks = [
        {
            "block": f"experts {e_a}↔{e_b} (router cosine {c:.3f})",
            "roles": ("experts.up", "experts.down"),
            "experts": (e_a, e_b),
        }
        for e_a, e_b, c in matched_experts(layout_a, layout_b, la, lb, al, best_experts)
    ]
    if all(lay.has(r, layer) for lay, layer in ((layout_a, la), (layout_b, lb)) for r in ("shared.up", "shared.down")):
        blocks.append({"block": "shared expert", "roles": ("shared.up", "shared.down"), "experts": (None, None)})
    return blocks


def phi_u_test(
    layout_a,
    layout_b,
    al: Alignment,
    pairs: LayerMap,
    seed: int = 0,
    max_units: int = MAX_UNITS,
    best_experts: int = BEST_EXPERTS,
) -> TestResult | None:
    """Per matched layer pair (per expert pair in MoE) ρ_l, z_l = ρ_l√(n_l−1); Fisher over all of them.

    ``pairs``: the layer map (layer of A, layer of B), A being the wider model the alignment maps from.
    None when no matched layer pair has the same MLP kind on both sides (the caller says it does not apply).
    Budgets (methods.md §L7.2.3): ``max_units`` of B's units per block, ``best_experts`` expert pairs per MoE
    layer; matrices are read as float32."""
    rng = np.random.default_rng(seed)
    per_layer = []
    f32 = np.float32
    with layout_a.handle.counting("phi_u"), layout_b.handle.counting("phi_u"):
        for la, lb in pairs:
            for blk in mlp_blocks(layout_a, layout_b, la, lb, al, best_experts):
                (up, down), (e_a, e_b) = blk["roles"], blk["experts"]
                up_b = layout_b.read(up, lb, e_b, dtype=f32)
                rho, n = layer_rho(
                    layout_a.read(up, la, e_a, dtype=f32),
                    layout_a.read(down, la, e_a, dtype=f32),
                    up_b,
                    layout_b.read(down, lb, e_b, dtype=f32),
                    al,
                    subsample_units(rng, up_b.shape[0], max_units),
                )
                per_layer.append(LayerRho(la, lb, rho, n, spearman_z(rho, n), block=blk["block"]))
    if not per_layer:
        return None
    return combine_layers("phi_u", per_layer, ANALYTIC_NULL + " (and expert pairs)")
