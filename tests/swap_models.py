"""Tiny models and a toy linear-layer model for the swap tests (built in well under a second each)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.merge_models import corpus


def tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained on stdlib docstrings, wrapped so AutoTokenizer reads it back."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def save_with_tokenizer(model, tok, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def llama(vocab: int, layers: int = 4, seed: int = 0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        **extra,
    )
    return LlamaForCausalLM(cfg).eval()


def qwen2_mixed(vocab: int = 97, layers: int = 4, seed: int = 0):
    """Alternating sliding (window 3) and full attention layers, so a block's mask type is observable."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    types = ["sliding_attention" if k % 2 == 0 else "full_attention" for k in range(layers)]
    cfg = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        use_sliding_window=True,
        sliding_window=3,
        layer_types=types,
        attn_implementation="eager",
    )
    return Qwen2ForCausalLM(cfg).eval()


class ToyLayer(torch.nn.Module):
    """ℓ(X) = f(C·X)·M: C is the causal window mean that defines X̂ (window 4), M reads/writes a coordinate block.

    With ``nonlinear`` the update is tanh(C·X·M)·M (still confined to M's block, no norm across blocks).
    """

    def __init__(self, M: torch.Tensor, nonlinear: bool = False, window: int = 4):
        super().__init__()
        self.M, self.nonlinear, self.window = M, nonlinear, window

    def forward(self, x):
        from lmsurgeon.swap.metrics import context_mix_batch

        u = context_mix_batch(x, self.window) @ self.M
        return x + (torch.tanh(u) @ self.M if self.nonlinear else u)


class ToyModel(torch.nn.Module):
    """Embedding then ToyLayers; ``config`` carries no cache settings, like an encoder."""

    def __init__(self, Ms: list[torch.Tensor], vocab: int = 50, nonlinear: bool = False, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(vocab, Ms[0].shape[0], generator=g, dtype=torch.float64))
        self.layers = torch.nn.ModuleList([ToyLayer(M, nonlinear) for M in Ms])
        self.config = SimpleNamespace()

    def forward(self, input_ids, attention_mask=None):
        x = self.embed[input_ids]
        for layer in self.layers:
            x = layer(x)
        return x
