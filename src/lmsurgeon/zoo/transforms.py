"""Function-preserving and lineage-making surgery on a state dict: permute, fold norm gains, prune layers.

These are how the zoo makes its hard cases for lineage detection, and lineage tests reuse them on other
models (a permuted or pruned MiniLM, say). Each family is described by a :class:`Layout`: for every tensor
name template, which axes run along the residual stream (``"d"``, one permutation for the whole model) and
which along a layer's FFN units (``"f"``, one permutation per layer). Permuting every ``"d"`` axis with the
same permutation, and every ``"f"`` axis of a layer with that layer's, leaves the function unchanged, because
RMSNorm and LayerNorm statistics are permutation invariant and elementwise gains and biases move with their
coordinates. Attention heads are left in place (the head space is not labelled).

A tensor the layout does not describe is an error, never silently left alone: one missed tensor would break
function preservation without anyone noticing.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import torch

from lmsurgeon.errors import LmsurgeonError, UnknownArchitecture

Axes = tuple[str | None, ...]  # one label per tensor axis: "d" residual, "f" FFN unit, None untouched
StateDict = dict[str, torch.Tensor]
RESIDUAL, FFN = "d", "f"


@dataclass(frozen=True)
class Layout:
    """Which axes of each tensor of one model family are residual dims or FFN units, and what feeds what.

    ``axes`` maps a name template (``{i}`` for the layer index, matched at a dotted boundary after any
    prefix such as ``model.`` or ``bert.``) to its axis labels. ``folds`` maps a pre-norm gain template to
    the linears it feeds; families whose norms sit on the residual stream (BERT's post-norm) have none.
    """

    family: str
    n_layers_key: str
    layer_prefix: str
    axes: dict[str, Axes]
    folds: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @cached_property
    def patterns(self) -> list[tuple[str, re.Pattern]]:
        """Templates compiled to regexes, longest first so the most specific template wins."""
        ordered = sorted(self.axes, key=len, reverse=True)
        return [(t, re.compile(r"(?:.*\.)?" + re.escape(t).replace(r"\{i\}", r"(?P<i>\d+)"))) for t in ordered]

    @cached_property
    def layer_pattern(self) -> re.Pattern:
        """Finds the layer index in a tensor name, e.g. ``model.layers.(7).``."""
        return re.compile(r"(?:^|\.)" + re.escape(self.layer_prefix).replace(r"\{i\}", r"(\d+)"))

    def role(self, name: str) -> tuple[str, int | None]:
        """The template a tensor name matches and its layer index (None outside the layers)."""
        for template, pattern in self.patterns:
            match = pattern.fullmatch(name)
            if match:
                layer = match.groupdict().get("i")
                return template, None if layer is None else int(layer)
        raise UnknownArchitecture(f"tensor {name!r} is not described by the {self.family} layout")


_LLAMA_LINEARS_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LLAMA = Layout(
    family="llama", n_layers_key="num_hidden_layers", layer_prefix="layers.{i}.",
    axes={
        "embed_tokens.weight": (None, RESIDUAL),
        **{f"layers.{{i}}.{lin}.weight": (None, RESIDUAL) for lin in _LLAMA_LINEARS_IN},
        **{f"layers.{{i}}.{lin}.bias": (None,) for lin in _LLAMA_LINEARS_IN},  # Qwen2-style qkv biases
        "layers.{i}.self_attn.o_proj.weight": (RESIDUAL, None),
        "layers.{i}.self_attn.o_proj.bias": (RESIDUAL,),
        "layers.{i}.input_layernorm.weight": (RESIDUAL,),
        "layers.{i}.post_attention_layernorm.weight": (RESIDUAL,),
        "layers.{i}.mlp.gate_proj.weight": (FFN, RESIDUAL),
        "layers.{i}.mlp.up_proj.weight": (FFN, RESIDUAL),
        "layers.{i}.mlp.down_proj.weight": (RESIDUAL, FFN),
        "norm.weight": (RESIDUAL,),
        "lm_head.weight": (None, RESIDUAL),
        "rotary_emb.inv_freq": (None,),
    },
    folds={
        "layers.{i}.input_layernorm.weight": tuple(f"layers.{{i}}.{lin}.weight" for lin in _LLAMA_LINEARS_IN),
        "layers.{i}.post_attention_layernorm.weight": ("layers.{i}.mlp.gate_proj.weight",
                                                       "layers.{i}.mlp.up_proj.weight"),
        "norm.weight": ("lm_head.weight",),
    },
)

_BERT_NORMS = ("embeddings.LayerNorm", "attention.output.LayerNorm", "output.LayerNorm")
BERT = Layout(
    family="bert", n_layers_key="num_hidden_layers", layer_prefix="encoder.layer.{i}.",
    axes={
        "embeddings.word_embeddings.weight": (None, RESIDUAL),
        "embeddings.position_embeddings.weight": (None, RESIDUAL),
        "embeddings.token_type_embeddings.weight": (None, RESIDUAL),
        "embeddings.position_ids": (None, None),
        "embeddings.token_type_ids": (None, None),
        "embeddings.LayerNorm.weight": (RESIDUAL,),
        "embeddings.LayerNorm.bias": (RESIDUAL,),
        **{f"encoder.layer.{{i}}.attention.self.{p}.weight": (None, RESIDUAL) for p in ("query", "key", "value")},
        **{f"encoder.layer.{{i}}.attention.self.{p}.bias": (None,) for p in ("query", "key", "value")},
        "encoder.layer.{i}.attention.output.dense.weight": (RESIDUAL, None),
        "encoder.layer.{i}.attention.output.dense.bias": (RESIDUAL,),
        **{f"encoder.layer.{{i}}.{n}.{w}": (RESIDUAL,) for n in _BERT_NORMS[1:] for w in ("weight", "bias")},
        "encoder.layer.{i}.intermediate.dense.weight": (FFN, RESIDUAL),
        "encoder.layer.{i}.intermediate.dense.bias": (FFN,),
        "encoder.layer.{i}.output.dense.weight": (RESIDUAL, FFN),
        "encoder.layer.{i}.output.dense.bias": (RESIDUAL,),
        "pooler.dense.weight": (None, RESIDUAL),
        "pooler.dense.bias": (None,),
        "cls.predictions.transform.dense.weight": (None, RESIDUAL),  # BertForMaskedLM head: its own space
        "cls.predictions.transform.dense.bias": (None,),
        "cls.predictions.transform.LayerNorm.weight": (None,),
        "cls.predictions.transform.LayerNorm.bias": (None,),
        "cls.predictions.decoder.weight": (None, None),
        "cls.predictions.decoder.bias": (None,),
        "cls.predictions.bias": (None,),
    },
)

GPT2 = Layout(  # Conv1D linears are stored [in, out]
    family="gpt2", n_layers_key="n_layer", layer_prefix="h.{i}.",
    axes={
        "wte.weight": (None, RESIDUAL),
        "wpe.weight": (None, RESIDUAL),
        **{f"h.{{i}}.{n}.{w}": (RESIDUAL,) for n in ("ln_1", "ln_2") for w in ("weight", "bias")},
        "h.{i}.attn.c_attn.weight": (RESIDUAL, None),
        "h.{i}.attn.c_attn.bias": (None,),
        "h.{i}.attn.c_proj.weight": (None, RESIDUAL),
        "h.{i}.attn.c_proj.bias": (RESIDUAL,),
        "h.{i}.attn.bias": (None, None, None, None),  # causal-mask buffer in older checkpoints
        "h.{i}.attn.masked_bias": (),
        "h.{i}.mlp.c_fc.weight": (RESIDUAL, FFN),
        "h.{i}.mlp.c_fc.bias": (FFN,),
        "h.{i}.mlp.c_proj.weight": (FFN, RESIDUAL),
        "h.{i}.mlp.c_proj.bias": (RESIDUAL,),
        "ln_f.weight": (RESIDUAL,),
        "ln_f.bias": (RESIDUAL,),
        "lm_head.weight": (None, RESIDUAL),
    },
)

LAYOUTS: dict[str, Layout] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "bert": BERT, "gpt2": GPT2}


def layout_for(model_or_config) -> Layout:
    """The layout for a transformers model or config, by its ``model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        raise UnknownArchitecture(f"no surgery layout for model_type {model_type!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[model_type]


# ---------------------------------------------------------------------------------------------- permutation


def axis_sizes(sd: Mapping[str, torch.Tensor], layout: Layout) -> dict[str | tuple[str, int], int]:
    """The length of the residual axis (key ``"d"``) and of each layer's FFN axis (key ``("f", i)``)."""
    sizes: dict[str | tuple[str, int], int] = {}
    for name, tensor in sd.items():
        template, layer = layout.role(name)
        for axis, label in enumerate(layout.axes[template]):
            if label is None:
                continue
            key = RESIDUAL if label == RESIDUAL else (FFN, layer)
            if sizes.setdefault(key, tensor.shape[axis]) != tensor.shape[axis]:
                raise LmsurgeonError(f"tensor {name!r} axis {axis} has {tensor.shape[axis]} entries, "
                                     f"expected {sizes[key]} ({label} axis of the {layout.family} layout)")
    return sizes


def random_permutations(sd: Mapping[str, torch.Tensor], layout: Layout, seed: int
                        ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """A random residual permutation and one random FFN permutation per layer, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    sizes = axis_sizes(sd, layout)
    perm_d = torch.randperm(sizes[RESIDUAL], generator=generator)
    layers = sorted(key[1] for key in sizes if key != RESIDUAL)
    perm_f = {i: torch.randperm(sizes[(FFN, i)], generator=generator) for i in layers}
    return perm_d, perm_f


def permute_state_dict(sd: Mapping[str, torch.Tensor], layout: Layout, perm_d: torch.Tensor,
                       perm_f: Mapping[int, torch.Tensor]) -> StateDict:
    """New tensors where coordinate ``j`` of every residual axis is old coordinate ``perm_d[j]``.

    FFN axes of layer ``i`` use ``perm_f[i]``. Tied tensors (same storage) stay tied in meaning because both
    names receive the same permutation, although the returned tensors are separate copies.
    """
    out: StateDict = {}
    for name, tensor in sd.items():
        template, layer = layout.role(name)
        result = tensor
        for axis, label in enumerate(layout.axes[template]):
            if label == RESIDUAL:
                result = result.index_select(axis, perm_d.to(result.device))
            elif label == FFN:
                result = result.index_select(axis, perm_f[layer].to(result.device))
        out[name] = result.clone() if result is tensor else result
    return out


# ---------------------------------------------------------------------------------------------- gain folding


def fold_norm_gains(sd: Mapping[str, torch.Tensor], layout: Layout) -> StateDict:
    """Multiply every pre-norm gain into the input columns of the linears it feeds, then set the gain to 1.

    ``W @ (g * n) == (W * g) @ n``, so the function is unchanged while the gains, a favourite lineage
    signal, become all ones. Only for layouts with ``folds`` (RMSNorm pre-norm families without a bias);
    a fed linear that shares storage with another tensor (a tied lm_head) cannot be folded alone.
    """
    if not layout.folds:
        raise LmsurgeonError(f"the {layout.family} layout declares no foldable gains "
                             "(only bias-free pre-norm families have them)")
    index = {layout.role(name): name for name in sd}
    out: StateDict = {name: tensor.clone() for name, tensor in sd.items()}
    for (template, layer), norm_name in index.items():
        for fed_template in layout.folds.get(template, ()):
            fed_name = index.get((fed_template, layer if "{i}" in fed_template else None))
            if fed_name is not None:
                _check_untied(sd, fed_name)
                out[fed_name] = _scale_residual_axis(out[fed_name], layout.axes[fed_template], sd[norm_name])
        if template in layout.folds:
            out[norm_name] = torch.ones_like(sd[norm_name])
    return out


def _scale_residual_axis(weight: torch.Tensor, axes: Axes, gain: torch.Tensor) -> torch.Tensor:
    """``weight`` times ``gain`` broadcast along its residual axis."""
    axis = axes.index(RESIDUAL)
    shape = [1] * weight.ndim
    shape[axis] = gain.numel()
    return weight * gain.to(weight.dtype).reshape(shape)


def _check_untied(sd: Mapping[str, torch.Tensor], name: str) -> None:
    """Refuse to fold into a tensor another name shares: that would silently change the other use."""
    mine = sd[name]
    for other, tensor in sd.items():
        if other != name and tensor.data_ptr() == mine.data_ptr() and tensor.shape == mine.shape:
            raise LmsurgeonError(f"{name!r} is tied to {other!r}; untie the weights before folding norm gains")


# ---------------------------------------------------------------------------------------------- rotation


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    """A Haar-random d×d orthogonal matrix (QR of a Gaussian matrix with the sign of R's diagonal fixed)."""
    g = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))


def rotate_state_dict(sd: Mapping[str, torch.Tensor], layout: Layout, Q: torch.Tensor) -> StateDict:
    """The residual stream expressed in the basis ``x' = Q x``: readers become ``W Qᵀ``, writers ``Q W``.

    RMSNorm commutes with an orthogonal map only when its gain is uniform, so gains must be folded first
    (:func:`fold_norm_gains`); they are checked and kept. What a permutation-based alignment cannot undo, this
    is: the attack the activation test φ_MATCH exists for.
    """
    if not layout.folds:
        raise LmsurgeonError(f"the {layout.family} layout has no foldable gains: a rotation would change its function")
    out: StateDict = {}
    for name, tensor in sd.items():
        template, _ = layout.role(name)
        if template in layout.folds:
            if not torch.all(tensor == tensor.reshape(-1)[0]):
                raise LmsurgeonError(f"{name!r} is not a uniform gain: fold the norm gains before rotating")
            out[name] = tensor.clone()
            continue
        result = tensor
        for axis, label in enumerate(layout.axes[template]):
            if label == RESIDUAL:
                moved = result.movedim(axis, -1)
                result = (moved.double() @ Q.T.to(moved.device)).to(tensor.dtype).movedim(-1, axis)
        out[name] = result.clone() if result is tensor else result.contiguous()
    return out


# ---------------------------------------------------------------------------------------------- pruning


def prune_state_dict(sd: Mapping[str, torch.Tensor], layout: Layout, drop: Iterable[int],
                     n_layers: int) -> StateDict:
    """Remove layers ``drop`` and renumber the rest 0..n-1 in order (``layers.5.`` becomes ``layers.4.``)."""
    dropped = sorted(set(drop))
    if not dropped or dropped[0] < 0 or dropped[-1] >= n_layers or len(dropped) >= n_layers:
        raise LmsurgeonError(f"cannot drop layers {dropped} from a {n_layers}-layer model")
    new_index = {old: new for new, old in enumerate(i for i in range(n_layers) if i not in dropped)}
    out: StateDict = {}
    for name, tensor in sd.items():
        match = layout.layer_pattern.search(name)
        if match is None:
            out[name] = tensor.clone()
            continue
        old = int(match.group(1))
        if old in new_index:
            start, end = match.span(1)
            out[f"{name[:start]}{new_index[old]}{name[end:]}"] = tensor.clone()
    return out


# ---------------------------------------------------------------------------------------------- on models


def state_dict_of(model: torch.nn.Module) -> StateDict:
    """The model's state dict with tied tensors still sharing storage (so folding can detect ties)."""
    return dict(model.state_dict())


def model_from_state_dict(template: torch.nn.Module, sd: Mapping[str, torch.Tensor], config=None):
    """A fresh model of ``template``'s class (and config unless given) holding ``sd``; strict loading."""
    config = copy.deepcopy(config if config is not None else template.config)
    model = type(template)(config)
    model.load_state_dict(dict(sd), strict=True)
    return model.to(next(template.parameters()).device).eval()


def permute_model(model, seed: int):
    """A function-identical copy with residual dims and FFN units randomly permuted; also the permutations."""
    layout = layout_for(model)
    sd = state_dict_of(model)
    perm_d, perm_f = random_permutations(sd, layout, seed)
    return model_from_state_dict(model, permute_state_dict(sd, layout, perm_d, perm_f)), (perm_d, perm_f)


def fold_model(model):
    """A function-identical copy whose pre-norm gains are all 1 (folded into the linears they feed).

    A model with a tied lm_head is refused (the final norm would have to be folded into the embeddings too).
    """
    return model_from_state_dict(model, fold_norm_gains(state_dict_of(model), layout_for(model)))


def rotate_model(model, seed: int):
    """A function-identical copy with gains folded and the residual stream rotated by a random orthogonal Q."""
    layout = layout_for(model)
    sd = fold_norm_gains(state_dict_of(model), layout)
    d = axis_sizes(sd, layout)[RESIDUAL]
    return model_from_state_dict(model, rotate_state_dict(sd, layout, random_orthogonal(d, seed)))


def prune_model(model, drop: Iterable[int]):
    """A copy without layers ``drop``: renumbered tensors and a config with the new layer count."""
    layout = layout_for(model)
    dropped = sorted(set(drop))
    n_layers = getattr(model.config, layout.n_layers_key)
    sd = prune_state_dict(state_dict_of(model), layout, dropped, n_layers)
    config = copy.deepcopy(model.config)
    setattr(config, layout.n_layers_key, n_layers - len(dropped))
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in dropped]
    return model_from_state_dict(model, sd, config)


# ---------------------------------------------------------------------------------------------- checks


@torch.no_grad()
def logit_discrepancy(model_a, model_b, input_ids: torch.Tensor) -> float:
    """``max|a - b| / max|a|`` over the logits both models give for ``input_ids``: 0 for identical function."""
    model_a.eval()
    model_b.eval()
    a = model_a(input_ids=input_ids).logits.double()
    b = model_b(input_ids=input_ids.to(next(model_b.parameters()).device)).logits.double().to(a.device)
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def moved_fraction(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor, the fraction of elements whose value changed (1.0 means every weight moved)."""
    if before.keys() != after.keys():
        raise LmsurgeonError("the two state dicts name different tensors")
    return {name: float((before[name] != after[name].to(before[name].device)).double().mean())
            for name in before if before[name].is_floating_point()}
