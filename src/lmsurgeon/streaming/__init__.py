"""Layer streaming: run models whose weights are larger than memory, one block at a time, from any model source.

A foundation package: it knows :mod:`lmsurgeon.io` (where tensors come from), :mod:`lmsurgeon.arch` (where the
blocks, final norm and head are) and ``transformers``/``accelerate`` (the modelling code and the big-model
utilities), and no capability.
"""

from lmsurgeon.streaming.budget import (
    STREAMING_MODES,
    MemoryPlan,
    available_memory,
    check_streaming_mode,
    compute_dtype,
    parse_size,
    plan_memory,
    stored_float_dtype,
    wants_streaming,
    weight_bytes,
)
from lmsurgeon.streaming.model import Batch, LayerCall, Residual, StreamedModel

__all__ = [
    "STREAMING_MODES",
    "Batch",
    "LayerCall",
    "MemoryPlan",
    "Residual",
    "StreamedModel",
    "available_memory",
    "check_streaming_mode",
    "compute_dtype",
    "parse_size",
    "plan_memory",
    "stored_float_dtype",
    "wants_streaming",
    "weight_bytes",
]
