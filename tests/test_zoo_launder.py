"""The launderer's transforms (methods.md §A) keep the logits of tiny GPT-2 and Llama-GQA models and move the weights.

Every transform is checked on logits at relative 1e-4 (float32 models, compared in float64), on models whose gains,
biases and weights are all random so that no step can pass by acting on zeros or ones; every transform must also
move the tensors it claims to rewrite, and the constraints the spec states (a rotation that fixes the all-ones
direction for LayerNorm, maps that commute with the rotary planes) are shown to matter by breaking them.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from lmsurgeon.errors import LmsurgeonError, UnknownArchitecture
from lmsurgeon.zoo import launder
from lmsurgeon.zoo.transforms import logit_discrepancy, moved_fraction

VOCAB = 97
TOLERANCE = 1e-4
MODEL_KINDS = ("gpt2", "gpt2_relu", "llama_gqa", "llama_biased")

# which tensors each transform must rewrite, per family (regex on state-dict names)
TARGETS = {
    "fold_norm_gains": {
        "gpt2": r"c_attn\.(weight|bias)|c_fc\.(weight|bias)|lm_head\.weight",
        "llama": r"(q|k|v|gate|up)_proj\.weight|lm_head\.weight",
    },
    "rotate_residual": {
        "gpt2": r"wte|wpe|c_attn\.weight|c_proj\.(weight|bias)|c_fc\.weight|lm_head",
        "llama": r"embed_tokens|_proj\.weight|lm_head",
    },
    "map_query_key": {"gpt2": r"c_attn\.weight", "llama": r"(q|k)_proj\.weight"},
    "map_value_output": {"gpt2": r"c_attn\.weight|attn\.c_proj\.weight", "llama": r"(v|o)_proj\.weight"},
    "permute_heads": {"gpt2": r"c_attn\.weight|attn\.c_proj\.weight", "llama": r"(q|o)_proj\.weight"},
    "permute_kv_heads": {"gpt2": r"c_attn\.weight", "llama": r"(k|v)_proj\.weight"},
    "permute_mlp_units": {"gpt2": r"c_fc\.weight|mlp\.c_proj\.weight", "llama": r"(gate|up|down)_proj\.weight"},
    "scale_mlp_units": {"gpt2": r"c_fc\.weight|mlp\.c_proj\.weight", "llama": r"(up|down)_proj\.weight"},
    "permute_vocabulary": {"gpt2": r"wte|lm_head", "llama": r"embed_tokens|lm_head"},
}
MIN_MOVED = 0.25  # a random non-identity permutation of 4 heads moves at least half of them


def randomise(model):
    """Random weights of a realistic scale, gains around 1 and nonzero biases, so every fold and map has work."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if re.search(r"ln_|norm", name):
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            else:
                param.copy_((0.15 if param.ndim > 1 else 0.05) * noise)
    return model.eval()


def make_model(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind.startswith("gpt2"):
        config = GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=32,
            bos_token_id=1,
            eos_token_id=2,
            activation_function="relu" if kind == "gpt2_relu" else "gelu_new",
        )
        return randomise(GPT2LMHeadModel(config))
    biased = kind == "llama_biased"
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1 if biased else 2,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=biased,
        attention_bias=biased,
        mlp_bias=biased,
    )
    return randomise(LlamaForCausalLM(config))


def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """64-wide matrices: on a loaded machine, waking a second thread costs far more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models() -> dict:
    return {kind: make_model(kind) for kind in MODEL_KINDS}


@pytest.fixture(scope="module")
def folded(models) -> dict:
    """Each model untied and folded: the input every rotation needs."""
    out = {}
    for kind, model in models.items():
        untied, _ = launder.untie_head(model)
        out[kind], _ = launder.fold_norm_gains(untied)
    return out


def assert_moved(before, after, transform: str) -> None:
    pattern = TARGETS[transform][launder.family_of(before)]
    fractions = moved_fraction(before.state_dict(), after.state_dict())
    targeted = {name: f for name, f in fractions.items() if re.search(pattern, name)}
    assert targeted, f"no tensor matches {pattern}"
    unmoved = {name: f for name, f in targeted.items() if f < MIN_MOVED}
    assert not unmoved, f"{transform} left these (nearly) unchanged: {unmoved}"


def vocab_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


# ------------------------------------------------------------------------------------------ one step each


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_untie_head_gives_the_head_its_own_tensor_and_keeps_the_logits(models, kind):
    model = models[kind]
    untied, step = launder.untie_head(model)
    assert logit_discrepancy(model, untied, input_ids()) == 0.0
    assert not launder.is_tied(untied)
    assert untied.config.tie_word_embeddings is False
    assert step.truth["was_tied"] == launder.is_tied(model)
    assert launder.is_tied(models["gpt2"]), "the GPT-2 fixture is meant to start tied"


def test_untied_gpt2_head_survives_saving_and_loading(models, tmp_path):
    from transformers import GPT2LMHeadModel

    untied, _ = launder.untie_head(models["gpt2"])
    with torch.no_grad():
        untied.lm_head.weight.mul_(1.5)  # a head that differs from the embedding must stay different
    untied.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert not launder.is_tied(loaded)
    assert logit_discrepancy(untied, loaded, input_ids()) == 0.0


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_fold_norm_gains_keeps_the_logits_and_leaves_plain_norms(models, folded, kind):
    untied, _ = launder.untie_head(models[kind])
    out, step = launder.fold_norm_gains(untied)
    assert logit_discrepancy(untied, out, input_ids()) <= TOLERANCE
    assert_moved(untied, out, "fold_norm_gains")
    for norm in launder._norms(out):
        assert torch.all(norm.gain == 1)
        if norm.bias is not None and not norm.final:
            assert torch.all(norm.bias == 0)
    assert torch.equal(step.truth["gains"][-1], launder._f64(launder._norms(untied)[-1].gain))


def test_fold_norm_gains_refuses_a_tied_head(models):
    with pytest.raises(LmsurgeonError, match="untie"):
        launder.fold_norm_gains(models["gpt2"])


def test_an_unknown_family_is_refused_by_name():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB)
    )
    with pytest.raises(UnknownArchitecture, match="'bert'"):
        launder.permute_heads(model, seed=0)


def test_a_parameter_outside_the_anatomy_is_refused_before_folding():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=64,
        n_layer=1,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=32,
        add_cross_attention=True,
        tie_word_embeddings=False,
    )
    with pytest.raises(UnknownArchitecture, match="crossattention"):
        launder.fold_norm_gains(GPT2LMHeadModel(config))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_rotate_residual_keeps_the_logits_and_rotates_the_embedding(folded, kind):
    model = folded[kind]
    out, step = launder.rotate_residual(model, seed=3)
    Q = step.truth["Q"]
    assert logit_discrepancy(model, out, input_ids()) <= TOLERANCE
    assert_moved(model, out, "rotate_residual")
    embed_before = launder._f64(model.get_input_embeddings().weight)
    embed_after = launder._f64(out.get_input_embeddings().weight)
    torch.testing.assert_close(embed_after, embed_before @ Q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_centring_orthogonal_is_orthogonal_and_fixes_the_all_ones_direction():
    Q = launder.centring_orthogonal(64, seed=5)
    ones = torch.ones(64, dtype=torch.float64)
    torch.testing.assert_close(Q.T @ Q, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(Q @ ones, ones, rtol=0, atol=1e-12)
    assert (Q - torch.eye(64, dtype=torch.float64)).abs().max() > 0.1, "Q must actually rotate"


def test_layernorm_breaks_under_a_rotation_that_moves_the_all_ones_direction(folded, monkeypatch):
    """Negative control: the GPT-2 rotation is function-preserving only because Q fixes 1 (methods.md §A2)."""
    monkeypatch.setattr(launder, "centring_orthogonal", launder.random_orthogonal)
    out, _ = launder.rotate_residual(folded["gpt2"], seed=3)
    assert logit_discrepancy(folded["gpt2"], out, input_ids()) > 1e-2


def test_rotate_residual_refuses_unfolded_gains(models):
    untied, _ = launder.untie_head(models["llama_gqa"])
    with pytest.raises(LmsurgeonError, match="fold"):
        launder.rotate_residual(untied, seed=0)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_map_query_key_keeps_the_logits(models, kind):
    model = models[kind]
    out, step = launder.map_query_key(model, seed=4)
    assert logit_discrepancy(model, out, input_ids()) <= TOLERANCE
    assert_moved(model, out, "map_query_key")
    aw = launder.read_attention(model, 0)
    assert tuple(step.truth["M"].shape) == (2, aw.n_kv, aw.head_dim, aw.head_dim)


def test_rotary_query_key_maps_only_scale_and_rotate_within_planes(models):
    M = launder.map_query_key(models["llama_gqa"], seed=4)[1].truth["M"][0, 0]
    half = M.shape[0] // 2
    i = torch.arange(half)
    in_plane = torch.zeros_like(M, dtype=torch.bool)
    for a, b in ((i, i), (i, i + half), (i + half, i), (i + half, i + half)):
        in_plane[a, b] = True
    assert torch.all(M[~in_plane] == 0)
    torch.testing.assert_close(M[i, i], M[i + half, i + half])
    torch.testing.assert_close(M[i, i + half], -M[i + half, i])


def test_rotary_attention_breaks_under_a_general_query_key_map(models, monkeypatch):
    """Negative control: a q/k map that mixes rotary planes changes the scores (methods.md §A3)."""
    monkeypatch.setattr(launder, "_rotary_commuting", launder._random_invertible)
    out, _ = launder.map_query_key(models["llama_gqa"], seed=4)
    assert logit_discrepancy(models["llama_gqa"], out, input_ids()) > 1e-2


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_map_value_output_keeps_the_logits(models, kind):
    model = models[kind]
    out, step = launder.map_value_output(model, seed=5)
    assert logit_discrepancy(model, out, input_ids()) <= TOLERANCE
    assert_moved(model, out, "map_value_output")
    assert step.truth["N"].shape[1] == launder.read_attention(model, 0).n_kv


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_permute_heads_keeps_the_logits_and_moves_query_heads_with_their_kv_head(models, kind):
    model = models[kind]
    out, step = launder.permute_heads(model, seed=6)
    assert logit_discrepancy(model, out, input_ids()) <= TOLERANCE
    assert_moved(model, out, "permute_heads")
    group = launder.read_attention(model, 0).group_size
    if launder.read_attention(model, 0).n_kv > 1:  # a single key/value head (multi-query) has nothing to permute
        assert_moved(model, out, "permute_kv_heads")
    q_perm, kv_perm = step.truth["q_perm"], step.truth["kv_perm"]
    for layer in range(q_perm.shape[0]):
        for j, old in enumerate(q_perm[layer].tolist()):
            assert old // group == int(kv_perm[layer, j // group])


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_permute_mlp_units_keeps_the_logits(models, kind):
    model = models[kind]
    out, step = launder.permute_mlp_units(model, seed=7)
    assert logit_discrepancy(model, out, input_ids()) <= TOLERANCE
    assert_moved(model, out, "permute_mlp_units")
    assert sorted(step.truth["perm"][0].tolist()) == list(range(launder.read_mlp(model, 0).W_up.shape[1]))


@pytest.mark.parametrize("kind", ("gpt2_relu", "llama_gqa", "llama_biased"))
def test_scale_mlp_units_keeps_the_logits_where_the_activation_allows(models, kind):
    model = models[kind]
    out, step = launder.scale_mlp_units(model, seed=8)
    assert logit_discrepancy(model, out, input_ids()) <= TOLERANCE
    assert_moved(model, out, "scale_mlp_units")
    assert step.truth["scale"].min() >= 0.5
    assert step.truth["scale"].max() <= 2.0


def test_scale_mlp_units_refuses_gelu(models):
    assert not launder.mlp_units_scale(models["gpt2"])
    with pytest.raises(LmsurgeonError, match="do not scale"):
        launder.scale_mlp_units(models["gpt2"], seed=8)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_permute_vocabulary_gives_permuted_logits_on_permuted_ids(models, kind):
    model = models[kind]
    out, step = launder.permute_vocabulary(model, seed=9)
    perm = step.truth["perm"]
    new_id = launder.inverse_permutation(perm)
    ids = input_ids()
    before, after = vocab_logits(model, ids), vocab_logits(out, new_id[ids])
    assert relative_error(before[..., perm], after) <= TOLERANCE
    assert_moved(model, out, "permute_vocabulary")
    assert out.config.bos_token_id == int(new_id[model.config.bos_token_id])
    assert launder.is_tied(out) == launder.is_tied(model)


# ------------------------------------------------------------------------------------------ tokenizers


def bpe_tokenizer():
    """A small trained BPE tokenizer with a bos-adding post-processor (ids that must be remapped too)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["the cat sat on the mat", "a dog and a cat met the other cat", "mats and hats on cats"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>"]))
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return tok


def unigram_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    pieces = [("<unk>", 0.0), ("a", -2.0), ("b", -2.0), ("c", -2.0), ("ab", -1.0), ("bc", -1.5), ("abc", -1.2)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@pytest.mark.parametrize("make", (bpe_tokenizer, unigram_tokenizer))
def test_permuted_tokenizer_encodes_text_to_the_permuted_ids(make):
    tok = make()
    n = tok.get_vocab_size(with_added_tokens=True)
    perm = launder.random_permutation(n, torch.Generator().manual_seed(0))
    new_tok = launder.permute_tokenizer(tok, perm)
    new_id = launder.inverse_permutation(perm)
    for text in ("the cat sat on the mat", "abc ab bc cab"):
        old = tok.encode(text)
        new = new_tok.encode(text)
        assert new.ids == [int(new_id[i]) for i in old.ids]
        assert new.tokens == old.tokens
    assert new_tok.get_vocab() != tok.get_vocab()


def test_permute_tokenizer_refuses_ids_beyond_the_permutation():
    tok = bpe_tokenizer()
    with pytest.raises(LmsurgeonError, match="outside"):
        launder.permute_tokenizer(tok, torch.arange(5))


# ------------------------------------------------------------------------------------------ composition


@pytest.fixture(scope="module")
def laundered(models) -> dict:
    return {kind: launder.launder(model, seed=11) for kind, model in models.items()}


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_launder_keeps_the_logits_on_permuted_ids_and_moves_every_weight(models, laundered, kind):
    model = models[kind]
    out, tokenizer, steps = laundered[kind]
    assert tokenizer is None
    perm = steps[-1].truth["perm"]
    ids = input_ids()
    before, after = vocab_logits(model, ids), vocab_logits(out, launder.inverse_permutation(perm)[ids])
    assert relative_error(before[..., perm], after) <= TOLERANCE
    fractions = moved_fraction(model.state_dict(), out.state_dict())
    weights = {name: f for name, f in fractions.items() if name.endswith("weight") and not re.search(r"ln_|norm", name)}
    assert min(weights.values()) > 0.9, weights


def test_launder_runs_every_step_in_order(laundered):
    names = {kind: [s.name for s in steps] for kind, (_, _, steps) in laundered.items()}
    core = [
        "untie_head",
        "fold_norm_gains",
        "rotate_residual",
        "map_query_key",
        "map_value_output",
        "permute_heads",
        "permute_mlp_units",
    ]
    assert names["gpt2"] == [*core, "permute_vocabulary"]  # GELU units do not scale
    assert names["llama_gqa"] == [*core, "scale_mlp_units", "permute_vocabulary"]
    assert names["gpt2_relu"] == [*core, "scale_mlp_units", "permute_vocabulary"]


def test_launder_with_a_tokenizer_keeps_the_function_on_text(models):
    model, tok = models["llama_gqa"], bpe_tokenizer()
    out, new_tok, steps = launder.launder(model, seed=12, tokenizer=tok)
    text = "the cat met a dog on the mat"
    old_ids = torch.tensor([tok.encode(text).ids])
    new_ids = torch.tensor([new_tok.encode(text).ids])
    perm = steps[-1].truth["perm"]
    assert not torch.equal(old_ids, new_ids)
    before, after = vocab_logits(model, old_ids), vocab_logits(out, new_ids)
    assert relative_error(before[..., perm], after) <= TOLERANCE
    n = tok.get_vocab_size(with_added_tokens=True)
    assert torch.equal(perm[n:], torch.arange(n, VOCAB)), "rows beyond the tokenizer stay in place"


def test_laundered_model_survives_saving_and_loading(laundered, tmp_path):
    from transformers import GPT2LMHeadModel

    out, _, _ = laundered["gpt2"]
    out.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert logit_discrepancy(out, loaded, input_ids()) == 0.0


def test_launder_is_reproducible_from_its_seed(models, laundered):
    again, _, _ = launder.launder(models["llama_gqa"], seed=11)
    other, _, _ = launder.launder(models["llama_gqa"], seed=13)
    first = laundered["llama_gqa"][0].state_dict()
    assert all(torch.equal(first[name], t) for name, t in again.state_dict().items())
    assert not torch.equal(first["model.embed_tokens.weight"], other.state_dict()["model.embed_tokens.weight"])


def test_step_manifest_is_json_with_permutations_in_full_and_maps_by_hash(laundered):
    steps = laundered["llama_gqa"][2]
    manifest = json.loads(json.dumps([s.manifest() for s in steps]))
    by_name = {m["name"]: m for m in manifest}
    assert by_name["permute_vocabulary"]["perm"] == steps[-1].truth["perm"].tolist()
    assert by_name["rotate_residual"]["Q"]["shape"] == [64, 64]
    assert len(by_name["rotate_residual"]["Q"]["sha256"]) == 64
    assert by_name["rotate_residual"]["seed"] == launder.child_seed(11, "rotate_residual")


def test_step_manifest_digest_ignores_last_bit_rounding_but_not_a_real_change():
    """The build and a later re-run may get a map that differs in its last float64 bits (BLAS/LAPACK rounding that
    depends on memory alignment): the recorded digest must be the same, and differ for any change that matters."""
    Q = launder.centring_orthogonal(64, seed=5)
    ulp = torch.nextafter(Q, torch.full_like(Q, 2.0))  # every entry moved by one float64 unit in the last place
    record = launder.Step("rotate_residual", 5, {"Q": Q}).manifest()
    assert launder.Step("rotate_residual", 5, {"Q": ulp}).manifest() == record
    assert launder.Step("rotate_residual", 5, {"Q": Q * (1 + 1e-6)}).manifest() != record
