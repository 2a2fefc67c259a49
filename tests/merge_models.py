"""Tiny base/donor pairs with different tokenizer families, built in seconds for the merge tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def corpus() -> list[str]:
    """A few hundred lines of stdlib docstrings (offline, deterministic)."""
    import collections
    import json
    import os
    import pathlib
    import re

    lines: list[str] = []
    for mod in (os, re, json, collections, pathlib, str, dict, list):
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name, None), "__doc__", None)
            if isinstance(doc, str):
                lines += [ln.strip() for ln in doc.splitlines() if len(ln.strip()) > 20]
    return lines[:600]


def byte_bpe_tokenizer(texts: list[str], vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return tok


def sentencepiece_tokenizer(texts: list[str], vocab_size: int = 500) -> Tokenizer:
    """SentencePiece-style BPE: ▁ word marker and <0xNN> byte fallback pieces."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=special))
    return tok


def save(model, tok: Tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def gpt2(tok: Tokenizer, path: Path, d: int = 32, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_embd=d,
        n_layer=2,
        n_head=2,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    return save(GPT2LMHeadModel(cfg), tok, path)


def llama(tok: Tokenizer, path: Path, d: int = 48, seed: int = 1) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    return save(LlamaForCausalLM(cfg), tok, path)
