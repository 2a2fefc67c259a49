"""The zoo pairs: cross-tokenizer, cross-width merges, and the domain scenario (a code-trained donor)."""

import json

from lmsurgeon.data import load_corpus
from lmsurgeon.merge import run_domain_merge, run_merge
from lmsurgeon.zoo.recipe import domain_texts


def test_zoo_pair_best_trial_keeps_perplexity_under_cap_and_moves_the_model(test_zoo, tmp_path):
    zoo_dir, _manifest = test_zoo
    res = run_merge(
        str(zoo_dir / "llama-sp"), str(zoo_dir / "gpt2-bpe"), tmp_path / "zoo", trials=4, max_prompts=8, seed=0
    )
    assert res["fit"]["stage_a"]["d_donor"] != res["fit"]["stage_a"]["d_base"]
    assert res["overlap"]["family_base"] != res["overlap"]["family_donor"]
    assert res["overlap"]["shared"] > res["overlap"]["raw_string_shared"]
    best = res["best"]
    assert best is not None
    assert best["r"] <= res["ppl_cap"]
    assert best["sym_kl"] > 0
    assert (tmp_path / "zoo" / "best_model" / "model.safetensors").exists()


def test_zoo_domain_scenario_recommends_nothing_worse_than_the_base(test_zoo, tmp_path):
    """Base llama-sp (general text) ← donor gpt2-code (code docstrings only): the donor knows the domain better
    than the base; whatever the search finds, the recommended model is not worse on held-out domain text and
    keeps general text within the tolerance."""
    zoo_dir, _manifest = test_zoo
    corpus = load_corpus()
    res = run_domain_merge(
        str(zoo_dir / "llama-sp"),
        str(zoo_dir / "gpt2-code"),
        tmp_path / "domain",
        domain_texts(corpus.split("train_b")),
        domain_texts(corpus.split("validation")),
        trials=6,
        seed=0,
        max_prompts=32,
    )
    bpb = res["bpb"]
    assert bpb["donor"]["heldout"] < bpb["base"]["heldout"]  # the scenario: the donor knows the domain
    assert bpb["best"]["heldout"] <= bpb["base"]["heldout"]
    assert bpb["best"]["general"] <= bpb["base"]["general"] * (1 + res["tolerance"])
    assert res["texts"]["heldout"]["documents"] == min(32, len(domain_texts(corpus.split("validation"))))
    # the documents given in memory are kept inside the run folder, nothing is written beside it
    kept = (tmp_path / "domain" / "texts" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in kept] == domain_texts(corpus.split("validation"))[:32]
    assert "run folder" in res["texts"]["search"]["source"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["domain"]
    if bpb["recommended"] == "base":  # when no trial beats the base, results and report say so
        assert "no trial" in bpb["reason"] or "costs general text" in bpb["reason"]
