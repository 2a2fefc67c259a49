"""Tiny random checkpoints with each family's real tensor names and config keys, written by ``transformers``.

Building them with ``transformers`` itself (not hand-written name lists) is the point: if a release renames a
tensor, the registry tests fail here instead of on a user's 100B checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

_DENSE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)

#: model_type → (config class, kwargs, loader kind)
TINY: dict[str, tuple[str, dict, str]] = {
    "bert": (
        "BertConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=97,
            max_position_embeddings=64,
        ),
        "base",
    ),
    "gpt2": (
        "GPT2Config",
        dict(n_embd=32, n_layer=3, n_head=4, vocab_size=97, n_positions=64, bos_token_id=1, eos_token_id=2),
        "causal-lm",
    ),
    "llama": ("LlamaConfig", _DENSE, "causal-lm"),
    "mistral": ("MistralConfig", _DENSE, "causal-lm"),
    "mixtral": ("MixtralConfig", dict(_DENSE, num_local_experts=4, num_experts_per_tok=2), "causal-lm"),
    "qwen2": ("Qwen2Config", _DENSE, "causal-lm"),
    "qwen3": ("Qwen3Config", dict(_DENSE, head_dim=8), "causal-lm"),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(_DENSE, **_MOE, num_experts=4, shared_expert_intermediate_size=32),
        "causal-lm",
    ),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_DENSE, **_MOE, num_experts=4, head_dim=8), "causal-lm"),
    "phi3": ("Phi3Config", _DENSE, "causal-lm"),
    "phimoe": ("PhimoeConfig", dict(_DENSE, num_local_experts=4, num_experts_per_tok=2), "causal-lm"),
    "glm4": ("Glm4Config", dict(_DENSE, head_dim=8), "causal-lm"),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(_DENSE, **_MOE, n_routed_experts=4, first_k_dense_replace=1, n_shared_experts=1, head_dim=8),
        "causal-lm",
    ),
    "solar_open": ("SolarOpenConfig", dict(_DENSE, **_MOE, n_routed_experts=4, head_dim=8), "causal-lm"),
    "gemma": ("GemmaConfig", dict(_DENSE, head_dim=8), "causal-lm"),
    "gemma2": ("Gemma2Config", dict(_DENSE, head_dim=8), "causal-lm"),
    "gemma3_text": ("Gemma3TextConfig", dict(_DENSE, head_dim=8), "causal-lm"),
}


def tiny_model(model_type: str, seed: int = 0):
    """A randomly initialised ``transformers`` model of ``model_type`` (norm gains randomised too)."""
    cls_name, kwargs, kind = TINY[model_type]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    auto = transformers.AutoModel if kind == "base" else transformers.AutoModelForCausalLM
    model = auto.from_config(config)
    with torch.no_grad():  # random gains, so that offset handling (Gemma's 1 + w) is observable
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if "norm" in name and "gemma" in model_type else 1.0))
    return model.eval()


def write_tiny(
    folder: Path,
    model_type: str,
    seed: int = 0,
    shard_size: str | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save a tiny model as a Hugging Face folder (sharded when ``shard_size`` is given)."""
    model = tiny_model(model_type, seed)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    if extra_tensors:
        _append_tensors(folder, extra_tensors)
    return folder


def _append_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add tensors in an extra shard (as a GLM-4.5 MTP layer is stored), updating or creating the index."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model-extra.safetensors")
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", "pt") as f:
            index = {"metadata": {}, "weight_map": dict.fromkeys(f.keys(), "model.safetensors")}
    index["weight_map"].update(dict.fromkeys(tensors, "model-extra.safetensors"))
    index_path.write_text(json.dumps(index))


def write_sparse_llama(
    folder: Path,
    n_layers: int = 16,
    hidden: int = 8192,
    intermediate: int = 28672,
    kv_heads: int = 8,
    head_dim: int = 128,
    vocab: int = 128256,
    seed: int = 0,
) -> int:
    """A Llama-70B-shaped bf16 checkpoint, one shard per layer, whose weights are holes in sparse files.

    Only the norm gains are written (random), so a 30 GB checkpoint costs a few MB of disk: the test of
    "analyse a model larger than RAM" without the disk. Returns the apparent size in bytes.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    heads = hidden // head_dim
    shapes = {
        "input_layernorm.weight": [hidden],
        "post_attention_layernorm.weight": [hidden],
        "self_attn.q_proj.weight": [heads * head_dim, hidden],
        "self_attn.k_proj.weight": [kv_heads * head_dim, hidden],
        "self_attn.v_proj.weight": [kv_heads * head_dim, hidden],
        "self_attn.o_proj.weight": [hidden, heads * head_dim],
        "mlp.gate_proj.weight": [intermediate, hidden],
        "mlp.up_proj.weight": [intermediate, hidden],
        "mlp.down_proj.weight": [hidden, intermediate],
    }
    shards = [{f"model.layers.{i}.{k}": v for k, v in shapes.items()} for i in range(n_layers)]
    shards.append(
        {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden], "lm_head.weight": [vocab, hidden]}
    )

    def gains_only(name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        return 1 + 0.1 * rng.standard_normal(shape[0], dtype=np.float32) if len(shape) == 1 else None

    total = write_sparse_shards(folder, shards, gains_only)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": hidden,
                "intermediate_size": intermediate,
                "num_hidden_layers": n_layers,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "head_dim": head_dim,
                "vocab_size": vocab,
                "tie_word_embeddings": False,
                "torch_dtype": "bfloat16",
            }
        )
    )
    return total


def write_sparse_shards(folder, shards: list[dict], fill) -> int:
    """Write bf16 safetensors shards and their index, every tensor a hole (zeros that take no disk) unless
    ``fill(name, shape)`` returns values for it (float32; a block of leading rows is enough, or an iterator of
    consecutive row blocks, so a 150k-row embedding is written without holding it whole).

    The apparent size is the real checkpoint's while disk use is only what was filled, so tests and benchmarks
    get "a checkpoint larger than memory" for a few MB. Returns the apparent size in bytes; the caller writes
    config.json.
    """
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in tensors.items():
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        start = 8 + len(raw)
        with open(folder / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name, shape in tensors.items():
                values = fill(name, tuple(shape))
                if values is None:
                    continue
                f.seek(start + header[name]["data_offsets"][0])
                for block in [values] if isinstance(values, np.ndarray) else values:  # or row blocks, in order
                    data = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(torch.bfloat16)
                    f.write(data.view(torch.int16).numpy().tobytes())
            f.truncate(start + offset)
        total += start + offset
        weight_map.update(dict.fromkeys(tensors, fname))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total
