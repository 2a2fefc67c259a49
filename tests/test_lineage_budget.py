"""Budgets of the weight tests: the n×n side of CKA equals the reference, a budgeted run reads exactly the
bytes the safetensors header offsets give for what it says it read, and the budgets bound that."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmsurgeon.lineage import compare
from lmsurgeon.lineage.cka import Grams, cka_grams, hsic1
from tests.lineage_models import permute_llama, random_llama, save, state_np
from tests.test_lineage_stats import _hsic_direct

rng = np.random.default_rng(7)


@pytest.mark.parametrize(("p", "q"), [(40, 50), (40, 9), (8, 9)])
def test_hsic_on_either_side_matches_the_direct_gram_reference(p, q):
    """n = 20 items: features on both sides (8, 9), Grams on both (40, 50), or one of each (40, 9)."""
    X, Y = rng.standard_normal((20, p)), rng.standard_normal((20, q))
    assert hsic1(Grams(X), Grams(Y)) == pytest.approx(_hsic_direct(X @ X.T, Y @ Y.T), abs=1e-10)
    perm = rng.permutation(20)
    assert cka_grams(Grams(X), Grams(Y).permuted(perm)) == pytest.approx(cka_grams(Grams(X), Grams(Y[perm])), abs=1e-12)


def test_float32_grams_stay_within_float32_rounding_of_float64():
    X, Y = rng.standard_normal((64, 300)), rng.standard_normal((64, 200))
    Y[:, :50] += X[:, :50]
    ref = cka_grams(Grams(X), Grams(Y))
    assert cka_grams(Grams(X.astype(np.float32)), Grams(Y.astype(np.float32))) == pytest.approx(ref, abs=1e-5)


def _header(folder) -> dict[str, int]:
    """name → bytes, from the raw safetensors header's data_offsets (independent of lmsurgeon.io)."""
    raw = (folder / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8 : 8 + n])
    head.pop("__metadata__", None)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in head.items()}


def test_a_budgeted_weight_run_reads_exactly_the_bytes_it_reports(tmp_path):
    base = random_llama(0, n_layers=3)
    a = save(base, tmp_path / "a")
    b = save(random_llama(9, n_layers=3), tmp_path / "b", permute_llama(state_np(base), 3, seed=2))
    r = compare(
        [str(a), str(b)],
        write=False,
        tests=("awm", "phi_u"),
        max_tokens=300,
        max_items=16,
        permutations=5,
        max_units=24,
    )
    pair = r["pairs"][0]
    assert pair["verdict"] == "derived"
    n_tokens = pair["alignment"]["shared_tokens"]
    assert n_tokens == 300
    for model, folder in zip(r["models"], (a, b), strict=True):
        size = _header(folder)
        layer = [f"model.layers.{i}." for i in range(3)]
        with open(folder / "config.json") as f:
            cfg = json.load(f)
        vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
        assert model["tensor_bytes"]["alignment"] == n_tokens * size["model.embed_tokens.weight"] // vocab
        assert model["tensor_bytes"]["awm"] == sum(
            size[p + f"self_attn.{r}_proj.weight"] for p in layer for r in ("q", "k")
        )
        assert model["tensor_bytes"]["phi_u"] == sum(
            size[p + f"mlp.{r}_proj.weight"] for p in layer for r in ("up", "down")
        )
        assert hidden == 64
        assert sum(model["tensor_bytes"].values()) <= model["bytes_read"]
    awm = next(t for t in pair["tests"] if t["name"] == "awm")
    assert awm["nulls"]["permutation"]["n"] == 5
    phi = next(t for t in pair["tests"] if t["name"] == "phi_u")
    assert all(p["n_units"] == 24 for p in phi["per_layer"])  # 128 units per layer, 24 sampled
