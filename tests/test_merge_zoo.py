"""On the zoo's cross-tokenizer, cross-width pair the best trial stays under the cap while moving the model."""

from lmsurgeon.merge import run_merge


def test_zoo_pair_best_trial_keeps_perplexity_under_cap_and_moves_the_model(test_zoo, tmp_path):
    zoo_dir, _manifest = test_zoo
    res = run_merge(str(zoo_dir / "llama-sp"), str(zoo_dir / "gpt2-bpe"), tmp_path / "zoo", trials=4,
                    max_prompts=8, seed=0)
    assert res["fit"]["stage_a"]["d_donor"] != res["fit"]["stage_a"]["d_base"]
    assert res["overlap"]["family_base"] != res["overlap"]["family_donor"]
    assert res["overlap"]["shared"] > res["overlap"]["raw_string_shared"]
    best = res["best"]
    assert best is not None
    assert best["r"] <= res["ppl_cap"]
    assert best["sym_kl"] > 0
    assert (tmp_path / "zoo" / "best_model" / "model.safetensors").exists()
