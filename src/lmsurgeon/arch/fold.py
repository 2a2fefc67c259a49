"""γ-folding (methods.md §L3): move a pre-norm's gain into the linear maps it feeds, keeping the function.

For positive u: W' = W·diag(γ ⊘ u), γ' = u; LayerNorm also c' = c + Wβ, β' = 0. u = 1 erases the gains;
u = another model's gains forges a perfect naive match. Which norms fold into which maps is family data (a
pre-norm's ``feeds``), so this one implementation serves the lineage γ-fold demonstration, the zoo's
γ-folded model and the tests.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lmsurgeon.arch.layout import Layout
from lmsurgeon.errors import LmsurgeonError

#: A norm site: (role, layer), layer None for a norm outside the layers (the final norm).
NormSite = tuple[str, int | None]


def fold_gains(
    state: Mapping[str, np.ndarray],
    layout: Layout,
    u: Mapping[NormSite, np.ndarray] | None = None,
    *,
    include_final_norm: bool = False,
) -> dict[str, np.ndarray]:
    """A float64 copy of ``state`` (checkpoint name → array) with every foldable gain folded into its consumers.

    ``layout`` names the tensors (bind it to ``state`` with :class:`~lmsurgeon.arch.ArraySource`, or to the
    checkpoint ``state`` came from); gains, weights and biases are all read from ``state``. ``u[(role, layer)]``
    gives the new effective gain (default all ones). Per-layer pre-norms are folded; the final norm too when
    ``include_final_norm`` (refused when the head is tied to the embeddings, which other inputs also read).
    A fused consumer (GPT-2's c_attn) is scaled once; every routed expert of a layer is scaled. The stored
    value respects the family's offset (Gemma stores γ' − 1).
    """
    family = layout.family
    if not family.foldable_norms():
        raise LmsurgeonError(f"the {family.name} family declares no foldable gains (only pre-norm families have them)")
    out = {name: np.array(value, dtype=np.float64, copy=True) for name, value in state.items()}
    for role in family.foldable_norms():
        per_layer = family.is_layer_role(role)
        if not per_layer and not include_final_norm:
            continue
        for layer in layout.layers if per_layer else [None]:
            gain_name = layout.name(role, layer)
            if gain_name is not None:
                new = None if u is None or (role, layer) not in u else np.asarray(u[(role, layer)], dtype=np.float64)
                _fold_one(out, layout, role, layer, gain_name, new)
    return out


def _fold_one(
    out: dict[str, np.ndarray], layout: Layout, role: str, layer: int | None, gain_name: str, new: np.ndarray | None
) -> None:
    """Fold one norm's gain (and LayerNorm bias) into its consumers in ``out``, in place."""
    family = layout.family
    gain = out[gain_name] + family.norm_offset
    bias_name = layout.bias_name(role, layer)
    beta = out[bias_name] if bias_name is not None else None
    new = np.ones_like(gain) if new is None else new
    if new.shape != gain.shape or np.any(new <= 0):
        raise LmsurgeonError("fold target gains must be positive and shaped like the gain", f"{role} layer {layer}")
    scale = gain / new
    done: set[str] = set()
    for consumer in family.spec(role).feeds:
        spec = family.spec(consumer)
        if layout.tied and spec.tied_to is not None:
            raise LmsurgeonError(
                f"{consumer} is tied to {spec.tied_to}; untie the weights before folding the {role} gain into it",
                layout.handle.name,
            )
        experts = layout.experts(layer, consumer) if consumer.startswith("experts.") and layer is not None else [None]
        for expert in experts:
            name = layout.name(consumer, layer, expert)
            if name is None or name in done:
                continue
            done.add(name)
            if name not in out:
                raise LmsurgeonError(
                    f"{name!r} (fed by {role}) is not among the tensors to fold into", layout.handle.name
                )
            conv = spec.layout == "conv1d"
            W = out[name]
            if beta is not None:
                consumer_bias = layout.bias_name(consumer, layer, expert)
                if consumer_bias is None:
                    raise LmsurgeonError("cannot fold a LayerNorm bias into a consumer without bias", name)
                out[consumer_bias] = out[consumer_bias] + (beta @ W if conv else W @ beta)
            out[name] = W * scale[:, None] if conv else W * scale[None, :]
    out[gain_name] = new - family.norm_offset
    if bias_name is not None:
        out[bias_name] = np.zeros_like(out[bias_name])
