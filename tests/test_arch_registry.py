"""The architecture registry against checkpoints written by ``transformers`` itself, one per supported model type."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmsurgeon.arch import Layout, detect_family, find_module
from lmsurgeon.arch.registry import families
from lmsurgeon.errors import UnknownArchitecture
from lmsurgeon.io import open_model
from tests.tiny_checkpoints import TINY, tiny_model, write_tiny

FAMILY_OF = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "mistral": "llama", "mixtral": "llama",
             "qwen2": "qwen2", "qwen3": "qwen2", "qwen2_moe": "qwen2", "qwen3_moe": "qwen2", "phi3": "phi3",
             "phimoe": "phi3", "glm4": "glm4", "glm4_moe": "glm4_moe", "solar_open": "glm4_moe", "gemma": "gemma",
             "gemma2": "gemma2", "gemma3_text": "gemma2"}


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    model_type = request.param
    folder = write_tiny(tmp_path_factory.mktemp(model_type), model_type)
    return model_type, folder


def claimed_names(layout: Layout) -> set[str]:
    """Every tensor name some role (weight or bias) of the layout resolves to."""
    out = set()
    for role in layout.family.roles():
        spec = layout.family.spec(role)
        layers = layout.layers if layout.family.is_layer_role(role) else [None]
        experts = range(64) if "{e}" in json.dumps(spec["name"]) else [None]
        for i in layers:
            for e in experts:
                if (name := layout.name(role, i, e)) is not None:
                    out.add(name)
                    if spec.get("bias"):
                        out.add(layout._full(role, spec["bias"], i, e))
    return out


def test_every_model_type_is_detected_as_its_family(tiny):
    model_type, folder = tiny
    assert detect_family(open_model(folder).config).name == FAMILY_OF[model_type]


def test_every_tensor_in_the_checkpoint_has_a_role(tiny):
    """A tensor no role names is a tensor every capability silently ignores: the registry must cover them all."""
    _, folder = tiny
    handle = open_model(folder)
    assert set(handle.names()) - claimed_names(Layout(handle)) == set()


def test_layout_reads_match_the_loaded_model_parameters(tiny):
    """Each role read from the file equals the live module's weight (in [out, in] orientation)."""
    model_type, folder = tiny
    layout = Layout(open_model(folder))
    model = tiny_model(model_type)
    layers = find_module(model, layout.family.modules["layers"])
    assert len(layers) == layout.n_layers == 3
    params = dict(model.named_parameters())
    for i in layout.layers:
        for role in ("q", "k", "v", "o"):
            w = layout.read(role, i)
            assert w.ndim == 2 and w.shape[1 if role != "o" else 0] == layout.hidden_size
        norm = layout.norm("attn_norm", i)
        stored = params[layout.name("attn_norm", i)].detach().double().numpy()
        np.testing.assert_allclose(norm.gain, stored + layout.norm_offset, rtol=1e-6)


def test_split_of_fused_projections_reassembles_the_fused_tensor(tmp_path):
    """GPT-2's c_attn ([in, 3·out], Conv1D) split into q, k, v must concatenate back to its transpose."""
    folder = write_tiny(tmp_path, "gpt2")
    layout = Layout(open_model(folder))
    fused = layout.handle.tensor("transformer.h.1.attn.c_attn.weight", np.float64)
    qkv = np.concatenate([layout.read(r, 1) for r in ("q", "k", "v")])
    np.testing.assert_array_equal(qkv, fused.T)
    bias = layout.handle.tensor("transformer.h.1.attn.c_attn.bias", np.float64)
    np.testing.assert_array_equal(np.concatenate([layout.bias(r, 1) for r in ("q", "k", "v")]), bias)


def test_gemma_norm_gain_applies_the_one_plus_w_offset(tmp_path):
    layout = Layout(open_model(write_tiny(tmp_path, "gemma2")))
    raw = layout.handle.tensor(layout.name("attn_norm", 0), np.float64)
    np.testing.assert_allclose(layout.norm("attn_norm", 0).gain, 1.0 + raw)
    assert layout.norm_offset == 1.0


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_tied_and_untied_heads_are_told_apart(tmp_path, model_type):
    layout = Layout(open_model(write_tiny(tmp_path, model_type)))
    assert layout.tied == (model_type == "gpt2")


def test_moe_experts_and_router_are_found(tmp_path):
    layout = Layout(open_model(write_tiny(tmp_path, "glm4_moe")))
    assert layout.experts(0) == []  # first_k_dense_replace=1: layer 0 is dense
    assert layout.has("up", 0)
    assert layout.experts(1) == [0, 1, 2, 3]
    assert layout.read("experts.up", 2, 3).shape == (16, 32)
    assert layout.read("router", 1).shape == (4, 32)


def test_glm45_extra_mtp_layer_is_skipped(tmp_path):
    """GLM-4.5 stores a multi-token-prediction layer at index num_hidden_layers; analyses must not see it."""
    extra = {"model.layers.3.input_layernorm.weight": torch.ones(32),
             "model.layers.3.self_attn.q_proj.weight": torch.zeros(32, 32)}
    layout = Layout(open_model(write_tiny(tmp_path, "glm4_moe", extra_tensors=extra)))
    assert layout.layers == [0, 1, 2]
    assert layout.skipped_layers == [3]
    assert all(layer != 3 for _, layer in layout.norms_present())


def test_unknown_architecture_error_lists_the_known_families():
    with pytest.raises(UnknownArchitecture) as e:
        detect_family({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}, where="x/config.json")
    message = str(e.value)
    assert "mamba" in message and "x/config.json" in message
    assert all(name in message for name in families())


def test_detection_falls_back_to_architectures_when_model_type_is_unknown():
    assert detect_family({"model_type": "custom", "architectures": ["LlamaForCausalLM"]}).name == "llama"


def test_minilm_layout_has_six_post_norm_encoder_layers():
    layout = Layout(open_model("minilm"))
    assert layout.family.name == "bert" and layout.n_layers == 6 and layout.hidden_size == 384
    norm = layout.norm("mlp_norm", 5)
    assert norm.kind == "layer" and norm.placement == "post" and norm.bias is not None
