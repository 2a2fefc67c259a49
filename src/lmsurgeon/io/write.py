"""Writing a checkpoint tensor by tensor, so that a rewritten 100B-class model never sits in memory whole.

safetensors' ``save_file`` needs every tensor of a file in memory at once, and a hub checkpoint's shards are
about 5 GB each. :func:`write_shards` plans the output files from the tensors' byte sizes alone (known from the
source's headers before anything is read), then reads the tensors of one output shard, writes it and lets it go:
the peak is one shard of at most ``shard_bytes`` (or one tensor larger than that). Both writers of rewritten
models use it: swap's ``--apply``/``--drop``/``--apply-plan`` and the merge's saved model when its base streams.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmsurgeon.io.model import ModelHandle

#: largest output shard: what one write holds in memory (a single larger tensor gets a shard of its own)
SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class PendingTensor:
    """One tensor of the checkpoint to write: its name there, its size, and how to get it when its shard is due."""

    name: str
    nbytes: int
    read: Callable[[], torch.Tensor]


def from_handle(handle: ModelHandle, source: str, name: str | None = None) -> PendingTensor:
    """Tensor ``source`` of ``handle`` (a :class:`lmsurgeon.io.ModelHandle`) in its stored dtype, under ``name``."""
    return PendingTensor(name or source, handle.info(source).nbytes, lambda: handle.stored_tensor(source))


def from_memory(name: str, tensor: torch.Tensor) -> PendingTensor:
    """A tensor already in memory (a merged embedding), written as it is."""
    return PendingTensor(name, tensor.numel() * tensor.element_size(), lambda: tensor.detach().to("cpu"))


def plan_shards(tensors: Sequence[PendingTensor], shard_bytes: int = SHARD_BYTES) -> list[list[PendingTensor]]:
    """Consecutive tensors grouped into shards of at most ``shard_bytes`` (in the given order, so a layer's
    tensors stay together as transformers writes them)."""
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_shards(dest: Path, tensors: Sequence[PendingTensor], shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Write ``tensors`` into ``dest`` as transformers names them: ``model.safetensors`` when they fit one shard,
    else ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``. Returns the files written."""
    from safetensors.torch import save_file

    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("two tensors would be written under one name")
    shards = plan_shards(tensors, shard_bytes)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map = {}
    for fname, shard in zip(files, shards, strict=True):
        state = {t.name: t.read().contiguous() for t in shard}
        save_file(state, str(dest / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, fname))
        del state
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files
