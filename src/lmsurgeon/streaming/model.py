"""``StreamedModel``: run a checkpoint larger than memory one decoder (or encoder) block at a time.

Every item's residual stream is kept in memory; the weights are not. A forward pass is: load the embedding, embed
all items, free it; then for each block: load it from the checkpoint, apply it to the hidden states of all items,
free it; at the end load the final norm and the head, and turn the last hidden states into per-token negative
log-likelihoods in row chunks, so the ``[tokens, vocab]`` logits never all exist at once. Peak memory is about the
largest block plus the activations, whatever the depth of the model. Weights come from
:func:`lmsurgeon.io.open_model`, so local folders, sharded folders and hub repositories read by HTTP ranges all
stream the same way, and ``handle.bytes_read`` counts what a run read.

When the whole model fits the memory budget (:func:`~lmsurgeon.streaming.budget.plan_memory`), every stage is
loaded once and kept (the plain path): the same code and the same numbers, without reloads.

How a block is called is not reimplemented per family. :meth:`StreamedModel.embed` runs the model's own forward
with each block's ``forward`` replaced by a recorder, which keeps the arguments the model passes to that block
(causal or padding mask from transformers' mask helpers, rotary cos/sin from the model's own rotary module,
position ids, per-layer sliding-window masks) and returns its input unchanged; the last recorder stops the pass.
Those recorded arguments are what :meth:`StreamedModel.apply_block` later calls each real block with.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmsurgeon.arch import Layout, find_module
from lmsurgeon.errors import LmsurgeonError, MissingTensor
from lmsurgeon.io import ModelHandle, open_model
from lmsurgeon.streaming import skeleton
from lmsurgeon.streaming.budget import (
    MemoryPlan,
    check_streaming_mode,
    map_large_allocations,
    plan_memory,
    return_freed_memory,
    weight_bytes,
)
from lmsurgeon.streaming.experts import PER_EXPERT, GroupedExperts, experts_modules, group_size, streams_experts

#: default size of one chunk of head logits (rows × vocabulary × 4 bytes)
HEAD_CHUNK_BYTES = 256 * 2**20


@dataclass
class LayerCall:
    """The arguments a model passes to one block besides the hidden states, as recorded from its own forward."""

    args: tuple
    kwargs: dict
    hidden_by_keyword: bool = False

    def __call__(self, block: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = (
            block(*self.args, hidden_states=hidden, **self.kwargs)
            if self.hidden_by_keyword
            else block(hidden, *self.args, **self.kwargs)
        )
        return out[0] if isinstance(out, tuple | list) else out


@dataclass
class Batch:
    """One micro-batch of items: token ids, which positions are real tokens, and the residual stream.

    ``hidden`` is ``[b, T, d]`` at depth :attr:`Residual.depth`; ``calls[i]`` is how block ``i`` is called for
    this batch (its masks and position embeddings depend on the batch's length and padding).
    """

    input_ids: torch.Tensor  # [b, T]
    attention_mask: torch.Tensor  # [b, T], 1 for real tokens, 0 for right padding
    hidden: torch.Tensor  # [b, T, d]
    calls: list[LayerCall] = field(repr=False)


@dataclass
class Residual:
    """The residual stream of all items after ``depth`` blocks (0 = the embedding output)."""

    batches: list[Batch]
    depth: int

    def hidden(self) -> list[torch.Tensor]:
        """Each batch's ``[b, T, d]`` hidden states."""
        return [b.hidden for b in self.batches]

    def with_hidden(self, hidden: Sequence[torch.Tensor], depth: int) -> Residual:
        """The same items with new hidden states (one tensor per batch) at ``depth``."""
        if len(hidden) != len(self.batches):
            raise LmsurgeonError(f"{len(hidden)} hidden-state tensors for {len(self.batches)} batches")
        return Residual(
            [Batch(b.input_ids, b.attention_mask, h, b.calls) for b, h in zip(self.batches, hidden, strict=True)], depth
        )


class _Recorder(torch.nn.Module):
    """Stands in for block ``index`` during :meth:`StreamedModel.embed`: records the call instead of computing.

    Attribute reads fall through to the real block (families pick a block's mask by ``block.attention_type``),
    and hooks registered on the real block do not fire for the recording pass.
    """

    def __init__(self, block: torch.nn.Module, index: int, record: Callable[[int, tuple, dict], torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not registered as a submodule: no parameters of its own
        self.index = index
        object.__setattr__(self, "_record", record)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self._record(self.index, args, kwargs)


class _StopForward(Exception):
    """Raised by the last recorder: the arguments of every block are known, the rest of the forward is not run."""


class StreamedModel:
    """A ``transformers`` model whose weights are read from the checkpoint block by block, on demand.

    ``source`` is anything :func:`~lmsurgeon.io.open_model` accepts, or an open :class:`~lmsurgeon.io.ModelHandle`
    (its ``bytes_read`` then keeps counting). ``kind``: ``causal-lm`` (decoder and head; :meth:`nll` available) or
    ``base`` (encoders, or a decoder's trunk). Weights are cast to ``dtype`` as they load and computation runs on
    ``device``. ``mode``: ``auto`` streams only when the weights do not fit ``max_memory`` (default: the memory
    available on ``device``; a byte count or a string such as ``"6GiB"``), ``stream`` and ``plain`` force a path.
    Items are processed in micro-batches of ``batch_size``. While streaming, a mixture-of-experts block too large
    for the budget runs its routed experts a group at a time (:mod:`lmsurgeon.streaming.experts`);
    ``expert_group`` forces that with groups of this many experts (0: never).
    """

    def __init__(
        self,
        source: str | Path | ModelHandle,
        *,
        kind: str = "causal-lm",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_memory: int | str | None = None,
        mode: str = "auto",
        batch_size: int = 8,
        head_chunk_bytes: int = HEAD_CHUNK_BYTES,
        expert_group: int | None = None,
    ):
        check_streaming_mode(mode)
        if batch_size < 1:
            raise LmsurgeonError(f"batch_size must be at least 1, got {batch_size}")
        self.handle = source if isinstance(source, ModelHandle) else open_model(source)
        self.layout = Layout(self.handle)
        self.kind = kind
        self.dtype = dtype
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.head_chunk_bytes = head_chunk_bytes
        self.plan: MemoryPlan = plan_memory(self.handle, dtype, max_memory, self.device)
        self.streaming = self.plan.stream if mode == "auto" else mode == "stream"

        self.model: Any = skeleton.build_skeleton(self.handle.config, kind, dtype, f"{self.handle.name}: config.json")
        self._place_buffers()
        family = self.layout.family
        self.layers: Any = find_module(self.model, family.modules["layers"])  # a ModuleList
        self.final_norm: Any = (
            find_module(self.model, family.modules["final_norm"]) if "final_norm" in family.modules else None
        )
        self.head: Any = self.model.get_output_embeddings() if kind == "causal-lm" else None
        self.n_layers = len(self.layers)
        self._layers_path = skeleton.module_path(self.model, self.layers)
        self._stages = self._partition_names()
        self._resident: set[str | int] = set()
        self._layer_bytes = weight_bytes(self.handle, dtype)
        self._expert_bytes = self._per_expert_bytes()
        self.expert_group = expert_group
        self._grouped: dict[int, list[GroupedExperts]] = {}
        if self.streaming:
            map_large_allocations()
        else:
            self.load(["embed", "final_norm", "lm_head", *range(self.n_layers)])

    def __repr__(self) -> str:
        way = "streaming" if self.streaming else "plain"
        return f"StreamedModel({self.handle.name!r}, {type(self.model).__name__}, {self.n_layers} blocks, {way})"

    # -- which checkpoint tensors belong to which stage -------------------------------------------------------
    def _checkpoint_prefix(self, module: torch.nn.Module) -> str:
        """The checkpoint name prefix of a skeleton module (``model.layers`` → ``model.layers.`` or ``layers.``
        depending on how the checkpoint was saved; modules outside the trunk, like ``lm_head``, keep their path)."""
        path = skeleton.module_path(self.model, module)
        base = self.model.base_model_prefix
        if self.model.base_model is self.model:
            return self.layout.prefix + path + "."
        if path == base or path.startswith(base + "."):
            return self.layout.prefix + path[len(base) + 1 :] + "."
        return path + "."

    def _partition_names(self) -> dict[str | int, list[str]]:
        """Checkpoint tensor names per stage: ``"embed"`` (everything before the blocks), each block index,
        ``"final_norm"`` and ``"lm_head"``. Layers beyond the config's count (GLM-4.5's multi-token-prediction
        layer) belong to no stage; so do head tensors when the model is built without its head."""
        names = self.handle.names()
        layers = self._checkpoint_prefix(self.layers)
        stages: dict[str | int, list[str]] = {"embed": [], "final_norm": [], "lm_head": []}
        stages.update({i: [] for i in range(self.n_layers)})
        norm = self._checkpoint_prefix(self.final_norm) if self.final_norm is not None else None
        head = self._checkpoint_prefix(self.head) if self.head is not None else None
        for name in names:
            if name.startswith(layers):
                index = name[len(layers) :].split(".", 1)[0]
                if index.isdigit() and int(index) < self.n_layers:
                    stages[int(index)].append(name)
            elif norm is not None and name.startswith(norm):
                stages["final_norm"].append(name)
            elif head is not None and name.startswith(head):
                stages["lm_head"].append(name)
            elif name.startswith("lm_head."):
                continue  # a head in the file, but this skeleton (kind="base") has none
            else:
                stages["embed"].append(name)
        self._tied = self.head is not None and not stages["lm_head"]
        if self._tied:
            if not self.model.config.get_text_config().tie_word_embeddings:
                raise MissingTensor(
                    "has no lm_head tensor and its config does not tie the head to the embedding", self.handle.name
                )
            embed = self._checkpoint_prefix(self.model.get_input_embeddings())
            stages["lm_head"] = [n for n in stages["embed"] if n.startswith(embed)]
        return stages

    # -- loading and freeing ------------------------------------------------------------------------------------
    def _place_buffers(self) -> None:
        """Move the skeleton's real buffers (rotary tables and the like) to the compute device."""
        from accelerate.utils import set_module_tensor_to_device  # type: ignore[import-untyped]

        if self.device.type == "cpu":
            return
        for name, _ in list(self.model.named_buffers()):
            set_module_tensor_to_device(self.model, name, self.device)

    def _module_paths(self, stage: str | int) -> Callable[[str], bool]:
        """Which skeleton parameter names a stage fills (used to empty it again, leaving other stages alone)."""

        def under(*modules: torch.nn.Module | None) -> tuple[str, ...]:
            return tuple(skeleton.module_path(self.model, m) + "." for m in modules if m is not None)

        if isinstance(stage, int):
            return lambda name: name.startswith(f"{self._layers_path}.{stage}.")
        if stage == "final_norm":
            return lambda name: name.startswith(under(self.final_norm))
        if stage == "lm_head":  # a tied head was loaded through the input embedding
            tied = self.model.get_input_embeddings() if self._tied else None
            return lambda name: name.startswith(under(self.head, tied))
        others = (self._layers_path + ".", *under(self.final_norm, self.head))
        return lambda name: not name.startswith(others)

    def load(self, stages: Sequence[str | int]) -> None:
        """Load these stages (``"embed"``, a block index, ``"final_norm"``, ``"lm_head"``) from the checkpoint;
        resident ones are left as they are. Callers that schedule blocks themselves (several blocks resident at
        once, blocks kept across passes) pair it with :meth:`release`."""
        todo = [s for s in stages if s not in self._resident]
        if not todo:
            return
        grouped = [s for s in todo if isinstance(s, int) and self._experts_in_groups(s)]
        names = sorted({n for s in todo if s not in grouped for n in self._stages[s]})
        skeleton.load_tensors(self.model, self.handle, names, self.dtype, self.device)
        for index in grouped:
            self._load_grouped(index)
        if self._tied and "lm_head" in todo:
            self.head.weight = self.model.get_input_embeddings().weight
        self._resident.update(todo)

    def release(self, stages: Sequence[str | int]) -> None:
        """Free these stages' weights again (their parameters go back to the meta device); a no-op on the plain
        path, where everything stays loaded."""
        if not self.streaming:
            return
        for stage in stages:
            for grouped in self._grouped.pop(stage, []) if isinstance(stage, int) else []:
                grouped.remove()
            skeleton.empty(self.model, self._module_paths(stage))
            self._resident.discard(stage)
        return_freed_memory()

    # -- mixture-of-experts blocks larger than the budget ---------------------------------------------------------
    def _per_expert_bytes(self) -> dict[int, int]:
        """Per block, the bytes (compute dtype) of its per-expert checkpoint tensors, from the headers alone."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        out: dict[int, int] = {}
        for stage, names in self._stages.items():
            if isinstance(stage, int):
                infos = [self.handle.info(n) for n in names if PER_EXPERT.search(n)]
                out[stage] = sum(int(torch.Size(i.shape).numel()) * itemsize for i in infos)
        return out

    def _experts_in_groups(self, index: int) -> bool:
        """Whether block ``index`` is loaded without its routed experts, which then run a group at a time."""
        if not self.streaming or not self._expert_bytes.get(index) or self.expert_group == 0:
            return False
        if self.expert_group is not None:
            return True
        return streams_experts(self._layer_bytes.get(f"layer.{index}", 0), self.plan.budget)

    def _load_grouped(self, index: int) -> None:
        """Load block ``index`` except its routed experts and install :class:`GroupedExperts` on its experts
        modules; an experts module that cannot be driven that way is loaded whole after all."""
        deferred = skeleton.load_tensors(
            self.model, self.handle, self._stages[index], self.dtype, self.device, defer_experts=True
        )
        block = self.layers[index]
        modules = experts_modules(block, f"{self._layers_path}.{index}", deferred)
        installed = []
        for path, module in modules.items():
            sources = {name: deferred.pop(f"{path}.{name}") for name, _ in module.named_parameters(recurse=False)}
            size = self._experts_per_group(sum(s.expert_bytes(self.dtype) for s in sources.values()))
            installed.append(GroupedExperts(module, sources, self._read_experts, size))
        self._grouped[index] = installed
        # fused experts of a module that is not an experts module of the kind driven above: loaded whole after all
        skeleton.place_stacked(self.model, deferred, self.handle, self.dtype, self.device)

    def _experts_per_group(self, expert_bytes: int) -> int:
        """Experts read at once for one expert of ``expert_bytes``: the caller's ``expert_group``, or what the
        budget allows (:func:`group_size`). The one rule for the loader and for :meth:`resident_block_bytes`."""
        return self.expert_group or group_size(expert_bytes, self.plan.budget)

    def _read_experts(self, stacked, experts: list[int]) -> torch.Tensor:
        """What :class:`GroupedExperts` calls for a group: those experts' rows, from this model's checkpoint."""
        return stacked.read(self.handle, self.dtype, self.device, experts)

    def resident_block_bytes(self) -> int:
        """The largest weight footprint one block has while it runs: the whole block, or for a block whose experts
        run in groups, the block without its routed experts plus one group."""
        largest = 0
        for index in range(self.n_layers):
            size = self._layer_bytes.get(f"layer.{index}", 0)
            experts = self._expert_bytes.get(index, 0)
            if experts and self._experts_in_groups(index):
                n = self._n_experts(index)
                one = experts // max(n, 1)
                size = size - experts + one * self._experts_per_group(one)
            largest = max(largest, size)
        return largest

    def outside_bytes(self) -> int:
        """Bytes (compute dtype) of everything outside the blocks: embeddings, final norm, head."""
        return self._layer_bytes.get("outside", 0)

    def _n_experts(self, index: int) -> int:
        found = {int(m.group(1)) for n in self._stages[index] if (m := PER_EXPERT.search(n))}
        return len(found)

    @contextmanager
    def loaded(self, *stages: str | int) -> Iterator[None]:
        """Stages loaded for the duration of the block; those already resident stay as they were."""
        new = [s for s in stages if s not in self._resident]
        self.load(new)
        try:
            yield
        finally:
            self.release(new)

    @property
    def resident(self) -> frozenset[str | int]:
        """The stages whose weights are in memory now."""
        return frozenset(self._resident)

    def resident_bytes(self) -> int:
        """Bytes of weights currently in memory (each shared storage once)."""
        return sum(p.numel() * p.element_size() for _, p in skeleton.loaded_parameters(self.model))

    # -- the forward, stage by stage ------------------------------------------------------------------------------
    def batches(
        self, input_ids: torch.Tensor | Sequence[Sequence[int]], attention_mask: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Items as right-padded ``(input_ids, attention_mask)`` micro-batches of at most ``batch_size`` rows.

        ``input_ids`` is a ``[n, T]`` tensor (with an optional ``[n, T]`` mask) or a list of token-id lists of any
        lengths, which are right-padded and masked.
        """
        if isinstance(input_ids, torch.Tensor):
            if input_ids.ndim != 2:
                raise LmsurgeonError(f"input_ids must be [items, tokens], got shape {tuple(input_ids.shape)}")
            ids = input_ids.long()
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
        else:
            if attention_mask is not None:
                raise LmsurgeonError("attention_mask is built from the lengths when input_ids is a list of lists")
            lengths = [len(s) for s in input_ids]
            if not lengths or min(lengths) == 0:
                raise LmsurgeonError("every item needs at least one token")
            ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(input_ids):
                ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
                mask[row, : len(seq)] = 1
        limit = self.layout.max_positions
        if limit is not None and ids.shape[1] > limit:
            raise LmsurgeonError(
                f"items of {ids.shape[1]} tokens exceed the model's {limit} positions", self.handle.name
            )
        return [
            (ids[i : i + self.batch_size], mask[i : i + self.batch_size])
            for i in range(0, ids.shape[0], self.batch_size)
        ]

    @torch.no_grad()
    def embed(
        self, input_ids: torch.Tensor | Sequence[Sequence[int]], attention_mask: torch.Tensor | None = None
    ) -> Residual:
        """The residual stream at depth 0 (the input of block 0) for every item, plus how each block is called.

        Runs the model's own forward up to its first block (embedding, position embeddings, embedding norm and
        scaling as the family does them), then records instead of computing every block (see the module doc).
        """
        out = []
        with self.loaded("embed"):
            for ids, mask in self.batches(input_ids, attention_mask):
                hidden, calls = self._record_calls(ids.to(self.device), mask.to(self.device))
                out.append(Batch(ids.to(self.device), mask.to(self.device), hidden, calls))
        return Residual(out, depth=0)

    def _record_calls(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
        calls: list[LayerCall | None] = [None] * self.n_layers
        first: list[torch.Tensor] = []

        def record(index: int, args: tuple, kwargs: dict) -> torch.Tensor:
            keyword = "hidden_states" in kwargs
            hidden = kwargs.pop("hidden_states") if keyword else args[0]
            calls[index] = LayerCall(args if keyword else args[1:], kwargs, keyword)
            if index == 0:
                first.append(hidden)
            if index == self.n_layers - 1:
                raise _StopForward
            return hidden

        trunk = self.model.base_model
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if "use_cache" in inspect.signature(trunk.forward).parameters:
            kwargs["use_cache"] = False
        real = list(self.layers)
        for i, layer in enumerate(real):
            self.layers[i] = _Recorder(layer, i, record)
        try:
            trunk(**kwargs)
        except _StopForward:
            pass
        finally:
            for i, layer in enumerate(real):
                self.layers[i] = layer
        missing = [i for i, c in enumerate(calls) if c is None]
        if missing or not first:
            raise LmsurgeonError(
                f"the model's forward did not call blocks {missing}; layer streaming cannot "
                f"drive {type(self.model).__name__}",
                self.handle.name,
            )
        return first[0], calls  # type: ignore[return-value]

    def blocks(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.nn.Module]]:
        """Blocks ``start..stop-1`` as ``(index, module)``, each loaded when reached and freed when the iteration
        moves on (or stops): at most one block's weights are in memory while streaming."""
        stop = self.n_layers if stop is None else stop
        if not 0 <= start <= stop <= self.n_layers:
            raise LmsurgeonError(f"block range {start}..{stop} outside 0..{self.n_layers}")
        for index in range(start, stop):
            with self.loaded(index):
                yield index, self.layers[index]

    @torch.no_grad()
    def apply_block(self, index: int, block: torch.nn.Module, residual: Residual) -> Residual:
        """``residual`` after ``block`` (called as block ``index`` is called by the model) for every batch.

        A block whose routed experts run in groups reads each group once for all batches
        (:meth:`GroupedExperts.run_batches`), not once per batch."""
        grouped = self._grouped.get(index, [])
        if len(grouped) == 1 and len(residual.batches) > 1:
            hidden = grouped[0].run_batches(lambda b: b.calls[index](block, b.hidden), residual.batches)
        else:
            hidden = [b.calls[index](block, b.hidden) for b in residual.batches]
        return residual.with_hidden(hidden, residual.depth + 1)

    def run_layers(
        self,
        residual: Residual,
        start: int | None = None,
        stop: int | None = None,
        hook: Callable[[int, Residual], Residual | None] | None = None,
    ) -> Residual:
        """Apply blocks ``start..stop-1`` (default: from ``residual.depth`` to the last) to every item.

        ``hook(index, residual)`` runs after block ``index`` while it is still loaded; it may return a replacement
        residual (a patched stream) or None to keep it.
        """
        start = residual.depth if start is None else start
        for index, block in self.blocks(start, stop):
            residual = self.apply_block(index, block, residual)
            if hook is not None:
                replaced = hook(index, residual)
                residual = residual if replaced is None else replaced
        return residual

    @torch.no_grad()
    def final(self, residual: Residual) -> list[torch.Tensor]:
        """The final norm applied to each batch's hidden states (what the head reads), or the hidden states
        themselves for families without one (BERT's post-norm blocks end normalised)."""
        if self.final_norm is None:
            return residual.hidden()
        with self.loaded("final_norm"):
            return [self.final_norm(h) for h in residual.hidden()]

    @torch.no_grad()
    def nll(
        self, input_ids: torch.Tensor | Sequence[Sequence[int]], attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-token negative log-likelihood ``[n, T-1]`` (float32) of token ``t+1`` given tokens ``≤ t``.

        Positions whose target (or context token) is padding are NaN, so a careless sum cannot hide them. The
        head is applied to at most ``head_chunk_bytes`` of logits at a time; Gemma-style final logit soft-capping
        is applied as the model's own head does.
        """
        if self.head is None:
            raise LmsurgeonError("nll needs a causal-lm model (this one was built without its head)")
        residual = self.run_layers(self.embed(input_ids, attention_mask))
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        rows_per_chunk = max(1, self.head_chunk_bytes // (4 * self.head.weight.shape[0]))
        out = []
        with self.loaded("final_norm", "lm_head"):
            for batch, h in zip(residual.batches, self.final(residual), strict=True):
                ids, mask = batch.input_ids, batch.attention_mask.bool()
                valid = mask[:, 1:] & mask[:, :-1]
                rows, targets = h[:, :-1][valid], ids[:, 1:][valid]
                losses = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
                for a in range(0, rows.shape[0], rows_per_chunk):
                    logits = self.head(rows[a : a + rows_per_chunk]).float()  # [chunk, vocab]
                    if cap:
                        logits = torch.tanh(logits / cap) * cap
                    losses[a : a + rows_per_chunk] = torch.nn.functional.cross_entropy(
                        logits, targets[a : a + rows_per_chunk], reduction="none"
                    )
                full = torch.full(valid.shape, float("nan"), dtype=torch.float32, device=rows.device)
                full[valid] = losses
                out.append(full.cpu())
        width = max(t.shape[1] for t in out)
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=float("nan")) for t in out])
