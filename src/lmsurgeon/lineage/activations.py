"""Activation tests (methods.md §L7.4): both models read the same words, so widths and vocabularies may differ.

Items are whitespace words that both tokenisers end on a token boundary (the word's last sub-token). One forward
pass per model and text records, at those items, every layer's hidden state and, for gated MLPs, every unit's
gate-projection and up-projection output. Two tests use them:

* ``act_cka``: hidden-state CKA per layer pair, layer map by assignment, item-permutation null. Never decisive:
  independents trained on similar data also align (REEF-like).
* ``phi_match`` (φ_MATCH, Zhu et al.): B's MLP units are matched to A's twice, by gate outputs and by up
  outputs, and ρ = Spearman of the two matchings per matched layer; Fisher over layers. Outputs of a layer are
  unchanged by any rotation of the residual stream, so this survives what the weight tests need
  ``--align procrustes`` for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from lmsurgeon.lineage.cka import Grams, cka_matrix, item_permutation_null, layer_map, matched_mean
from lmsurgeon.lineage.phi_u import MAX_UNITS, combine_layers, subsample_units, two_view_rho
from lmsurgeon.lineage.results import LayerCka, LayerMap, LayerRho, TestResult
from lmsurgeon.lineage.stats import spearman_z

MAX_ITEMS = 1024
MAX_TOKENS = 128
MIN_ITEMS = 16
N_PERMUTATIONS = 20
ACTIVATION_TESTS = ("act_cka", "phi_match")


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


@dataclass
class Activations:
    """One model's activations at the shared items, per layer: hidden states [n, d] (float64) and, where the
    layer has a dense gated MLP, gate and up outputs [n, m] (float32 to bound memory)."""

    hidden: list[np.ndarray] = field(default_factory=list)
    gate: list[np.ndarray | None] = field(default_factory=list)
    up: list[np.ndarray | None] = field(default_factory=list)


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


def collect(model, enc: list[dict], keep: list[list[int]], taps: list[dict] | None) -> Activations:
    """Hidden states after each block, and gate/up outputs when ``taps`` are given, at the kept word ends."""
    import torch

    acts = Activations()
    hidden: list[list[np.ndarray]] = []
    mlp: dict[str, list[list[np.ndarray]]] = {"gate": [[] for _ in taps or []], "up": [[] for _ in taps or []]}
    rows: list[int] = []

    def hook(kind: str, li: int, cols: slice):
        def save(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            mlp[kind][li].append(out[0, rows][:, cols].float().numpy())

        return save

    handles = [
        tap[kind][0].register_forward_hook(hook(kind, li, tap[kind][1]))
        for li, tap in enumerate(taps or [])
        for kind in ("gate", "up")
    ]
    try:
        with torch.no_grad():
            for e, ends in zip(enc, keep, strict=True):
                if not ends:
                    continue
                rows[:] = [e["ends"][c] for c in ends]
                out = model(input_ids=torch.tensor([e["ids"]]), output_hidden_states=True)
                for li, h in enumerate(out.hidden_states[1:]):
                    if len(hidden) <= li:
                        hidden.append([])
                    hidden[li].append(h[0, rows].double().numpy())
    finally:
        for h in handles:
            h.remove()
    acts.hidden = [np.concatenate(p) for p in hidden]
    for kind in ("gate", "up"):
        setattr(acts, kind, [np.concatenate(p) if p else None for p in mlp[kind]])
    return acts


def act_cka(HA: list[np.ndarray], HB: list[np.ndarray], seed: int = 0) -> TestResult:
    """CKA matrix of hidden states over the shared items, layer map by assignment, permutation-null z."""
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
    t.measure(s, item_permutation_null(GA, GB, pairs, seed, N_PERMUTATIONS, "item"))
    return t


def _centered_units(X: np.ndarray) -> np.ndarray:
    """Units as rows of centred outputs, so the cosine of two rows is their correlation over the items."""
    X = np.asarray(X, dtype=np.float64)
    return (X - X.mean(0)).T


def match_rho(gate_a, up_a, gate_b, up_b, units: np.ndarray | None) -> tuple[float, int]:
    """ρ = Spearman(σ_gate, σ_up) over B's (optionally subsampled) units."""
    gA, uA, gB, uB = map(_centered_units, (gate_a, up_a, gate_b, up_b))
    if units is not None:
        gB, uB = gB[units], uB[units]
    return two_view_rho(gA, gB, uA, uB)


def phi_match(A: Activations, B: Activations, pairs: LayerMap, seed: int = 0, max_units: int = MAX_UNITS) -> TestResult:
    """Per matched layer pair ρ_l, z_l = ρ_l√(n_l−1); Fisher over layers (the same combination as φ_U)."""
    rng = np.random.default_rng(seed)
    per_layer = []
    for i, j in pairs:
        units = subsample_units(rng, B.gate[j].shape[1], max_units)
        rho, n = match_rho(A.gate[i], A.up[i], B.gate[j], B.up[j], units)
        per_layer.append(LayerRho(i, j, rho, n, spearman_z(rho, n)))
    return combine_layers("phi_match", per_layer)


def activation_tests(layout_a, layout_b, texts: list[str], tests=ACTIVATION_TESTS, seed: int = 0) -> list[TestResult]:
    """Load both models once, read ``texts``, and run the requested activation tests."""
    tests = [t for t in ACTIVATION_TESTS if t in tests]
    if layout_a.handle.tokenizer is None or layout_b.handle.tokenizer is None:
        return [TestResult.not_applicable(t, "a model has no tokenizer.json") for t in tests]
    enc_a, enc_b = encode(layout_a.handle.tokenizer, texts), encode(layout_b.handle.tokenizer, texts)
    keep = shared_items(enc_a, enc_b)
    n = sum(len(k) for k in keep)
    if n < MIN_ITEMS:
        return [TestResult.not_applicable(t, f"only {n} shared word items in the text") for t in tests]
    model_a, model_b = layout_a.handle.load_model("base"), layout_b.handle.load_model("base")
    taps_a = mlp_taps(layout_a, model_a) if "phi_match" in tests else None
    taps_b = mlp_taps(layout_b, model_b) if "phi_match" in tests else None
    gated = taps_a is not None and taps_b is not None
    A = collect(model_a, enc_a, keep, taps_a if gated else None)
    B = collect(model_b, enc_b, keep, taps_b if gated else None)
    cka = act_cka(A.hidden, B.hidden, seed)
    out = [cka] if "act_cka" in tests else []
    if "phi_match" in tests:
        if not gated:
            out.append(
                TestResult.not_applicable("phi_match", "needs a dense gated MLP (gate and up) in every layer of both")
            )
        else:
            t = phi_match(A, B, cka.layer_map, seed)
            t.layer_map_from = "act_cka"
            out.append(t)
    return out
