"""The launderer's toolbox (methods.md §A): function-preserving re-parameterisations of a whole transformers model.

Whoever re-releases someone else's model under a new name can, before any fine-tuning, rewrite its weights so
that the function stays the same while most weight-space statistics move. This module does exactly that to an
in-memory ``GPT2LMHeadModel`` (LayerNorm pre-norm, learned positions, GELU or ReLU MLP, Conv1D layout) or
``LlamaForCausalLM`` (RMSNorm, rotary attention with grouped-query heads, SwiGLU MLP), so that lineage tests can be
checked against it and the zoo can train laundered models.

Every transform is its own function taking a model (and a seed where it is random); it returns a new model (the
input is never modified) and a :class:`Step` recording what it did: the ground truth a test or ``zoo.json``
compares a recovered map with. :func:`launder` composes them all. Each preserves the logits up to float rounding
(``tests/test_zoo_launder.py`` checks every one at relative 1e-4 in float32); each refuses an input on which it
would not (a tied head to fold into, unfolded gains to rotate, GELU units to scale).

Convention (methods.md §A): the residual stream is a row vector x, a reader computes ``x W`` with W ``[d, out]``
(GPT-2's Conv1D stores exactly this; an ``nn.Linear`` stores Wᵀ), a writer adds ``z W_o`` with W_o ``[in, d]``.
:class:`AttentionWeights` and :class:`MlpWeights` hand out one layer in this convention whatever the storage, so
the transforms below are written once for both families.

The zoo's state-dict surgery (:mod:`lmsurgeon.zoo.transforms`) covers residual and MLP-unit permutation, folding
of bias-free gains and rotation for Llama; this module adds what a launderer needs beyond that (LayerNorm folding
and a centring-preserving rotation, per-head maps, head permutation, unit scaling, untying, vocabulary
permutation) on model objects, and reuses its Haar-random orthogonal matrix.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmsurgeon.errors import LmsurgeonError, UnknownArchitecture
from lmsurgeon.zoo.transforms import random_orthogonal

FAMILIES = {"gpt2": "gpt2", "llama": "llama"}  # model_type → the anatomy below
SCALE_RANGE = 2.0  # random scales s are log-uniform in [1/SCALE_RANGE, SCALE_RANGE]: condition number ≤ 4
SCALABLE_ACTIVATIONS = ("relu",)  # positively homogeneous: act(c·u) = c·act(u) for c > 0


@dataclass
class Step:
    """What one transform did: its name, its seed and its ground truth.

    ``truth`` holds tensors (permutations as int64, maps as float64) keyed as each transform's docstring says;
    :meth:`manifest` turns it into JSON for ``zoo.json`` (integer tensors in full, float tensors as shape and
    SHA-256, since the seed reproduces them exactly).
    """

    name: str
    seed: int | None
    truth: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict:
        """A JSON-serialisable record of this step."""
        out: dict[str, Any] = {"name": self.name, "seed": self.seed}
        for key, value in self.truth.items():
            out[key] = _json_value(value)
        return out


def _json_value(value: Any) -> Any:
    """Tensors of indices as lists; float tensors as their shape and a digest of their values rounded to float32.

    Why float32: the same seed gives the same float64 matrix only up to the last bits, since LAPACK and BLAS
    (MKL without conditional numerical reproducibility) may round differently with the memory alignment of their
    inputs. A digest of the float64 bits made a re-run's record differ from the build's; rounded to float32, two
    results that agree to ~1e-15 give the same digest except with negligible probability.
    """
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            raw = value.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
            return {"shape": list(value.shape), "sha256": hashlib.sha256(raw).hexdigest()}
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ anatomy


@dataclass
class AttentionWeights:
    """One layer's attention in the row-vector convention, float64 copies.

    ``W_q`` [d, n_heads·d_h], ``W_k`` and ``W_v`` [d, n_kv·d_h], ``W_o`` [n_heads·d_h, d]; biases [out] or None.
    Query head h reads columns ``h·d_h:(h+1)·d_h`` of W_q and writes through rows of W_o with the same index; it
    attends with key/value head ``h // (n_heads // n_kv)`` (HF's ``repeat_kv`` order). ``rotary`` marks attention
    whose q and k are rotated per position in planes (i, i + d_h/2).
    """

    W_q: torch.Tensor
    W_k: torch.Tensor
    W_v: torch.Tensor
    W_o: torch.Tensor
    b_q: torch.Tensor | None
    b_k: torch.Tensor | None
    b_v: torch.Tensor | None
    n_heads: int
    n_kv: int
    head_dim: int
    rotary: bool

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv


@dataclass
class MlpWeights:
    """One layer's MLP in the row-vector convention, float64 copies.

    ``W_up`` [d, f] (GPT-2's c_fc, Llama's up_proj), ``W_gate`` [d, f] or None (ungated), ``W_down`` [f, d];
    biases [f] or None. ``activation`` is the config's name for the nonlinearity (of the gate when gated).
    """

    W_up: torch.Tensor
    W_gate: torch.Tensor | None
    W_down: torch.Tensor
    b_up: torch.Tensor | None
    b_gate: torch.Tensor | None
    activation: str

    @property
    def gated(self) -> bool:
        return self.W_gate is not None


@dataclass
class _Reader:
    """A linear that reads a norm's output: its weight, which axis of it runs along the residual, its bias."""

    weight: nn.Parameter
    axis: int
    bias: nn.Parameter | None


@dataclass
class _Norm:
    gain: nn.Parameter
    bias: nn.Parameter | None
    readers: list[_Reader]
    final: bool


def family_of(model) -> str:
    """``"gpt2"`` or ``"llama"`` for a supported transformers causal LM; UnknownArchitecture otherwise."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnknownArchitecture(f"the launderer knows model_type {', '.join(FAMILIES)}, not {model_type!r}")
    return FAMILIES[model_type]


def blocks(model) -> list[Any]:  # transformers modules: attributes are dynamic
    """The transformer blocks in order (GPT-2's ``transformer.h``, Llama's ``model.layers``)."""
    return list(model.transformer.h) if family_of(model) == "gpt2" else list(model.model.layers)


def n_layers(model) -> int:
    """Number of transformer blocks."""
    return len(blocks(model))


def is_tied(model) -> bool:
    """Whether the head and the token embedding are one tensor."""
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _f64(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy, detached from autograd."""
    return t.detach().to(torch.float64).clone()


def _f64_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else _f64(t)


def _store(param: nn.Parameter | None, value: torch.Tensor | None) -> None:
    """Write a float64 result into a parameter in its own dtype and device."""
    if param is None or value is None:
        return
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype, device=param.device))


def read_attention(model, layer: int) -> AttentionWeights:
    """Layer ``layer``'s attention as :class:`AttentionWeights` (float64 copies)."""
    block = blocks(model)[layer]
    if family_of(model) == "gpt2":
        attn = block.attn
        d = attn.embed_dim
        W_q, W_k, W_v = _f64(attn.c_attn.weight).split(d, dim=1)
        b_q, b_k, b_v = _f64(attn.c_attn.bias).split(d)
        return AttentionWeights(
            W_q,
            W_k,
            W_v,
            _f64(attn.c_proj.weight),
            b_q,
            b_k,
            b_v,
            attn.num_heads,
            attn.num_heads,
            attn.head_dim,
            rotary=False,
        )
    attn = block.self_attn
    n_heads = model.config.num_attention_heads
    return AttentionWeights(
        _f64(attn.q_proj.weight).T,
        _f64(attn.k_proj.weight).T,
        _f64(attn.v_proj.weight).T,
        _f64(attn.o_proj.weight).T,
        b_q=_f64_or_none(attn.q_proj.bias),
        b_k=_f64_or_none(attn.k_proj.bias),
        b_v=_f64_or_none(attn.v_proj.bias),
        n_heads=n_heads,
        n_kv=n_heads // attn.num_key_value_groups,
        head_dim=attn.head_dim,
        rotary=True,
    )


def write_attention(model, layer: int, aw: AttentionWeights) -> None:
    """Store ``aw`` into layer ``layer``'s attention (shapes must match the model's)."""
    block = blocks(model)[layer]
    if family_of(model) == "gpt2":
        attn = block.attn
        _store(attn.c_attn.weight, torch.cat([aw.W_q, aw.W_k, aw.W_v], dim=1))
        if aw.b_q is None or aw.b_k is None or aw.b_v is None:
            raise LmsurgeonError("GPT-2's fused attention needs all three q/k/v biases")
        _store(attn.c_attn.bias, torch.cat([aw.b_q, aw.b_k, aw.b_v]))
        _store(attn.c_proj.weight, aw.W_o)
        return
    attn = block.self_attn
    for module, W, b in ((attn.q_proj, aw.W_q, aw.b_q), (attn.k_proj, aw.W_k, aw.b_k), (attn.v_proj, aw.W_v, aw.b_v)):
        _store(module.weight, W.T)
        _store(module.bias, b)
    _store(attn.o_proj.weight, aw.W_o.T)


def read_mlp(model, layer: int) -> MlpWeights:
    """Layer ``layer``'s MLP as :class:`MlpWeights` (float64 copies)."""
    block = blocks(model)[layer]
    if family_of(model) == "gpt2":
        mlp = block.mlp
        return MlpWeights(
            _f64(mlp.c_fc.weight),
            None,
            _f64(mlp.c_proj.weight),
            _f64(mlp.c_fc.bias),
            None,
            model.config.activation_function,
        )
    mlp = block.mlp
    return MlpWeights(
        _f64(mlp.up_proj.weight).T,
        _f64(mlp.gate_proj.weight).T,
        _f64(mlp.down_proj.weight).T,
        _f64_or_none(mlp.up_proj.bias),
        _f64_or_none(mlp.gate_proj.bias),
        model.config.hidden_act,
    )


def write_mlp(model, layer: int, mw: MlpWeights) -> None:
    """Store ``mw`` into layer ``layer``'s MLP (shapes must match the model's)."""
    mlp = blocks(model)[layer].mlp
    if family_of(model) == "gpt2":
        _store(mlp.c_fc.weight, mw.W_up)
        _store(mlp.c_fc.bias, mw.b_up)
        _store(mlp.c_proj.weight, mw.W_down)
        return
    _store(mlp.up_proj.weight, mw.W_up.T)
    _store(mlp.gate_proj.weight, None if mw.W_gate is None else mw.W_gate.T)
    _store(mlp.down_proj.weight, mw.W_down.T)
    _store(mlp.up_proj.bias, mw.b_up)
    _store(mlp.gate_proj.bias, mw.b_gate)


def _residual_tensors(model) -> list[tuple[nn.Parameter, int]]:
    """Every parameter with an axis along the residual stream, and that axis; norm gains and in-layer norm
    biases excluded (a rotation needs them uniform / zero), the final norm's bias included. Tied tensors once."""
    out: list[tuple[nn.Parameter | None, int]] = []
    if family_of(model) == "gpt2":
        t = model.transformer
        out += [(t.wte.weight, 1), (t.wpe.weight, 1)]
        for block in t.h:
            out += [
                (block.attn.c_attn.weight, 0),
                (block.attn.c_proj.weight, 1),
                (block.attn.c_proj.bias, 0),
                (block.mlp.c_fc.weight, 0),
                (block.mlp.c_proj.weight, 1),
                (block.mlp.c_proj.bias, 0),
            ]
        out += [(t.ln_f.bias, 0)]
    else:
        out += [(model.model.embed_tokens.weight, 1)]
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            out += [
                (attn.q_proj.weight, 1),
                (attn.k_proj.weight, 1),
                (attn.v_proj.weight, 1),
                (attn.o_proj.weight, 0),
                (attn.o_proj.bias, 0),
                (mlp.gate_proj.weight, 1),
                (mlp.up_proj.weight, 1),
                (mlp.down_proj.weight, 0),
                (mlp.down_proj.bias, 0),
            ]
    out += [(model.lm_head.weight, 1)]
    seen: set[int] = set()
    unique = []
    for param, axis in out:
        if param is not None and id(param) not in seen:
            seen.add(id(param))
            unique.append((param, axis))
    return unique


def _norms(model) -> list[_Norm]:
    """Every norm and the linears that read its output (the head for the final norm)."""
    head = [_Reader(model.lm_head.weight, 1, None)]
    if family_of(model) == "gpt2":
        t = model.transformer
        norms = []
        for block in t.h:
            norms.append(
                _Norm(
                    block.ln_1.weight,
                    block.ln_1.bias,
                    [_Reader(block.attn.c_attn.weight, 0, block.attn.c_attn.bias)],
                    final=False,
                )
            )
            norms.append(
                _Norm(
                    block.ln_2.weight,
                    block.ln_2.bias,
                    [_Reader(block.mlp.c_fc.weight, 0, block.mlp.c_fc.bias)],
                    final=False,
                )
            )
        return [*norms, _Norm(t.ln_f.weight, t.ln_f.bias, head, final=True)]
    norms = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        norms.append(
            _Norm(
                block.input_layernorm.weight,
                None,
                [_Reader(p.weight, 1, p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj)],
                final=False,
            )
        )
        norms.append(
            _Norm(
                block.post_attention_layernorm.weight,
                None,
                [_Reader(p.weight, 1, p.bias) for p in (mlp.gate_proj, mlp.up_proj)],
                final=False,
            )
        )
    return [*norms, _Norm(model.model.norm.weight, None, head, final=True)]


def residual_axes(model) -> dict[str, int]:
    """Parameter name → the axis that runs along the residual stream, for every parameter that has one (norm
    gains and biases included); a tied head is named once, as the embedding."""
    axes = {id(p): axis for p, axis in _residual_tensors(model)}
    for norm in _norms(model):
        axes.update({id(p): 0 for p in (norm.gain, norm.bias) if p is not None})
    return {name: axes[id(p)] for name, p in model.named_parameters() if id(p) in axes}


def _check_described(model) -> None:
    """Refuse a model with a parameter the anatomy above does not place: a rotation or fold that missed one tensor
    would change the function without anyone noticing (a GPT-2 with cross-attention, say)."""
    known = {id(p) for p, _ in _residual_tensors(model)}
    for norm in _norms(model):
        known |= {id(norm.gain), id(norm.bias)} | {id(r.bias) for r in norm.readers}
    for name, param in model.named_parameters():
        if id(param) not in known:
            raise UnknownArchitecture(
                f"parameter {name!r} is not described by the launderer's {family_of(model)} anatomy"
            )


# ------------------------------------------------------------------------------------------ randomness


def child_seed(seed: int, name: str) -> int:
    """A seed for one named sub-step, derived from ``seed`` reproducibly (and independently of call order)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _log_uniform_scales(n: int, generator: torch.Generator) -> torch.Tensor:
    """n positive scales, log-uniform in [1/SCALE_RANGE, SCALE_RANGE] (float64)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.exp((2 * u - 1) * math.log(SCALE_RANGE))


def _haar(n: int, generator: torch.Generator) -> torch.Tensor:
    return random_orthogonal(n, int(torch.randint(2**62, (1,), generator=generator)))


def _random_invertible(n: int, generator: torch.Generator) -> torch.Tensor:
    """U diag(s) V with U, V Haar-orthogonal and s log-uniform: invertible, condition number ≤ SCALE_RANGE²."""
    return _haar(n, generator) @ torch.diag(_log_uniform_scales(n, generator)) @ _haar(n, generator)


def _rotary_commuting(head_dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random M [d_h, d_h] commuting with every rotary rotation: per plane (i, i + d_h/2) a scaled rotation s·R(φ).

    Rotary embedding rotates the pair (a, b) = (q_i, q_{i+d_h/2}) to (a cos θ − b sin θ, b cos θ + a sin θ), a
    2-d rotation; 2-d rotations and scalings commute with it, anything mixing planes does not (frequencies differ).
    """
    half = head_dim // 2
    s = _log_uniform_scales(half, generator)
    phi = 2 * math.pi * torch.rand(half, generator=generator, dtype=torch.float64)
    M = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    i = torch.arange(half)
    M[i, i] = s * torch.cos(phi)
    M[i, i + half] = s * torch.sin(phi)
    M[i + half, i] = -s * torch.sin(phi)
    M[i + half, i + half] = s * torch.cos(phi)
    return M


def random_permutation(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of range(n) that is not the identity (for n ≥ 2), so a step always moves."""
    while True:
        perm = torch.randperm(n, generator=generator)
        if n < 2 or not torch.equal(perm, torch.arange(n)):
            return perm


# ------------------------------------------------------------------------------------------ transforms


def _copy(model):
    out = copy.deepcopy(model)
    out.eval()
    return out


def untie_head(model) -> tuple[Any, Step]:
    """A copy whose head is its own tensor (a copy of the token embedding when they were tied).

    Folding the final norm into the head, rotating the head and permuting the vocabulary all need the head free of
    the embedding. ``config.tie_word_embeddings`` becomes False so a saved copy loads untied. Truth:
    ``was_tied`` (bool).
    """
    out = _copy(model)
    was_tied = is_tied(out)
    if was_tied:
        out.lm_head.weight = nn.Parameter(out.get_input_embeddings().weight.detach().clone())
    out.config.tie_word_embeddings = False
    return out, Step("untie_head", None, {"was_tied": was_tied})


def fold_norm_gains(model) -> tuple[Any, Step]:
    """A copy whose norms are plain normalisations: gains multiplied into the linears they feed (methods.md §A1).

    Every in-layer norm n(x) = x̂ ⊙ γ + β feeding readers W with bias c becomes γ' = 1, β' = 0 with
    W' = diag(γ) W and c' = c + β W. The final norm's gain goes into the head (refused while the head is tied, see
    :func:`untie_head`); GPT-2's head has no bias, so the final LayerNorm keeps β/γ as its bias (x̂ + β/γ, then
    H diag(γ) gives back x̂ diag(γ) Hᵀ + β Hᵀ). Truth: ``gains`` [n_norms, d] and ``biases`` (LayerNorm only)
    as they were, norms in order (layer 0's two norms, ..., the final norm).
    """
    if is_tied(model):
        raise LmsurgeonError("the head is tied to the token embedding: untie it before folding the final norm into it")
    _check_described(model)
    out = _copy(model)
    gains, biases = [], []
    for norm in _norms(out):
        gamma, beta = _f64(norm.gain), _f64_or_none(norm.bias)
        if norm.final and beta is not None and torch.any(gamma == 0):
            raise LmsurgeonError("the final LayerNorm has a zero gain: its bias cannot be kept as β/γ")
        gains.append(gamma)
        if beta is not None:
            biases.append(beta)
        for reader in norm.readers:
            W = _f64(reader.weight).movedim(reader.axis, 0)  # [d, out]
            if beta is not None and not norm.final:
                if reader.bias is None:
                    raise LmsurgeonError("a LayerNorm bias feeds a linear without a bias: it cannot be folded")
                _store(reader.bias, _f64(reader.bias) + beta @ W)
            _store(reader.weight, (gamma[:, None] * W).movedim(0, reader.axis))
        _store(norm.gain, torch.ones_like(gamma))
        if beta is not None:
            _store(norm.bias, beta / gamma if norm.final else torch.zeros_like(beta))
    truth: dict[str, Any] = {"gains": torch.stack(gains)}
    if biases:
        truth["biases"] = torch.stack(biases)
    return out, Step("fold_norm_gains", None, truth)


def centring_orthogonal(d: int, seed: int) -> torch.Tensor:
    """A random orthogonal Q [d, d] with Q·1 = 1, so that LayerNorm's centring commutes with it (methods.md §A2).

    Q = B diag(1, R') Bᵀ with B an orthonormal basis whose first column is 1/√d and R' Haar-random of size d − 1.
    """
    g = torch.randn(d, d, generator=_generator(seed), dtype=torch.float64)
    g[:, 0] = 1.0
    B, r = torch.linalg.qr(g)
    B = B * torch.sign(torch.diagonal(r))  # first column +1/√d
    R = torch.zeros(d, d, dtype=torch.float64)
    R[0, 0] = 1.0
    R[1:, 1:] = random_orthogonal(d - 1, child_seed(seed, "R'"))
    return B @ R @ B.T


def _check_folded(model) -> None:
    for norm in _norms(model):
        if not torch.all(norm.gain == 1):
            raise LmsurgeonError("a norm gain is not 1: fold the norm gains before rotating the residual stream")
        if norm.bias is not None and not norm.final and not torch.all(norm.bias == 0):
            raise LmsurgeonError("an in-layer LayerNorm bias is not 0: fold the norms before rotating")


def rotate_residual(model, seed: int) -> tuple[Any, Step]:
    """A copy whose residual stream is x' = x Q for a random orthogonal Q (methods.md §A2).

    Every residual axis (embeddings and positions, readers, writers and their biases, the final norm's bias, the
    head) is multiplied by Q on the right, which is E' = E Q, W' = QᵀW for readers and W_o' = W_o Q for writers.
    Needs folded norms (:func:`fold_norm_gains`) and an untied head. RMSNorm (Llama) commutes with any
    orthogonal Q, so Q is Haar-random; LayerNorm (GPT-2) only with one that fixes the all-ones direction, so Q is
    :func:`centring_orthogonal`. Truth: ``Q`` [d, d] float64.
    """
    if is_tied(model):
        raise LmsurgeonError("the head is tied to the token embedding: untie it before rotating the residual stream")
    _check_folded(model)
    _check_described(model)
    out = _copy(model)
    d = out.config.hidden_size
    Q = centring_orthogonal(d, seed) if family_of(out) == "gpt2" else random_orthogonal(d, seed)
    for param, axis in _residual_tensors(out):
        _store(param, (_f64(param).movedim(axis, -1) @ Q).movedim(-1, axis))
    return out, Step("rotate_residual", seed, {"Q": Q})


def _head_blocks(W: torch.Tensor, n: int, axis: int) -> list[torch.Tensor]:
    """W split into n equal blocks along ``axis`` (one per head)."""
    return list(W.split(W.shape[axis] // n, dim=axis))


def _map_columns(W: torch.Tensor, maps: Sequence[torch.Tensor], heads_per_map: int = 1) -> torch.Tensor:
    """[d, n·d_h] → head block h right-multiplied by maps[h // heads_per_map] (a group's query heads share one)."""
    d_h = maps[0].shape[0]
    n = W.shape[-1] // d_h
    return torch.cat([block @ maps[h // heads_per_map] for h, block in enumerate(_head_blocks(W, n, -1))], dim=-1)


def map_query_key(model, seed: int) -> tuple[Any, Step]:
    """A copy with per-head invertible maps inside every q·k product: W_Q^h M, W_K^h M⁻ᵀ (methods.md §A3).

    One M per key/value head, shared by the query heads of its group (grouped-query attention needs that); biases
    transform like their weights. Without rotary embedding M is a general invertible map (U diag(s) V); with it,
    only maps commuting with every position's rotation keep the scores, so M is a per-plane scaled rotation
    (:func:`_rotary_commuting`). Truth: ``M`` [layers, n_kv, d_h, d_h].
    """
    out = _copy(model)
    generator = _generator(seed)
    all_maps = []
    for layer in range(n_layers(out)):
        aw = read_attention(out, layer)
        make = _rotary_commuting if aw.rotary else _random_invertible
        maps = [make(aw.head_dim, generator) for _ in range(aw.n_kv)]
        inverse_t = [torch.linalg.inv(M).T for M in maps]
        group = aw.group_size
        aw.W_q = _map_columns(aw.W_q, maps, group)
        aw.W_k = _map_columns(aw.W_k, inverse_t)
        if aw.b_q is not None:
            aw.b_q = _map_columns(aw.b_q[None], maps, group)[0]
        if aw.b_k is not None:
            aw.b_k = _map_columns(aw.b_k[None], inverse_t)[0]
        write_attention(out, layer, aw)
        all_maps.append(torch.stack(maps))
    return out, Step("map_query_key", seed, {"M": torch.stack(all_maps)})


def map_value_output(model, seed: int) -> tuple[Any, Step]:
    """A copy with per-head invertible maps between value and output: W_V^h N, N⁻¹ W_O^h (methods.md §A3).

    One general invertible N per key/value head (values are not rotated, so rotary attention allows any N),
    applied to the output rows of every query head of its group; the value bias transforms like W_V (attention
    weights sum to one, so the bias passes through unchanged). Truth: ``N`` [layers, n_kv, d_h, d_h].
    """
    out = _copy(model)
    generator = _generator(seed)
    all_maps = []
    for layer in range(n_layers(out)):
        aw = read_attention(out, layer)
        maps = [_random_invertible(aw.head_dim, generator) for _ in range(aw.n_kv)]
        group = aw.group_size
        aw.W_v = _map_columns(aw.W_v, maps)
        if aw.b_v is not None:
            aw.b_v = _map_columns(aw.b_v[None], maps)[0]
        rows = _head_blocks(aw.W_o, aw.n_heads, 0)
        aw.W_o = torch.cat([torch.linalg.solve(maps[h // group], block) for h, block in enumerate(rows)], dim=0)
        write_attention(out, layer, aw)
        all_maps.append(torch.stack(maps))
    return out, Step("map_value_output", seed, {"N": torch.stack(all_maps)})


def _take_heads(W: torch.Tensor, order: torch.Tensor, axis: int) -> torch.Tensor:
    blocks = _head_blocks(W, len(order), axis)
    return torch.cat([blocks[int(i)] for i in order], dim=axis)


def permute_heads(model, seed: int) -> tuple[Any, Step]:
    """A copy with attention heads reordered (methods.md §A3): new head j is old head ``q_perm[j]``.

    Key/value heads are permuted (``kv_perm``) and each group's query heads travel with their key/value head,
    in a random order within the group; W_O rows follow their query heads. Without grouped-query attention the two
    permutations are the same. Truth: ``q_perm`` [layers, n_heads], ``kv_perm`` [layers, n_kv].
    """
    out = _copy(model)
    generator = _generator(seed)
    q_perms, kv_perms = [], []
    for layer in range(n_layers(out)):
        aw = read_attention(out, layer)
        group = aw.group_size
        kv_perm = random_permutation(aw.n_kv, generator)
        q_perm = torch.cat([int(g) * group + torch.randperm(group, generator=generator) for g in kv_perm])
        aw.W_q, aw.W_o = _take_heads(aw.W_q, q_perm, 1), _take_heads(aw.W_o, q_perm, 0)
        aw.W_k, aw.W_v = _take_heads(aw.W_k, kv_perm, 1), _take_heads(aw.W_v, kv_perm, 1)
        aw.b_q = None if aw.b_q is None else _take_heads(aw.b_q, q_perm, 0)
        aw.b_k = None if aw.b_k is None else _take_heads(aw.b_k, kv_perm, 0)
        aw.b_v = None if aw.b_v is None else _take_heads(aw.b_v, kv_perm, 0)
        write_attention(out, layer, aw)
        q_perms.append(q_perm)
        kv_perms.append(kv_perm)
    return out, Step("permute_heads", seed, {"q_perm": torch.stack(q_perms), "kv_perm": torch.stack(kv_perms)})


def permute_mlp_units(model, seed: int) -> tuple[Any, Step]:
    """A copy with each layer's MLP hidden units reordered: new unit j is old unit ``perm[layer][j]`` (§A4).

    Columns of up (and gate) and their biases, rows of down. Truth: ``perm`` [layers, f].
    """
    out = _copy(model)
    generator = _generator(seed)
    perms = []
    for layer in range(n_layers(out)):
        mw = read_mlp(out, layer)
        perm = random_permutation(mw.W_up.shape[1], generator)
        mw.W_up, mw.W_down = mw.W_up[:, perm], mw.W_down[perm]
        mw.W_gate = None if mw.W_gate is None else mw.W_gate[:, perm]
        mw.b_up = None if mw.b_up is None else mw.b_up[perm]
        mw.b_gate = None if mw.b_gate is None else mw.b_gate[perm]
        write_mlp(out, layer, mw)
        perms.append(perm)
    return out, Step("permute_mlp_units", seed, {"perm": torch.stack(perms)})


def mlp_units_scale(model) -> bool:
    """Whether the MLP units allow a positive per-unit scale: the up branch of a gated MLP, or ReLU units."""
    mw = read_mlp(model, 0)
    return mw.gated or mw.activation in SCALABLE_ACTIVATIONS


def scale_mlp_units(model, seed: int) -> tuple[Any, Step]:
    """A copy with each MLP unit's input scaled by c > 0 and its output by 1/c (methods.md §A4).

    Allowed where act(c·u) = c·act(u): a gated MLP's up branch (act(gate)·up is linear in up) or ReLU units.
    GELU and SiLU are not homogeneous, so an ungated MLP with those is refused. Truth: ``scale`` [layers, f],
    log-uniform in [1/2, 2].
    """
    if not mlp_units_scale(model):
        raise LmsurgeonError(f"{read_mlp(model, 0).activation} MLP units do not scale: act(c·u) ≠ c·act(u)")
    out = _copy(model)
    generator = _generator(seed)
    scales = []
    for layer in range(n_layers(out)):
        mw = read_mlp(out, layer)
        c = _log_uniform_scales(mw.W_up.shape[1], generator)
        mw.W_up, mw.W_down = mw.W_up * c, mw.W_down / c[:, None]
        mw.b_up = None if mw.b_up is None else mw.b_up * c
        write_mlp(out, layer, mw)
        scales.append(c)
    return out, Step("scale_mlp_units", seed, {"scale": torch.stack(scales)})


# ------------------------------------------------------------------------------------------ vocabulary


_SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _remap_ids(value, new_id: torch.Tensor):
    if isinstance(value, int) and 0 <= value < len(new_id):
        return int(new_id[value])
    if isinstance(value, list):
        return [_remap_ids(v, new_id) for v in value]
    return value


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv with inv[perm[j]] = j."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    return inv


def permute_vocabulary(model, seed: int, n_tokens: int | None = None) -> tuple[Any, Step]:
    """A copy whose token ids are shuffled: new id j is old id ``perm[j]`` (methods.md §A5).

    Embedding rows and head rows move together (once when tied); the config's special ids (bos, eos, pad) follow.
    Only the first ``n_tokens`` ids are shuffled (default: every row), so padding rows beyond the tokenizer stay
    put. Apply the same ``perm`` to the tokenizer with :func:`permute_tokenizer`. Truth: ``perm`` [vocab].
    """
    out = _copy(model)
    rows = out.get_input_embeddings().weight.shape[0]
    n = rows if n_tokens is None else n_tokens
    if not 2 <= n <= rows:
        raise LmsurgeonError(f"cannot permute {n} token ids of a {rows}-row embedding")
    perm = torch.cat([random_permutation(n, _generator(seed)), torch.arange(n, rows)])
    params = {id(p): p for p in (out.get_input_embeddings().weight, out.get_output_embeddings().weight)}
    for param in params.values():
        _store(param, _f64(param)[perm])
    new_id = inverse_permutation(perm)
    for config in (out.config, getattr(out, "generation_config", None)):
        for key in _SPECIAL_ID_KEYS:
            if config is not None and getattr(config, key, None) is not None:
                setattr(config, key, _remap_ids(getattr(config, key), new_id))
    return out, Step("permute_vocabulary", seed, {"perm": perm})


def _remap_post_processor(spec: dict | None, new_id: Callable[[int], int]) -> None:
    """Special-token ids inside a post-processor (Template, Bert/Roberta, Sequence), rewritten in place."""
    if not spec:
        return
    for processor in spec.get("processors", []):
        _remap_post_processor(processor, new_id)
    for key in ("sep", "cls"):
        if isinstance(spec.get(key), list):
            spec[key][1] = new_id(spec[key][1])
    for special in (spec.get("special_tokens") or {}).values():
        special["ids"] = [new_id(i) for i in special["ids"]]


def permute_tokenizer(tokenizer, perm: torch.Tensor):
    """A ``tokenizers.Tokenizer`` whose token with old id ``perm[j]`` now has id j (methods.md §A5).

    The vocabulary (a token→id map for BPE, WordPiece and WordLevel; the ordered piece list for Unigram), the
    added tokens and the post-processor's special ids are rewritten; merges name tokens by string and stay valid.
    Encoding any text gives ``inverse_permutation(perm)[old_ids]``.
    """
    from tokenizers import Tokenizer

    inv = inverse_permutation(perm)

    def new_id(old: int) -> int:
        if not 0 <= old < len(perm):
            raise LmsurgeonError(f"tokenizer id {old} is outside the {len(perm)}-id permutation")
        return int(inv[old])

    spec = json.loads(tokenizer.to_str())
    model = spec["model"]
    if model["type"] == "Unigram":
        pieces = model["vocab"]
        if len(pieces) != len(perm):
            raise LmsurgeonError(f"a Unigram vocabulary of {len(pieces)} pieces needs a permutation of that length")
        model["vocab"] = [pieces[int(old)] for old in perm]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_id(model["unk_id"])
    elif isinstance(model.get("vocab"), dict):
        model["vocab"] = {token: new_id(old) for token, old in model["vocab"].items()}
    else:
        raise LmsurgeonError(f"no vocabulary to permute in a {model['type']} tokenizer")
    for added in spec.get("added_tokens") or []:
        added["id"] = new_id(added["id"])
    _remap_post_processor(spec.get("post_processor"), new_id)
    return Tokenizer.from_str(json.dumps(spec))


# ------------------------------------------------------------------------------------------ composition


def launder(model, seed: int, tokenizer=None) -> tuple[Any, Any, list[Step]]:
    """Every transform above in turn: what a launderer would do before fine-tuning (issue: laundered zoo case).

    Untie the head, fold the norms, rotate the residual stream, per-head q/k and v/o maps, permute heads and MLP
    units, scale MLP units where the activation allows, permute the vocabulary (and ``tokenizer`` with it when
    given). Each step's seed is derived from ``seed`` and its name (:func:`child_seed`). Returns the laundered
    model, the permuted tokenizer (None when none was given) and the steps in order.
    """
    steps: list[Step] = []
    out, step = untie_head(model)
    steps.append(step)
    out, step = fold_norm_gains(out)
    steps.append(step)
    seeded = [rotate_residual, map_query_key, map_value_output, permute_heads, permute_mlp_units]
    if mlp_units_scale(out):
        seeded.append(scale_mlp_units)
    for transform in seeded:
        out, step = transform(out, child_seed(seed, transform.__name__))
        steps.append(step)
    n_tokens = None if tokenizer is None else tokenizer.get_vocab_size(with_added_tokens=True)
    out, step = permute_vocabulary(out, child_seed(seed, "permute_vocabulary"), n_tokens)
    steps.append(step)
    new_tokenizer = None if tokenizer is None else permute_tokenizer(tokenizer, step.truth["perm"])
    return out, new_tokenizer, steps
