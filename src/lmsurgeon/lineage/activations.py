"""Activation tests (methods.md §L7.4): both models read the same words, so widths and vocabularies may differ.

Items are whitespace words that both tokenisers end on a token boundary (the word's last sub-token). One pass per
model, streamed block by block when the model does not fit the memory budget (:mod:`lmsurgeon.lineage.act_capture`,
§L7.4.4), records at those items every block's hidden state and every MLP unit's activation and readout. Two tests
use them:

* ``act_cka``: hidden-state CKA per layer pair, layer map by assignment, item-permutation null. Never decisive:
  independents trained on similar data also align (REEF-like).
* ``phi_match`` (after φ_MATCH, Zhu et al., extended to every MLP kind): B's MLP units are matched to A's twice,
  by activation (the input of the down-projection: GELU, ReLU, gated, experts) and by readout (the block's input
  residual on the unit's down column), and ρ = Spearman of the two matchings per matched layer (per expert pair in
  MoE); Fisher over layers with the analytic null of φ_U (§L7.4.2). Both views are unchanged by any rotation of the
  residual stream, so this survives what the weight tests need ``--align procrustes`` for.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from lmsurgeon.lineage.act_capture import Activations, MlpCapture, capture, expert_views, router_logits
from lmsurgeon.lineage.cka import Grams, cka_matrix, item_permutation_null, layer_map, matched_mean
from lmsurgeon.lineage.config import parse_act_layers
from lmsurgeon.lineage.phi_u import (
    ANALYTIC_NULL,
    BEST_EXPERTS,
    MAX_UNITS,
    combine_layers,
    match_units,
    subsample_units,
    two_view_rho,
)
from lmsurgeon.lineage.results import LayerCka, LayerMap, LayerRho, TestResult
from lmsurgeon.lineage.stats import spearman_z, unit_norm

MAX_ITEMS = 1024
MAX_TOKENS = 128
MIN_ITEMS = 16
N_PERMUTATIONS = 20
ACTIVATION_TESTS = ("act_cka", "phi_match")
#: blocks the activation tests run under ``--act-layers auto`` when a model streams (does not fit the memory
#: budget): a derived model's early blocks carry its parent's units and hidden states as its late ones do, and
#: each streamed MoE block of a 100B-class checkpoint is ~4.4 GB read and ~30 s on two cores
STREAMED_ACT_LAYERS = 4


def act_blocks(spec: str | int, n_layers: tuple[int, int], streams: tuple[bool, ...]) -> int:
    """How many leading blocks the activation tests run; each model runs at most its own depth (methods.md
    §L7.4.4).

    ``all``: every block; ``N``: the first N; ``auto``: every block when both models run whole in memory, else
    the first :data:`STREAMED_ACT_LAYERS`, so the default run on two 100B-class checkpoints reads a few blocks of
    each instead of both whole checkpoints.
    """
    limit = parse_act_layers(spec)
    deepest = max(n_layers)
    if limit is None:
        return deepest
    if limit == 0:
        return min(STREAMED_ACT_LAYERS, deepest) if any(streams) else deepest
    return min(limit, deepest)


def word_ends(text: str) -> list[int]:
    return [m.end() for m in re.finditer(r"\S+", text)]


def last_token_at(offsets, ends: list[int]) -> dict[int, int]:
    """char end → index of the token ending there (the word's last sub-token)."""
    by_end = {}
    for t, (s, e) in enumerate(offsets):
        if e > s:
            by_end[e] = t
    return {e: by_end[e] for e in ends if e in by_end}


def encode(tokenizer, texts: list[str]) -> list[dict]:
    """Per text: token ids (at most MAX_TOKENS) and char end → token index."""
    tokenizer.no_truncation()
    enc = []
    for text in texts:
        e = tokenizer.encode(text)
        n = min(len(e.ids), MAX_TOKENS)
        enc.append({"ids": e.ids[:n], "ends": last_token_at(e.offsets[:n], word_ends(text))})
    return enc


def shared_items(enc_a: list[dict], enc_b: list[dict], max_items: int = MAX_ITEMS) -> list[list[int]]:
    """Per text, the char ends both tokenisations end a token at; whole texts in order until the budget is spent."""
    keep = [sorted(set(a["ends"]) & set(b["ends"])) for a, b in zip(enc_a, enc_b, strict=True)]
    budget, trimmed = max_items, []
    for k in keep:
        trimmed.append(k[: max(budget, 0)])
        budget -= len(k)
    return trimmed


def mlp_taps(layout, model) -> list[dict] | None:
    """Per analysed layer: the modules (and output slices) computing gate and up; None unless every layer has a
    dense gated MLP (GPT-2 and BERT have no gate; MoE layers have experts instead)."""
    from lmsurgeon.arch import find_module

    where = [(layout.role_module("gate", i), layout.role_module("up", i)) for i in layout.layers]
    if not where or any(g is None or u is None for g, u in where):
        return None
    layers = find_module(model, layout.family.modules["layers"])
    return [
        {"gate": (layers[i].get_submodule(g[0]), g[1]), "up": (layers[i].get_submodule(u[0]), u[1])}
        for i, (g, u) in zip(layout.layers, where, strict=True)
    ]


def act_cka(HA: list[np.ndarray], HB: list[np.ndarray], seed: int = 0, with_null: bool = True) -> TestResult:
    """CKA matrix of hidden states over the shared items, layer map by assignment, permutation-null z (skipped
    with ``with_null=False`` when only the layer map is wanted, as for phi_match alone)."""
    GA = {"hidden": [Grams(h - h.mean(0)) for h in HA]}
    GB = {"hidden": [Grams(h - h.mean(0)) for h in HB]}
    M = cka_matrix(GA, GB)
    pairs = layer_map(M)
    s = matched_mean(M, pairs)
    t = TestResult(
        "act_cka",
        applies=True,
        decisive=False,
        reason="never decisive: independents trained on similar data also align (REEF-like)",
        statistic=s,
        n_items=HA[0].shape[0],
        layer_map=pairs,
        matrix=M,
        per_layer=[LayerCka(i, j, float(M[i, j])) for i, j in pairs],
    )
    if with_null:
        t.measure(s, item_permutation_null(GA, GB, pairs, seed, N_PERMUTATIONS, "item"))
    return t


def _live_units(*views: np.ndarray) -> np.ndarray:
    """Units (columns) whose every view varies over the items: a dead ReLU unit, or one that is constant on
    these words, has no correlation to match by and would be assigned arbitrarily."""
    spread = [np.asarray(v, dtype=np.float64).std(0) for v in views]
    return np.all([s > 1e-8 * max(float(np.median(s)), 1e-300) for s in spread], axis=0)


def _centered_units(X: np.ndarray) -> np.ndarray:
    """Units as rows of centred outputs, so the cosine of two rows is their correlation over the items."""
    X = np.asarray(X, dtype=np.float64)
    return (X - X.mean(0)).T


def match_rho(view1_a, view2_a, view1_b, view2_b, units: np.ndarray | None) -> tuple[float, int]:
    """ρ = Spearman(σ₁, σ₂) of B's (optionally subsampled) live units matched to A's by correlation over the
    items in two views ([n, m] each: activation and readout, or gate and up outputs); dead units dropped."""
    if units is not None:
        view1_b, view2_b = view1_b[:, units], view2_b[:, units]
    live_a, live_b = _live_units(view1_a, view2_a), _live_units(view1_b, view2_b)
    v1a, v2a = _centered_units(view1_a[:, live_a]), _centered_units(view2_a[:, live_a])
    v1b, v2b = _centered_units(view1_b[:, live_b]), _centered_units(view2_b[:, live_b])
    if min(v1a.shape[0], v1b.shape[0]) < 2:
        return float("nan"), 0
    return two_view_rho(v1a, v1b, v2a, v2b)


def _views(layout, layer: int, cap: MlpCapture, block: tuple[str, int | None]) -> tuple[np.ndarray, np.ndarray]:
    """(activation, readout) of one MLP block of a layer: the dense MLP, an expert, or the shared expert."""
    prefix, expert = block
    if prefix == "mlp":
        assert cap.act is not None and cap.readout is not None
        return cap.act, cap.readout
    return expert_views(layout, layer, cap, prefix, expert)


def _most_used(logits: np.ndarray) -> list[int]:
    return [int(e) for e in np.argsort(-logits.mean(0), kind="stable")[:BEST_EXPERTS]]


def block_pairs(layout_a, layout_b, i: int, j: int, ca: MlpCapture, cb: MlpCapture) -> list[tuple]:
    """The MLP blocks to compare in one matched layer pair, as ``(label, block of A, block of B)``.

    Dense–dense: the MLPs. MoE–MoE: experts matched by the correlation of their router logits over the items
    (assignment), the BEST_EXPERTS best pairs, and the shared experts when both have one. Dense–MoE (an upcycled
    model): the dense MLP against the MoE side's BEST_EXPERTS most-used experts (highest mean router logit)."""
    if ca.kind is None or cb.kind is None:
        return []
    if ca.kind == cb.kind == "dense":
        return [("mlp", ("mlp", None), ("mlp", None))]
    if ca.kind == cb.kind == "moe":
        ea, eb = layout_a.experts(i, "experts.up"), layout_b.experts(j, "experts.up")
        RA, RB = router_logits(layout_a, i, ca), router_logits(layout_b, j, cb)
        sigma = match_units(_centered_units(RA), _centered_units(RB))
        C = unit_norm(_centered_units(RA), axis=1) @ unit_norm(_centered_units(RB), axis=1).T
        best = sorted(((c, sigma[c]) for c in range(len(eb)) if sigma[c] >= 0), key=lambda p: -C[p[1], p[0]])
        out = [
            (f"experts {ea[r]}↔{eb[c]} (router r {C[r, c]:.3f})", ("experts", ea[r]), ("experts", eb[c]))
            for c, r in best[:BEST_EXPERTS]
        ]
        if layout_a.has("shared.up", i) and layout_b.has("shared.up", j):
            out.append(("shared expert", ("shared", None), ("shared", None)))
        return out
    if ca.kind == "dense":
        eb = layout_b.experts(j, "experts.up")
        return [
            (f"mlp↔expert {eb[e]}", ("mlp", None), ("experts", eb[e]))
            for e in _most_used(router_logits(layout_b, j, cb))
        ]
    ea = layout_a.experts(i, "experts.up")
    return [
        (f"expert {ea[e]}↔mlp", ("experts", ea[e]), ("mlp", None)) for e in _most_used(router_logits(layout_a, i, ca))
    ]


def phi_match(
    A: Activations, B: Activations, pairs: LayerMap, layout_a, layout_b, seed: int = 0, max_units: int = MAX_UNITS
) -> TestResult | None:
    """Per matched layer pair (per expert pair in MoE) ρ_l of the activation and readout matchings,
    z_l = ρ_l√(n_l−1); Fisher over all of them (the combination of φ_U, methods.md §L7.3.2, §L7.4.2).
    None when no matched layer pair has an MLP on both sides."""
    rng = np.random.default_rng(seed)
    per_layer = []
    for i, j in pairs:
        ca, cb = A.mlp[i], B.mlp[j]
        for label, block_a, block_b in block_pairs(layout_a, layout_b, i, j, ca, cb):
            act_a, read_a = _views(layout_a, i, ca, block_a)
            act_b, read_b = _views(layout_b, j, cb, block_b)
            units = subsample_units(rng, act_b.shape[1], max_units)
            rho, n = match_rho(act_a, read_a, act_b, read_b, units)
            per_layer.append(LayerRho(i, j, rho, n, spearman_z(rho, n), block=label))
    if not per_layer:
        return None
    return combine_layers("phi_match", per_layer, ANALYTIC_NULL + " (activation vs readout; expert pairs)")


def activation_tests(
    layout_a,
    layout_b,
    texts: list[str],
    tests=ACTIVATION_TESTS,
    seed: int = 0,
    max_memory: int | str | None = None,
    mode: str = "auto",
    act_layers: str | int = "auto",
) -> list[TestResult]:
    """Run both models (streamed block by block when one does not fit ``max_memory``) on ``texts`` once, through
    the leading blocks ``act_layers`` gives (:func:`act_blocks`), and compute the requested activation tests."""
    from lmsurgeon.streaming import compute_dtype, wants_streaming

    tests = [t for t in ACTIVATION_TESTS if t in tests]
    if layout_a.handle.tokenizer is None or layout_b.handle.tokenizer is None:
        return [TestResult.not_applicable(t, "a model has no tokenizer.json") for t in tests]
    enc_a, enc_b = encode(layout_a.handle.tokenizer, texts), encode(layout_b.handle.tokenizer, texts)
    keep = shared_items(enc_a, enc_b)
    n = sum(len(k) for k in keep)
    if n < MIN_ITEMS:
        return [TestResult.not_applicable(t, f"only {n} shared word items in the text") for t in tests]
    with_mlp = "phi_match" in tests
    layouts = (layout_a, layout_b)
    streams = tuple(wants_streaming(lay.handle, torch.float32, mode, max_memory) for lay in layouts)
    dtypes = tuple(
        compute_dtype(lay.handle, max_memory) if streamed else torch.float32
        for lay, streamed in zip(layouts, streams, strict=True)
    )
    k = act_blocks(act_layers, (layout_a.n_layers, layout_b.n_layers), streams)
    paths = tuple("stream" if st else "plain" for st in streams)  # the decision above, not a second in dtype
    A, B = (
        capture(lay, e, keep, max_memory=max_memory, mode=path, with_mlp=with_mlp, blocks=k, dtype=dt)
        for lay, e, dt, path in zip(layouts, (enc_a, enc_b), dtypes, paths, strict=True)
    )
    run = {
        "blocks": [len(A.hidden), len(B.hidden)],
        "of": [layout_a.n_layers, layout_b.n_layers],
        "streamed": list(streams),
        "dtype": [str(dt).removeprefix("torch.") for dt in dtypes],
        "act_layers": str(act_layers),
    }
    cka = act_cka(A.hidden, B.hidden, seed, with_null="act_cka" in tests)
    cka.run = run
    out = [cka] if "act_cka" in tests else []
    if with_mlp:
        t = phi_match(A, B, cka.layer_map, layout_a, layout_b, seed)
        if t is None:
            out.append(TestResult.not_applicable("phi_match", "no matched layer pair has an MLP on both sides"))
        else:
            t.layer_map_from = "act_cka"
            t.run = run
            out.append(t)
    return out
