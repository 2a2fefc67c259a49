"""The γ-fold demonstration (methods.md §L3): fold a loaded model's gains and show its logits do not move.

The folding itself is :func:`lmsurgeon.arch.fold.fold_gains` (family data says which norm feeds which maps);
it is re-exported here for callers that import it from the lineage package.
"""

from __future__ import annotations

import numpy as np

from lmsurgeon.arch.fold import fold_gains
from lmsurgeon.errors import LmsurgeonError

__all__ = ["MAX_DEMO_PARAMS", "fold_gains", "fold_logit_change"]

MAX_DEMO_PARAMS = 300_000_000


def fold_logit_change(layout, text: str, max_tokens: int = 64) -> dict:
    """Fold every foldable gain of a loaded model to u = 1 and measure the largest logit change on ``text``.

    Shows that the erased gains carried no function: the change is float32 rounding. Skipped (with a reason)
    for post-norm models, models without a tokenizer, models over ``MAX_DEMO_PARAMS`` parameters, and models
    whose loaded form names a fed tensor differently from the file (experts stored fused), which cannot be folded.
    """
    import torch

    h = layout.handle
    n_params = sum(int(np.prod(i.shape)) for i in h.header().values())
    if n_params > MAX_DEMO_PARAMS or h.tokenizer is None:
        return {
            "applies": False,
            "reason": "model too large to load for the demo" if n_params > MAX_DEMO_PARAMS else "no tokenizer.json",
        }
    try:
        model = h.load_model("causal-lm", dtype=torch.float32)
    except LmsurgeonError as e:
        return {"applies": False, "reason": f"cannot load: {e}"}
    ids = torch.tensor([h.tokenizer.encode(text).ids[:max_tokens]])
    sd = model.state_dict()
    names = {n for n in h.names()}
    state = {k: v.detach().double().numpy() for k, v in sd.items() if k in names}
    try:
        folded = fold_gains(state, layout)
    except LmsurgeonError as e:  # e.g. experts the loaded model stores fused, under other names than the file
        return {"applies": False, "reason": f"cannot fold: {e}"}
    with torch.no_grad():
        before = model(input_ids=ids).logits.double()
        model.load_state_dict({k: torch.from_numpy(v).float() for k, v in folded.items()}, strict=False)
        after = model(input_ids=ids).logits.double()
    return {
        "applies": True,
        "max_abs_logit_change": float((after - before).abs().max()),
        "max_abs_logit": float(before.abs().max()),
        "n_tokens": int(ids.shape[1]),
    }
