"""Capture every layer's input and call arguments in one forward, then replay blocks from the cache.

methods.md §S8: δ(i, i+1) needs h_i, h_{i+2} and block i applied to block i+1's output on h_i. Replaying blocks with
their own captured arguments (the mask the model built, rotary cos/sin, position ids) gives the exchanged order
in O(L) block calls instead of one whole forward per pair. A block keeps its own arguments wherever it is moved
(its mask type, its rotary set), which is what a checkpoint written by ``--apply`` does (layer_types permuted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmsurgeon.arch import find_module

_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


@dataclass
class Capture:
    """h[i]: input of layer i, h[L]: output of the last layer; args/kwargs: what each layer was called with."""

    h: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    output: object = None  # the model's own output of the captured forward (logits for an LM)


def first(out):
    """transformers v5 layers return a tensor, older ones a tuple whose first item is the hidden state."""
    return out[0] if isinstance(out, (tuple, list)) else out


def capture(model, layers_paths: list[str], **inputs) -> Capture:
    """Run one forward with pre-hooks on every layer of ``find_module(model, layers_paths)``; return the cache.

    The forward runs with ``use_cache=False`` where the model takes it: a block called with a cache writes its
    ``layer_idx`` slot, and a replayed block must not read anyone else's. A model that captures itself
    (:class:`lmsurgeon.swap.streamed.StreamedSwapModel`, whose weights are streamed) is asked to.
    """
    if hasattr(model, "capture") and not isinstance(model, torch.nn.Module):
        return model.capture(**inputs)
    layers = find_module(model, layers_paths)
    cap = Capture()
    handles = []

    def pre_hook(module, args, kwargs):
        if "hidden_states" in kwargs:
            cap.h.append(kwargs["hidden_states"].detach())
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            cap.args.append(tuple(args))
        else:
            cap.h.append(args[0].detach())
            rest = dict(kwargs)
            cap.args.append(tuple(args[1:]))
        for key in _CACHE_KWARGS:
            if key in rest:
                rest[key] = None
        if "use_cache" in rest:
            rest["use_cache"] = False
        cap.kwargs.append(rest)

    def last_hook(module, args, kwargs, out):
        cap.h.append(first(out).detach())

    for layer in layers:
        handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(last_hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            cap.output = model(**inputs, use_cache=False) if _accepts_cache(model) else model(**inputs)
    finally:
        for hd in handles:
            hd.remove()
    return cap


def _accepts_cache(model) -> bool:
    return getattr(model.config, "is_decoder", False) or hasattr(model.config, "use_cache")


def call_block(layers, j: int, x: torch.Tensor, cap: Capture) -> torch.Tensor:
    """Apply block j to x with block j's own captured arguments (its mask type and rotary set)."""
    with torch.inference_mode():
        return first(layers[j](x, *cap.args[j], **cap.kwargs[j]))


def swapped_output(layers, i: int, cap: Capture, inner: torch.Tensor | None = None) -> torch.Tensor:
    """L_i(L_{i+1}(h_i)): the exchanged pair's output on the real input h_i (``inner`` = L_{i+1}(h_i) if known)."""
    if inner is None:
        inner = call_block(layers, i + 1, cap.h[i], cap)
    return call_block(layers, i, inner, cap)


def continue_from(layers, start: int, x: torch.Tensor, cap: Capture) -> torch.Tensor:
    """Run blocks start…L−1 on x (each with its own arguments): the rest of the model after a rewired prefix."""
    for j in range(start, len(layers)):
        x = call_block(layers, j, x, cap)
    return x


def delta_from_cache(layers, cap: Capture, mask: torch.Tensor | None = None) -> list[float]:
    """δ(i, i+1) (eq. 2) for every adjacent pair: mean over real tokens of ‖h_{i+2} − L_i(L_{i+1}(h_i))‖/‖h_i‖."""
    deltas = []
    for i in range(len(layers) - 1):
        ratio = token_delta(cap.h[i], cap.h[i + 2], swapped_output(layers, i, cap))
        deltas.append(float(ratio[mask.bool()].mean() if mask is not None else ratio.mean()))
    return deltas


def token_delta(h_i: torch.Tensor, normal: torch.Tensor, swapped: torch.Tensor) -> torch.Tensor:
    """Per token ‖normal − swapped‖₂ / ‖h_i‖₂ in float32 or wider (eq. 2 inside the expectation); [B, T]."""
    wide = torch.float64 if h_i.dtype == torch.float64 else torch.float32
    return (normal.to(wide) - swapped.to(wide)).norm(dim=-1) / h_i.to(wide).norm(dim=-1)
