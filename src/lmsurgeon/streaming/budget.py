"""How much memory a model needs, how much there is, and therefore whether to stream it.

The estimate comes from the safetensors headers alone (names, dtypes, shapes), so it costs a few kilobytes of
reads even for a 200 GB checkpoint on the hub. The available memory and the parsing of budgets such as ``"6GiB"``
come from accelerate's big-model utilities (``get_max_memory``, ``convert_file_size_to_int``), the same ones
``from_pretrained(device_map="auto", max_memory=...)`` uses, so a budget means the same thing to lmsurgeon as to
transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lmsurgeon.errors import LmsurgeonError

#: share of the budget left for activations, the head's logit chunks and allocator slack when deciding whether
#: the whole model fits (the plain path holds every weight at once, plus the same activations as streaming)
ACTIVATION_RESERVE = 0.25

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class MemoryPlan:
    """What a run will hold in memory, in bytes of the compute dtype, and the decision taken from it.

    ``largest_block`` is the peak weight footprint of a streamed run (one block, or the embedding or the head when
    they are larger); ``total`` is what the plain path holds. ``stream`` is True when the total does not fit in
    ``budget`` after :data:`ACTIVATION_RESERVE`.
    """

    total: int
    largest_block: int
    budget: int
    stream: bool

    def describe(self) -> str:
        way = "layer streaming" if self.stream else "whole model in memory"
        return (
            f"{way}: weights {self.total / 2**30:.2f} GiB, largest block {self.largest_block / 2**30:.2f} GiB, "
            f"budget {self.budget / 2**30:.2f} GiB"
        )


def parse_size(size: int | str) -> int:
    """``6GiB``, ``500MB`` or a byte count, as accelerate's ``convert_file_size_to_int`` reads it."""
    from accelerate.utils import convert_file_size_to_int  # type: ignore[import-untyped]

    if isinstance(size, str) and size.strip().isdigit():
        size = int(size)  # a byte count given on the command line
    try:
        value = convert_file_size_to_int(size)
    except ValueError:
        value = None
    if not isinstance(value, int) or value <= 0:
        raise LmsurgeonError(f"memory budget {size!r} is not a size such as 6GiB, 500MB or a byte count")
    return value


def available_memory(device: str | torch.device = "cpu") -> int:
    """Free memory on ``device`` now: host memory available (psutil) for CPU, free device memory for an
    accelerator, both as reported by accelerate's ``get_max_memory``."""
    from accelerate.utils import get_max_memory  # type: ignore[import-untyped]

    device = torch.device(device)
    free = get_max_memory()
    key: int | str = "cpu" if device.type == "cpu" else (device.index or 0)
    if key not in free:
        raise LmsurgeonError(f"no memory figure for device {device} (devices seen: {sorted(map(str, free))})")
    return int(free[key])


def weight_bytes(handle, dtype: torch.dtype) -> dict[str, int]:
    """Bytes each stage of the checkpoint occupies once loaded in ``dtype``, from the headers alone.

    Keys are ``"layer.<i>"`` for tensors whose name carries a layer index (``model.layers.3.…``, ``h.3.…``) and
    ``"outside"`` for the rest (embeddings, final norm, head). Floating-point tensors are counted in ``dtype``
    (they are cast to it when loaded); other tensors keep their stored size.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    out: dict[str, int] = {}
    for info in handle.header().values():
        n = 1
        for d in info.shape:
            n *= d
        size = n * itemsize if info.dtype in _FLOAT_DTYPES else info.nbytes
        m = _LAYER_INDEX.search(info.name)
        key = f"layer.{m.group(1)}" if m else "outside"
        out[key] = out.get(key, 0) + size
    return out


#: --streaming: ``auto`` streams only a model that does not fit, ``stream`` and ``plain`` force a path
STREAMING_MODES = ("auto", "stream", "plain")


def check_streaming_mode(mode: str) -> None:
    """One clear error for an unknown ``--streaming`` value, whichever command was given it."""
    if mode not in STREAMING_MODES:
        raise LmsurgeonError(f"--streaming {mode!r} is not one of {', '.join(STREAMING_MODES)}")


def wants_streaming(
    handle, dtype: torch.dtype, mode: str, budget: int | str | None = None, device: str | torch.device = "cpu"
) -> bool:
    """Whether ``mode`` streams ``handle``: ``stream`` always, ``plain`` never, ``auto`` when its weights do not fit
    ``budget`` (:func:`plan_memory`)."""
    check_streaming_mode(mode)
    if mode != "auto":
        return mode == "stream"
    return plan_memory(handle, dtype, budget, device).stream


def plan_memory(
    handle, dtype: torch.dtype, budget: int | str | None = None, device: str | torch.device = "cpu"
) -> MemoryPlan:
    """Decide between the plain path and layer streaming for ``handle`` computed in ``dtype``.

    ``budget`` defaults to the memory available on ``device`` now. The plain path is chosen when all weights fit
    in the budget less :data:`ACTIVATION_RESERVE`; it is faster (no reloads) and gives the same numbers.
    """
    limit = available_memory(device) if budget is None else parse_size(budget)
    sizes = weight_bytes(handle, dtype)
    total = sum(sizes.values())
    largest = max(sizes.values(), default=0)
    return MemoryPlan(total=total, largest_block=largest, budget=limit, stream=total > limit * (1 - ACTIVATION_RESERVE))


_TORCH_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_float_dtype(handle) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's bytes (bf16 for the hub's large models)."""
    by_dtype: dict[str, int] = {}
    for info in handle.header().values():
        if info.dtype in _TORCH_FLOATS:
            by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    return _TORCH_FLOATS[max(by_dtype, key=by_dtype.__getitem__)] if by_dtype else torch.float32


def compute_dtype(handle, budget: int | str | None = None, device: str | torch.device = "cpu") -> torch.dtype:
    """float32 when its largest stage (one block, or the embedding) fits ``budget`` after
    :data:`ACTIVATION_RESERVE`; otherwise the checkpoint's own floating dtype.

    Why: a 100B-class MoE block is 4.4 GB in bf16 and 8.9 GB cast to float32, so a 6 GiB budget can stream the
    model only in the dtype it was stored in. Statistics over activations lose nothing that matters at bf16's
    8 significant bits; where float32 fits it is used, so small models keep their exact numbers.
    """
    plan = plan_memory(handle, torch.float32, budget, device)
    if plan.largest_block <= plan.budget * (1 - ACTIVATION_RESERVE):
        return torch.float32
    return stored_float_dtype(handle)


def return_freed_memory() -> None:
    """Hand memory that the C allocator keeps after frees back to the system (glibc's ``malloc_trim``; a no-op
    elsewhere).

    Why: a streamed run frees a block's weights, its expert groups and their activations many times over, from
    several threads (the micro-batches that meet at the experts). glibc serves tensors below its mmap threshold
    (which grows to 32 MB after large frees) from per-thread arenas and keeps their freed pages, so the process's
    resident size climbs with every block although the live tensors do not. Called when a streamed stage is
    released; ``benchmarks/bench_scale.py swap`` shows the peak it saves (docs/scale.md)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def map_large_allocations() -> None:
    """Have glibc serve every allocation of :data:`MMAP_THRESHOLD` or more by its own ``mmap``, so that freeing
    it returns its pages at once (``mallopt(M_MMAP_THRESHOLD)``; a no-op elsewhere). Called once a model streams.

    Why: by default the threshold follows the largest freed mapping up to 32 MB, so after the first frees the
    per-expert tensors (11–23 MB at GLM-4.5-Air's shape) and the activations of a streamed block come from the
    heap arenas. Those are reused only where a new request fits a freed hole, and ``benchmarks/bench_scale.py
    swap`` saw the resident size creep by 25 MB steps for a minute of expert groups at 8 layers while the live
    tensors did not grow. A fixed threshold costs a ``mmap`` and fresh page faults per large tensor, small next to
    reading that tensor from the checkpoint."""
    global _MAPPED
    libc = _glibc()
    if libc is not None and not _MAPPED:
        _MAPPED = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def _glibc():
    """The C library when it is glibc (it has ``malloc_trim`` and ``mallopt``), looked up once; else None."""
    global _LIBC
    if _LIBC is False:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            libc = None
        _LIBC = libc if libc is not None and all(hasattr(libc, f) for f in ("malloc_trim", "mallopt")) else None
    return _LIBC


#: float32 logits made at once wherever a head runs on many positions (swap's Δloss and KL, the merge's scoring):
#: at GLM-4.5-Air's 151,552 words a batch's whole logits are gigabytes, and each position's log-probabilities
#: depend on its own row only, so chunking changes no number
LOGIT_CHUNK_BYTES = 64 << 20
MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_LIBC: object = False  # not looked up yet; None: not glibc
_MAPPED = False
