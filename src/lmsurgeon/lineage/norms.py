"""Per-layer norm vectors of one model, read through the registry (only the norm tensors are touched)."""

from __future__ import annotations

import numpy as np


def norm_vectors(layout) -> dict[str, dict[int | None, np.ndarray]]:
    """{"attn_norm": {layer: gain}, "attn_norm.bias": {layer: bias}, "final_norm": {None: gain}, ...}.

    Gains are effective (Gemma's 1 + w); biases appear under ``<role>.bias`` when the norm has one.
    """
    out: dict[str, dict[int | None, np.ndarray]] = {}
    for role, layer in layout.norms_present():
        n = layout.norm(role, layer)
        out.setdefault(role, {})[layer] = n.gain
        if n.bias is not None:
            out.setdefault(f"{role}.bias", {})[layer] = n.bias
    return out


def is_pre_norm(layout) -> bool:
    """Pre-norm blocks feed norm outputs only to linear maps, which is what makes γ-folding possible."""
    return any(layout.family.is_layer_role(r) for r in layout.family.foldable_norms())
