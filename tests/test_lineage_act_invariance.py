"""φ_MATCH on every MLP kind (methods.md §L7.4.2, §L7.7.1): function-preserving transforms leave it high, a
separately trained model leaves it null.

The transforms are the launderer's (``lmsurgeon.zoo.launder``): MLP unit permutation, MLP unit scaling (ReLU units,
SwiGLU's up branch), norm folding plus a residual rotation, and the whole laundering chain (heads, per-head maps,
vocabulary permutation with its tokenizer). Each gives a model with the same function, so the activations at the
items, hence each layer's ρ, are those of the model against itself; the independents are the zoo's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from lmsurgeon.arch import Layout
from lmsurgeon.data import load_texts
from lmsurgeon.io import open_model
from lmsurgeon.lineage.activations import activation_tests
from lmsurgeon.zoo import launder

N_TEXTS = 24


@pytest.fixture(scope="module")
def texts():
    return load_texts(None, split="validation")[:N_TEXTS]


def _save(model, tokenizer: Tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def _load(folder: Path):
    return open_model(folder).load_model("causal-lm", dtype=torch.float32)


def _relu_copy(folder: Path, out: Path) -> Path:
    """The same GPT-2 weights with ReLU units: a third MLP kind, whose units may also be dead on the items."""
    from transformers import GPT2LMHeadModel

    model = _load(folder)
    config = model.config
    config.activation_function = "relu"
    relu = GPT2LMHeadModel(config)
    relu.load_state_dict(model.state_dict())
    return _save(relu.eval(), Tokenizer.from_file(str(folder / "tokenizer.json")), out)


@pytest.fixture(scope="module")
def kinds(test_zoo, tmp_path_factory):
    """Base and independent folders per MLP kind: GELU (GPT-2), ReLU (GPT-2 with ReLU units), SwiGLU (Llama)."""
    zoo = Path(test_zoo[0])
    tmp = tmp_path_factory.mktemp("kinds")
    return {
        "gelu": (zoo / "gpt2-bpe", [zoo / "gpt2-code"]),
        "relu": (_relu_copy(zoo / "gpt2-bpe", tmp / "relu-a"), [_relu_copy(zoo / "gpt2-code", tmp / "relu-b")]),
        "swiglu": (zoo / "lin-base", [zoo / "lin-indep-1"]),
    }


def _phi_match(a: Path, b: Path, texts):
    (t,) = activation_tests(Layout(open_model(a)), Layout(open_model(b)), texts, ("phi_match",))
    assert t.applies, t.reason
    return t


def _transformed(folder: Path, name: str, out: Path) -> Path:
    model = _load(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if name == "permute_units":
        model, _ = launder.permute_mlp_units(model, seed=5)
    elif name == "scale_units":
        model, _ = launder.scale_mlp_units(model, seed=6)
    elif name == "rotate_residual":
        model, _ = launder.untie_head(model)
        model, _ = launder.fold_norm_gains(model)
        model, _ = launder.rotate_residual(model, seed=7)
    else:
        model, tokenizer, _ = launder.launder(model, seed=8, tokenizer=tokenizer)
    return _save(model, tokenizer, out)


TRANSFORMS = ["permute_units", "scale_units", "rotate_residual", "launder"]


@pytest.mark.parametrize("kind", ["gelu", "relu", "swiglu"])
def test_phi_match_is_unchanged_by_function_preserving_transforms_and_null_on_independents(
    kind, kinds, texts, tmp_path
):
    base, independents = kinds[kind]
    itself = _phi_match(base, base, texts)
    assert itself.z >= 12, (kind, itself.z)
    for name in TRANSFORMS:
        if name == "scale_units" and not launder.mlp_units_scale(_load(base)):
            continue  # GELU is not homogeneous: act(c·u) ≠ c·act(u), the transform does not exist
        t = _phi_match(base, _transformed(base, name, tmp_path / name), texts)
        for same, moved in zip(itself.per_layer, t.per_layer, strict=True):
            assert (moved.a, moved.b, moved.n_units) == (same.a, same.b, same.n_units), (kind, name)
            assert moved.rho == pytest.approx(same.rho, abs=0.02), (kind, name)
        assert t.z >= 12, (kind, name, t.z)
    for other in independents:
        t = _phi_match(base, other, texts)
        assert abs(t.z) < 3, (kind, other.name, t.z)


def _upcycled(folder: Path, out: Path, n_experts: int = 4, seed: int = 0, expert_order=None) -> Path:
    """A Mixtral whose every expert is a copy of the Llama's dense MLP under a new random router: top-k weights
    are renormalised, so the function is the dense model's. ``expert_order`` permutes experts with their router
    rows (function-preserving too)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    dense = _load(folder)
    c = dense.config
    config = MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters,
        tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=n_experts,
        num_experts_per_tok=2,
    )
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(config).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing = moe.load_state_dict(state, strict=False).missing_keys
    assert all(".mlp." in k for k in missing), missing
    order = torch.arange(n_experts) if expert_order is None else torch.as_tensor(expert_order)
    with torch.no_grad():
        for layer, block in zip(dense.model.layers, moe.model.layers, strict=True):
            gate_up = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])
            block.mlp.experts.gate_up_proj.copy_(gate_up.expand(n_experts, *gate_up.shape))
            block.mlp.experts.down_proj.copy_(layer.mlp.down_proj.weight.expand(n_experts, -1, -1))
            block.mlp.gate.weight.copy_(block.mlp.gate.weight[order])
        ids = torch.arange(1, 40)[None]
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    return _save(moe, Tokenizer.from_file(str(folder / "tokenizer.json")), out)


def test_phi_match_follows_a_dense_mlp_into_its_experts_and_matches_experts_by_router(test_zoo, texts, tmp_path):
    zoo = Path(test_zoo[0])
    base, other = zoo / "lin-base", zoo / "lin-indep-1"
    moe = _upcycled(base, tmp_path / "moe")
    reordered = _upcycled(base, tmp_path / "moe-reordered", expert_order=[2, 0, 3, 1])
    other_moe = _upcycled(other, tmp_path / "other-moe", seed=1)
    dense_moe = _phi_match(base, moe, texts)
    assert {p.block.split(" ")[0] for p in dense_moe.per_layer} == {"mlp↔expert"}
    assert dense_moe.z >= 12, dense_moe.z
    moe_moe = _phi_match(moe, reordered, texts)
    assert {p.block.split(" ")[0] for p in moe_moe.per_layer} == {"experts"}
    assert moe_moe.z >= 12, moe_moe.z
    independent = _phi_match(moe, other_moe, texts)
    assert abs(independent.z) < 3, independent.z


def test_dead_units_are_dropped_before_matching():
    """ReLU units that never fire on the items (and a unit whose down column is zero) have no correlation to match
    by: φ_MATCH equals the one computed on the live units alone, and counts only them."""
    import numpy as np

    from lmsurgeon.lineage.activations import match_rho

    g = np.random.default_rng(0)
    x, h = g.standard_normal((300, 16)), g.standard_normal((300, 16))
    W_up, W_down = g.standard_normal((40, 16)), g.standard_normal((16, 40))
    act = np.maximum(x @ W_up.T - np.where(np.arange(40) < 5, 1e3, 0.0), 0.0)  # units 0-4 never fire
    W_down[:, 5] = 0.0
    readout = h @ W_down
    perm = g.permutation(40)
    act_b, read_b = act[:, perm] * 1.7, readout[:, perm]
    live = np.arange(6, 40)
    live_b = np.flatnonzero(np.isin(perm, live))
    rho, n = match_rho(act, readout, act_b, read_b, None)
    assert n == 34
    assert rho == pytest.approx(1.0)
    assert (rho, n) == match_rho(act[:, live], readout[:, live], act_b[:, live_b], read_b[:, live_b], None)
