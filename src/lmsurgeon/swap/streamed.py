"""Swap analysis of a checkpoint larger than memory: blocks read from the checkpoint on demand (methods.md §S15).

:class:`StreamedSwapModel` wraps :class:`lmsurgeon.streaming.StreamedModel` (an ``accelerate``
``init_empty_weights`` skeleton filled one stage at a time by transformers' own loader) and gives the swap engine
the two things it uses from a model: a capture of every layer's input for a batch, and an indexable list of
blocks. ``layers[j]`` loads block j when it is not resident and frees the least recently used block beyond
``capacity`` (at least two: δ applies block i to block i+1's output, and a swapped plan calls i+1 then i). The
engine and the plan evaluator run a batch layer-major (every stream that needs block j advances while j is
loaded), so a pass reads each block about once per batch. The embedding stays loaded for the whole run (every
capture starts with it); the final norm and the head are loaded once the fit pass, which never reads them, is
done (:meth:`StreamedSwapModel.load_head`), and then stay: every Δloss and every plan score ends in them. At
GLM-4.5-Air's vocabulary the head is 1.2 GB, and the fit pass is where the normal-equation sums (2 d × d float64
per layer) are held.

A block is called with the arguments the model's own forward passes it (recorded by ``StreamedModel.embed``:
masks, rotary cos/sin, position ids), on the same hidden states as the plain path, so the streamed numbers are the
plain ones (tested to equality).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.streaming import Residual, StreamedModel
from lmsurgeon.streaming.budget import ACTIVATION_RESERVE
from lmsurgeon.swap.capture import Capture


class BlockCache:
    """The model's blocks as a sequence; ``cache[j]`` is block j, loaded on first use, least recently used freed."""

    def __init__(self, streamed: StreamedModel, capacity: int):
        if capacity < 2:
            raise LmsurgeonError(f"a streamed swap keeps at least 2 blocks resident, not {capacity}")
        self.streamed, self.capacity = streamed, capacity
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.loads = 0

    def __len__(self) -> int:
        return self.streamed.n_layers

    def __getitem__(self, j: int) -> torch.nn.Module:
        if not 0 <= j < len(self):
            raise IndexError(j)
        if j in self._lru:
            self._lru.move_to_end(j)
        else:
            if self.streamed.streaming:
                while len(self._lru) >= self.capacity:
                    old, _ = self._lru.popitem(last=False)
                    self.streamed.release([old])
                self.streamed.load([j])
                self.loads += 1
            self._lru[j] = None
        return self.streamed.layers[j]

    def __iter__(self):
        return (self[j] for j in range(len(self)))


class StreamedSwapModel:
    """What the swap engine needs from a model, with weights streamed from ``handle`` when they do not fit.

    ``mode``: ``auto`` streams only when the weights exceed ``max_memory`` (default: memory available now),
    ``stream`` and ``plain`` force a path; both paths run the same code. ``capacity``: blocks kept resident
    (default: as many as fit in the budget left after the embedding, head and ``ACTIVATION_RESERVE``, at least 2).
    """

    def __init__(
        self,
        handle,
        kind: str,
        dtype: torch.dtype,
        device: str,
        max_memory: int | str | None = None,
        mode: str = "auto",
        capacity: int | None = None,
    ):
        self.sm = StreamedModel(
            handle, kind=kind, dtype=dtype, device=device, max_memory=max_memory, mode=mode, batch_size=1 << 30
        )
        self.streaming = self.sm.streaming
        self.model: Any = self.sm.model  # the skeleton: config, final norm and head modules for find_head
        self.config = self.model.config
        if capacity is None:  # the budget left after the embedding, head and the reserve, in blocks as they run
            block = self.sm.resident_block_bytes()
            # the reserve holds what is not weights: activations, logit chunks, the swap's d × d maps, allocator
            # slack; one more block's worth too (a block's transient copies while it loads and runs)
            reserve = ACTIVATION_RESERVE * self.sm.plan.budget
            spare = self.sm.plan.budget - self.sm.outside_bytes() - block - reserve
            capacity = max(2, int(spare // max(block, 1)))
        self.layers = BlockCache(self.sm, min(capacity, max(2, self.sm.n_layers)))
        self.kind = kind
        self.sm.load(["embed"])  # read by every capture

    def load_head(self) -> None:
        """Load the final norm and the LM head (a causal LM's): before the first Δloss or plan score."""
        if self.kind == "causal-lm":
            self.sm.load(["final_norm", "lm_head"])

    def describe(self) -> str:
        return self.sm.plan.describe()

    def capture(self, **inputs) -> Capture:
        """Every layer's input for one batch (and each block's call arguments), as ``capture.capture`` gives
        for an in-memory model: the embedding, then blocks 0…L−1 in order, each read once."""
        residual = self.sm.embed(inputs["input_ids"], inputs["attention_mask"])
        if len(residual.batches) != 1:
            raise LmsurgeonError("a streamed capture takes one batch at a time")
        b = residual.batches[0]
        cap = Capture()
        cap.h.append(b.hidden)
        for j, call in enumerate(b.calls):
            cap.args.append(tuple(call.args))
            cap.kwargs.append(dict(call.kwargs))
            with torch.inference_mode():
                cap.h.append(call(self.layers[j], cap.h[-1]))
        return cap

    def layer_pairs(self, inputs: list[dict]) -> Iterator[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """For j = 0…L−1: (j, [(h_j, h_{j+1}) of each batch]), every batch through block j before block j+1.

        What the fit pass reads (``engine.fit_pass``): each block is loaded once for all batches (and a block
        whose experts run in groups reads each group once for all of them), and only two depths of the residual
        stream are alive. The block calls are those of :meth:`capture`, so the states are the same."""
        batches = [b for x in inputs for b in self.sm.embed(x["input_ids"], x["attention_mask"]).batches]
        residual = Residual(batches, depth=0)
        for j in range(len(self.layers)):
            with torch.inference_mode():
                after = self.sm.apply_block(j, self.layers[j], residual)
            yield j, list(zip(residual.hidden(), after.hidden(), strict=True))
            residual = after

    def resident_bytes(self) -> int:
        return self.sm.resident_bytes()
