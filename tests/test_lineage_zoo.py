"""Validation on the zoo: every lin-* pair gets the verdict its manifest lineage implies."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmsurgeon.lineage import compare

LIN = [
    "lin-base",
    "lin-finetune",
    "lin-permuted",
    "lin-pruned",
    "lin-gammafold",
    "lin-indep-1",
    "lin-indep-2",
    "lin-indep-3",
]


def _root(entries, n):
    while entries[n].get("parent") in entries:
        n = entries[n]["parent"]
    return n


def test_zoo_lineage_pairs_get_the_verdict_of_their_manifest_lineage(test_zoo):
    zoo_dir, manifest = test_zoo
    entries = manifest["models"]
    r = compare(
        [str(Path(zoo_dir) / entries[n]["path"]) for n in LIN], write=False, tests=("awm", "phi_u"), all_pairs=True
    )
    names = {m["name"]: n for m, n in zip(r["models"], LIN, strict=True)}
    for p in r["pairs"]:
        a, b = names[p["a"]], names[p["b"]]
        derived = _root(entries, a) == _root(entries, b)
        zs = [t["z"] for t in p["tests"]]
        if derived:
            assert p["verdict"] == "derived", (a, b, zs)
            assert min(zs) >= 12, (a, b, zs)
        else:
            assert p["verdict"] == "independent", (a, b, zs)
            assert max(zs) < 3, (a, b, zs)
            assert p["naive"]["mean_raw_cosine"] >= 0.9  # the seed's phenomenon on independents


def _zoo_paths(test_zoo, names):
    zoo_dir, manifest = test_zoo
    return [str(Path(zoo_dir) / manifest["models"][n]["path"]) for n in names]


def test_phi_match_separates_descendants_from_independents_on_the_zoo(test_zoo):
    r = compare(_zoo_paths(test_zoo, LIN), write=False, tests=("phi_match",))
    for p, name in zip(r["pairs"], LIN[1:], strict=True):
        t = next(t for t in p["tests"] if t["name"] == "phi_match")
        assert t["applies"], name
        assert t["layer_map_from"] == "act_cka"
        if "indep" in name:
            assert t["z"] < 3, name
            assert p["verdict"] == "independent", (name, t["z"])
        else:
            assert t["z"] >= 12, name
            assert p["verdict"] == "derived", (name, t["z"])


def test_rotated_copy_defeats_weight_alignment_but_not_phi_match(test_zoo, tmp_path):
    """Gains folded, then the residual stream rotated by a random orthogonal matrix: same function, a basis no
    permutation explains. With --align permutation awm cannot see it, phi_match still does, so the verdict is not
    `independent`; the default --align auto chooses the orthogonal map on held-out tokens and calls it derived."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from lmsurgeon.zoo.transforms import logit_discrepancy, rotate_model

    base_dir = Path(_zoo_paths(test_zoo, ["lin-base"])[0])
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    rotated = rotate_model(base, seed=5)
    ids = torch.randint(0, base.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    assert logit_discrepancy(base, rotated, ids) < 1e-4
    out = tmp_path / "lin-rotated"
    rotated.save_pretrained(out)
    shutil.copy(base_dir / "tokenizer.json", out / "tokenizer.json")
    p = compare([str(base_dir), str(out)], write=False, tests=("awm", "phi_match"), align="permutation")["pairs"][0]
    z = {t["name"]: t["z"] for t in p["tests"]}
    assert z["awm"] < 3, z
    assert z["phi_match"] >= 12, z
    assert p["verdict"] == "inconclusive"
    assert "disagree" in p["reasons"][0]
    assert any("--align procrustes" in s for s in p["suggested"]), p["suggested"]

    # --align auto (the default) and --align procrustes undo the rotation for the weight tests, and still call
    # the independents independent
    others = _zoo_paths(test_zoo, ["lin-indep-1", "lin-indep-2", "lin-indep-3"])
    for align in ("auto", "procrustes"):
        r = compare([str(base_dir), str(out), *others], write=False, tests=("awm", "phi_u", "circuits"), align=align)
        rot, *indeps = r["pairs"]
        assert rot["verdict"] == "derived"
        assert min(t["z"] for t in rot["tests"]) >= 12, rot["tests"]
        assert rot["alignment"]["method"] == "procrustes"
        assert rot["alignment"]["embedding_mean_abs_corr"] > 0.99
        if align == "auto":
            assert rot["alignment"]["evidence"]["margin_z"] >= 3
            assert any(s.startswith("rotation") for s in rot["suggested"])
        for p in indeps:
            assert p["verdict"] == "independent", [(t["name"], t["z"]) for t in p["tests"]]
            if align == "auto":  # held-out tokens give the orthogonal map's extra freedom no decisive margin
                assert p["alignment"]["method"] != "procrustes", p["alignment"]


def test_null_models_replace_each_decisive_tests_null(test_zoo):
    """--null: every decisive test's z is measured against A and B compared with the given independents."""
    base, tuned, indep, *nulls = _zoo_paths(
        test_zoo, ["lin-base", "lin-finetune", "lin-indep-1", "lin-indep-2", "lin-indep-3"]
    )
    r = compare([base, tuned, indep], write=False, tests=("awm", "phi_u", "phi_match"), null=nulls)
    derived, independent = r["pairs"]
    for p in (derived, independent):
        for t in p["tests"]:
            assert t["null"]["source"] == "4 comparisons with the --null models", t
            assert t["null"]["n"] == 4, t
            if t["name"] != "awm":  # phi tests: their analytic z (kept under nulls.own) against the null
                own = t["nulls"]["own"]["z"]
                assert t["z"] == pytest.approx((own - t["null"]["mean"]) / max(t["null"]["std"], 1e-3))
    assert derived["verdict"] == "derived"
    assert independent["verdict"] == "independent"
