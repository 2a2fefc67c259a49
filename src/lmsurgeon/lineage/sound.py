"""Stage 2 for one pair: residual alignment, then the weight tests, each with ``applies`` and why not."""

from __future__ import annotations

import numpy as np

from lmsurgeon.lineage.align import MIN_SHARED, align_residual, align_rotation, shared_tokens
from lmsurgeon.lineage.awm import awm_test
from lmsurgeon.lineage.checks import problem
from lmsurgeon.lineage.phi_u import mlp_kind, phi_u_test


def not_applicable(name: str, reason: str) -> dict:
    return {"name": name, "applies": False, "reason": reason, "statistic": None, "z": None,
            "neg_log10_p": None, "null": None, "per_layer": []}


def _roles_present(layout, roles) -> str | None:
    for r in roles:
        missing = [i for i in layout.layers if not layout.has(r, i)]
        if missing:
            return f"{layout.handle.name} has no {r!r} in layer {missing[0]}"
    return None


def _mlp_missing(layout) -> str | None:
    """Why φ_U cannot read a model's MLPs (a layer with neither up/down nor router + experts), or None."""
    bad = [i for i in layout.layers if mlp_kind(layout, i) is None]
    return f"{layout.handle.name} has no up/down or experts in layer {bad[0]}" if bad else None


def alignment(la, lb, seed: int = 0, method: str = "permutation"):
    """(alignment, swapped, reason): B is the narrower model; fails with a reason when too few shared tokens.

    ``method``: ``permutation`` (units and signs, spec §7.1) or ``procrustes`` (any orthogonal map)."""
    swapped = lb.hidden_size > la.hidden_size
    if swapped:
        la, lb = lb, la
    ta, tb = la.handle.tokenizer, lb.handle.tokenizer
    if ta is None or tb is None:
        return None, swapped, "a model has no tokenizer.json (shared tokens unknown)"
    ia, ib = shared_tokens(ta, tb, seed=seed)
    need = max(MIN_SHARED, lb.hidden_size)
    if ia.size < need:
        return None, swapped, f"only {ia.size} shared tokens (< {need} needed)"
    E_A, E_B = la.read_rows("embed", ia), lb.read_rows("embed", ib)
    for lay, E in ((la, E_A), (lb, E_B)):
        why = problem(E)
        if why:
            return None, swapped, f"bad numbers: {lay.handle.name} embedding rows have {why}"
    fit = align_rotation if method == "procrustes" else align_residual
    return fit(E_A, E_B), swapped, ""


def weight_tests(la, lb, tests: tuple[str, ...], seed: int = 0,
                 align: str = "permutation") -> tuple[list[dict], dict]:
    """awm and phi_u for one pair (B narrower after an internal swap); returns the tests and alignment facts."""
    al, swapped, why = alignment(la, lb, seed, align)
    if swapped:
        la, lb = lb, la
    facts = {"method": align, "swapped": swapped, "shared_tokens": None if al is None else al.n_tokens,
             "embedding_mean_abs_corr": None if al is None else al.mean_abs_corr}
    out = []
    awm = None
    if "awm" in tests or "phi_u" in tests:
        missing = _roles_present(la, ("q", "k")) or _roles_present(lb, ("q", "k"))
        awm = not_applicable("awm", why or missing) if al is None or missing else awm_test(la, lb, al, seed=seed)
        if swapped and awm.get("applies"):
            awm["layer_map"] = [[b, a] for a, b in awm["layer_map"]]
            awm["per_layer"] = [{"a": p["b"], "b": p["a"], "cka": p["cka"]} for p in awm["per_layer"]]
        if "awm" in tests:
            out.append(awm)
    if "phi_u" in tests:
        missing = _mlp_missing(la) or _mlp_missing(lb)
        if al is None or missing:
            out.append(not_applicable("phi_u", why or missing))
        elif not awm.get("applies"):
            out.append(not_applicable("phi_u", "no layer map (awm did not apply)"))
        else:
            pairs = [(la.layers.index(a), lb.layers.index(b)) for a, b in
                     ([[b, a] for a, b in awm["layer_map"]] if swapped else awm["layer_map"])]
            t = phi_u_test(la, lb, al, pairs, seed=seed) or not_applicable(
                "phi_u", "no matched layer pair has the same MLP kind (dense or experts) on both")
            if swapped:
                t["per_layer"] = [{**p, "a": p["b"], "b": p["a"]} for p in t["per_layer"]]
            out.append(t)
    return out, facts


def null_from_values(values: list[float], source: str) -> dict | None:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return None
    return {"source": source, "mean": float(v.mean()), "std": float(v.std(ddof=1)), "n": int(v.size)}
