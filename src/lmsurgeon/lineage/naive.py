"""Stage 1 (methods.md §L2, §L6): the seed's norm-gain comparison, faithfully, with its corrections beside it.

Raw cosine of positive, clustered gains is ≈ 1/√((1+cv_a²)(1+cv_b²)) whatever the models, so every table here
carries the centered (Pearson) and rank (Spearman) versions and the shuffled-element control.
"""

from __future__ import annotations

import numpy as np

from lmsurgeon.lineage import stats

DEFAULT_FOCUS = 10


def depth_map(n_a: int, n_b: int) -> list[tuple[int, int]]:
    """Relative-depth pairs t = i/(L−1): each layer of the shallower model to the nearest-t layer of the deeper."""
    if n_a == n_b:
        return [(i, i) for i in range(n_a)]
    short, long_ = (n_a, n_b) if n_a < n_b else (n_b, n_a)
    t_long = np.arange(long_) / max(long_ - 1, 1)
    pairs = []
    for i in range(short):
        t = i / max(short - 1, 1)
        j = int(np.argmin(np.abs(t_long - t) + 1e-12 * np.arange(long_)))  # ties → lower index
        pairs.append((i, j) if n_a < n_b else (j, i))
    return pairs


def monotone_map(R: np.ndarray) -> list[tuple[int, int]]:
    """Increasing map of the shallower model's layers into the deeper one maximising Σ r (dynamic programming)."""
    R = np.nan_to_num(np.asarray(R, dtype=np.float64), nan=0.0)
    flip = R.shape[0] > R.shape[1]
    if flip:
        R = R.T
    m, n = R.shape
    best = np.full((m + 1, n + 1), -np.inf)
    best[0, :] = 0.0
    for i in range(1, m + 1):
        for j in range(i, n + 1):
            best[i, j] = max(best[i, j - 1], best[i - 1, j - 1] + R[i - 1, j - 1])
    pairs, i, j = [], m, n
    while i > 0:
        if j > i and best[i, j] == best[i, j - 1]:
            j -= 1
        else:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
    pairs.reverse()
    return [(b, a) for a, b in pairs] if flip else pairs


def compare_vectors(a, b, seed: int = 0) -> dict:
    """Every same-layer number of the table: raw, Pearson, Spearman, shuffled control, symmetric relative L2."""
    sh = stats.shuffled_control(a, b, seed=seed)
    return {
        "raw_cosine": stats.cosine(a, b),
        "pearson": stats.pearson(a, b),
        "spearman": stats.spearman(a, b),
        "shuffled_expected": sh["expected"],
        "shuffled_mean": sh["mean"],
        "shuffled_std": sh["std"],
        "rel_l2": stats.rel_l2(a, b),
    }


def layer_matrix(va: dict, vb: dict, fn) -> np.ndarray:
    """fn(a_i, b_j) for all layer pairs (the seed's "confusion" heatmaps); nan where widths differ."""
    la, lb = sorted(va), sorted(vb)
    M = np.full((len(la), len(lb)), np.nan)
    for x, i in enumerate(la):
        for y, j in enumerate(lb):
            if va[i].shape == vb[j].shape:
                M[x, y] = fn(va[i], vb[j])
    return M


def self_contrast(M: np.ndarray) -> float:
    """Diagonal mean minus off-diagonal mean of a model-vs-itself matrix: how alike all its layers look."""
    off = M[~np.eye(M.shape[0], dtype=bool)]
    return float(np.nanmean(np.diag(M)) - np.nanmean(off)) if off.size else float("nan")


def pair_naive(na: dict, nb: dict, depth: str = "relative", seed: int = 0) -> dict:
    """Same-layer table, layer×layer matrices and the pair's headline means over per-layer gain norms."""
    rows, matrices = [], {}
    for role in sorted(set(na) & set(nb)):
        va, vb = na[role], nb[role]
        if None in va or None in vb:  # final norm: one vector each
            pairs = [(None, None)]
        else:
            la, lb = sorted(va), sorted(vb)
            matrices[role] = {"raw": layer_matrix(va, vb, stats.cosine), "pearson": layer_matrix(va, vb, stats.pearson)}
            idx = monotone_map(matrices[role]["pearson"]) if depth == "monotone" else depth_map(len(la), len(lb))
            pairs = [(la[i], lb[j]) for i, j in idx]
        for i, j in pairs:
            if va[i].shape != vb[j].shape:
                rows.append({"role": role, "layer_a": i, "layer_b": j, "raw_cosine": "n/a (widths differ)"})
                continue
            rows.append({"role": role, "layer_a": i, "layer_b": j, **compare_vectors(va[i], vb[j], seed)})
    gains = [
        r
        for r in rows
        if not r["role"].endswith(".bias") and r["layer_a"] is not None and isinstance(r["raw_cosine"], float)
    ]

    def mean(key):
        v = np.array([r[key] for r in gains], dtype=np.float64)
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")

    return {
        "same_layer": rows,
        "matrices": matrices,
        "mean_raw_cosine": mean("raw_cosine"),
        "mean_pearson": mean("pearson"),
        "mean_spearman": mean("spearman"),
        "mean_shuffled": mean("shuffled_expected"),
    }


def focus_layer(n_layers: int, requested: int | None) -> int:
    """The seed's headline layer: 10 when it exists, else the middle."""
    if requested is not None:
        return requested
    return DEFAULT_FOCUS if n_layers > DEFAULT_FOCUS else n_layers // 2


def gain_summary(nv: dict) -> list[dict]:
    """mean/std/cv/min/max per role and layer: the distribution that raw cosine actually measures."""

    def order(kv):
        return -1 if kv[0] is None else kv[0]

    return [
        {"role": role, "layer": layer, **stats.gain_summary(v)}
        for role, per in nv.items()
        if not role.endswith(".bias")
        for layer, v in sorted(per.items(), key=order)
    ]


def gamma_fold_demo(na: dict, nb: dict) -> dict:
    """What folding does to the naive numbers: A's gains set to u = 1, or to B's gains (a transplant).

    u = 1 leaves raw cosine at 1/√(1+cv_B²) and Pearson undefined; u = B's gains forges raw = Pearson = 1.
    The function is unchanged in both cases (the tests fold real checkpoints and compare logits).
    """
    out = []
    for role in sorted(set(na) & set(nb)):
        if role.endswith(".bias") or None in na[role]:
            continue
        for i in sorted(set(na[role]) & set(nb[role])):
            a, b = na[role][i], nb[role][i]
            if a.shape != b.shape:
                continue
            ones = np.ones_like(a)
            out.append(
                {
                    "role": role,
                    "layer": i,
                    "pearson_before": stats.pearson(a, b),
                    "raw_before": stats.cosine(a, b),
                    "raw_after_u1": stats.cosine(ones, b),
                    "pearson_after_u1": stats.pearson(ones, b),
                    "raw_after_transplant": stats.cosine(b, b),
                    "pearson_after_transplant": stats.pearson(b, b),
                }
            )
    return {"rows": out}
