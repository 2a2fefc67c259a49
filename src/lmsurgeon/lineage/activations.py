"""Activation test (spec §7.4): hidden-state CKA on the same words, across any widths and vocabularies.

Both models read the same text; items are whitespace words that both tokenisers end on a token boundary
(the word's last sub-token). Features are each layer's hidden states, so widths and vocabularies may differ.
Reported with a permutation null but never decisive: same-data independents also score high (REEF-like).
"""

from __future__ import annotations

import re

import numpy as np

from lmsurgeon.lineage.awm import layer_map
from lmsurgeon.lineage.cka import Grams, cka_grams
from lmsurgeon.lineage.stats import log_p_from_z, neg_log10_p, z_against

MAX_ITEMS = 1024
MAX_TOKENS = 128
N_PERMUTATIONS = 20


def word_ends(text: str) -> list[int]:
    return [m.end() for m in re.finditer(r"\S+", text)]


def last_token_at(offsets, ends: list[int]) -> dict[int, int]:
    """char end → index of the token ending there (the word's last sub-token)."""
    by_end = {}
    for t, (s, e) in enumerate(offsets):
        if e > s:
            by_end[e] = t
    return {e: by_end[e] for e in ends if e in by_end}


def hidden_states(handle, texts: list[str]) -> tuple[list[dict], object]:
    """Per text: token ids and char end → token index; plus the loaded base model."""
    tok = handle.tokenizer
    if tok is None:
        return [], None
    tok.no_truncation()
    enc = []
    for text in texts:
        e = tok.encode(text)
        n = min(len(e.ids), MAX_TOKENS)
        enc.append({"ids": e.ids[:n], "ends": last_token_at(e.offsets[:n], word_ends(text))})
    return enc, handle.load_model("base")


def collect(model, enc: list[dict], keep: list[list[int]]) -> list[np.ndarray]:
    """Per layer (after each block), the hidden states at the kept word ends: [n_items, d] float64."""
    import torch

    per_layer: list[list[np.ndarray]] = []
    with torch.no_grad():
        for e, ends in zip(enc, keep, strict=True):
            if not ends:
                continue
            out = model(input_ids=torch.tensor([e["ids"]]), output_hidden_states=True)
            hs = out.hidden_states[1:]
            idx = [e["ends"][c] for c in ends]
            for li, h in enumerate(hs):
                if len(per_layer) <= li:
                    per_layer.append([])
                per_layer[li].append(h[0, idx].double().numpy())
    return [np.concatenate(p) for p in per_layer]


def act_cka_test(handle_a, handle_b, texts: list[str], seed: int = 0) -> dict:
    """CKA matrix of hidden states over shared word items, layer map by assignment, permutation-null z."""
    enc_a, model_a = hidden_states(handle_a, texts)
    enc_b, model_b = hidden_states(handle_b, texts)
    if model_a is None or model_b is None:
        return {"name": "act_cka", "applies": False, "reason": "a model has no tokenizer.json"}
    keep = [sorted(set(a["ends"]) & set(b["ends"])) for a, b in zip(enc_a, enc_b, strict=True)]
    total = sum(len(k) for k in keep)
    if total > MAX_ITEMS:            # keep whole texts in order until the item budget is spent
        budget, trimmed = MAX_ITEMS, []
        for k in keep:
            trimmed.append(k[:max(budget, 0)])
            budget -= len(k)
        keep = trimmed
    HA, HB = collect(model_a, enc_a, keep), collect(model_b, enc_b, keep)
    n = HA[0].shape[0] if HA else 0
    if n < 16:
        return {"name": "act_cka", "applies": False, "reason": f"only {n} shared word items in the text"}
    GA = [Grams(h - h.mean(0)) for h in HA]
    GB = [Grams(h - h.mean(0)) for h in HB]
    M = np.array([[cka_grams(a, b) for b in GB] for a in GA])
    pairs = layer_map(M)
    s = float(np.mean([M[i, j] for i, j in pairs]))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(N_PERMUTATIONS):
        p = rng.permutation(n)
        vals.append(np.mean([cka_grams(GA[i], Grams(HB[j][p] - HB[j].mean(0))) for i, j in pairs]))
    null = {"source": f"{N_PERMUTATIONS} random item permutations", "mean": float(np.mean(vals)),
            "std": float(np.std(vals, ddof=1)), "n": N_PERMUTATIONS}
    z = z_against(s, null["mean"], null["std"])
    return {"name": "act_cka", "applies": True, "decisive": False,
            "reason": "never decisive: independents trained on similar data also align (REEF-like)",
            "statistic": s, "z": z, "neg_log10_p": neg_log10_p(log_p_from_z(z)), "null": null, "n_items": n,
            "layer_map": [list(p) for p in pairs], "matrix": M.tolist(),
            "per_layer": [{"a": i, "b": j, "cka": float(M[i, j])} for i, j in pairs]}
