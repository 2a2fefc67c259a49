"""The adversarial zoo family (methods.md §A7–§A11): models made to evade a lineage test or to frame an innocent one.

A launderer re-releases someone else's model after rewriting its weights; an accuser pastes a few of a model's
tensors into an independent one to make it look derived. Both happen in public disputes, so the zoo carries one
model per trick, made from ``gpt2-bpe`` (LayerNorm, tied head) and from ``llama-sp`` (RMSNorm, rotary attention,
grouped-query heads), each with its ground truth in ``zoo.json``:

* derived: ``laundered`` (every function-preserving map of §A1–§A5, permuted tokenizer included), ``upscaled``
  (depth up-scaling, §A7), ``pruned`` (width pruning by importance, §A8), ``reembedded`` (§A9) and, for Llama,
  ``moe`` (MoE upcycling, §A10);
* independent: ``gains-pasted`` and ``embed-pasted`` (§A11), made from an independent model of the base's shape.

The model-level transforms here (:func:`upscale_depth`, :func:`prune_width`, :func:`reinit_embeddings`,
:func:`paste_tensors`, :func:`upcycle_moe`) take a transformers model and return a new one with a
:class:`~lmsurgeon.zoo.launder.Step` recording what they did; the *case* functions (one per case, in
:data:`CASES`) are what ``zoo build`` calls: they take the build and the model's recipe, apply the transforms,
check the function-preserving part on logits (the build refuses one that is not, relative error above
``FUNCTION_TOLERANCE``), train, and return the model with its manifest facts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.zoo.launder import (
    AttentionWeights,
    MlpWeights,
    Step,
    blocks,
    family_of,
    inverse_permutation,
    launder,
    n_layers,
    read_attention,
    read_mlp,
    residual_axes,
    write_attention,
    write_mlp,
)
from lmsurgeon.zoo.transforms import layout_for, site_of, state_dict_of

if TYPE_CHECKING:
    from lmsurgeon.zoo.build import _Build
    from lmsurgeon.zoo.recipe import ModelRecipe

KEEP_FRACTION = 0.75  # width pruning keeps this share of residual dims and MLP units (Minitron prunes ~25-50 %)
MOE_EXPERTS = 4  # MoE upcycling: experts per layer
MOE_TOP_K = 2  # ... and experts per token
CALIBRATION_WINDOWS = 8  # training windows the pruning importance is measured on
_LAYER_NAME = re.compile(r"^(.*?\.(?:h|layers)\.)(\d+)(\..*)$")


# ------------------------------------------------------------------------------------------ depth up-scaling


def upscaled_layers(n: int) -> list[int]:
    """SOLAR's layer order for an ``n``-layer stack: layers ``0..n-m-1`` then ``m..n-1`` with ``m = n // 4`` trimmed
    at the seam (32 → 24 + 24 = 48 layers for Mistral-7B; 2 → 4 and 4 → 6 in the zoo)."""
    m = n // 4
    return [*range(n - m), *range(m, n)]


def upscale_depth(model) -> tuple[Any, Step]:
    """A deeper copy made of two overlapping copies of the layer stack (methods.md §A7), not function-preserving.

    New layer j is a copy of old layer ``source[j]`` (:func:`upscaled_layers`); embeddings, final norm and head
    are kept. Truth: ``source`` [new layers].
    """
    source = upscaled_layers(n_layers(model))
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(source)  # GPT-2's n_layer is an alias of this attribute
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in source]
    old = state_dict_of(model)
    deeper = type(model)(config).to(next(model.parameters()).device)
    new_state = {}
    for name in deeper.state_dict():
        match = _LAYER_NAME.match(name)
        old_name = name if match is None else f"{match[1]}{source[int(match[2])]}{match[3]}"
        new_state[name] = old[old_name].clone()
    deeper.load_state_dict(new_state, strict=True)
    return deeper.eval(), Step("upscale_depth", None, {"source": torch.tensor(source)})


# ------------------------------------------------------------------------------------------ width pruning


def _importance_modules(block, family: str) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    """(attention output projection, MLP down projection, the block's norms) of one block."""
    if family == "gpt2":
        return block.attn.c_proj, block.mlp.c_proj, [block.ln_1, block.ln_2]
    return block.self_attn.o_proj, block.mlp.down_proj, [block.input_layernorm, block.post_attention_layernorm]


@torch.no_grad()
def importance(model, calibration: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Minitron's activation importance on ``calibration`` ids [B, T] (methods.md §A8).

    Residual channel i: mean |n(x)_i| over tokens and every in-layer norm's output; query head h of a layer: mean
    L2 norm of its attention output (the input block of the output projection); MLP unit j: mean |act_j| (the
    input of the down projection). Returns (hidden [d], heads per layer [n_heads], units per layer [f]).
    """
    family = family_of(model)
    hidden = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    heads: list[torch.Tensor] = []
    units: list[torch.Tensor] = []
    handles = []

    def add_hidden(_module, _args, output):
        nonlocal hidden
        hidden = hidden + output.detach().abs().double().mean(dim=(0, 1)).cpu()

    for block in blocks(model):
        attn_out, down, norms = _importance_modules(block, family)
        n_heads = model.config.num_attention_heads

        def on_attn(_module, args, n_heads=n_heads):
            z = args[0].detach().double()
            heads.append(z.unflatten(-1, (n_heads, -1)).norm(dim=-1).mean(dim=(0, 1)).cpu())

        def on_down(_module, args):
            units.append(args[0].detach().abs().double().mean(dim=(0, 1)).cpu())

        handles += [attn_out.register_forward_pre_hook(on_attn), down.register_forward_pre_hook(on_down)]
        handles += [norm.register_forward_hook(add_hidden) for norm in norms]
    try:
        model.eval()
        model(input_ids=calibration.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return hidden, heads, units


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in increasing index order (kept channels stay in their order)."""
    return torch.sort(torch.topk(scores, k).indices).values


def _head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def prune_width(model, calibration: torch.Tensor) -> tuple[Any, Step]:
    """A narrower copy keeping the most important residual dims, heads and MLP units (methods.md §A8).

    Llama keeps ``KEEP_FRACTION`` of the residual dims and MLP units and drops the least important query head of
    every key/value group (the groups stay, so does the head size); GPT-2's head size is d / n_heads, so it drops
    its least important heads and keeps as many residual dims as the remaining heads span. Not
    function-preserving: the zoo retrains it. Truth: ``hidden`` [d'] kept residual dims, ``heads`` [layers, n']
    kept query heads, ``units`` [layers, f'] kept MLP units (old indices).
    """
    family = family_of(model)
    config = copy.deepcopy(model.config)
    hidden_scores, head_scores, unit_scores = importance(model, calibration)
    aw0 = read_attention(model, 0)
    if family == "gpt2":
        n_heads = max(1, (aw0.n_heads * 3) // 4)
        d_new = n_heads * aw0.head_dim
        config.n_embd, config.n_head = d_new, n_heads
    else:
        group = aw0.group_size
        if group < 2:
            raise LmsurgeonError("width pruning of heads needs grouped-query attention with ≥ 2 query heads per group")
        n_heads = aw0.n_kv * (group - 1)
        d_new = int(round(config.hidden_size * KEEP_FRACTION))
        config.hidden_size, config.num_attention_heads = d_new, n_heads
    f_new = int(round(read_mlp(model, 0).W_up.shape[1] * KEEP_FRACTION))
    if family == "gpt2":
        config.n_inner = f_new
    else:
        config.intermediate_size = f_new
    keep_d = _top(hidden_scores, d_new)
    small = type(model)(config).to(next(model.parameters()).device)
    with torch.no_grad():
        for param in small.parameters():
            param.fill_(float("nan"))
    axes = residual_axes(model)
    targets = dict(small.named_parameters())
    for name, param in model.named_parameters():
        if name not in targets:
            continue
        value = param.detach()
        if name in axes:
            value = value.index_select(axes[name], keep_d.to(value.device))
        if value.shape == targets[name].shape:
            with torch.no_grad():
                targets[name].copy_(value)
    kept_heads, kept_units = [], []
    for layer in range(n_layers(model)):
        aw = read_attention(model, layer)
        if family == "gpt2":
            heads = _top(head_scores[layer], n_heads)
            kv_heads = heads
        else:  # per group, drop its least important query head
            g = aw.group_size
            heads = torch.cat(
                [kv * g + _top(head_scores[layer][kv * g : (kv + 1) * g], g - 1) for kv in range(aw.n_kv)]
            )
            kv_heads = torch.arange(aw.n_kv)
        q_cols, kv_cols = _head_columns(heads, aw.head_dim), _head_columns(kv_heads, aw.head_dim)
        write_attention(
            small,
            layer,
            AttentionWeights(
                aw.W_q[keep_d][:, q_cols],
                aw.W_k[keep_d][:, kv_cols],
                aw.W_v[keep_d][:, kv_cols],
                aw.W_o[q_cols][:, keep_d],
                None if aw.b_q is None else aw.b_q[q_cols],
                None if aw.b_k is None else aw.b_k[kv_cols],
                None if aw.b_v is None else aw.b_v[kv_cols],
                len(heads),
                len(kv_heads),
                aw.head_dim,
                aw.rotary,
            ),
        )
        mw = read_mlp(model, layer)
        units = _top(unit_scores[layer], f_new)
        write_mlp(
            small,
            layer,
            MlpWeights(
                mw.W_up[keep_d][:, units],
                None if mw.W_gate is None else mw.W_gate[keep_d][:, units],
                mw.W_down[units][:, keep_d],
                None if mw.b_up is None else mw.b_up[units],
                None if mw.b_gate is None else mw.b_gate[units],
                mw.activation,
            ),
        )
        kept_heads.append(heads)
        kept_units.append(units)
    unset = [name for name, p in small.named_parameters() if torch.isnan(p).any()]
    if unset:
        raise LmsurgeonError(f"width pruning left {len(unset)} tensors unset ({unset[0]}, ...)")
    truth = {"hidden": keep_d, "heads": torch.stack(kept_heads), "units": torch.stack(kept_units)}
    return small.eval(), Step("prune_width", None, truth)


# ------------------------------------------------------------------------------------------ re-embedding


def reinit_embeddings(model, seed: int) -> tuple[Any, Step]:
    """A copy whose token embedding and head are drawn afresh, N(0, initializer_range²) (methods.md §A9).

    A tied head is re-drawn with its embedding; GPT-2's position table is kept (it is part of the body).
    Truth: ``tied`` (bool).
    """
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    params = {id(p): p for p in (out.get_input_embeddings().weight, out.get_output_embeddings().weight)}
    with torch.no_grad():
        for param in params.values():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * std)
    return out.eval(), Step("reinit_embeddings", seed, {"tied": len(params) == 1})


def embedding_parameters(model) -> list[nn.Parameter]:
    """The token embedding and the head (once when tied): what re-embedding trains while the body is frozen."""
    return list(
        {id(p): p for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}.values()
    )


# ------------------------------------------------------------------------------------------ pasting


PASTE_WHAT = ("norm_gains", "embedding")


def paste_tensors(target, donor, what: str) -> tuple[Any, Step]:
    """A copy of ``target`` with ``donor``'s norm gains (every norm's gain, not its bias) or its token embedding
    pasted in (methods.md §A11): the accuser's forgery. Both models must have the same shapes; which tensors
    are which comes from the family file (roles), not from names. Truth: ``names`` pasted."""
    if what not in PASTE_WHAT:
        raise LmsurgeonError(f"cannot paste {what!r}; choose one of {', '.join(PASTE_WHAT)}")
    out = copy.deepcopy(target)
    state = state_dict_of(out)
    layout = layout_for(out, state)
    source = donor.state_dict()
    pasted = []
    for name, tensor in state.items():
        site = site_of(layout, name)
        if site.is_buffer or site.is_bias:
            continue
        spec = layout.family.spec(site.role)
        if (what == "norm_gains" and spec.is_norm) or (what == "embedding" and site.role == "embed"):
            if source[name].shape != tensor.shape:
                raise LmsurgeonError(f"cannot paste {name!r}: {tuple(source[name].shape)} vs {tuple(tensor.shape)}")
            with torch.no_grad():
                tensor.copy_(source[name])
            pasted.append(name)
    if not pasted:
        raise LmsurgeonError(f"no {what} tensors to paste in a {layout.family.name} model")
    return out.eval(), Step(f"paste_{what}", None, {"names": pasted})


# ------------------------------------------------------------------------------------------ MoE upcycling


def moe_config(config, n_experts: int, top_k: int):
    """The Mixtral config of a Llama config: same attention, rotary and norms, ``n_experts`` experts of the dense
    MLP's width, ``top_k`` per token."""
    from transformers import MixtralConfig

    settings = {
        k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")
    }
    settings.update(
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
        sliding_window=None,
        output_router_logits=False,
        architectures=["MixtralForCausalLM"],
    )
    return MixtralConfig(**settings)


def upcycle_moe(model, seed: int, n_experts: int = MOE_EXPERTS, top_k: int = MOE_TOP_K) -> tuple[Any, Step]:
    """A Mixtral copy of a Llama model whose every expert is the dense MLP (methods.md §A10).

    Mixtral renormalises the top-k router weights to sum to one, so identical experts give back the dense MLP
    whatever the router says: the copy is function-preserving; the new router is N(0, initializer_range²).
    Training then differentiates the experts. Truth: ``router`` [layers, E, d] (as a hash).
    """
    from transformers import MixtralForCausalLM

    if family_of(model) != "llama":
        raise LmsurgeonError("MoE upcycling makes a Mixtral from a Llama model")
    moe = MixtralForCausalLM(moe_config(model.config, n_experts, top_k)).to(next(model.parameters()).device)
    dense = state_dict_of(model)
    generator = torch.Generator().manual_seed(seed)
    routers = []
    state = {}
    for name, tensor in moe.state_dict().items():
        match = _LAYER_NAME.match(name)
        if match is not None and match[3].startswith(".mlp."):
            prefix = f"{match[1]}{match[2]}.mlp."
            if name.endswith("experts.gate_up_proj"):
                fused = torch.cat([dense[prefix + "gate_proj.weight"], dense[prefix + "up_proj.weight"]])
                state[name] = fused.expand(n_experts, *fused.shape).clone()
            elif name.endswith("experts.down_proj"):
                down = dense[prefix + "down_proj.weight"]
                state[name] = down.expand(n_experts, *down.shape).clone()
            elif name.endswith("gate.weight"):
                router = torch.randn(tensor.shape, generator=generator) * model.config.initializer_range
                routers.append(router)
                state[name] = router.to(tensor.dtype)
            else:
                raise LmsurgeonError(f"MoE upcycling does not know {name!r}")
        else:
            state[name] = dense[name].clone()
    moe.load_state_dict(state, strict=True)
    return moe.eval(), Step("upcycle_moe", seed, {"experts": n_experts, "top_k": top_k, "router": torch.stack(routers)})


# ------------------------------------------------------------------------------------------ the cases


CaseResult = tuple[torch.nn.Module, dict]


def _facts(build: _Build, recipe: ModelRecipe, model, initial: float, steps: list[Step], check: float | None) -> dict:
    """The manifest facts every adversarial entry carries: kind, case, ground truth and what was applied."""
    return {
        "kind": "adversarial",
        "case": recipe.case,
        "truth": recipe.truth,
        "truth_relative_to": recipe.relative_to,
        "derived_from": recipe.parent,
        "applied": [step.manifest() for step in steps],
        "function_check": check,
        "initial_val_ppl": initial,
        "intermediate_size": _intermediate(model),
    }


def _intermediate(model) -> int:
    config = model.config
    return int(getattr(config, "n_inner", None) or getattr(config, "intermediate_size", None) or 4 * config.hidden_size)


def independent(build: _Build, recipe: ModelRecipe) -> CaseResult:
    """An independent reference of the base's shape: initialised from the recipe's own seed and trained from
    scratch on the same data, the model the false accusations start from."""
    model = build.fresh(recipe)
    initial = build.val_ppl(model, recipe)
    build.train(recipe, model)
    return model, _facts(build, recipe, model, initial, [], None)


def laundered(build: _Build, recipe: ModelRecipe) -> CaseResult:
    """Every function-preserving map of §A1–§A5 (:func:`lmsurgeon.zoo.launder.launder`), its own permuted
    tokenizer saved beside it, checked on logits, then trained on the permuted token stream."""
    base = build.model(recipe.parent)
    tokenizer = build.raw_tokenizer(recipe.tokenizer)
    model, new_tokenizer, steps = launder(base, recipe.seed, tokenizer)
    new_ids = inverse_permutation(steps[-1].truth["perm"])
    build.set_vocabulary(recipe, new_tokenizer, new_ids)
    check = build.check_same_function(recipe, base, model, new_ids)
    initial = build.val_ppl(model, recipe)
    build.train(recipe, model)
    eos_id = int(new_ids[build.tokenizers[recipe.tokenizer]["eos_id"]])
    return model, {**_facts(build, recipe, model, initial, steps, check), "own_tokenizer": True, "eos_id": eos_id}


def upscaled(build: _Build, recipe: ModelRecipe) -> CaseResult:
    """Depth up-scaling (§A7), then trained."""
    model, step = upscale_depth(build.model(recipe.parent))
    initial = build.val_ppl(model, recipe)
    build.train(recipe, model)
    return model, _facts(build, recipe, model, initial, [step], None)


def pruned(build: _Build, recipe: ModelRecipe) -> CaseResult:
    """Width pruning by activation importance on training windows (§A8), then retrained."""
    calibration = build.windows(recipe, "train", CALIBRATION_WINDOWS)
    model, step = prune_width(build.model(recipe.parent), calibration)
    initial = build.val_ppl(model, recipe)
    build.train(recipe, model)
    return model, _facts(build, recipe, model, initial, [step], None)


def reembedded(build: _Build, recipe: ModelRecipe) -> CaseResult:
    """Embedding and head re-drawn (§A9), trained with the body frozen for the recipe's steps, then every
    weight for a quarter of them."""
    model, step = reinit_embeddings(build.model(recipe.parent), recipe.seed)
    initial = build.val_ppl(model, recipe)
    trainable = {id(p) for p in embedding_parameters(model)}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)
    build.train(recipe, model)
    for param in model.parameters():
        param.requires_grad_(True)
    unfrozen = max(1, recipe.steps // 4)
    build.train(recipe, model, steps=unfrozen, seed_offset=1)
    facts = _facts(build, recipe, model, initial, [step], None)
    return model, {**facts, "training_steps": recipe.steps + unfrozen, "frozen_body_steps": recipe.steps}


def gains_pasted(build: _Build, recipe: ModelRecipe) -> CaseResult:
    """An independent model with the base's norm gains pasted in (§A11); not trained, so the forged gains are
    exactly the base's."""
    independent = build.model(recipe.parent)
    model, step = paste_tensors(independent, build.model(recipe.relative_to), "norm_gains")
    initial = build.val_ppl(model, recipe)
    return model, {**_facts(build, recipe, model, initial, [step], None), "training_steps": 0}


def embed_pasted(build: _Build, recipe: ModelRecipe) -> CaseResult:
    """An independent model with the base's token embedding pasted in (§A11), then trained on."""
    model, step = paste_tensors(build.model(recipe.parent), build.model(recipe.relative_to), "embedding")
    initial = build.val_ppl(model, recipe)
    build.train(recipe, model)
    return model, _facts(build, recipe, model, initial, [step], None)


def moe_upcycled(build: _Build, recipe: ModelRecipe) -> CaseResult:
    """MoE upcycling (§A10), checked function-preserving on logits, then trained."""
    base = build.model(recipe.parent)
    model, step = upcycle_moe(base, recipe.seed)
    check = build.check_same_function(recipe, base, model)
    initial = build.val_ppl(model, recipe)
    build.train(recipe, model)
    return model, _facts(build, recipe, model, initial, [step], check)


CASES: dict[str, Callable[[_Build, ModelRecipe], CaseResult]] = {
    "independent": independent,
    "laundered": laundered,
    "upscaled": upscaled,
    "pruned": pruned,
    "reembedded": reembedded,
    "gains-pasted": gains_pasted,
    "embed-pasted": embed_pasted,
    "moe": moe_upcycled,
}
