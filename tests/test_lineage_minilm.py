"""MiniLM-derived copies made on the fly from the bundled all-MiniLM-L6-v2 tensors (BERT: post-norm, biased)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from lmsurgeon.lineage import compare
from tests.lineage_models import minilm_folder, permute_minilm, prune_minilm, save_tensors


@pytest.fixture(scope="module")
def minilm_copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm_copies")
    st = minilm_folder(root / "permuted")
    save_tensors(permute_minilm(st, seed=0), root / "permuted")
    cfg = json.loads((root / "permuted" / "config.json").read_text())
    minilm_folder(root / "pruned")
    pruned, pcfg = prune_minilm(st, [0, 2, 3, 5], cfg)
    save_tensors(pruned, root / "pruned")
    (root / "pruned" / "config.json").write_text(json.dumps(pcfg))
    minilm_folder(root / "tuned")
    rng = np.random.default_rng(3)
    save_tensors(
        {k: v + 0.01 * v.std() * rng.standard_normal(v.shape) if v.size > 1 else v for k, v in st.items()},
        root / "tuned",
    )
    return root


def test_minilm_vs_its_perturbed_copy_is_derived_within_a_minute(minilm_copies):
    t0 = time.time()
    r = compare(["minilm", str(minilm_copies / "tuned")], write=False, tests=("awm", "phi_u"))
    assert time.time() - t0 < 60
    p = r["pairs"][0]
    assert p["verdict"] == "derived"
    assert min(t["z"] for t in p["tests"]) >= 12


def test_minilm_permuted_copy_is_derived_by_weights_and_by_activations(minilm_copies):
    r = compare(["minilm", str(minilm_copies / "permuted")], write=False, tests=("awm", "phi_u", "act_cka"))
    p = r["pairs"][0]
    assert p["verdict"] == "derived"
    assert abs(p["naive"]["mean_pearson"]) < 0.3  # norm gains permuted: the naive signal is gone
    act = next(t for t in p["tests"] if t["name"] == "act_cka")
    assert act["applies"]
    assert act["statistic"] > 0.99
    assert act["layer_map"] == [[i, i] for i in range(6)]


def test_minilm_layer_pruned_copy_maps_surviving_layers(minilm_copies):
    p = compare(["minilm", str(minilm_copies / "pruned")], write=False, tests=("awm", "phi_u"))["pairs"][0]
    assert p["verdict"] == "derived"
    assert p["layer_map"] == [[0, 0], [2, 1], [3, 2], [5, 3]]
