"""Synthetic twins of the disputed checkpoints for ``bench_scale.py lineage``: real shapes, sparse files.

Three checkpoints: ``glm-a`` (GLM-4.5-Air's shapes, seeded random data), ``glm-derived`` (a derivation of it: the
residual stream permuted with sign flips, the filled routed experts reordered together with their router rows,
and 1 % noise) and ``solar-indep`` (Solar-Open-100B's shapes, independent seed, its own larger vocabulary).
Only the tensors lineage reads hold data — embedding, norms, q and k, routers, the first ``experts_filled``
routed experts' up/down, the shared expert's up/down, the dense layer's up/down — everything else is a sparse
hole, so each file has its real apparent size. Router rows of unfilled experts are zero (φ_U never picks them:
their cosine is 0). Each model gets a word-level tokenizer.json (``w0`` … ``w{vocab-1}``), so the shared
tokens are the first 151,552 words.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
from _shapes import Glm4MoeShape, build_once

ROW_BLOCK = 8192
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")
READ_SUFFIXES = (
    "norm.weight",
    "q_proj.weight",
    "k_proj.weight",
    "mlp.gate.weight",
    "up_proj.weight",
    "down_proj.weight",
    "embed_tokens.weight",
)


def _rng(seed: int, name: str, block: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), block])


#: what a forward pass reads besides READ_SUFFIXES: the activation tests run the blocks
FORWARD_SUFFIXES = ("v_proj.weight", "o_proj.weight", "gate_proj.weight")


def base_values(shape: Glm4MoeShape, seed: int, experts_filled: int, forward: bool = False, head: bool = False):
    """fill(name, dims) for an independent model: seeded data where lineage reads, holes elsewhere. ``forward``
    also fills what running the blocks reads (values, outputs, gates), for the activation tests; ``head`` the
    untied LM head, which swap's Δloss and the merge's guard score tokens through (a hole would give every
    token the same probability)."""
    suffixes = READ_SUFFIXES + (FORWARD_SUFFIXES if forward else ()) + (("lm_head.weight",) if head else ())

    def fill(name: str, dims: tuple[int, ...]):
        m = _EXPERT.search(name)
        if m and int(m.group(1)) >= experts_filled:
            return None
        if not name.endswith(suffixes) or ("gate_proj" in name and not forward):
            return None
        if len(dims) == 1:
            return 1 + 0.1 * _rng(seed, name).standard_normal(dims, dtype=np.float32)
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return (
                0.02 * _rng(seed, name, b).standard_normal((min(ROW_BLOCK, dims[0] - a), dims[1]), dtype=np.float32)
                for b, a in enumerate(range(0, dims[0], ROW_BLOCK))
            )
        w = 0.02 * _rng(seed, name).standard_normal(dims, dtype=np.float32)
        if name.endswith("mlp.gate.weight"):
            w[experts_filled:] = 0.0
        return w

    return fill


def derived_values(shape: Glm4MoeShape, seed: int, experts_filled: int, noise: float = 0.01, forward: bool = False):
    """fill for a derivation of ``base_values(shape, seed)``: residual permutation and signs, filled experts
    reordered with their router rows, ``noise`` × std added. Function-preserving apart from the noise."""
    base = base_values(shape, seed, experts_filled, forward)
    g = np.random.default_rng([seed, 99])
    perm, sign = g.permutation(shape.hidden), np.where(g.random(shape.hidden) < 0.5, -1.0, 1.0).astype(np.float32)
    experts = g.permutation(experts_filled)  # B's expert e is A's expert experts[e]

    def noisy(w: np.ndarray, name: str, block: int = 0) -> np.ndarray:
        return w + noise * float(w.std()) * _rng(seed + 1, name, block).standard_normal(w.shape, dtype=np.float32)

    def fill(name: str, dims: tuple[int, ...]):
        m = _EXPERT.search(name)
        source = name
        if m and int(m.group(1)) < experts_filled:
            source = name.replace(f".experts.{m.group(1)}.", f".experts.{experts[int(m.group(1))]}.")
        w = base(source, dims)
        if w is None:
            return None
        if name.endswith("embed_tokens.weight"):
            return (noisy(blk[:, perm] * sign, name, b) for b, blk in enumerate(w))
        if len(dims) == 1:  # norm gains: permuted (RMSNorm commutes with a signed permutation)
            return w[perm]
        if name.endswith(("down_proj.weight", "o_proj.weight")):  # writes the residual: rows
            return noisy(w[perm] * sign[:, None], name)
        if name.endswith("mlp.gate.weight"):
            w = np.concatenate([w[:experts_filled][experts], w[experts_filled:]])
        return noisy(w[:, perm] * sign, name)  # reads the residual: columns

    return fill


def word_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def build_twin(folder: Path, shape: Glm4MoeShape, fill, stamp: dict) -> Path:
    """Write one twin unless ``folder`` already holds it (same stamp)."""
    return build_once(folder, shape, fill, stamp, after=lambda f: word_tokenizer(f, shape.vocab))


def build_twins(
    root: Path, glm: Glm4MoeShape, solar: Glm4MoeShape, experts_filled: int, forward: bool = False
) -> dict[str, Path]:
    out = {}
    for name, shape, fill in (
        ("glm-a", glm, base_values(glm, 0, experts_filled, forward)),
        ("glm-derived", glm, derived_values(glm, 0, experts_filled, forward=forward)),
        ("solar-indep", solar, base_values(solar, 7, experts_filled, forward)),
    ):
        stamp = {"config": shape.config(), "experts_filled": experts_filled, "kind": name, "version": 1}
        if forward:
            stamp["forward"] = True
        out[name] = build_twin(root / name, shape, fill, stamp)
    return out


def build_forward_model(folder: Path, shape: Glm4MoeShape, seed: int, experts_filled: int) -> Path:
    """One independent twin with data in everything a forward pass reads, LM head included, for the swap and merge
    benchmarks (which need one model each, not the three lineage compares)."""
    stamp = {"config": shape.config(), "experts_filled": experts_filled, "seed": seed, "forward": True, "head": True}
    return build_twin(folder, shape, base_values(shape, seed, experts_filled, forward=True, head=True), stamp)
