"""Tiny checkpoints for the lineage tests, built in the test itself (no zoo, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

VOCAB = 400


def word_tokenizer(folder: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer.json whose tokens ("w0".."wN") every tiny model shares."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def llama_config(n_layers: int = 3, hidden: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                       tie_word_embeddings=False)


def random_llama(seed: int, n_layers: int = 3, gain_noise: float = 0.1):
    """A randomly initialised tiny Llama whose norm gains are 1 + noise (positive, clustered like trained ones)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(n_layers)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + gain_noise * torch.randn_like(p).abs())
    return model


def save(model, folder: Path, state: dict | None = None) -> Path:
    """Save ``model`` (optionally with ``state`` loaded first) as safetensors plus the word tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    if state is not None:
        model.load_state_dict({k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in state.items()},
                              strict=False)
    model.save_pretrained(folder, safe_serialization=True)
    word_tokenizer(folder)
    return folder


def state_np(model) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy().copy() for k, v in model.state_dict().items()}


def permute_llama(state: dict, n_layers: int, seed: int) -> dict:
    """Function-preserving residual permutation + signs and MLP-unit permutation of a Llama state dict.

    x' = (x[perm]) * s: input sides W[:, perm] * s, output sides W[perm, :] * s, gains γ[perm] (RMSNorm
    commutes with both); MLP units: gate/up rows and down columns permuted together.
    """
    rng = np.random.default_rng(seed)
    d = state["model.embed_tokens.weight"].shape[1]
    perm, s = rng.permutation(d), rng.choice([-1.0, 1.0], size=d)
    out = dict(state)
    out["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:, perm] * s
    out["lm_head.weight"] = state["lm_head.weight"][:, perm] * s
    out["model.norm.weight"] = state["model.norm.weight"][perm]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[p + n + ".weight"] = state[p + n + ".weight"][perm]
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            out[p + n + ".weight"] = state[p + n + ".weight"][:, perm] * s
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            out[p + n + ".weight"] = state[p + n + ".weight"][perm, :] * s[:, None]
        u = rng.permutation(state[p + "mlp.up_proj.weight"].shape[0])
        out[p + "mlp.gate_proj.weight"] = out[p + "mlp.gate_proj.weight"][u]
        out[p + "mlp.up_proj.weight"] = out[p + "mlp.up_proj.weight"][u]
        out[p + "mlp.down_proj.weight"] = out[p + "mlp.down_proj.weight"][:, u]
    return out


def logits(model, seed: int = 0) -> np.ndarray:
    ids = torch.from_numpy(np.random.default_rng(seed).integers(0, VOCAB, size=(2, 12)))
    with torch.no_grad():
        return model(input_ids=ids).logits.double().numpy()


def minilm_folder(folder: Path) -> dict:
    """Copy config/tokenizer of the bundled MiniLM into ``folder``; returns its tensors (float64)."""
    from lmsurgeon.io import open_model

    h = open_model("minilm")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(h.config))
    (folder / "tokenizer.json").write_text(h.read_text("tokenizer.json"))
    return {n: h.tensor(n, np.float64) for n in h.names()}


def save_tensors(state: dict, folder: Path) -> Path:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
              str(folder / "model.safetensors"))
    return folder


def permute_minilm(state: dict, seed: int) -> dict:
    """Residual + MLP-unit permutation of BERT tensors (no signs: LayerNorm's centering is not sign-equivariant)."""
    rng = np.random.default_rng(seed)
    pre = "embeddings." if "embeddings.word_embeddings.weight" in state else "bert.embeddings."
    root = pre[: -len("embeddings.")]
    d = state[pre + "word_embeddings.weight"].shape[1]
    perm = rng.permutation(d)
    out = dict(state)
    for n in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        out[pre + n + ".weight"] = state[pre + n + ".weight"][:, perm]
    for n in ("LayerNorm.weight", "LayerNorm.bias"):
        out[pre + n] = state[pre + n][perm]
    i = 0
    while f"{root}encoder.layer.{i}.attention.self.query.weight" in state:
        p = f"{root}encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"):
            out[p + n + ".weight"] = state[p + n + ".weight"][:, perm]
        for n in ("attention.output.dense", "output.dense"):
            out[p + n + ".weight"] = state[p + n + ".weight"][perm, :]
            out[p + n + ".bias"] = state[p + n + ".bias"][perm]
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            out[p + n + ".weight"] = state[p + n + ".weight"][perm]
            out[p + n + ".bias"] = state[p + n + ".bias"][perm]
        u = rng.permutation(state[p + "intermediate.dense.weight"].shape[0])
        out[p + "intermediate.dense.weight"] = out[p + "intermediate.dense.weight"][u]
        out[p + "intermediate.dense.bias"] = state[p + "intermediate.dense.bias"][u]
        out[p + "output.dense.weight"] = out[p + "output.dense.weight"][:, u]
        i += 1
    if root + "pooler.dense.weight" in state:
        out[root + "pooler.dense.weight"] = state[root + "pooler.dense.weight"][:, perm]
    return out


def prune_minilm(state: dict, keep: list[int], config: dict) -> tuple[dict, dict]:
    """Keep only layers ``keep`` (renumbered), as layer pruning does."""
    out = {}
    for k, v in state.items():
        if ".encoder.layer." in "." + k:
            head, rest = k.split("encoder.layer.", 1)
            i, tail = rest.split(".", 1)
            if int(i) in keep:
                out[f"{head}encoder.layer.{keep.index(int(i))}.{tail}"] = v
        else:
            out[k] = v
    return out, {**config, "num_hidden_layers": len(keep)}
