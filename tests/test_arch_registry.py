"""The architecture registry against checkpoints written by ``transformers`` itself, one per supported model type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lmsurgeon.arch
from lmsurgeon.arch import ArraySource, InvalidFamilyFile, Layout, detect_family, find_module, load_family
from lmsurgeon.arch.fold import fold_gains
from lmsurgeon.arch.registry import families
from lmsurgeon.errors import CorruptCheckpoint, LmsurgeonError, UnknownArchitecture
from lmsurgeon.io import open_model
from tests.tiny_checkpoints import TINY, tiny_model, write_tiny

FAMILY_OF = {
    "bert": "bert",
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen2",
    "qwen2_moe": "qwen2",
    "qwen3_moe": "qwen2",
    "phi3": "phi3",
    "phimoe": "phi3",
    "glm4": "glm4",
    "glm4_moe": "glm4_moe",
    "solar_open": "glm4_moe",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma2",
}


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    model_type = request.param
    folder = write_tiny(tmp_path_factory.mktemp(model_type), model_type)
    return model_type, folder


def test_every_model_type_is_detected_as_its_family(tiny):
    model_type, folder = tiny
    assert detect_family(open_model(folder).config).name == FAMILY_OF[model_type]


def test_every_tensor_in_the_checkpoint_has_a_role(tiny):
    """A tensor no role names is a tensor every capability silently ignores: the registry must cover them all."""
    _, folder = tiny
    handle = open_model(folder)
    assert set(handle.names()) - set(Layout(handle).sites) == set()


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
            assert w.ndim == 2
            assert w.shape[1 if role != "o" else 0] == layout.hidden_size
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
    extra = {
        "model.layers.3.input_layernorm.weight": torch.ones(32),
        "model.layers.3.self_attn.q_proj.weight": torch.zeros(32, 32),
    }
    layout = Layout(open_model(write_tiny(tmp_path, "glm4_moe", extra_tensors=extra)))
    assert layout.layers == [0, 1, 2]
    assert layout.skipped_layers == [3]
    assert [layer for _, layer in layout.norms_present() if layer == 3] == []


def test_unknown_architecture_error_lists_the_known_families():
    with pytest.raises(UnknownArchitecture) as e:
        detect_family({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}, where="x/config.json")
    message = str(e.value)
    assert "mamba" in message
    assert "x/config.json" in message
    assert [name for name in families() if name not in message] == []


def test_detection_falls_back_to_architectures_when_model_type_is_unknown():
    assert detect_family({"model_type": "custom", "architectures": ["LlamaForCausalLM"]}).name == "llama"


def test_minilm_layout_has_six_post_norm_encoder_layers():
    layout = Layout(open_model("minilm"))
    assert layout.family.name == "bert"
    assert layout.n_layers == 6
    assert layout.hidden_size == 384
    norm = layout.norm("mlp_norm", 5)
    assert norm.kind == "layer"
    assert norm.placement == "post"
    assert norm.bias is not None


# ------------------------------------------------------------------------------------- the family file schema

FAMILY_DIR = Path(lmsurgeon.arch.__file__).parent / "families"


def _llama_data() -> dict:
    return json.loads((FAMILY_DIR / "llama.json").read_text())


def _without(d: dict, *path: str) -> dict:
    *parents, last = path
    for key in parents:
        d = d[key]
    del d[last]
    return d


def _set(d: dict, value, *path: str) -> None:
    *parents, last = path
    for key in parents:
        d = d[key]
    d[last] = value


BROKEN = {  # what goes wrong → (edit of llama.json, the key the one-line error must name)
    "unknown top-level key": (lambda d: _set(d, "beyond_n_layers", "skip_layer"), "skip_layer"),
    "unknown key in a role": (lambda d: _set(d, "self_attn.q_proj.bias", "layer", "q", "bais"), "layer.q.bais"),
    "unknown role": (lambda d: _set(d, d["layer"].pop("attn_norm"), "layer", "atn_norm"), "layer.atn_norm"),
    "missing required role": (lambda d: _without(d, "layer", "mlp_norm"), "layer.mlp_norm"),
    "missing required key": (lambda d: _without(d, "layer_prefix"), "layer_prefix"),
    "missing role key": (lambda d: _without(d, "layer", "down", "axes"), "layer.down.axes"),
    "wrong type (number as string)": (lambda d: _set(d, "1.0", "norm_offset"), "norm_offset"),
    "wrong type (string for a list)": (lambda d: _set(d, "llama", "model_types"), "model_types"),
    "wrong type (bool for a string)": (lambda d: _set(d, True, "layer", "q", "bias"), "layer.q.bias"),
    "unknown axis label": (lambda d: _set(d, ["residual", None], "layer", "o", "axes"), "layer.o.axes"),
    "feeds an undeclared role": (
        lambda d: _set(d, ["gate_proj"], "layer", "mlp_norm", "feeds"),
        "layer.mlp_norm.feeds",
    ),
    "unknown norm kind": (lambda d: _set(d, "rmsnorm", "layer", "attn_norm", "kind"), "layer.attn_norm.kind"),
    "unknown skip_layers value": (lambda d: _set(d, "all", "skip_layers"), "skip_layers"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_family_file_fails_with_one_line_naming_file_and_key(tmp_path, case):
    edit, key = BROKEN[case]
    data = _llama_data()
    edit(data)
    path = tmp_path / "broken_family.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidFamilyFile) as e:
        load_family(path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("broken_family.json: ")
    assert f"'{key}'" in message


def test_a_family_file_that_is_not_json_names_the_file(tmp_path):
    path = tmp_path / "truncated.json"
    path.write_text('{"family": "x",')
    with pytest.raises(InvalidFamilyFile, match="^truncated.json: not a readable JSON file"):
        load_family(path)


def test_every_shipped_family_file_passes_the_schema():
    files = sorted(FAMILY_DIR.glob("*.json"))
    assert [load_family(f).name for f in files] == [f.stem for f in files]
    assert sorted(families()) == [f.stem for f in files]


def test_a_family_without_skip_layers_refuses_tensors_past_the_config_layer_count(tmp_path):
    """Only GLM-4.5-style families store extra layers; elsewhere a layer past num_hidden_layers means the config
    and the weights disagree, which must not be skipped silently."""
    extra = {"model.layers.3.input_layernorm.weight": torch.ones(32)}
    layout = Layout(open_model(write_tiny(tmp_path, "llama", extra_tensors=extra)))
    with pytest.raises(CorruptCheckpoint, match="layer 3"):
        _ = layout.skipped_layers


def _tiny_state(model_type: str, **config_changes) -> tuple[dict, dict]:
    model = tiny_model(model_type)
    config = {**model.config.to_dict(), **config_changes}
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}, config


def test_a_head_tied_by_config_reads_the_embedding_even_when_the_file_stores_a_head():
    state, config = _tiny_state("llama", tie_word_embeddings=True)
    state["lm_head.weight"] = np.zeros_like(state["lm_head.weight"])  # what transformers would ignore
    layout = Layout(ArraySource(state, config))
    assert layout.tied
    np.testing.assert_array_equal(layout.read("lm_head"), state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(layout.read_rows("lm_head", [3, 1]), state["model.embed_tokens.weight"][[3, 1]])


def test_an_untied_head_reads_its_own_tensor():
    state, config = _tiny_state("llama", tie_word_embeddings=False)
    layout = Layout(ArraySource(state, config))
    assert not layout.tied
    np.testing.assert_array_equal(layout.read("lm_head"), state["lm_head.weight"])


DENSE_DECODERS = ["gemma", "gemma2", "gemma3_text", "glm4", "gpt2", "llama", "mistral", "phi3", "qwen2", "qwen3"]


def _logits(model, state: dict | None = None) -> np.ndarray:
    if state is not None:
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)).float() for k, v in state.items()})
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits.double().numpy()


@pytest.mark.parametrize("model_type", DENSE_DECODERS)
def test_folding_the_gains_the_family_file_names_keeps_the_logits(model_type):
    """A missing or wrong ``feeds`` entry would change the function: folding by the file must not."""
    model = tiny_model(model_type)
    before = _logits(model)
    state = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    layout = Layout(ArraySource(state, model.config.to_dict()))
    folded = fold_gains(state, layout)
    for role, layer in layout.norms_present():
        if layout.family.spec(role).foldable and layer is not None:
            np.testing.assert_array_equal(folded[layout.name(role, layer)] + layout.norm_offset, 1.0)
    np.testing.assert_allclose(_logits(model, folded), before, atol=1e-4 * np.abs(before).max())


@pytest.mark.parametrize("model_type", DENSE_DECODERS)
def test_permuting_the_axes_the_family_file_labels_keeps_the_logits(model_type):
    """A wrong or missing axis label would change the function: permuting by the file must not."""
    from lmsurgeon.zoo.transforms import logit_discrepancy, permute_model

    model = tiny_model(model_type)
    permuted, (perm_d, _) = permute_model(model, seed=4)
    assert not torch.equal(perm_d, torch.arange(perm_d.numel()))
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    assert logit_discrepancy(model, permuted, ids) < 1e-4


@pytest.mark.parametrize("model_type", [t for t in DENSE_DECODERS if t != "phi3"])
def test_permuting_attention_heads_the_family_file_labels_keeps_the_logits(model_type):
    """Whole heads move, query heads with the key/value head they share (grouped-query attention)."""
    from lmsurgeon.zoo.transforms import layout_for, logit_discrepancy, permute_model

    model = tiny_model(model_type)
    plain, _ = permute_model(model, seed=4)
    with_heads, _ = permute_model(model, seed=4, heads=True)
    layout = layout_for(with_heads)
    q = layout.name("q", 0)
    assert not torch.equal(with_heads.state_dict()[q], plain.state_dict()[q])
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    assert logit_discrepancy(model, with_heads, ids) < 1e-4


def test_heads_of_a_fused_grouped_query_projection_are_refused():
    """Phi-3's qkv_proj fuses 4 query and 2 key/value heads: parts of different sizes, no single permutation."""
    from lmsurgeon.zoo.transforms import permute_model

    with pytest.raises(LmsurgeonError, match="parts of different sizes"):
        permute_model(tiny_model("phi3"), seed=4, heads=True)


def test_folding_into_a_tied_head_is_refused():
    state, config = _tiny_state("gemma")
    layout = Layout(ArraySource(state, config))
    with pytest.raises(LmsurgeonError, match="tied"):
        fold_gains(state, layout, include_final_norm=True)


def test_folding_a_post_norm_family_is_refused_by_name():
    layout = Layout(open_model("minilm"))
    with pytest.raises(LmsurgeonError, match="bert family declares no foldable gains"):
        fold_gains({}, layout)


def test_minilm_buffers_are_described_as_buffers_and_every_tensor_has_a_site():
    """The bundled MiniLM stores embeddings.position_ids: a buffer the family file lists, not a weight."""
    layout = Layout(open_model("minilm"))
    assert set(layout.handle.names()) - set(layout.sites) == set()
    assert layout.sites["embeddings.position_ids"].is_buffer
    assert not layout.sites["embeddings.word_embeddings.weight"].is_buffer
