"""Tensors parked on disk while a run that is short of memory does not need them.

A streamed run's memory budget goes to the blocks it computes with. Some of its own state is large and read
rarely: swap's fitted maps A_i (d × d float64 per layer, 128 MiB each at width 4,096), read a pair at a time,
and the original rows of a merge baseline that rewrites a whole embedding and head (2 × 1.2 GB at GLM-4.5-Air's
vocabulary in bf16), read once to put them back. :class:`DiskTensors` writes such tensors to ``safetensors``
files in a temporary folder, which is removed with the object, and reads one back when it is indexed.
``safetensors`` (not ``torch.save`` or ``np.save``): no pickle, and bfloat16 kept as it is.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class DiskTensors(Sequence):
    """A list of tensors or numpy arrays on disk; ``disk[i]`` reads item i back as the kind it was given."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="lmsurgeon-spill-")
        self._items: list[tuple[Path, bool]] = []  # (file, given as numpy)

    @property
    def folder(self) -> Path:
        return Path(self._dir.name)

    def append(self, value: torch.Tensor | np.ndarray) -> None:
        path = self.folder / f"{len(self._items)}.safetensors"
        is_numpy = isinstance(value, np.ndarray)
        tensor = torch.from_numpy(np.ascontiguousarray(value)) if is_numpy else value.detach()
        save_file({"t": tensor.contiguous().cpu()}, str(path))
        self._items.append((path, is_numpy))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        path, is_numpy = self._items[i]
        tensor = load_file(str(path))["t"]
        return tensor.numpy() if is_numpy else tensor
