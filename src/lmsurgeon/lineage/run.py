"""``compare(sources)``: naive report plus sound tests for every pair; returns exactly what results.json holds.

The steps, in order: open every model and read its norm gains (the naive part reads nothing else); fold each
pre-norm model's gains to show they carry no function; then per pair the naive comparison and, unless
``naive_only``, the sound tests (weight tests, their ``--null`` recalibration, activation tests), the bad-number
check and the verdict; last, the results body and the run folder.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np

from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.io import open_model
from lmsurgeon.lineage import naive
from lmsurgeon.lineage.activations import ACTIVATION_TESTS, activation_tests
from lmsurgeon.lineage.awm import guarded_z
from lmsurgeon.lineage.checks import CheckedLayout, invalidate_tests
from lmsurgeon.lineage.config import ALL_TESTS, LineageConfig
from lmsurgeon.lineage.norms import is_pre_norm, norm_vectors
from lmsurgeon.lineage.results import AlignmentFacts, NaiveSummary, Null, OtherNulls, PairResult, TestResult, Verdict
from lmsurgeon.lineage.sound import WEIGHT_TESTS, weight_tests
from lmsurgeon.lineage.verdict import T_HI, T_LO, verdict
from lmsurgeon.report.progress import stage, task

SCHEMA = "lmsurgeon/lineage@1"
N_TEXTS = 64


@dataclass
class Model:
    """One source, opened: its unique display name, layout (recording bad numbers) and norm gains."""

    name: str
    source: str
    layout: CheckedLayout
    norms: dict
    naive_bytes_read: int

    def entry(self) -> dict:
        """The model's ``results.json`` entry (bytes read so far)."""
        h, lay = self.layout.handle, self.layout
        return {
            "name": self.name,
            "source": str(self.source),
            "revision": h.revision,
            "family": lay.family.name,
            "n_layers": lay.n_layers,
            "hidden_size": lay.hidden_size,
            "bytes_read": h.bytes_read,
            "naive_bytes_read": self.naive_bytes_read,
            "tensor_bytes": dict(h.tensor_bytes),
            "bad_numbers": list(lay.bad.values()),
        }


def compare(
    sources: list[str],
    out: str | Path | None = None,
    config: LineageConfig | None = None,
    *,
    overwrite: bool = False,
    write: bool = True,
    progress: bool = False,
    **options,
) -> dict:
    """Compare ``sources[0]`` against each other source (every pair with ``all_pairs``); write the run folder
    (unless ``write`` is False) and return the results.

    ``config`` holds every analysis choice (:class:`LineageConfig`); its fields may also be given as keywords
    (``compare(srcs, tests=("awm",), align="procrustes")``), which replace those of ``config``. ``out`` is the
    run folder (default ``runs/lineage-<timestamp>``); the returned dict is what results.json holds, plus
    ``out``, the run folder written (absent with ``write=False``).

    The first source is the model whose descendants are in question, so A-vs-each is the default; every pair
    (n·(n−1)/2) is for surveys such as the benchmark. Reads only norm tensors for the naive part; the sound
    tests add the shared embedding rows and the q/k/up/down matrices. Bytes read are reported per model.
    """
    config = LineageConfig.build(config, **options)
    if len(sources) < 2:
        raise LmsurgeonError("lineage needs at least two models", ", ".join(map(str, sources)))
    t0 = time.time()
    models = open_models(sources)
    t_naive = time.time()
    texts = _text_loader(config.text)
    fold_logits = {} if config.naive_only else fold_demos(models, texts)
    null_layouts = [CheckedLayout(open_model(s)) for s in config.null]
    pairs = []
    combos = _pair_indices(len(models), config.all_pairs)
    with task("lineage: pairs", len(combos), progress) as update:
        for done, (x, y) in enumerate(combos):
            stage(f"lineage: {models[x].name} vs {models[y].name}")
            pairs.append(compare_pair(models[x], models[y], config, texts, null_layouts))
            update(done + 1)
    body = results_body(models, pairs, config, fold_logits)
    timings = {"naive_seconds": t_naive - t0, "total_compare_seconds": time.time() - t0}
    if not write:
        from lmsurgeon.report.results import jsonable

        return jsonable({"schema": SCHEMA, "seed": config.seed, **body, "timings": timings})
    from lmsurgeon.lineage.report import write_run

    return write_run(out, body, models, pairs, seed=config.seed, timings=timings, overwrite=overwrite)


# -- steps -------------------------------------------------------------------------------------------------
def open_models(sources: list[str]) -> list[Model]:
    """Open every source and read its norm gains (nothing else yet)."""
    out = []
    for name, source in zip(_unique_names(sources), sources, strict=True):
        layout = CheckedLayout(open_model(source))
        with layout.handle.counting("naive"):
            norms = norm_vectors(layout)
        out.append(Model(name, source, layout, norms, layout.handle.bytes_read))
    return out


def _text_loader(text: str | None):
    """The activation tests' texts, read on first use only (the first N_TEXTS of the validation split)."""

    @cache
    def texts() -> list[str]:
        from lmsurgeon.data import load_texts

        return load_texts(text, split="validation")[:N_TEXTS]

    return texts


def fold_demos(models: list[Model], texts) -> dict:
    """Per pre-norm model, the largest logit change when all its gains are folded to 1 (γ-fold demonstration)."""
    from lmsurgeon.lineage.fold import fold_logit_change

    return {m.name: fold_logit_change(m.layout, " ".join(texts()[:2])) for m in models if is_pre_norm(m.layout)}


def _pair_indices(n: int, all_pairs: bool) -> list[tuple[int, int]]:
    """Which pairs a run compares: A against each other source, or every pair."""
    return list(itertools.combinations(range(n), 2)) if all_pairs else [(0, k) for k in range(1, n)]


def compare_pair(ma: Model, mb: Model, config: LineageConfig, texts, null_layouts: list[CheckedLayout]) -> PairResult:
    """The naive comparison of one pair and, unless ``naive_only``, its sound tests and verdict."""
    la, lb = ma.layout, mb.layout
    pn = naive.pair_naive(ma.norms, mb.norms, depth=config.depth, seed=config.seed)
    fl = naive.focus_layer(min(la.n_layers, lb.n_layers), config.focus_layer)
    pair = PairResult(
        ma.name,
        mb.name,
        naive=NaiveSummary(pn["mean_raw_cosine"], pn["mean_pearson"], pn["mean_spearman"], pn["mean_shuffled"]),
        verdict=Verdict("inconclusive", ["--naive-only: naive numbers never decide"]),
        matrices=pn["matrices"],
        gamma_fold=naive.gamma_fold_demo(ma.norms, mb.norms) if is_pre_norm(la) else None,
        naive_table={
            "a": ma.name,
            "b": mb.name,
            "rows": pn["same_layer"],
            "focus": [r for r in pn["same_layer"] if r["layer_a"] == fl],
        },
    )
    if config.naive_only:
        return pair
    t_pair = time.time()
    before = [la.handle.bytes_read, lb.handle.bytes_read]
    pair.naive = replace(pair.naive, weight_std=weight_std_naive(la, lb))
    pair.tests, pair.alignment = sound_tests(la, lb, config, texts, null_layouts)
    invalidate_tests(pair.tests, [la, lb])
    pair.verdict = verdict(pair.tests, pair.alignment)
    mapped = [t for name in ("awm", "act_cka") if (t := pair.test(name)) is not None and t.applies]
    pair.layer_map = mapped[0].layer_map if mapped else None
    pair.seconds = time.time() - t_pair
    pair.bytes_read = {"a": la.handle.bytes_read - before[0], "b": lb.handle.bytes_read - before[1]}
    return pair


def weight_std_naive(la, lb) -> dict:
    """The per-layer weight-σ fingerprint of the second dispute (methods.md §L2.1), layers paired by relative
    depth, or why it does not apply. Reported beside the norm cosine; like it, it never decides."""
    from lmsurgeon.lineage.weight_std import ROLES, compare_std_profiles, sampled_std

    pairs = naive.depth_map(la.n_layers, lb.n_layers)
    try:
        profiles = []
        for lay in (la, lb):
            with lay.handle.counting("weight_std"):
                profiles.append({r: [sampled_std(lay, r, i) for i in lay.layers] for r in ROLES})
        c = compare_std_profiles(*profiles, pairs=pairs)
    except (LmsurgeonError, KeyError) as e:
        return {"applies": False, "reason": str(e)}
    return {"applies": True, "fingerprint": c.fingerprint, "per_role": c.per_role, "n_layer_pairs": len(c.pairs)}


def sound_tests(la, lb, config: LineageConfig, texts, null_layouts) -> tuple[list[TestResult], AlignmentFacts]:
    """Weight tests (measured against the ``--null`` models when given), then activation tests."""
    weight = tuple(t for t in config.tests if t in WEIGHT_TESTS)
    seed, align = config.seed, config.align
    out, facts = weight_tests(la, lb, weight, seed, align, config)
    if null_layouts and out:
        measure_against_null_models(
            out, la, lb, null_layouts, lambda x, nl: weight_tests(x, nl, weight, seed, align, config)[0]
        )
    wanted = [t for t in ACTIVATION_TESTS if t in config.tests]
    if wanted:
        acts = _activation_tests(la, lb, texts(), wanted, seed, config)
        decisive = [t for t in acts if t.name == "phi_match"]  # act_cka never decides: its own null stays
        if null_layouts and decisive:
            measure_against_null_models(
                decisive,
                la,
                lb,
                null_layouts,
                lambda x, nl: _activation_tests(x, nl, texts(), ("phi_match",), seed, config),
            )
        out += acts
    return out, facts


def _activation_tests(la, lb, texts, wanted, seed, config: LineageConfig) -> list[TestResult]:
    try:
        with la.handle.counting("activations"), lb.handle.counting("activations"):
            return activation_tests(
                la, lb, texts, wanted, seed, max_memory=config.max_memory, act_layers=config.act_layers
            )
    except (LmsurgeonError, MemoryError, OSError, ValueError) as e:
        return [TestResult.not_applicable(t, f"cannot run the models: {e}") for t in wanted]


def measure_against_null_models(tests: list[TestResult], la, lb, null_layouts, run_tests) -> None:
    """Measure each test against A and B each compared once with every ``--null`` model (``run_tests(x, nl)``
    returns all the tests of one comparison): that null replaces the test's own, which is kept as
    ``nulls.own`` (methods.md §L7.5). awm stays guarded by its wrong layer maps (:func:`guarded_z`)."""
    refs = [r for nl in null_layouts for x in (la, lb) for r in run_tests(x, nl)]
    for t in tests:
        values = [r.value_for_null for r in refs if r.name == t.name and r.applies]
        null = Null.of_finite(values, f"{len(values)} comparisons with the --null models")
        value, own, own_z = t.value_for_null, t.null, t.z
        if null is None or not t.applies or value is None:
            continue
        inner = t.nulls.unmatched_layers if t.nulls else None
        if t.name == "awm" and inner is not None and np.isfinite(inner.std):
            t.set_z(*guarded_z(value, null, inner))
        else:
            t.measure(value, null)
        t.nulls = replace(t.nulls or OtherNulls(), own=own, own_z=own_z)


def results_body(models: list[Model], pairs: list[PairResult], config: LineageConfig, fold_logits: dict) -> dict:
    """What results.json holds besides its common header and timings."""
    return {
        "config": config.to_json(),
        "models": [m.entry() for m in models],
        "thresholds": {"T_hi": T_HI, "T_lo": T_LO},
        "naive": {
            "focus_layer": naive.focus_layer(min(m.layout.n_layers for m in models), config.focus_layer),
            "same_layer": [p.naive_table for p in pairs],
            "gain_summary": {m.name: naive.gain_summary(m.norms) for m in models},
            "gamma_fold": {f"{p.a} vs {p.b}": p.gamma_fold for p in pairs},
            "gamma_fold_logits": fold_logits,
        },
        "pairs": [p.to_json() for p in pairs],
    }


def _unique_names(sources) -> list[str]:
    names = []
    for s in sources:
        base = Path(str(s).rstrip("/")).name or str(s)
        n, k = base, 2
        while n in names:
            n, k = f"{base}#{k}", k + 1
        names.append(n)
    return names


__all__ = ["ALL_TESTS", "LineageConfig", "compare"]
