"""A ``transformers`` model built without weights, filled and emptied one stage at a time from a model handle.

Three library pieces do the work, so lmsurgeon carries no per-family loading code:

* ``accelerate.init_empty_weights`` builds the skeleton from config.json: parameters on the meta device (no
  memory), buffers real. Buffers must stay real because some are computed at construction and never stored in
  the checkpoint (the rotary ``inv_freq`` of Llama-like models); ``torch.device("meta")`` would turn them into
  shapes without values.
* ``transformers``' own checkpoint loader (``convert_and_load_state_dict_in_model`` with the model's conversion
  mapping) puts a stage's tensors into the skeleton, exactly as ``from_pretrained`` does: renamed legacy keys,
  per-expert MoE tensors (``mlp.experts.{e}.gate_proj.weight``) stacked into the fused 3-D parameters the
  modelling code expects, dtype casts. A streamed block is therefore the same module ``from_pretrained`` builds.
* ``accelerate.utils.set_module_tensor_to_device(..., "meta")`` empties a stage again, dropping the storage while
  keeping the parameter's shape and dtype for the next load.

Tensors come from :class:`lmsurgeon.io.ModelHandle` (local memory maps, shards, or HTTP range reads), one at a
time and only when the loader asks for them, so the bytes read are counted by the handle like any other read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmsurgeon.errors import LmsurgeonError, UnknownArchitecture

KINDS = ("causal-lm", "base")

#: safetensors dtypes read as float64 (others float32) before the cast to the compute dtype: no precision lost
_WIDE = {"F64"}
_EXACT_IN_TORCH = {"BF16", "F16", "F32", "F64"}  # stored float dtypes that torch promotes (float8 does not)
_INTEGER = {"I64", "I32", "I16", "I8", "U8"}
#: tensors larger than this are read in row chunks of about this many float32 bytes
CHUNK_BYTES = 64 * 2**20


def build_skeleton(config: dict, kind: str, dtype: torch.dtype, where: str) -> Any:
    """The model of ``config`` (a config.json dict) with every parameter on the meta device, in eval mode
    (a ``transformers.PreTrainedModel``).

    ``kind`` is ``causal-lm`` (``AutoModelForCausalLM``: decoders with their head) or ``base`` (``AutoModel``:
    encoders, or a decoder without its head). Only architectures ``transformers`` ships are built: a config
    that needs remote code is refused rather than run.
    """
    import transformers
    from accelerate import init_empty_weights  # type: ignore[import-untyped]

    from lmsurgeon.io.model import quiet_transformers

    if kind not in KINDS:
        raise LmsurgeonError(f"unknown model kind {kind!r} (one of {list(KINDS)})")
    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        raise UnknownArchitecture(
            f"model_type {model_type!r} is not an architecture transformers ships; layer "
            "streaming builds only those (no remote code)",
            where,
        )
    auto = transformers.AutoModelForCausalLM if kind == "causal-lm" else transformers.AutoModel
    try:
        with quiet_transformers():
            hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
            with init_empty_weights():
                model = auto.from_config(hf_config, dtype=dtype)
    except (ValueError, KeyError, TypeError) as e:
        raise LmsurgeonError(
            f"transformers cannot build a {kind} model from it: {str(e).splitlines()[0]}", where
        ) from None
    return model.eval()


class _DeferredTensor:
    """A checkpoint tensor that is read from the handle only when the transformers loader slices it (``t[...]``).

    The loader materialises each source tensor when the conversion that needs it runs, so a stage never holds
    its raw tensors and their converted copies all at once. Floating-point tensors arrive in the wider of their
    stored dtype and the compute dtype (exact either way). A tensor up to :data:`CHUNK_BYTES` comes as stored
    (bf16, f16, f32, f64) and is widened only when the compute dtype is wider: an MoE layer reads its experts
    a tensor at a time, and a float32 copy of each (23 MB at GLM-4.5-Air's shape) is transient churn that the
    C allocator keeps. A larger tensor (an embedding, a head) is read in row chunks of :data:`CHUNK_BYTES`
    through float32 into its final buffer instead of existing three times over (stored, float32, cast).
    """

    def __init__(self, handle, name: str, compute_dtype: torch.dtype):
        self.handle = handle
        self.name = name
        self.compute_dtype = compute_dtype

    def __getitem__(self, index) -> torch.Tensor:
        from lmsurgeon.io.model import TORCH_DTYPES

        info = self.handle.info(self.name)
        if info.dtype in _INTEGER:
            return torch.from_numpy(self.handle.tensor(self.name, np.int64))[index]
        if info.dtype == "BOOL":
            return torch.from_numpy(self.handle.tensor(self.name, np.bool_))[index]
        wide = info.dtype in _WIDE
        if info.dtype in _EXACT_IN_TORCH and (info.nbytes <= CHUNK_BYTES or len(info.shape) < 2):
            # as stored, widened only if the compute dtype is wider: no float32 copy of every expert matrix
            stored = self.handle.stored_tensor(self.name)
            return stored.to(torch.promote_types(stored.dtype, self.compute_dtype))[index]
        if info.nbytes <= CHUNK_BYTES or len(info.shape) < 2 or wide:
            return torch.from_numpy(self.handle.tensor(self.name, np.float64 if wide else np.float32))[index]
        out = torch.empty(info.shape, dtype=torch.promote_types(TORCH_DTYPES[info.dtype], self.compute_dtype))
        rows = max(1, CHUNK_BYTES // (4 * int(np.prod(info.shape[1:]))))
        for a in range(0, info.shape[0], rows):
            b = min(a + rows, info.shape[0])
            out[a:b] = torch.from_numpy(self.handle.rows(self.name, np.arange(a, b), np.float32))
        return out[index]


@contextlib.contextmanager
def _sequential_loading():
    """Make transformers' loader read one tensor at a time (``HF_DEACTIVATE_ASYNC_LOAD``), as it does itself for
    disk offload: with its thread pool every tensor of a stage is materialised at once, which doubles the peak of
    an MoE block, and the handle's byte counters are not meant to be updated from several threads."""
    key = "HF_DEACTIVATE_ASYNC_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


def load_tensors(
    model: Any, handle, names: Iterable[str], dtype: torch.dtype, device: torch.device, *, defer_experts: bool = False
) -> dict[str, StackedExperts]:
    """Read the checkpoint tensors ``names`` from ``handle`` into ``model`` as transformers' loader would.

    Per-expert MoE tensors that transformers stacks into one fused parameter are copied into that parameter
    expert by expert (:meth:`StackedExperts.read`); everything else goes through transformers' loader. With
    ``defer_experts`` those fused parameters are left on the meta device and returned instead, keyed by parameter
    name, so that a caller can read a few experts at a time (:mod:`lmsurgeon.streaming.experts`). Raises when a
    tensor does not fit the parameter it maps to (a shape mismatch means the config and the checkpoint disagree,
    and a silently half-loaded block would compute garbage).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model, dot_natural_key
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:  # pragma: no cover - depends on the installed transformers
        raise LmsurgeonError("layer streaming needs transformers >= 5 (its checkpoint conversion loader)") from None

    from lmsurgeon.io.model import quiet_transformers

    names = sorted(names, key=dot_natural_key)  # the order transformers stacks experts in
    if not names:
        return {}
    mapping = get_model_conversion_mapping(model)
    stacked, rest = _stacked_expert_groups(model, mapping, names)
    if not defer_experts:
        place_stacked(model, stacked, handle, dtype, device)
    if rest:
        state = {name: _DeferredTensor(handle, name, dtype) for name in rest}
        config = LoadStateDictConfig(device_map={"": device}, dtype=dtype, weight_mapping=mapping)  # type: ignore[arg-type]
        with _sequential_loading(), quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(model, state, config)
        if info.mismatched_keys:
            key, got, want = sorted(info.mismatched_keys)[0]
            raise LmsurgeonError(
                f"tensor for {key} has shape {tuple(got)}, the config implies {tuple(want)}", handle.name
            )
        if info.conversion_errors:
            key, error = next(iter(info.conversion_errors.items()))
            raise LmsurgeonError(
                f"transformers could not convert the tensors of {key}: {error.strip().splitlines()[-1]}", handle.name
            )
    return stacked if defer_experts else {}


def place_stacked(
    model: Any, stacked: dict[str, StackedExperts], handle, dtype: torch.dtype, device: torch.device
) -> None:
    """Read each fused expert parameter whole (:meth:`StackedExperts.read`) and put it into ``model``."""
    from accelerate.utils import set_module_tensor_to_device  # type: ignore[import-untyped]

    for target, experts in stacked.items():
        set_module_tensor_to_device(model, target, device, value=experts.read(handle, dtype, device))


def _is_expert_stacking(converter) -> bool:
    """True for transformers' MoE conversions: stack experts along a new axis 0 (``MergeModulelist(0)``), then, for
    several sources (gate and up), concatenate them along axis 1 (``Concatenate(1)``)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    if len(converter.target_patterns) != 1 or not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim:
        return False
    if len(ops) == 1:
        return len(converter.source_patterns) == 1
    return len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1


def _stacked_expert_groups(model: Any, mapping: list, names: list[str]) -> tuple[dict[str, StackedExperts], list[str]]:
    """Split ``names`` into fused-expert targets (``target →`` :class:`StackedExperts`, with every expert present)
    and the rest, naming targets as transformers' own ``rename_source_key`` does."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    groups: dict[str, tuple[Any, dict[str, list[str]]]] = {}
    rest = []
    for name in names:
        target, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        converter = by_pattern.get(pattern) if pattern else None
        if pattern is None or converter is None or target not in meta or not _is_expert_stacking(converter):
            rest.append(name)
            continue
        groups.setdefault(target, (converter, {}))[1].setdefault(pattern, []).append(name)
    complete = {}
    for target, (converter, parts) in groups.items():
        n_experts = meta[target].shape[0]
        if all(len(parts.get(p, [])) == n_experts for p in converter.source_patterns):
            sources = [parts[p] for p in converter.source_patterns]
            complete[target] = StackedExperts(target, tuple(meta[target].shape), sources)
        else:  # let transformers report what is missing
            rest += [n for names_of in parts.values() for n in names_of]
    return complete, sorted(rest)


@dataclass(frozen=True)
class StackedExperts:
    """A fused ``[experts, rows, cols]`` MoE parameter and the per-expert checkpoint tensors it is stacked from.

    ``sources[k][e]`` is expert ``e``'s tensor of the k-th source (gate, then up, for a fused ``gate_up_proj``);
    the parameter is ``cat([stack(sources[0]), stack(sources[1]), ...], dim=1)``, as transformers' conversion
    builds it.
    """

    target: str
    shape: tuple[int, ...]
    sources: list[list[str]]

    @property
    def n_experts(self) -> int:
        return self.shape[0]

    def expert_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one expert's slice in ``dtype``."""
        return int(np.prod(self.shape[1:])) * torch.empty((), dtype=dtype).element_size()

    def read(
        self, handle, dtype: torch.dtype, device: torch.device, experts: Sequence[int] | None = None
    ) -> torch.Tensor:
        """The fused parameter, or its rows for ``experts`` only (in that order), filled one expert tensor at a
        time: without holding the per-expert list, the stacks and the concatenation at once (for a GLM-4.5-Air
        layer that is 3 GB of transient copies)."""
        chosen = list(range(self.n_experts)) if experts is None else list(experts)
        out = torch.empty((len(chosen), *self.shape[1:]), dtype=dtype, device=device)
        offset = 0
        for names in self.sources:
            rows = 0
            for slot, expert in enumerate(chosen):
                name = names[expert]
                tensor = _DeferredTensor(handle, name, dtype)[...]
                rows = tensor.shape[0]
                if offset + rows > self.shape[1] or tuple(tensor.shape[1:]) != tuple(self.shape[2:]):
                    raise LmsurgeonError(
                        f"expert tensor {name} has shape {tuple(tensor.shape)}, which does not fit "
                        f"{self.target} of shape {self.shape}",
                        handle.name,
                    )
                out[slot, offset : offset + rows] = tensor
            offset += rows
        if chosen and offset != self.shape[1]:
            raise LmsurgeonError(
                f"expert tensors fill {offset} of the {self.shape[1]} rows of {self.target}", handle.name
            )
        return out


def empty(model: torch.nn.Module, selects: Callable[[str], bool]) -> None:
    """Return every loaded parameter whose name ``selects`` accepts to the meta device (storage dropped, shape and
    dtype kept for the next load)."""
    from accelerate.utils import set_module_tensor_to_device  # type: ignore[import-untyped]

    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if param.device.type != "meta" and selects(name):
            set_module_tensor_to_device(model, name, "meta")


def loaded_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Parameters that currently hold data (not on the meta device), each storage once."""
    for name, param in model.named_parameters():
        if param.device.type != "meta":
            yield name, param


def module_path(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """The dotted path of ``module`` inside ``model`` (``""`` for the model itself)."""
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return name
    raise LmsurgeonError(f"{type(module).__name__} is not part of {type(model).__name__}")
