"""γ-folding (spec §3): move a pre-norm's gain into the linear maps it feeds, keeping the function.

For positive u: W' = W·diag(γ ⊘ u), γ' = u; LayerNorm also c' = c + Wβ, β' = 0. u = 1 erases the gains;
u = another model's gains forges a perfect naive match. Used by the γ-fold demonstration and by the tests.
"""

from __future__ import annotations

import numpy as np

from lmsurgeon.errors import LmsurgeonError


def fold_gains(state: dict[str, np.ndarray], layout, u: dict | None = None) -> dict[str, np.ndarray]:
    """A copy of ``state`` (name → float array, checkpoint names) with every foldable per-layer gain folded.

    ``u[(role, layer)]`` gives the new gain (default all ones). Only pre-norms with ``feeds`` are folded; fused
    consumers (GPT-2 c_attn) are scaled once. Offsets (Gemma 1 + w) are respected in the stored value.
    """
    fam = layout.family
    out = {k: np.array(v, dtype=np.float64, copy=True) for k, v in state.items()}
    for role, layer in layout.norms_present():
        spec = fam.spec(role)
        if spec.get("placement", "pre") != "pre" or not spec.get("feeds") or layer is None:
            continue
        norm = layout.norm(role, layer)
        new = np.ones_like(norm.gain) if u is None or (role, layer) not in u else np.asarray(u[(role, layer)], float)
        if np.any(new <= 0):
            raise LmsurgeonError("fold target gains must be positive", f"{role} layer {layer}")
        done: set[str] = set()
        for consumer in spec["feeds"]:
            name = layout.name(consumer, layer)
            if name is None or name in done:
                continue
            done.add(name)
            conv = fam.spec(consumer).get("layout") == "conv1d"
            W = out[name]
            bspec = fam.spec(consumer).get("bias")
            bname = layout._full(consumer, bspec, layer, None) if bspec else None
            if norm.bias is not None:
                shift = norm.bias @ W if conv else W @ norm.bias
                if bname is None or bname not in out:
                    raise LmsurgeonError("cannot fold a LayerNorm bias into a consumer without bias", name)
                out[bname] = out[bname] + shift
            scale = norm.gain / new
            out[name] = W * scale[:, None] if conv else W * scale[None, :]
        out[layout.name(role, layer)] = new - fam.norm_offset
        bias_name = layout._full(role, spec["bias"], layer, None) if spec.get("bias") else None
        if norm.bias is not None and bias_name in out:
            out[bias_name] = np.zeros_like(out[bias_name])
    return out


MAX_DEMO_PARAMS = 300_000_000


def fold_logit_change(layout, text: str, max_tokens: int = 64) -> dict:
    """Fold every foldable gain of a loaded model to u = 1 and measure the largest logit change on ``text``.

    Shows that the erased gains carried no function: the change is float32 rounding. Skipped (with a reason)
    for post-norm models, models without a tokenizer, or models over ``MAX_DEMO_PARAMS`` parameters.
    """
    import torch

    h = layout.handle
    n_params = sum(int(np.prod(i.shape)) for i in h.header().values())
    if n_params > MAX_DEMO_PARAMS or h.tokenizer is None:
        return {"applies": False, "reason": "model too large to load for the demo" if n_params > MAX_DEMO_PARAMS
                else "no tokenizer.json"}
    try:
        model = h.load_model("causal-lm", dtype=torch.float32)
    except LmsurgeonError as e:
        return {"applies": False, "reason": f"cannot load: {e}"}
    ids = torch.tensor([h.tokenizer.encode(text).ids[:max_tokens]])
    sd = model.state_dict()
    names = {n for n in h.names()}
    state = {k: v.detach().double().numpy() for k, v in sd.items() if k in names}
    with torch.no_grad():
        before = model(input_ids=ids).logits.double()
        folded = fold_gains(state, layout)
        model.load_state_dict({k: torch.from_numpy(v).float() for k, v in folded.items()}, strict=False)
        after = model(input_ids=ids).logits.double()
    return {"applies": True, "max_abs_logit_change": float((after - before).abs().max()),
            "max_abs_logit": float(before.abs().max()), "n_tokens": int(ids.shape[1])}
