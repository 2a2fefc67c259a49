"""The adversarial zoo family: every case built with its ground truth, its function-preserving part checked, its
transforms doing what they claim on small models, and the built models loading, generating and tokenising."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.zoo import load_model, recompute_perplexity
from lmsurgeon.zoo.adversarial import (
    embedding_parameters,
    paste_tensors,
    prune_width,
    reinit_embeddings,
    upcycle_moe,
    upscale_depth,
    upscaled_layers,
)
from lmsurgeon.zoo.build import FUNCTION_TOLERANCE, _Build
from lmsurgeon.zoo.launder import inverse_permutation, launder, read_attention, read_mlp
from lmsurgeon.zoo.recipe import ADVERSARIAL_CASES
from lmsurgeon.zoo.tokenizers import load_tokenizer
from lmsurgeon.zoo.transforms import logit_discrepancy

BASES = {"gpt2": "gpt2-bpe", "llama": "llama-sp"}
INDEPENDENT_START = {"gpt2": "gpt2-code", "llama": "adv-llama-indep"}
PRESERVING = {"laundered", "moe"}  # cases whose transform keeps the function before training
TEXT = "Return the number of items in a container."


def _adversarial(manifest) -> dict[str, dict]:
    return {n: e for n, e in manifest["models"].items() if e.get("kind") == "adversarial"}


def _root(entries, name):
    while entries[name].get("parent") in entries:
        name = entries[name]["parent"]
    return name


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.3 * torch.randn(param.shape))
    return model


@pytest.fixture
def tiny_gpt2():
    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def ids():
    return torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))


# ------------------------------------------------------------------------------------- transforms, small models


def test_moe_upcycling_keeps_the_dense_function_whatever_the_router(tiny_llama, ids):
    moe, step = upcycle_moe(tiny_llama, seed=3)
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    assert logit_discrepancy(tiny_llama, moe, ids) < FUNCTION_TOLERANCE
    with torch.no_grad():  # another router: still the dense MLP, because identical experts are averaged
        moe.model.layers[0].mlp.gate.weight.normal_(0, 1)
    assert logit_discrepancy(tiny_llama, moe, ids) < FUNCTION_TOLERANCE
    with torch.no_grad():  # experts that differ: the function changes, so the check above can fail
        moe.model.layers[0].mlp.experts.down_proj[0].mul_(3)
    assert logit_discrepancy(tiny_llama, moe, ids) > 1e-2


def test_build_refuses_a_transform_that_changes_the_logits(tiny_llama):
    stream = torch.randint(0, 97, (4 * 16,), generator=torch.Generator().manual_seed(5))
    fake = SimpleNamespace(
        _stream=lambda tokenizer, split: stream,
        recipe=SimpleNamespace(seq_len=16),
        device=torch.device("cpu"),
        out="zoo",
    )
    recipe = SimpleNamespace(name="adv-x", transformation="adversarial", tokenizer="t")
    changed, _ = reinit_embeddings(tiny_llama, seed=1)
    with pytest.raises(LmsurgeonError, match="changed the logits"):
        _Build.check_same_function(fake, recipe, tiny_llama, changed)
    moe, _ = upcycle_moe(tiny_llama, seed=1)
    assert _Build.check_same_function(fake, recipe, tiny_llama, moe) < FUNCTION_TOLERANCE


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_depth_upscaling_copies_each_layer_from_its_source(family, tiny_gpt2, tiny_llama, ids):
    model = tiny_gpt2 if family == "gpt2" else tiny_llama
    deeper, step = upscale_depth(model)
    source = step.truth["source"].tolist()
    assert source == upscaled_layers(2) == [0, 1, 0, 1]
    assert upscaled_layers(32) == [*range(24), *range(8, 32)]  # SOLAR-10.7B from Mistral-7B: 48 layers
    for new, old in enumerate(source):
        assert torch.equal(read_attention(deeper, new).W_q, read_attention(model, old).W_q)
        assert torch.equal(read_mlp(deeper, new).W_down, read_mlp(model, old).W_down)
    assert torch.isfinite(deeper(input_ids=ids).logits).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_width_pruning_keeps_the_most_active_channels_as_slices_of_the_original(family, tiny_gpt2, tiny_llama, ids):
    model = tiny_gpt2 if family == "gpt2" else tiny_llama
    small, step = prune_width(model, ids)
    keep_d, heads, units = step.truth["hidden"], step.truth["heads"], step.truth["units"]
    assert small.config.hidden_size == len(keep_d) < model.config.hidden_size
    assert small.config.num_attention_heads == heads.shape[1] < model.config.num_attention_heads
    big, little = read_mlp(model, 1), read_mlp(small, 1)
    assert little.W_up.shape[1] == units.shape[1] < big.W_up.shape[1]
    assert torch.allclose(little.W_up, big.W_up[keep_d][:, units[1]].float().double())
    assert torch.allclose(little.W_down, big.W_down[units[1]][:, keep_d].float().double())
    d_h = read_attention(model, 0).head_dim
    cols = (heads[0][:, None] * d_h + torch.arange(d_h)).reshape(-1)
    assert torch.allclose(read_attention(small, 0).W_q, read_attention(model, 0).W_q[keep_d][:, cols].float().double())
    if family == "llama":  # each key/value group keeps all but one of its query heads
        group = model.config.num_attention_heads // model.config.num_key_value_heads
        assert (heads // group).tolist() == [[0, 0, 1, 1]] * 2
    # the kept units are the most active ones: every dropped unit was at most as active as any kept one
    from lmsurgeon.zoo.adversarial import importance

    _, _, unit_scores = importance(model, ids)
    dropped = torch.ones(len(unit_scores[1]), dtype=torch.bool)
    dropped[units[1]] = False
    assert unit_scores[1][dropped].max() <= unit_scores[1][units[1]].min()
    assert torch.isfinite(small(input_ids=ids).logits).all()


def test_reembedding_redraws_only_the_embedding_and_head(tiny_llama, tiny_gpt2):
    fresh, step = reinit_embeddings(tiny_llama, seed=4)
    assert not step.truth["tied"]
    moved = {n for n, p in fresh.named_parameters() if not torch.equal(p, tiny_llama.get_parameter(n))}
    assert moved == {"model.embed_tokens.weight", "lm_head.weight"}
    assert len(embedding_parameters(fresh)) == 2
    tied, step = reinit_embeddings(tiny_gpt2, seed=4)
    assert step.truth["tied"] and len(embedding_parameters(tied)) == 1
    assert tied.lm_head.weight is tied.transformer.wte.weight


def test_pasting_copies_exactly_the_named_tensors_and_refuses_other_shapes(tiny_llama):
    torch.manual_seed(9)
    other = LlamaForCausalLM(tiny_llama.config).eval()
    forged, step = paste_tensors(other, tiny_llama, "norm_gains")
    names = set(step.truth["names"])
    assert names == {n for n, _ in tiny_llama.named_parameters() if n.endswith("norm.weight")}
    for name, param in forged.named_parameters():
        source = tiny_llama if name in names else other
        assert torch.equal(param, source.get_parameter(name)), name
    embedded, step = paste_tensors(other, tiny_llama, "embedding")
    assert step.truth["names"] == ["model.embed_tokens.weight"]
    narrower = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=16, num_hidden_layers=2, num_attention_heads=2))
    with pytest.raises(LmsurgeonError, match="cannot paste"):
        paste_tensors(narrower, tiny_llama, "norm_gains")


# ------------------------------------------------------------------------------------- the built family


def test_every_adversarial_case_is_in_the_zoo_with_its_ground_truth(test_zoo):
    _, manifest = test_zoo
    entries = manifest["models"]
    adversarial = _adversarial(manifest)
    expected = {f"adv-{f}-{case}" for f in BASES for case in ADVERSARIAL_CASES} | {"adv-llama-moe", "adv-llama-indep"}
    assert set(adversarial) == expected
    for name, entry in adversarial.items():
        family = name.split("-")[1]
        case = entry["case"]
        assert name == f"adv-{family}-{'indep' if case == 'independent' else case}"
        assert entry["truth_relative_to"] == BASES[family]
        assert entry["truth"] in ("derived", "independent")
        # the stated truth is the lineage the manifest's parent chain implies
        assert (entry["truth"] == "derived") == (_root(entries, name) == _root(entries, BASES[family])), name
        if case == "independent":
            assert entry["derived_from"] is None and entry["applied"] == []
        elif entry["truth"] == "independent":
            assert entry["derived_from"] == INDEPENDENT_START[family]
            assert [step["name"] for step in entry["applied"]] in (["paste_norm_gains"], ["paste_embedding"])
        else:
            assert entry["derived_from"] == BASES[family]
            assert entry["applied"], name
        assert entry["training_steps"] == (0 if case == "gains-pasted" else entry["training_steps"])
        assert entry["training_steps"] > 0 or case == "gains-pasted"
    assert (
        adversarial["adv-llama-reembedded"]["frozen_body_steps"] < adversarial["adv-llama-reembedded"]["training_steps"]
    )


def test_function_preserving_parts_were_checked_below_tolerance_before_training(test_zoo):
    _, manifest = test_zoo
    for name, entry in _adversarial(manifest).items():
        if entry["case"] in PRESERVING:
            assert 0 <= entry["function_check"] <= FUNCTION_TOLERANCE, name
        else:
            assert entry["function_check"] is None, name
    steps = [s["name"] for s in manifest["models"]["adv-llama-laundered"]["applied"]]
    assert steps == [
        "untie_head",
        "fold_norm_gains",
        "rotate_residual",
        "map_query_key",
        "map_value_output",
        "permute_heads",
        "permute_mlp_units",
        "scale_mlp_units",  # SwiGLU's up branch scales; GPT-2's GELU units do not
        "permute_vocabulary",
    ]
    assert "scale_mlp_units" not in [s["name"] for s in manifest["models"]["adv-gpt2-laundered"]["applied"]]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_relaundering_the_base_reproduces_the_recorded_steps_and_its_saved_tokenizer(test_zoo, family):
    """An independent re-run of the laundered case's transform from the files on disk: the same permutation as
    recorded, the same tokenizer as saved, and the base's logits on real text read through both."""
    zoo_dir, manifest = test_zoo
    entry = manifest["models"][f"adv-{family}-laundered"]
    base, base_tok = load_model(zoo_dir, BASES[family])
    tokenizer = load_tokenizer(zoo_dir / manifest["tokenizers"][entry["tokenizer"]]["path"])
    laundered, new_tokenizer, steps = launder(base, entry["seed"], tokenizer)
    assert [s.manifest() for s in steps] == entry["applied"]
    saved = AutoTokenizer.from_pretrained(str(zoo_dir / entry["path"]))
    assert saved.get_vocab() == new_tokenizer.get_vocab()
    ids = base_tok(TEXT, return_tensors="pt")["input_ids"]
    new_ids = inverse_permutation(steps[-1].truth["perm"])
    assert torch.equal(saved(TEXT, return_tensors="pt")["input_ids"], new_ids[ids])
    assert logit_discrepancy(base, laundered, ids, new_ids) <= FUNCTION_TOLERANCE


def test_laundered_tokenizer_round_trips_and_matches_the_embedding_rows(test_zoo):
    zoo_dir, manifest = test_zoo
    entry = manifest["models"]["adv-llama-laundered"]
    base, base_tok = load_model(zoo_dir, "llama-sp")
    model, tok = load_model(zoo_dir, "adv-llama-laundered")
    perm = torch.tensor(entry["applied"][-1]["perm"])
    new_ids = inverse_permutation(perm)
    base_vocab, vocab = base_tok.get_vocab(), tok.get_vocab()
    assert vocab == {token: int(new_ids[i]) for token, i in base_vocab.items()}
    ids = tok(TEXT)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert ids == new_ids[torch.tensor(base_tok(TEXT)["input_ids"])].tolist()
    assert model.config.eos_token_id == int(new_ids[base.config.eos_token_id]) == entry["eos_id"]
    # row new_ids[t] of the laundered embedding is token t's row rotated (E' = E Q, then lightly trained): an
    # orthogonal fit in this row order leaves a far smaller residual than in a shuffled order
    E = base.model.embed_tokens.weight.detach().double()
    E_new = model.model.embed_tokens.weight.detach().double()

    def procrustes_residual(rows: torch.Tensor) -> float:
        U, _, Vt = torch.linalg.svd(E.T @ E_new[rows])
        return float((E @ (U @ Vt) - E_new[rows]).norm() / E_new.norm())

    shuffled = new_ids[torch.randperm(len(new_ids), generator=torch.Generator().manual_seed(0))]
    assert procrustes_residual(new_ids) < 0.5 * procrustes_residual(shuffled)


def test_every_adversarial_model_loads_with_transformers_and_generates(test_zoo):
    zoo_dir, manifest = test_zoo
    for name, entry in _adversarial(manifest).items():
        folder = zoo_dir / entry["path"]
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        assert type(model).__name__ == entry["architecture"], name
        batch = tokenizer(TEXT, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=model.config.eos_token_id
            )
        assert out.shape[1] == batch["input_ids"].shape[1] + 4, name
        assert isinstance(tokenizer.decode(out[0]), str)


def test_built_shapes_follow_each_case(test_zoo):
    zoo_dir, manifest = test_zoo
    models = manifest["models"]
    for family, base in BASES.items():
        b = models[base]
        up, pruned = models[f"adv-{family}-upscaled"], models[f"adv-{family}-pruned"]
        assert up["layers"] == len(upscaled_layers(b["layers"])) > b["layers"]
        assert pruned["hidden_size"] < b["hidden_size"] and pruned["attention_heads"] < b["attention_heads"]
        assert pruned["intermediate_size"] < b["intermediate_size"]
        assert pruned["kv_heads"] == (b["kv_heads"] if family == "llama" else pruned["attention_heads"])
    assert not models["adv-gpt2-laundered"]["tied_embeddings"] and models["gpt2-bpe"]["tied_embeddings"]
    moe = models["adv-llama-moe"]
    assert moe["architecture"] == "MixtralForCausalLM" and moe["applied"][0]["experts"] == 4
    forged, _ = load_model(zoo_dir, "adv-llama-gains-pasted")
    base, _ = load_model(zoo_dir, "llama-sp")
    start, _ = load_model(zoo_dir, "adv-llama-indep")
    for name, param in forged.named_parameters():  # untrained forgery: the base's gains, the rest independent
        assert torch.equal(param, (base if name.endswith("norm.weight") else start).get_parameter(name)), name


def test_recorded_perplexity_of_laundered_and_upcycled_models_matches_recomputation_from_disk(test_zoo):
    zoo_dir, manifest = test_zoo
    for name in ("adv-gpt2-laundered", "adv-llama-moe"):  # own permuted tokenizer and eos id; a Mixtral
        recomputed = recompute_perplexity(zoo_dir, name)
        assert recomputed == pytest.approx(manifest["models"][name]["final_val_ppl"], rel=1e-4), name
