"""The merge's perplexity guard, quality measurements and generation on a layer-streamed base (methods.md §M11).

A merge only rewrites the embedding and the LM head, so a streamed base keeps exactly those resident (patched in
place as in memory) and reads every block from the checkpoint once per evaluation, for all batches of the text
at once: peak memory is the embedding, the head, one block and the activations, whatever the depth. The
numbers equal the in-memory path's (the same modelling code runs the same weights; see
:class:`lmsurgeon.streaming.StreamedModel`). ``auto`` streams only when the model does not fit ``max_memory``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmsurgeon.errors import LmsurgeonError


def load_lm(handle, cfg, dtype: torch.dtype):
    """The model in memory, or layer-streamed (:class:`StreamedLM`) when ``cfg.streaming`` asks or it does not fit
    ``cfg.max_memory`` (methods.md §M11)."""
    from lmsurgeon.streaming import wants_streaming

    if wants_streaming(handle, dtype, cfg.streaming, cfg.max_memory, cfg.device):
        if cfg.trust_remote_code:
            raise LmsurgeonError("layer streaming runs only the transformers library's own models", handle.name)
        return StreamedLM(handle, dtype=dtype, device=cfg.device, batch_size=cfg.batch_size, max_memory=cfg.max_memory)
    return handle.load_model(dtype=dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)


class StreamedLM:
    """A causal LM whose blocks stream from the checkpoint while the embedding, final norm and head stay resident.

    It offers what the merge reads from a ``transformers`` model (``get_input_embeddings``,
    ``get_output_embeddings``, ``config``) and :meth:`head_inputs` with :meth:`head_logits`, which
    :class:`PromptEvaluator` uses instead of one forward per batch.
    """

    def __init__(self, handle, *, dtype: torch.dtype, device: str, batch_size: int, max_memory=None):
        from lmsurgeon.streaming import StreamedModel

        self.handle = handle
        self.streamed = StreamedModel(
            handle, dtype=dtype, device=device, mode="stream", batch_size=batch_size, max_memory=max_memory
        )
        self.streamed.load(["embed", "final_norm", "lm_head"])
        self.model = self.streamed.model
        self.config = self.model.config
        self.device = torch.device(device)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.streamed.head

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the head's input, with Gemma-2-style final soft-capping as the model applies it."""
        z = self.streamed.head(h)
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        return torch.tanh(z / cap) * cap if cap else z

    @torch.no_grad()
    def head_inputs(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """What the head reads, per ``(input_ids, attention_mask)`` batch: every block streamed once for all."""
        from lmsurgeon.streaming import Residual

        parts = [self.streamed.embed(ids, mask) for ids, mask in batches]
        residual = Residual([b for part in parts for b in part.batches], depth=0)
        residual = self.streamed.run_layers(residual)
        hidden = self.streamed.final(residual)
        sizes = [sum(b.input_ids.shape[0] for b in part.batches) for part in parts]
        out, at = [], 0
        for n in sizes:  # the streamed model's micro-batches back into the caller's batches
            rows, got = [], 0
            while got < n:
                rows.append(hidden[at])
                got += hidden[at].shape[0]
                at += 1
            out.append(torch.cat(rows) if len(rows) > 1 else rows[0])
        return out

    @torch.no_grad()
    def next_token_logits(self, ids: list[int]) -> torch.Tensor:
        """The logits of the token after `ids` (one item, no cache: every block streams once per token)."""
        h = self.head_inputs([(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))])[0]
        return self.head_logits(h[0, -1:]).float()[0]

    def save_pretrained(self, path: str | Path, rows: dict[str, torch.Tensor]) -> None:
        """Write the base's checkpoint with the named tensors replaced (the merged embedding and head), one output
        shard in memory at a time (:func:`lmsurgeon.io.write.write_shards`): the base's own shards are about 5 GB
        each for a 100B-class model, more than the budget leaves beside the resident embedding and head."""
        import json

        from lmsurgeon.io.write import from_handle, from_memory, write_shards

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_shards(
            path,
            [
                from_memory(name, rows[name]) if name in rows else from_handle(self.handle, name)
                for name in self.handle.names()
            ],
        )
        (path / "config.json").write_text(json.dumps(self.handle.config, indent=2) + "\n", encoding="utf-8")

    def parameter_names(self) -> dict[str, Any]:
        """Checkpoint name of the embedding and (untied) head weights: what a merge rewrites."""
        from lmsurgeon.arch import Layout

        layout = Layout(self.handle)
        names = {"embed": layout.require("embed")}
        if layout.has("lm_head") and not layout.tied:
            names["lm_head"] = layout.name("lm_head")
        return names
