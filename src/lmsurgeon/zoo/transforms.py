"""Function-preserving and lineage-making surgery on a state dict: permute, fold norm gains, rotate, prune layers.

These are how the zoo makes its hard cases for lineage detection, and lineage tests reuse them on other
models (a permuted or pruned MiniLM, say). What they need about a family comes from its family file through
:class:`lmsurgeon.arch.Layout`: every tensor's role and the label of each of its axes (``hidden``: the residual
stream, one permutation for the whole model; ``mlp``: the units of one MLP, one permutation per layer, expert
and shared MLP; unlabelled axes stay in place), and which norms fold into which linear maps. Permuting every
``hidden`` axis with the same permutation, and every ``mlp`` axis of one MLP with that MLP's, leaves the
function unchanged, because RMSNorm and LayerNorm statistics are permutation invariant and elementwise gains
and biases move with their coordinates. Attention heads (``heads``/``kv_heads`` axes) move only when asked:
whole heads, each query head with the key/value head its group shares.

A tensor the family does not describe is an error, never silently left alone: one missed tensor would break
function preservation without anyone noticing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch

from lmsurgeon.arch import ArraySource, Layout, TensorSite, detect_family
from lmsurgeon.arch.fold import fold_gains
from lmsurgeon.arch.schema import HEADS, HIDDEN, KV_HEADS
from lmsurgeon.errors import LmsurgeonError, UnknownArchitecture

StateDict = dict[str, torch.Tensor]
UnitGroup = tuple[int | None, int | None, str]  # (layer, expert, "mlp" | "experts" | "shared")


def layout_for(model, state: Mapping[str, torch.Tensor] | None = None) -> Layout:
    """The family layout of a ``transformers`` model, bound to its state dict (or to ``state``)."""
    config = model.config
    cfg = config.to_dict() if hasattr(config, "to_dict") else {"model_type": getattr(config, "model_type", None)}
    family = detect_family(cfg, where=f"{type(model).__name__} config")
    return Layout(ArraySource(state_dict_of(model) if state is None else state, cfg, type(model).__name__), family)


def site_of(layout: Layout, name: str) -> TensorSite:
    """The role, layer and axis labels of a state-dict tensor; a tensor no role names is an error."""
    site = layout.sites.get(name)
    if site is None:
        raise UnknownArchitecture(f"tensor {name!r} is not described by the {layout.family.name} family file")
    return site


# ---------------------------------------------------------------------------------------------- permutation


def axis_sizes(sd: Mapping[str, torch.Tensor], layout: Layout) -> dict[str | UnitGroup, int]:
    """The length of the residual axis (key ``"hidden"``) and of each MLP's unit axis (key: its unit group)."""
    sizes: dict[str | UnitGroup, int] = {}
    for name, tensor in sd.items():
        site = site_of(layout, name)
        for axis, label in enumerate(site.axes):
            if label is None or label in (HEADS, KV_HEADS):
                continue
            key: str | UnitGroup = HIDDEN if label == HIDDEN else site.unit_group
            parts = _fused_parts(layout, name, site, axis)
            size = tensor.shape[axis] // parts
            if sizes.setdefault(key, size) != size or size * parts != tensor.shape[axis]:
                raise LmsurgeonError(
                    f"tensor {name!r} axis {axis} has {tensor.shape[axis]} entries, expected "
                    f"{parts} × {sizes[key]} ({label} axis of the {layout.family.name} family)"
                )
    return sizes


def random_permutations(
    sd: Mapping[str, torch.Tensor], layout: Layout, seed: int
) -> tuple[torch.Tensor, dict[UnitGroup, torch.Tensor]]:
    """A random residual permutation and one per MLP (layer by layer), reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    sizes = axis_sizes(sd, layout)
    perm_d = torch.randperm(sizes[HIDDEN], generator=generator)
    groups = sorted((key for key in sizes if not isinstance(key, str)), key=_group_order)
    perm_units = {group: torch.randperm(sizes[group], generator=generator) for group in groups}
    return perm_d, perm_units


def random_head_permutations(layout: Layout, seed: int) -> dict[int, torch.Tensor]:
    """One random permutation of the key/value heads per layer, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return {layer: torch.randperm(layout.dims["n_kv_heads"], generator=generator) for layer in layout.layers}


def _head_index(layout: Layout, label: str, perm_kv: torch.Tensor) -> torch.Tensor:
    """Rows of a ``heads`` or ``kv_heads`` axis in their new order: whole heads of ``head_dim`` rows move, and
    each query head moves with the key/value head its group shares."""
    head_dim, n_heads, n_kv = layout.dims["head_dim"], layout.dims["n_heads"], layout.dims["n_kv_heads"]
    if n_heads % n_kv:
        raise LmsurgeonError(f"{n_heads} query heads do not share {n_kv} key/value heads evenly", layout.handle.name)
    group = n_heads // n_kv
    heads = perm_kv if label == KV_HEADS else (perm_kv[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _group_order(group: UnitGroup) -> tuple[int, int, str]:
    """Layer by layer (the dense or shared MLP, then experts in order): the order permutations are drawn in."""
    layer, expert, kind = group
    return (-1 if layer is None else layer, -1 if expert is None else expert, kind)


def permute_state_dict(
    sd: Mapping[str, torch.Tensor],
    layout: Layout,
    perm_d: torch.Tensor,
    perm_units: Mapping[UnitGroup, torch.Tensor],
    signs: torch.Tensor | None = None,
    perm_heads: Mapping[int, torch.Tensor] | None = None,
) -> StateDict:
    """New tensors where coordinate ``j`` of every residual axis is old coordinate ``perm_d[j]``.

    MLP-unit axes use their MLP's permutation from ``perm_units``. With ``signs`` (±1 per residual coordinate)
    the residual stream is also sign-flipped, x' = x[perm_d]·s: every weight's residual axis is multiplied by
    ``signs`` while norm gains only move (RMSNorm commutes with signed permutations; LayerNorm's centering does
    not, so families with LayerNorm refuse signs). With ``perm_heads`` (a key/value-head permutation per
    layer, :func:`random_head_permutations`) attention heads move too; without it they stay in place. Tied
    tensors stay tied in meaning because both names receive the same permutation, although the returned
    tensors are separate copies.
    """
    if signs is not None:
        _check_sign_flips_allowed(layout)
    out: StateDict = {}
    for name, tensor in sd.items():
        site = site_of(layout, name)
        is_norm = not site.is_buffer and layout.family.spec(site.role).is_norm
        result = tensor
        for axis, label in enumerate(site.axes):
            if label is None or (label in (HEADS, KV_HEADS) and perm_heads is None):
                continue
            if label in (HEADS, KV_HEADS):
                assert perm_heads is not None and site.layer is not None
                perm = _head_index(layout, label, perm_heads[site.layer])
            else:
                perm = perm_d if label == HIDDEN else perm_units[site.unit_group]
            index = _fused_index(perm, _fused_parts(layout, name, site, axis))
            result = result.index_select(axis, index.to(result.device))
            if label == HIDDEN and signs is not None and not is_norm:
                shape = [1] * result.ndim
                shape[axis] = -1
                result = result * signs.to(result.device, result.dtype).reshape(shape)
        out[name] = result.clone() if result is tensor else result
    return out


def _fused_parts(layout: Layout, name: str, site: TensorSite, axis: int) -> int:
    """How many equal parts a fused tensor's output axis holds (Phi-3's gate_up_proj: 2), else 1."""
    spec = layout.family.spec(site.role)
    weight = layout.name(site.role, site.layer, site.expert)
    out_axis = 1 if spec.layout == "conv1d" and not site.is_bias else 0
    if spec.split is None or weight is None or not weight.endswith(spec.split.of) or axis != out_axis:
        return 1
    if len({layout.dims[part] for part in spec.split.parts}) != 1:
        raise LmsurgeonError(f"{name!r}: a labelled axis fused from parts of different sizes cannot be permuted")
    return len(spec.split.parts)


def _fused_index(perm: torch.Tensor, parts: int) -> torch.Tensor:
    """``perm`` applied within each of ``parts`` consecutive blocks."""
    n = perm.numel()
    return torch.cat([perm + k * n for k in range(parts)]) if parts > 1 else perm


def _check_sign_flips_allowed(layout: Layout) -> None:
    for role in layout.family.norm_roles():
        spec = layout.family.spec(role)
        if HIDDEN in spec.axes and spec.kind != "rms":
            raise LmsurgeonError(
                f"the {layout.family.name} family has {spec.kind} norms: sign flips of the "
                "residual stream would change its function"
            )


# ---------------------------------------------------------------------------------------------- gain folding


def fold_norm_gains(sd: Mapping[str, torch.Tensor], layout: Layout) -> StateDict:
    """Multiply every pre-norm gain into the input columns of the linears it feeds, then set the gain to 1.

    ``W @ (g * n) == (W * g) @ n``, so the function is unchanged while the gains, a favourite lineage
    signal, become all ones. The folding is :func:`lmsurgeon.arch.fold.fold_gains` (final norm included); a
    head tied to the embeddings cannot be folded alone and is refused. Tensors keep their dtype.
    """
    arrays = {name: tensor.detach().cpu().double().numpy() for name, tensor in sd.items()}
    folded = fold_gains(arrays, layout, include_final_norm=True)
    return {name: torch.from_numpy(folded[name]).to(tensor.dtype).to(tensor.device) for name, tensor in sd.items()}


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
    family = layout.family
    if not family.foldable_norms():
        raise LmsurgeonError(f"the {family.name} family has no foldable gains: a rotation would change its function")
    out: StateDict = {}
    for name, tensor in sd.items():
        site = site_of(layout, name)
        if site.is_buffer:
            out[name] = tensor.clone()
            continue
        spec = family.spec(site.role)
        if spec.is_norm and HIDDEN in site.axes:
            if spec.kind != "rms" or site.is_bias:
                raise LmsurgeonError(f"{name!r} belongs to a {spec.kind} norm, which does not commute with a rotation")
            if not torch.all(tensor == tensor.reshape(-1)[0]):
                raise LmsurgeonError(f"{name!r} is not a uniform gain: fold the norm gains before rotating")
            out[name] = tensor.clone()
            continue
        result = tensor
        for axis, label in enumerate(site.axes):
            if label == HIDDEN:
                moved = result.movedim(axis, -1)
                result = (moved.double() @ Q.T.to(moved.device)).to(tensor.dtype).movedim(-1, axis)
        out[name] = result.clone() if result is tensor else result.contiguous()
    return out


# ---------------------------------------------------------------------------------------------- pruning


def prune_state_dict(sd: Mapping[str, torch.Tensor], layout: Layout, drop: Iterable[int], n_layers: int) -> StateDict:
    """Remove layers ``drop`` and renumber the rest 0..n-1 in order (``layers.5.`` becomes ``layers.4.``)."""
    dropped = sorted(set(drop))
    if not dropped or dropped[0] < 0 or dropped[-1] >= n_layers or len(dropped) >= n_layers:
        raise LmsurgeonError(f"cannot drop layers {dropped} from a {n_layers}-layer model")
    new_index = {old: new for new, old in enumerate(i for i in range(n_layers) if i not in dropped)}
    layer_start = len(layout.prefix + layout.family.layer_prefix.split("{i}")[0])
    out: StateDict = {}
    for name, tensor in sd.items():
        old = layout.layer_of(name)
        if old is None:
            out[name] = tensor.clone()
        elif old in new_index:
            out[f"{name[:layer_start]}{new_index[old]}{name[layer_start + len(str(old)) :]}"] = tensor.clone()
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


def permute_model(model, seed: int, heads: bool = False):
    """A function-identical copy with residual dims and MLP units randomly permuted; also those permutations.

    With ``heads`` each layer's attention heads are permuted as well (drawn from ``seed`` after the others, so
    the residual and MLP permutations are the same either way).
    """
    sd = state_dict_of(model)
    layout = layout_for(model, sd)
    perm_d, perm_units = random_permutations(sd, layout, seed)
    perm_heads = random_head_permutations(layout, seed + 1) if heads else None
    permuted = permute_state_dict(sd, layout, perm_d, perm_units, perm_heads=perm_heads)
    return model_from_state_dict(model, permuted), (perm_d, perm_units)


def fold_model(model):
    """A function-identical copy whose pre-norm gains are all 1 (folded into the linears they feed).

    A model with a tied lm_head is refused (the final norm would have to be folded into the embeddings too).
    """
    sd = state_dict_of(model)
    return model_from_state_dict(model, fold_norm_gains(sd, layout_for(model, sd)))


def rotate_model(model, seed: int):
    """A function-identical copy with gains folded and the residual stream rotated by a random orthogonal Q."""
    layout = layout_for(model)
    sd = fold_norm_gains(state_dict_of(model), layout)
    d = axis_sizes(sd, layout)[HIDDEN]
    return model_from_state_dict(model, rotate_state_dict(sd, layout, random_orthogonal(d, seed)))


def prune_model(model, drop: Iterable[int]):
    """A copy without layers ``drop``: renumbered tensors and a config with the new layer count."""
    sd = state_dict_of(model)
    layout = layout_for(model, sd)
    dropped = sorted(set(drop))
    keys = layout.family.config_keys["n_layers"]
    n_key = next(k for k in ([keys] if isinstance(keys, str) else keys) if hasattr(model.config, k))
    n_layers = getattr(model.config, n_key)
    sd = prune_state_dict(sd, layout, dropped, n_layers)
    config = copy.deepcopy(model.config)
    setattr(config, n_key, n_layers - len(dropped))
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in dropped]
    return model_from_state_dict(model, sd, config)


# ---------------------------------------------------------------------------------------------- checks


@torch.no_grad()
def logit_discrepancy(model_a, model_b, input_ids: torch.Tensor, new_ids: torch.Tensor | None = None) -> float:
    """``max|a - b| / max|a|`` over the logits both models give for ``input_ids``: 0 for identical function.

    With ``new_ids`` (old token id → id in ``model_b``'s permuted vocabulary, methods.md §A5) ``model_b`` reads
    ``new_ids[input_ids]`` and its logit for old token t is read at column ``new_ids[t]``.
    """
    model_a.eval()
    model_b.eval()
    a = model_a(input_ids=input_ids).logits.double()
    ids_b = input_ids if new_ids is None else new_ids.to(input_ids.device)[input_ids]
    b = model_b(input_ids=ids_b.to(next(model_b.parameters()).device)).logits.double().to(a.device)
    if new_ids is not None:
        b = b[..., new_ids.to(b.device)]
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def moved_fraction(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor, the fraction of elements whose value changed (1.0 means every weight moved)."""
    if before.keys() != after.keys():
        raise LmsurgeonError("the two state dicts name different tensors")
    return {
        name: float((before[name] != after[name].to(before[name].device)).double().mean())
        for name in before
        if before[name].is_floating_point()
    }
