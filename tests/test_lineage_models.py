"""Lineage on tiny checkpoints built here: positive controls are `derived`, independents `independent`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmsurgeon.arch import Layout
from lmsurgeon.io import open_model
from lmsurgeon.lineage import compare
from lmsurgeon.lineage.fold import fold_gains
from tests.lineage_models import logits, permute_llama, random_llama, save, state_np

TESTS = ("awm", "phi_u")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """base, a fine-tuned-like copy, a permuted copy, a γ-folded copy, a pruned copy, two independents."""
    root = tmp_path_factory.mktemp("lineage_tiny")
    base = random_llama(0, n_layers=4)
    st = state_np(base)
    paths = {"base": save(base, root / "base")}
    rng = np.random.default_rng(1)
    tuned = {k: v + 0.02 * v.std() * rng.standard_normal(v.shape) for k, v in st.items()}
    paths["tuned"] = save(random_llama(9, n_layers=4), root / "tuned", tuned)
    perm_model = random_llama(9, n_layers=4)
    paths["permuted"] = save(perm_model, root / "permuted", permute_llama(st, 4, seed=2))
    folded = fold_gains(st, Layout(open_model(paths["base"])))
    fold_model = random_llama(9, n_layers=4)
    paths["folded"] = save(fold_model, root / "folded", folded)
    pruned = random_llama(9, n_layers=2)
    keep = {k: v for k, v in st.items() if not k.startswith(("model.layers.1.", "model.layers.3."))}
    keep = {k.replace("model.layers.2.", "model.layers.1."): v for k, v in keep.items()}
    paths["pruned"] = save(pruned, root / "pruned", keep)
    paths["indep1"] = save(random_llama(11, n_layers=4), root / "indep1")
    paths["indep2"] = save(random_llama(12, n_layers=4), root / "indep2")
    return {"paths": paths, "base": base, "perm_model": perm_model, "fold_model": fold_model}


def _pair(zoo, a, b, **kw):
    r = compare([str(zoo["paths"][a]), str(zoo["paths"][b])], write=False, tests=TESTS, **kw)
    return r["pairs"][0]


def _z(pair, name):
    return next(t for t in pair["tests"] if t["name"] == name)["z"]


def test_function_preserving_permutation_keeps_logits_and_is_called_derived(zoo):
    np.testing.assert_allclose(logits(zoo["perm_model"]), logits(zoo["base"]), atol=1e-5)
    p = _pair(zoo, "base", "permuted")
    assert p["verdict"] == "derived"
    assert abs(p["naive"]["mean_pearson"]) < 0.5  # the naive signal is gone...
    assert next(t for t in p["tests"] if t["name"] == "awm")["statistic"] > 0.99  # ...the sound one is not
    assert p["layer_map"] == [[i, i] for i in range(4)]


def test_gamma_folded_copy_keeps_logits_erases_gains_and_is_still_derived(zoo):
    np.testing.assert_allclose(logits(zoo["fold_model"]), logits(zoo["base"]), atol=1e-4)
    folded = _pair(zoo, "indep1", "folded")
    plain = _pair(zoo, "indep1", "base")
    assert folded["naive"]["mean_pearson"] is None  # u = 1: Pearson undefined, not 0
    for name in TESTS:  # sound statistics do not move under folding
        sf = next(t for t in folded["tests"] if t["name"] == name)["statistic"]
        sp = next(t for t in plain["tests"] if t["name"] == name)["statistic"]
        assert sf == pytest.approx(sp, abs=1e-6)
    assert _pair(zoo, "base", "folded")["verdict"] == "derived"


def test_fine_tuned_copy_is_derived(zoo):
    p = _pair(zoo, "base", "tuned")
    assert p["verdict"] == "derived"
    assert min(_z(p, n) for n in TESTS) >= 5


def test_pruned_copy_is_derived_with_the_surviving_layers_mapped(zoo):
    p = _pair(zoo, "base", "pruned")
    assert p["verdict"] == "derived"
    assert p["layer_map"] == [[0, 0], [2, 1]]


def test_independent_models_have_high_raw_cosine_yet_are_independent(zoo):
    p = _pair(zoo, "indep1", "indep2")
    assert p["naive"]["mean_raw_cosine"] >= 0.9  # the seed's phenomenon
    assert abs(p["naive"]["mean_pearson"]) < 0.3
    assert p["verdict"] == "independent"
    assert [t["name"] for t in p["tests"] if t["z"] >= 3] == []


def test_same_inputs_and_seed_give_the_same_results(zoo):
    a = compare([str(zoo["paths"]["base"]), str(zoo["paths"]["tuned"])], write=False, tests=TESTS)
    b = compare([str(zoo["paths"]["base"]), str(zoo["paths"]["tuned"])], write=False, tests=TESTS)
    a.pop("timings"), b.pop("timings")
    for p in a["pairs"] + b["pairs"]:
        p.pop("seconds")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_naive_only_reads_only_norm_tensors(zoo):
    r = compare([str(zoo["paths"]["base"]), str(zoo["paths"]["indep1"])], write=False, naive_only=True)
    h = open_model(zoo["paths"]["base"])
    norm_bytes = sum(i.nbytes for n, i in h.header().items() if "norm" in n)
    raw = (zoo["paths"]["base"] / "model.safetensors").read_bytes()
    header_bytes = 8 + int.from_bytes(raw[:8], "little")
    assert norm_bytes <= r["models"][0]["bytes_read"] <= 1.05 * (norm_bytes + header_bytes)
    assert r["pairs"][0]["verdict"] == "inconclusive"
    assert r["pairs"][0]["tests"] == []


def test_cli_writes_results_report_and_figures(zoo, tmp_path):
    from lmsurgeon.cli import main

    out = tmp_path / "run"
    code = main(
        ["lineage", str(zoo["paths"]["base"]), str(zoo["paths"]["permuted"]), "--out", str(out), "--tests", "awm,phi_u"]
    )
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "lmsurgeon/lineage@1"
    p = res["pairs"][0]
    assert {"a", "b", "verdict", "naive", "tests"} <= set(p)
    assert {"mean_raw_cosine", "mean_pearson"} <= set(p["naive"])
    for t in p["tests"]:
        assert {"name", "statistic", "z", "neg_log10_p", "applies"} <= set(t), t["name"]
    assert (out / "report.html").stat().st_size > 1000
    assert list((out / "figures").glob("*.png"))


def test_too_few_shared_tokens_makes_weight_tests_not_apply(zoo, tmp_path):
    from tokenizers import Tokenizer, models

    folder = tmp_path / "othervocab"
    import shutil

    shutil.copytree(zoo["paths"]["indep2"], folder)
    Tokenizer(models.WordLevel({f"x{i}": i for i in range(400)}, unk_token="x0")).save(str(folder / "tokenizer.json"))
    sources = [str(zoo["paths"]["base"]), str(folder)]
    p = compare(sources, write=False, tests=TESTS, align="permutation")["pairs"][0]
    assert p["verdict"] == "inconclusive"
    for t in p["tests"]:
        assert not t["applies"], t["name"]
        assert "shared tokens" in t["reason"], t["name"]
    # --align auto (the default) falls back on the stored basis (methods.md §L7.1.4): one look, no correction,
    # and this independent body stays independent
    p = compare(sources, write=False, tests=TESTS)["pairs"][0]
    stored = p["alignment"]["evidence"]["stored_basis"]
    assert p["alignment"]["method"] == "stored" and stored["looks"] == 1
    assert "shared tokens" in stored["reason"]
    assert p["verdict"] == "independent", p["tests"]


def test_three_sources_compare_the_first_against_each_other_unless_all_pairs(zoo):
    srcs = [str(zoo["paths"][k]) for k in ("base", "tuned", "permuted")]
    first = compare(srcs, write=False, naive_only=True)
    every = compare(srcs, write=False, naive_only=True, all_pairs=True)
    names = [m["name"] for m in first["models"]]
    assert [(p["a"], p["b"]) for p in first["pairs"]] == [(names[0], names[1]), (names[0], names[2])]
    assert [(p["a"], p["b"]) for p in every["pairs"]] == [
        (names[0], names[1]),
        (names[0], names[2]),
        (names[1], names[2]),
    ]


def _tiny_qwen2_moe(seed: int):
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from tests.lineage_models import VOCAB

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        num_experts=6,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return Qwen2MoeForCausalLM(cfg).eval()


def test_moe_phi_u_matches_experts_by_router_rows_across_an_expert_permutation(tmp_path):
    """A MoE copy with its experts reordered (router rows with them) and every weight perturbed is derived by
    phi_u through the router-matched experts and the shared expert; an independent MoE is not."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    paths = {"base": save(_tiny_qwen2_moe(0), tmp_path / "base"), "indep": save(_tiny_qwen2_moe(7), tmp_path / "indep")}
    st = load_file(paths["base"] / "model.safetensors")  # on disk: one tensor per expert
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(6, generator=g).tolist()
    moved = dict(st)
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp."
        moved[pre + "gate.weight"] = st[pre + "gate.weight"][order]
        for e in range(6):
            for w in ("gate_proj", "up_proj", "down_proj"):
                moved[f"{pre}experts.{e}.{w}.weight"] = st[f"{pre}experts.{order[e]}.{w}.weight"]
    moved = {k: (v + 0.02 * v.std() * torch.randn(v.shape, generator=g)).contiguous() for k, v in moved.items()}
    paths["moved"] = tmp_path / "moved"
    shutil.copytree(paths["base"], paths["moved"])
    save_file(moved, paths["moved"] / "model.safetensors", metadata={"format": "pt"})
    r = compare([str(paths["base"]), str(paths["moved"]), str(paths["indep"])], write=False, tests=TESTS)
    derived, indep = r["pairs"]
    phi = next(t for t in derived["tests"] if t["name"] == "phi_u")
    blocks = {p["block"].split(" (")[0] for p in phi["per_layer"]}
    assert "shared expert" in blocks
    assert any(b.startswith("experts") for b in blocks)
    for p in phi["per_layer"]:  # matched experts are the moved ones
        if p["block"].startswith("experts"):
            e_a, e_b = (int(x) for x in p["block"].split(" ")[1].split("↔"))
            assert order[e_b] == e_a
    assert phi["z"] >= 5
    assert derived["verdict"] == "derived"
    assert next(t for t in indep["tests"] if t["name"] == "phi_u")["z"] < 3
    assert indep["verdict"] == "independent"


def test_cli_without_out_prints_where_its_run_folder_is(zoo, tmp_path, monkeypatch, capsys):
    from lmsurgeon.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["lineage", str(zoo["paths"]["base"]), str(zoo["paths"]["indep1"]), "--naive-only"]) == 0
    printed = capsys.readouterr()
    report_lines = [ln for ln in printed.out.splitlines() if ln.startswith("report: ")]
    assert len(report_lines) == 1
    # stderr is no terminal under pytest: one timed line per stage, the pair named
    pair_lines = [ln for ln in printed.err.splitlines() if "] lineage: " in ln and " vs " in ln]
    assert len(pair_lines) == 1
    report = Path(report_lines[0].removeprefix("report: "))
    assert report.name == "report.html"
    assert report.is_file()
    assert report.parent.parent == (tmp_path / "runs").resolve()


def test_a_wider_b_gets_the_layer_map_of_a_wider_a_turned_round(tmp_path):
    """The weight tests run with the wider model first; the result comes back in the caller's (A, B) order."""
    from transformers import LlamaForCausalLM

    from tests.lineage_models import llama_config

    torch.manual_seed(21)
    narrow = save(random_llama(20, n_layers=2), tmp_path / "narrow")
    wide = save(LlamaForCausalLM(llama_config(n_layers=4, hidden=96)).eval(), tmp_path / "wide")
    narrow_first = _pair({"paths": {"n": narrow, "w": wide}}, "n", "w")
    wide_first = _pair({"paths": {"n": narrow, "w": wide}}, "w", "n")
    assert narrow_first["alignment"]["swapped"] is True
    assert wide_first["alignment"]["swapped"] is False
    awm_nw = next(t for t in narrow_first["tests"] if t["name"] == "awm")
    awm_wn = next(t for t in wide_first["tests"] if t["name"] == "awm")
    assert awm_nw["statistic"] == awm_wn["statistic"]
    assert awm_nw["layer_map"] == [[b, a] for a, b in awm_wn["layer_map"]]
    assert sorted(a for a, _ in awm_nw["layer_map"]) == [0, 1]  # A is the 2-layer model
    assert np.array(awm_nw["matrix"]).shape == (2, 4)
    np.testing.assert_array_equal(np.array(awm_nw["matrix"]), np.array(awm_wn["matrix"]).T)
    phi_nw = next(t for t in narrow_first["tests"] if t["name"] == "phi_u")
    assert [[p["a"], p["b"]] for p in phi_nw["per_layer"]] == awm_nw["layer_map"]
