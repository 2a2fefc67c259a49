"""transformers configs and fresh models for the zoo's two decoder families.

Dropout is off everywhere: the zoo's transforms are checked for exact function preservation, and a
deterministic forward pass is what makes those checks (and a recomputed perplexity) meaningful.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PretrainedConfig

from lmsurgeon.zoo.recipe import MAX_POSITIONS, ArchSpec


def make_config(arch: ArchSpec, vocab_size: int, bos_id: int, eos_id: int) -> PretrainedConfig:
    """The transformers config for ``arch`` over a vocabulary of ``vocab_size``."""
    if arch.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=MAX_POSITIONS,
            n_embd=arch.hidden,
            n_layer=arch.layers,
            n_head=arch.heads,
            n_inner=arch.intermediate,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=arch.tie,
            architectures=["GPT2LMHeadModel"],
        )
    if arch.family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=arch.hidden,
            intermediate_size=arch.intermediate,
            num_hidden_layers=arch.layers,
            num_attention_heads=arch.heads,
            num_key_value_heads=arch.kv_heads,
            head_dim=arch.hidden // arch.heads,
            max_position_embeddings=MAX_POSITIONS,
            rms_norm_eps=1e-5,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=arch.tie,
            architectures=["LlamaForCausalLM"],
        )
    raise ValueError(f"unknown zoo family {arch.family!r}")


def new_model(config: PretrainedConfig, seed: int) -> torch.nn.Module:
    """A freshly initialised model; the same seed always gives the same weights."""
    torch.manual_seed(seed)
    cls = GPT2LMHeadModel if config.model_type == "gpt2" else LlamaForCausalLM
    return cls(config).eval()


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
