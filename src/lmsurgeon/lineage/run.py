"""``compare(sources)``: naive report plus sound tests for every pair; returns exactly what results.json holds."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np

from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.io import open_model
from lmsurgeon.lineage import naive
from lmsurgeon.lineage.activations import ACTIVATION_TESTS, activation_tests
from lmsurgeon.lineage.align import ALIGN_METHODS
from lmsurgeon.lineage.awm import guarded_z
from lmsurgeon.lineage.checks import CheckedLayout, invalidate_tests
from lmsurgeon.lineage.norms import is_pre_norm, norm_vectors
from lmsurgeon.lineage.sound import not_applicable, null_from_values, weight_tests
from lmsurgeon.lineage.stats import log_p_from_z, neg_log10_p, z_against
from lmsurgeon.lineage.verdict import T_HI, T_LO, verdict

ALL_TESTS = ("awm", "phi_u", "phi_match", "act_cka")


def _model_entry(name: str, source: str, layout) -> dict:
    h = layout.handle
    return {"name": name, "source": str(source), "revision": h.revision, "family": layout.family.name,
            "n_layers": layout.n_layers, "hidden_size": layout.hidden_size, "bytes_read": h.bytes_read}


ANALYTIC_Z = ("phi_u", "phi_match")  # tests whose statistic for the --null comparison is their analytic z


def _null_value(t: dict) -> float:
    return t["z"] if t["name"] in ANALYTIC_Z else t["statistic"]


def _apply_null(test: dict, values: list[float]) -> None:
    """Replace a test's z by the independents' null: z = (s − μ₀)/max(σ₀, 0.001) (s = statistic, or the
    analytic z for φ_U and φ_MATCH)."""
    null = null_from_values(values, f"{len(values)} comparisons with the --null models")
    if null is None or not test.get("applies"):
        return
    s = _null_value(test)
    test.setdefault("nulls", {})["own"] = {**(test.get("null") or {}), "z": test["z"]}
    test["null"], test["z"] = null, z_against(s, null["mean"], null["std"])
    inner = test.get("nulls", {}).get("unmatched_layers")
    if test["name"] == "awm" and inner and np.isfinite(inner["std"]):
        test["z"], test["null"] = guarded_z(s, null, inner)
    test["neg_log10_p"] = neg_log10_p(log_p_from_z(test["z"]))


def _run_activation_tests(la, lb, texts, wanted, seed) -> list[dict]:
    try:
        return activation_tests(la, lb, texts, wanted, seed)
    except (LmsurgeonError, MemoryError, OSError, ValueError) as e:
        return [not_applicable(t, f"cannot run the models: {e}") for t in wanted]


def _apply_nulls(tests: list[dict], la, lb, null_layouts, run_tests) -> None:
    """Recalibrate ``tests`` against A and B each compared once with every --null model (``run_tests(x, nl)``
    returns all the tests of one comparison)."""
    refs = [r for nl in null_layouts for x in (la, lb) for r in run_tests(x, nl)]
    for t in tests:
        _apply_null(t, [_null_value(r) for r in refs if r["name"] == t["name"] and r.get("applies")])


def pair_tests(la, lb, tests, seed, texts_fn, null_layouts, align="permutation") -> tuple[list[dict], dict]:
    weight = tuple(t for t in tests if t in ("awm", "phi_u"))
    out, facts = weight_tests(la, lb, weight, seed, align)
    if null_layouts and out:
        _apply_nulls(out, la, lb, null_layouts, lambda x, nl: weight_tests(x, nl, weight, seed, align)[0])
    wanted = [t for t in ACTIVATION_TESTS if t in tests]
    if wanted:
        acts = _run_activation_tests(la, lb, texts_fn(), wanted, seed)
        decisive = [t for t in acts if t["name"] == "phi_match"]   # act_cka never decides: its own null stays
        if null_layouts and decisive:
            _apply_nulls(decisive, la, lb, null_layouts,
                         lambda x, nl: _run_activation_tests(x, nl, texts_fn(), ("phi_match",), seed))
        out += acts
    return out, facts


def compare(sources: list[str], out: str | Path | None = None, *, naive_only: bool = False,
            tests: tuple[str, ...] = ALL_TESTS, null: list[str] | None = None, focus_layer: int | None = None,
            depth: str = "relative", align: str = "permutation", text: str | None = None, seed: int = 0,
            overwrite: bool = False,
            write: bool = True, progress: bool = False, all_pairs: bool = False) -> dict:
    """Compare ``sources[0]`` against each other source (every pair with ``all_pairs``); write the run folder
    (unless ``write`` is False) and return results.

    The first source is the model whose descendants are in question, so A-vs-each is the default; every pair
    (n·(n−1)/2) is for surveys such as the benchmark.

    ``align``: how B's residual basis is matched to A's for the weight tests, ``permutation`` (units and signs)
    or ``procrustes`` (any rotation, for models whose gains were folded and basis rotated).

    Reads only norm tensors for the naive part; the sound tests add the shared embedding rows and the q/k/up/down
    matrices. Bytes read are reported per model.
    """
    if len(sources) < 2:
        raise LmsurgeonError("lineage needs at least two models", ", ".join(map(str, sources)))
    unknown = set(tests) - set(ALL_TESTS)
    if unknown:
        raise LmsurgeonError(f"unknown tests {sorted(unknown)} (known: {', '.join(ALL_TESTS)})", "--tests")
    if align not in ALIGN_METHODS:
        raise LmsurgeonError(f"unknown alignment {align!r} (known: {', '.join(ALIGN_METHODS)})", "--align")
    t0 = time.time()
    names = _unique_names(sources)
    layouts = [CheckedLayout(open_model(s)) for s in sources]
    nvs = [norm_vectors(lay) for lay in layouts]
    naive_bytes = [lay.handle.bytes_read for lay in layouts]
    t_naive = time.time()
    texts_cache: list = []

    def texts():
        if not texts_cache:
            from lmsurgeon.data import load_texts
            texts_cache.extend(load_texts(text, split="validation")[:64])
        return texts_cache

    fold_demo = {}
    if not naive_only:
        from lmsurgeon.lineage.fold import fold_logit_change
        for name, lay in zip(names, layouts, strict=True):
            if is_pre_norm(lay):
                fold_demo[name] = fold_logit_change(lay, " ".join(texts()[:2]))
    null_layouts = [CheckedLayout(open_model(s)) for s in (null or [])]
    pairs, naive_same = [], []
    combos = (list(itertools.combinations(range(len(sources)), 2)) if all_pairs
              else [(0, k) for k in range(1, len(sources))])
    if progress:
        from rich.progress import track
        combos = track(combos, description="lineage pairs", transient=True)
    for x, y in combos:
        pn = naive.pair_naive(nvs[x], nvs[y], depth=depth, seed=seed)
        fl = naive.focus_layer(min(layouts[x].n_layers, layouts[y].n_layers), focus_layer)
        naive_same.append({"a": names[x], "b": names[y], "rows": pn["same_layer"],
                           "focus": [r for r in pn["same_layer"] if r["layer_a"] == fl]})
        entry = {"a": names[x], "b": names[y],
                 "naive": {k: pn[k] for k in ("mean_raw_cosine", "mean_pearson", "mean_spearman", "mean_shuffled")},
                 "gamma_fold": naive.gamma_fold_demo(nvs[x], nvs[y]) if is_pre_norm(layouts[x]) else None,
                 "_matrices": pn["matrices"]}
        if naive_only:
            entry.update(verdict="inconclusive", reasons=["--naive-only: naive numbers never decide"],
                         tests=[], layer_map=None)
        else:
            t_pair = time.time()
            before = [layouts[x].handle.bytes_read, layouts[y].handle.bytes_read]
            tlist, facts = pair_tests(layouts[x], layouts[y], tests, seed, texts, null_layouts, align)
            invalidate_tests(tlist, [layouts[x], layouts[y]])
            v, reasons = verdict(tlist)
            awm = next((t for t in tlist if t["name"] == "awm" and t.get("applies")), None)
            act = next((t for t in tlist if t["name"] == "act_cka" and t.get("applies")), None)
            entry.update(verdict=v, reasons=reasons, tests=tlist, alignment=facts,
                         layer_map=(awm or act or {}).get("layer_map"),
                         seconds=time.time() - t_pair,
                         bytes_read={"a": layouts[x].handle.bytes_read - before[0],
                                     "b": layouts[y].handle.bytes_read - before[1]})
        pairs.append(entry)
    body = {
        "models": [_model_entry(n, s, lay) | {"naive_bytes_read": nb, "bad_numbers": list(lay.bad.values())}
                   for n, s, lay, nb in zip(names, sources, layouts, naive_bytes, strict=True)],
        "thresholds": {"T_hi": T_HI, "T_lo": T_LO},
        "naive": {"focus_layer": naive.focus_layer(min(lay.n_layers for lay in layouts), focus_layer),
                  "same_layer": naive_same,
                  "gain_summary": {n: naive.gain_summary(nv) for n, nv in zip(names, nvs, strict=True)},
                  "gamma_fold": {f"{p['a']} vs {p['b']}": p["gamma_fold"] for p in pairs},
                  "gamma_fold_logits": fold_demo},
        "pairs": [{k: v for k, v in p.items() if not k.startswith("_") and k != "gamma_fold"} for p in pairs],
    }
    timings = {"naive_seconds": t_naive - t0, "total_compare_seconds": time.time() - t0}
    if not write:
        from lmsurgeon.report.results import jsonable
        return jsonable({"schema": "lmsurgeon/lineage@1", "seed": seed, **body, "timings": timings})
    from lmsurgeon.lineage.report import write_run
    return write_run(out, body, layouts, nvs, pairs, names, seed=seed, timings=timings, overwrite=overwrite)


def _unique_names(sources) -> list[str]:
    names = []
    for s in sources:
        base = Path(str(s).rstrip("/")).name or str(s)
        n, k = base, 2
        while n in names:
            n, k = f"{base}#{k}", k + 1
        names.append(n)
    return names


run = compare

__all__ = ["compare", "run"]
