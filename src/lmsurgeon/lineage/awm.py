"""AWM-style attention test (methods.md §L7.2): CKA of aligned q/k weights, layer by layer, with a layer map.

Items are the aligned residual dimensions (n = d_B), features the output rows of W_q / W_k. Item rows are
scaled to unit norm, so folding a norm gain into q/k (a per-item scale) leaves every number unchanged.
The test runs with the wider model as A (the alignment brings A into B's basis); its caller turns the result.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from lmsurgeon.lineage.align import Alignment
from lmsurgeon.lineage.cka import Grams, cka_matrix, item_permutation_null, layer_map, matched_mean
from lmsurgeon.lineage.results import LayerCka, LayerMap, Null, OtherNulls, TestResult
from lmsurgeon.lineage.stats import unit_norm
from lmsurgeon.lineage.verdict import T_LO

N_PERMUTATIONS = 20
MAX_ITEMS = 1024
ROLES = ("q", "k")


def items_a(W: np.ndarray, al: Alignment) -> np.ndarray:
    """A's input side in B's residual basis: (W_A[:, π])ᵀ or (W_A R)ᵀ, [d_B, out]."""
    return unit_norm(al.a_in(W).T, axis=1)


def items_b(W: np.ndarray, al: Alignment) -> np.ndarray:
    """B's input side with recovered signs: (W_B·diag(s))ᵀ, [d_B, out]."""
    return unit_norm(al.b_in(W).T, axis=1)


def item_sample(al: Alignment, max_items: int, seed: int = 0) -> tuple[Alignment, np.ndarray]:
    """The alignment restricted to at most ``max_items`` of B's residual dimensions chosen by seed, and those
    dimensions (sorted): the CKA items of both models (methods.md §L7.2.3). All of them when B has fewer."""
    d_b = al.perm.size
    if d_b <= max_items:
        return al, np.arange(d_b)
    idx = np.sort(np.random.default_rng([seed, d_b]).choice(d_b, max_items, replace=False))
    rot = None if al.rotation is None else al.rotation[:, idx]
    return replace(al, perm=al.perm[idx], sign=al.sign[idx], rotation=rot), idx


def layer_grams(layout, al: Alignment, side: str, items: np.ndarray | None = None) -> dict[str, list[Grams]]:
    """Per role (q, k), per layer: the precomputed Gram pieces of the item matrices.

    ``al`` is :func:`item_sample`'s restricted alignment and ``items`` its B dimensions (None: all). Weights are
    read as float32 and one layer at a time, so memory holds one q matrix plus the kept Gram pieces."""
    out: dict[str, list[Grams]] = {role: [] for role in ROLES}
    with layout.handle.counting("awm"):
        for i in layout.layers:
            for role in ROLES:
                W = layout.read(role, i, dtype=np.float32)
                X = items_a(W, al) if side == "a" else items_b(W if items is None else W[:, items], al)
                del W
                out[role].append(Grams(X))
    return out


def unmatched_null(M: np.ndarray, pairs: LayerMap) -> Null:
    """The statistic under wrong layer maps: each matched A layer paired with another B layer.

    Within one model, layers i ≠ j start from independent random weights yet live in the same residual basis,
    see the same tokens and the same training, so their CKA measures exactly what two same-data independents
    share. The wrong entries are every M[i, j′] with (i, j) matched and j′ ≠ j; the statistic, a mean over the
    L′ matched pairs, has under this null their mean and standard deviation σ·√(1/L′ + 1/n_wrong) (σ of the
    entries: with a two-layer B, a random wrong map has no spread of its own, yet its entries do). The std is nan
    (no null) when fewer than two wrong entries exist.
    """
    wrong = [float(M[i, jj]) for i, j in pairs for jj in range(M.shape[1]) if jj != j]
    wrong = [w for w in wrong if np.isfinite(w)]
    if len(wrong) < 2:
        return Null("wrong layer maps", float("nan"), float("nan"), len(wrong))
    w = np.asarray(wrong)
    spread = float(w.std(ddof=1) * np.sqrt(1.0 / len(pairs) + 1.0 / w.size))
    return Null(f"{w.size} wrong layer pairs (same pair, unmatched layers)", float(w.mean()), spread, int(w.size))


CALIBRATION_FILE = Path(__file__).parent / "calibration.json"


def calibration_key(method: str) -> str:
    return "awm" if method == "permutation" else f"awm_{method}"


def shipped_null(method: str = "permutation") -> Null | None:
    """The calibration shipped with the package (``benchmarks/calibrate_lineage.py``): mean CKA of independently
    trained same-data models under the given residual alignment."""
    data = json.loads(CALIBRATION_FILE.read_text()).get(calibration_key(method))
    return None if data is None else Null.of(data["values"], data["source"])


def guarded_z(s: float, independents: Null | None, guard: Null) -> tuple[float, Null]:
    """z against the independents' null, unless the pair fails to beat its own wrong layer maps by T_lo.

    The z a verdict needs is the one against what independently trained models score (methods.md §L7.5.1; the published
    AWM separation is measured the same way). The within-pair wrong-layer null is a guard: same basis, same
    training, different weights; when the matched layers do not clear it by T_lo standard deviations, its (lower)
    z is the one reported, so a basis that matches everything can never be called derived.
    """
    z_guard = guard.z(s)
    if independents is None:
        return z_guard, guard
    z_ind = independents.z(s)
    if np.isfinite(z_guard) and z_guard < T_LO and z_guard < z_ind:
        return z_guard, guard
    return z_ind, independents


def awm_test(
    layout_a,
    layout_b,
    al: Alignment,
    seed: int = 0,
    max_items: int = MAX_ITEMS,
    permutations: int = N_PERMUTATIONS,
) -> TestResult:
    """Run the test: CKA matrix, layer map, statistic (mean matched CKA), z against a null, per-layer CKA.

    Budgets (methods.md §L7.2.3): ``max_items`` residual dimensions as items, ``permutations`` draws of the
    item-permutation null."""
    sub, items = item_sample(al, max_items, seed)
    GA, GB = layer_grams(layout_a, sub, "a"), layer_grams(layout_b, sub, "b", items)
    M = cka_matrix(GA, GB)
    pairs = layer_map(M)
    s = matched_mean(M, pairs)
    perm = item_permutation_null(GA, GB, pairs, seed, permutations, "residual")
    inner = unmatched_null(M, pairs)
    independents = shipped_null(al.method)  # a fitted rotation has more freedom: its own calibration
    t = TestResult(
        "awm",
        applies=True,
        align=al.method,
        statistic=s,
        nulls=OtherNulls(permutation=perm, unmatched_layers=inner, independents=independents, z_permutation=perm.z(s)),
        per_layer=[LayerCka(i, j, float(M[i, j])) for i, j in pairs],
        layer_map=pairs,
        monotone=bool(all(b1 < b2 for (_, b1), (_, b2) in zip(pairs, pairs[1:], strict=False))),
        matrix=M,
    )
    t.set_z(*guarded_z(s, independents, inner if np.isfinite(inner.std) else perm))
    return t
