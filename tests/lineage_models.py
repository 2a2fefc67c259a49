"""Tiny checkpoints for the lineage tests, built in the test itself (no zoo, no network).

Permuted and pruned copies use the zoo's surgery, which reads each family's tensor axes from its family file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lmsurgeon.arch import ArraySource, Layout
from lmsurgeon.zoo.transforms import permute_state_dict, prune_state_dict, random_permutations

VOCAB = 400


def word_tokenizer(folder: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer.json whose tokens ("w0".."wN") every tiny model shares."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def llama_config(n_layers: int = 3, hidden: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


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
        model.load_state_dict(
            {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in state.items()}, strict=False
        )
    model.save_pretrained(folder, safe_serialization=True)
    word_tokenizer(folder)
    return folder


def state_np(model) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy().copy() for k, v in model.state_dict().items()}


def permuted(state: dict, config: dict, seed: int, signs: bool) -> dict:
    """A function-preserving permutation of a numpy state dict: residual dims (sign-flipped too when ``signs``)
    and every MLP's units, on the axes the family file labels (the zoo's surgery, seeded)."""
    layout = Layout(ArraySource(state, config))
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    perm_d, perm_units = random_permutations(sd, layout, seed)
    flips = None
    if signs:
        flips = torch.randint(0, 2, perm_d.shape, generator=torch.Generator().manual_seed(seed)) * 2.0 - 1.0
    out = permute_state_dict(sd, layout, perm_d, perm_units, signs=flips)
    return {k: v.numpy() for k, v in out.items()}


def permute_llama(state: dict, n_layers: int, seed: int) -> dict:
    """Function-preserving residual permutation + signs and MLP-unit permutation of a Llama state dict.

    x' = (x[perm]) * s: input sides W[:, perm] * s, output sides W[perm, :] * s, gains γ[perm] (RMSNorm
    commutes with both); MLP units: gate/up rows and down columns permuted together.
    """
    hidden = state["model.embed_tokens.weight"].shape[1]
    return permuted(
        state, {"model_type": "llama", "num_hidden_layers": n_layers, "hidden_size": hidden}, seed, signs=True
    )


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

    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}, str(folder / "model.safetensors")
    )
    return folder


def permute_minilm(state: dict, seed: int, config: dict | None = None) -> dict:
    """Residual + MLP-unit permutation of BERT tensors (no signs: LayerNorm's centering is not sign-equivariant).

    ``config`` defaults to the bundled MiniLM's, whose tensors ``state`` usually is.
    """
    from lmsurgeon.io import open_model

    return permuted(state, config or open_model("minilm").config, seed, signs=False)


def prune_minilm(state: dict, keep: list[int], config: dict) -> tuple[dict, dict]:
    """Keep only layers ``keep`` (renumbered), as layer pruning does."""
    layout = Layout(ArraySource(state, config))
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    drop = [i for i in layout.layers if i not in keep]
    out = prune_state_dict(sd, layout, drop, layout.n_layers)
    return {k: v.numpy() for k, v in out.items()}, {**config, "num_hidden_layers": len(keep)}
