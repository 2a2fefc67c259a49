"""End-to-end effect of a rewiring (methods.md §S9): from a rewired hidden state, final norm and head → loss and KL.

Only the model's own final norm and head are applied (found via the registry), plus Gemma-2-style final logit
soft-capping when the config asks for it, so ``head_logits(h_L)`` equals the model's logits (tested). Logits are
built in chunks of tokens sized by bytes (:data:`LOGIT_CHUNK_BYTES`): a 50k vocabulary over 8k tokens would
otherwise need 1.6 GB per call, and at GLM-4.5-Air's 151,552 words even 480 tokens make 290 MB of float32
logits, of which a KL step holds five copies at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmsurgeon.arch import find_module
from lmsurgeon.errors import MissingTensor
from lmsurgeon.streaming.budget import LOGIT_CHUNK_BYTES


@dataclass
class Head:
    """The model's last steps after the layers: final norm, LM head, optional soft-capping."""

    norm: torch.nn.Module | None
    lm_head: torch.nn.Module
    softcap: float | None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits of hidden states h: [N, d]."""
        with torch.inference_mode():
            x = self.norm(h) if self.norm is not None else h
            z = self.lm_head(x).float()
            if self.softcap:
                z = torch.tanh(z / self.softcap) * self.softcap
            return z

    def chunk_rows(self) -> int:
        """Tokens per logits chunk: :data:`LOGIT_CHUNK_BYTES` of float32 logits over the vocabulary. Each token's
        log-probabilities depend on its own row only, so the chunking does not change them."""
        vocab = int(self.lm_head.weight.shape[0])
        return max(1, LOGIT_CHUNK_BYTES // (4 * vocab))


def find_head(model, family) -> Head | None:
    """The model's head, or None for an encoder (no LM head: Δloss does not apply)."""
    if family.encoder or "lm_head" not in family.modules:
        return None
    try:
        lm_head = find_module(model, family.modules["lm_head"])
    except MissingTensor:
        return None
    norm = None
    if "final_norm" in family.modules:
        try:
            norm = find_module(model, family.modules["final_norm"])
        except MissingTensor:
            norm = None
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    return Head(norm=norm, lm_head=lm_head, softcap=getattr(cfg, "final_logit_softcapping", None))


def token_losses(
    head: Head, h: torch.Tensor, targets: torch.Tensor, sel: torch.Tensor, ref_logp: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy of next tokens at the selected positions, and KL(p_ref ‖ p) if reference log-probs are given.

    h: [B, T, d]; targets: [B, T] (token t+1 at position t); sel: [B, T] bool. Returns float64 per-token vectors.
    """
    x, tgt = h[sel], targets[sel]
    ce, kl = [], []
    rows = head.chunk_rows()
    for k, a in enumerate(range(0, x.shape[0], rows)):
        logp = torch.log_softmax(head.logits(x[a : a + rows]), dim=-1)
        ce.append(-logp.gather(1, tgt[a : a + rows, None])[:, 0].double())
        if ref_logp is not None:
            ref = ref_logp[k]
            kl.append((ref.exp() * (ref - logp)).sum(-1).double())
        del logp
    return torch.cat(ce), (torch.cat(kl) if ref_logp is not None else None)


def reference_logp(head: Head, h: torch.Tensor, sel: torch.Tensor) -> list[torch.Tensor]:
    """The original model's log-probs at the selected positions, chunked like :func:`token_losses`."""
    x, rows = h[sel], head.chunk_rows()
    return [torch.log_softmax(head.logits(x[a : a + rows]), dim=-1) for a in range(0, x.shape[0], rows)]
