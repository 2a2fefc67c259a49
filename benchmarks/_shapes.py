"""Checkpoints with the tensor names and shapes of GLM-4.5-style MoE decoders, for the benchmarks.

One catalogue of names and shapes (:class:`Glm4MoeShape`) serves ``bench_io`` (a scaled-down model filled with
random data) and ``bench_scale`` (the real GLM-4.5-Air width, written by :func:`write_sparse_checkpoint` with
random data only in the tensors a run reads and sparse holes everywhere else, so the apparent size is the real
one and the disk holds a few GB).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Glm4MoeShape:
    """Dimensions of a ``glm4_moe`` decoder: ``first_dense`` dense layers, then MoE layers with ``experts`` routed
    experts, ``shared_experts`` shared ones and a sigmoid router with a score-correction bias, plus
    ``mtp_layers`` multi-token-prediction layers stored after the last layer (index ``n_layers``)."""

    n_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    moe_inter: int
    dense_inter: int
    vocab: int
    first_dense: int = 1
    shared_experts: int = 1
    mtp_layers: int = 1
    attention_bias: bool = False
    #: further config.json keys of the published model (rope, routing); the benchmarks' own models omit them
    extra_config: dict = field(default_factory=dict)

    def with_layers(self, n_layers: int, mtp_layers: int | None = None) -> Glm4MoeShape:
        """The same width with ``n_layers`` layers (a slice of the real depth)."""
        return replace(self, n_layers=n_layers, mtp_layers=self.mtp_layers if mtp_layers is None else mtp_layers)

    def config(self) -> dict:
        cfg = {
            "model_type": "glm4_moe",
            "architectures": ["Glm4MoeForCausalLM"],
            "hidden_size": self.hidden,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.dense_inter,
            "moe_intermediate_size": self.moe_inter,
            "n_routed_experts": self.experts,
            "n_shared_experts": self.shared_experts,
            "first_k_dense_replace": self.first_dense,
            "vocab_size": self.vocab,
            "num_nextn_predict_layers": self.mtp_layers,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
        if self.attention_bias:
            cfg["attention_bias"] = True
        return {**cfg, **self.extra_config}

    def is_dense(self, layer: int) -> bool:
        return layer < self.first_dense

    def layer_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Tensor name → shape for one layer, in the order the files store them."""
        p = f"model.layers.{layer}."
        q, kv, d = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden
        t: dict[str, tuple[int, ...]] = {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
        }
        if self.attention_bias:
            t.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
        if self.is_dense(layer):
            mlps = {"mlp.": self.dense_inter}
        else:
            mlps = {f"mlp.experts.{e}.": self.moe_inter for e in range(self.experts)}
            mlps["mlp.shared_experts."] = self.moe_inter * self.shared_experts
            t[p + "mlp.gate.weight"] = (self.experts, d)
            t[p + "mlp.gate.e_score_correction_bias"] = (self.experts,)
        for m, inter in mlps.items():
            t[p + m + "gate_proj.weight"] = (inter, d)
            t[p + m + "up_proj.weight"] = (inter, d)
            t[p + m + "down_proj.weight"] = (d, inter)
        return t

    def outside_shapes(self) -> dict[str, tuple[int, ...]]:
        """Embedding, final norm and (untied) head."""
        return {
            "model.embed_tokens.weight": (self.vocab, self.hidden),
            "model.norm.weight": (self.hidden,),
            "lm_head.weight": (self.vocab, self.hidden),
        }

    def all_layers(self) -> range:
        """Every stored layer index, the multi-token-prediction layers included."""
        return range(self.n_layers + self.mtp_layers)

    def shards_by_size(self, max_bytes: int = 5 * 10**9, itemsize: int = 2) -> list[dict[str, tuple[int, ...]]]:
        """Tensors grouped into shards of at most ``max_bytes`` in storage order, the way ``save_pretrained`` and
        the hub's large checkpoints split them (embedding first, layer by layer, final norm and head last)."""
        tensors = {"model.embed_tokens.weight": self.outside_shapes()["model.embed_tokens.weight"]}
        for layer in self.all_layers():
            tensors.update(self.layer_shapes(layer))
        tensors.update({k: v for k, v in self.outside_shapes().items() if k != "model.embed_tokens.weight"})
        shards: list[dict[str, tuple[int, ...]]] = [{}]
        size = 0
        for name, shape in tensors.items():
            n = int(np.prod(shape)) * itemsize
            if shards[-1] and size + n > max_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = shape
            size += n
        return shards


#: GLM-4.5-Air as published on the hub (config.json of zai-org/GLM-4.5-Air): 46 layers + 1 MTP layer, hidden 4096,
#: 96 query heads and 8 KV heads of 128, 128 routed experts of 1408 + 1 shared, first layer dense (10944),
#: vocabulary 151552, untied head, q/k/v biases, half-width partial rotary.
GLM45_AIR = Glm4MoeShape(
    n_layers=46,
    hidden=4096,
    heads=96,
    kv_heads=8,
    head_dim=128,
    experts=128,
    moe_inter=1408,
    dense_inter=10944,
    vocab=151552,
    first_dense=1,
    shared_experts=1,
    mtp_layers=1,
    attention_bias=True,
    extra_config={
        "num_experts_per_tok": 8,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "partial_rotary_factor": 0.5,
        "rope_theta": 1000000,
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 131072,
        "hidden_act": "silu",
        "use_qk_norm": False,
    },
)

#: Solar-Open-100B's published dimensions (upstage/Solar-Open-100B: 48 layers, hidden 4096, 64 query heads and
#: 8 KV heads of 128, 128 routed experts + 1 shared, top-8, vocabulary 196,608; 102.6B parameters, which gives
#: expert width 1280), written with glm4_moe tensor names: its shapes and sizes, not its modelling code.
SOLAR_OPEN_100B = Glm4MoeShape(
    n_layers=48,
    hidden=4096,
    heads=64,
    kv_heads=8,
    head_dim=128,
    experts=128,
    moe_inter=1280,
    dense_inter=10240,
    vocab=196608,
    first_dense=0,
    shared_experts=1,
    mtp_layers=0,
    attention_bias=False,
    extra_config={
        "model_type": "solar_open",
        "architectures": ["SolarOpenForCausalLM"],
        "num_experts_per_tok": 8,
        "rms_norm_eps": 1e-05,
        "hidden_act": "silu",
    },
)

Filler = Callable[[str, tuple[int, ...]], "np.ndarray | None"]


def write_sparse_checkpoint(
    folder: Path, shape: Glm4MoeShape, shards: list[dict[str, tuple[int, ...]]], fill: Filler
) -> int:
    """Write a bf16 sharded checkpoint whose tensors are holes (zeros that take no disk) unless ``fill`` returns
    their values (a float32 array, or a block of leading rows). Returns the apparent size in bytes.

    The shard files, index and config.json are what a hub repository holds; only the filled bytes use disk.
    """
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/ holds the writer
    from tests.tiny_checkpoints import write_sparse_shards

    total = write_sparse_shards(folder, shards, fill)
    (folder / "config.json").write_text(json.dumps(shape.config(), indent=1))
    return total


def disk_bytes(folder: Path) -> int:
    """Bytes the folder's files actually occupy on disk (sparse holes excluded)."""
    return sum(p.stat().st_blocks * 512 for p in folder.iterdir() if p.is_file())


def apparent_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def build_once(folder: Path, shape, fill, stamp: dict, after=None) -> Path:
    """Write a sparse checkpoint of ``shape`` filled by ``fill`` into ``folder`` (then ``after(folder)``, e.g. a
    tokenizer) unless the folder already holds exactly this one: its ``bench-scale.json`` equals ``stamp``.

    Building a 100B-class twin takes minutes, so every benchmark that needs one reuses it across runs."""
    import time

    marker = folder / "bench-scale.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return folder
    started = time.perf_counter()
    write_sparse_checkpoint(folder, shape, shape.shards_by_size(), fill)
    if after is not None:
        after(folder)
    marker.write_text(json.dumps(stamp))
    print(
        f"built {folder.name}: {apparent_bytes(folder) / 1e9:.1f} GB apparent, {disk_bytes(folder) / 1e9:.2f} GB "
        f"on disk, {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return folder
