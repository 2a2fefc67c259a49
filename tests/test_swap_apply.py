"""--apply / --drop checkpoints (methods.md §S11–§S13): they load with transformers and compute what the in-memory
rewired model computes; counts, layer_idx and layer_types follow the new order; KV-cached decoding still works."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmsurgeon.arch import Layout
from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.io import open_model
from lmsurgeon.swap.apply import new_order, write_rewired
from tests.swap_models import qwen2_mixed, save_with_tokenizer, tokenizer
from tests.tiny_checkpoints import tiny_model

IDS = torch.tensor([[5, 9, 13, 2, 7, 11, 3, 8, 21, 4]])


def _save(model, path):
    return save_with_tokenizer(model, tokenizer(), path)


def _rewire(src, dest, **kw):
    h = open_model(src)
    layout = Layout(h)
    return write_rewired(h, layout, dest, new_order(layout.n_layers, **kw))


def _logits(model, **kw):
    with torch.no_grad():
        return model(IDS, use_cache=False, **kw).logits


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2_moe"])
def test_saved_swap_matches_in_memory_swapped_model(tmp_path, model_type):
    model = tiny_model(model_type)
    src = _save(model, tmp_path / "src")
    dest = _rewire(src, tmp_path / "swap", swap=1)
    loaded = AutoModelForCausalLM.from_pretrained(dest).eval()
    layers = model.model.layers if hasattr(model, "model") else model.transformer.h
    layers[1], layers[2] = layers[2], layers[1]
    assert torch.allclose(_logits(loaded), _logits(model), atol=1e-5)
    layers[1], layers[2] = layers[2], layers[1]
    assert not torch.allclose(_logits(loaded), _logits(model), atol=1e-3)  # the swap did change something


def test_drop_fixes_count_layer_idx_and_layer_types(tmp_path):
    model = qwen2_mixed(layers=4)
    src = _save(model, tmp_path / "src")
    dest = _rewire(src, tmp_path / "drop", drop=1)
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    assert cfg["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
    loaded = AutoModelForCausalLM.from_pretrained(dest).eval()
    assert [layer.self_attn.layer_idx for layer in loaded.model.layers] == [0, 1, 2]
    del model.model.layers[1]
    model.config.layer_types = cfg["layer_types"]
    model.config.num_hidden_layers = 3
    assert torch.allclose(_logits(loaded), _logits(model), atol=1e-5)


def test_cached_generation_of_rewired_model_equals_uncached_argmax_decoding(tmp_path):
    src = _save(qwen2_mixed(layers=4), tmp_path / "src")
    loaded = AutoModelForCausalLM.from_pretrained(_rewire(src, tmp_path / "s", swap=2)).eval()
    with torch.no_grad():
        gen = loaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True)
    seq = IDS
    for _ in range(6):
        nxt = _logits_of(loaded, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(gen, seq)


def _logits_of(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_index_dependent_gpt2_scaling_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=300, scale_attn_by_inverse_layer_idx=True)
    src = _save(GPT2LMHeadModel(cfg), tmp_path / "src")
    with pytest.raises(LmsurgeonError, match="scale_attn_by_inverse_layer_idx"):
        _rewire(src, tmp_path / "s", swap=0)
