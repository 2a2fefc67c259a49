"""A family bound to one checkpoint: which prefix its names use, how many layers, which roles exist.

``Layout.read(role, layer, expert)`` returns a float64 matrix in the ``[out, in]`` convention whatever the
storage (Conv1D transposed, fused tensors split), and norms as *effective* gains (Gemma's 1 + w), so
capabilities compare like with like and never see file names. The checkpoint may be any
:class:`TensorSource`: a :class:`~lmsurgeon.io.ModelHandle`, or an in-memory state dict wrapped in
:class:`ArraySource` (how the zoo's transforms and the tests use the same family facts).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from lmsurgeon.arch.registry import detect_family
from lmsurgeon.arch.schema import Family, RoleSpec
from lmsurgeon.errors import CorruptCheckpoint, MissingTensor

MAX_LAYERS = 100_000
#: The pseudo-role of a non-weight tensor older checkpoints store (masks, position ids, rotary frequencies).
BUFFER = "buffer"
MAX_EXPERTS = 100_000


class TensorSource(Protocol):
    """What a layout needs from a checkpoint: its name, config.json, tensor names and float reads."""

    name: str

    @property
    def config(self) -> dict: ...

    def names(self) -> list[str]: ...

    def tensor(self, name: str, dtype: Any = ...) -> np.ndarray: ...

    def rows(self, name: str, idx: Any, dtype: Any = ...) -> np.ndarray: ...


class ArraySource:
    """An in-memory checkpoint: ``arrays`` maps tensor names to anything ``np.asarray`` reads (numpy arrays,
    CPU torch tensors). Reads convert on demand, so wrapping a live model's state dict copies nothing."""

    def __init__(self, arrays: Mapping[str, Any], config: dict, name: str = "state dict"):
        self.arrays = arrays
        self._config = config
        self.name = name

    @property
    def config(self) -> dict:
        return self._config

    def names(self) -> list[str]:
        return list(self.arrays)

    def tensor(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        if name not in self.arrays:
            raise MissingTensor(f"has no tensor {name!r}", self.name)
        return np.array(self.arrays[name], dtype=dtype, copy=True)

    def rows(self, name: str, idx: Any, dtype: Any = np.float32) -> np.ndarray:
        return self.tensor(name, dtype)[np.asarray(idx)]


@dataclass
class Norm:
    """A norm's effective gain and (for LayerNorm) bias, as float64 vectors."""

    role: str
    layer: int | None
    kind: str
    gain: np.ndarray
    bias: np.ndarray | None
    placement: str


@dataclass(frozen=True)
class TensorSite:
    """Where one checkpoint tensor sits in the family: its role, layer, expert and whether it is the bias.

    ``axes`` labels the tensor's axes in storage order (see :data:`lmsurgeon.arch.schema.AXIS_LABELS`);
    ``unit_group`` names the MLP whose units an ``mlp`` axis counts (``mlp``, ``experts`` or ``shared``).
    """

    role: str
    layer: int | None
    expert: int | None
    is_bias: bool
    axes: tuple[str | None, ...]

    @property
    def is_buffer(self) -> bool:
        """A non-weight tensor (the family's ``buffers``): transforms copy it, analyses ignore it."""
        return self.role == BUFFER

    @property
    def unit_group(self) -> tuple[int | None, int | None, str]:
        """The key of the MLP-unit permutation an ``mlp`` axis of this tensor follows."""
        return self.layer, self.expert, self.role.split(".")[0] if "." in self.role else "mlp"


class Layout:
    """Role-level access to a checkpoint (a :class:`TensorSource`, usually a :class:`~lmsurgeon.io.ModelHandle`)."""

    def __init__(self, handle: TensorSource, family: Family | None = None):
        self.handle = handle
        self.family = family or detect_family(handle.config, where=f"{handle.name}: config.json")
        self.config = self.family.text_config(handle.config)
        self._names = set(handle.names())
        self.prefix = self._find_prefix()

    def __repr__(self) -> str:
        return f"Layout({self.handle.name!r}, family={self.family.name}, layers={self.n_layers})"

    # -- config facts -----------------------------------------------------------------------------------
    def cfg(self, key: str, default: Any = None) -> Any:
        """A config value by the family's logical key (``n_layers``, ``hidden_size``...)."""
        names = self.family.config_keys.get(key, key)
        for name in [names] if isinstance(names, str) else names:
            if self.config.get(name) is not None:
                return self.config[name]
        return default

    def _int_cfg(self, key: str, default: int | None = None, cap: int = 10**9) -> int:
        v = self.cfg(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > cap:
            raise CorruptCheckpoint(
                f"config {key} = {v!r} is not a sane non-negative integer", f"{self.handle.name}: config.json"
            )
        return v

    @cached_property
    def hidden_size(self) -> int:
        return self._int_cfg("hidden_size")

    @cached_property
    def n_layers(self) -> int:
        return self._int_cfg("n_layers", cap=MAX_LAYERS)

    @cached_property
    def max_positions(self) -> int | None:
        """The longest sequence the model accepts (learned position tables index out of range past it), or None."""
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            v = self.config.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    @cached_property
    def dims(self) -> dict[str, int]:
        """Sizes that fused-tensor splits are expressed in."""
        d = self.hidden_size
        n_heads = self._int_cfg("n_heads", 1) or 1
        head_dim = self._int_cfg("head_dim", d // n_heads) or d // n_heads
        n_kv = self._int_cfg("n_kv_heads", n_heads) or n_heads
        inter = self._int_cfg("intermediate_size", 4 * d) or 4 * d
        return {
            "hidden_size": d,
            "q_dim": n_heads * head_dim,
            "kv_dim": n_kv * head_dim,
            "intermediate_size": inter,
            "head_dim": head_dim,
            "n_heads": n_heads,
            "n_kv_heads": n_kv,
        }

    @cached_property
    def layers(self) -> list[int]:
        """Layer indices analysed: 0..n_layers-1 (extra layers such as GLM-4.5's MTP layer are skipped)."""
        return list(range(self.n_layers))

    @cached_property
    def skipped_layers(self) -> list[int]:
        """Layer indices present in the checkpoint beyond ``n_layers`` (e.g. a multi-token-prediction layer).

        Only families whose file declares ``skip_layers`` store such layers; in any other family a layer index
        at or past the config's layer count means config.json and the weights disagree, which is an error.
        """
        pat = re.compile(re.escape(self.prefix + self.family.layer_prefix).replace(r"\{i\}", r"(\d+)"))
        found = {int(m.group(1)) for n in self._names if (m := pat.match(n))}
        extra = sorted(i for i in found if i >= self.n_layers)
        if extra and self.family.skip_layers is None:
            raise CorruptCheckpoint(
                f"tensors for layer {extra[0]} but config.json says {self.n_layers} layers "
                f"(the {self.family.name} family stores no extra layers)",
                self.handle.name,
            )
        return extra

    @property
    def norm_offset(self) -> float:
        return self.family.norm_offset

    @cached_property
    def tied(self) -> bool:
        """True when the head is the embedding matrix: config.json ties them, or the file has no head tensor."""
        return self.cfg("tie") is True or not self.has("lm_head")

    def _source_role(self, role: str) -> str:
        """The role whose tensor holds ``role``'s values: its ``tied_to`` role when the checkpoint ties them."""
        tied_to = self.family.spec(role).tied_to
        if tied_to is not None and (self.cfg("tie") is True or not self.has(role)):
            return tied_to
        return role

    # -- names ------------------------------------------------------------------------------------------
    def _find_prefix(self) -> str:
        probes = self.family.spec("embed").names
        for p in self.family.prefixes:
            if any(p + probe in self._names for probe in probes):
                return p
        probe = probes[0]
        raise MissingTensor(
            f"no {self.family.name} embedding tensor ({probe!r} under prefixes {list(self.family.prefixes)})",
            self.handle.name,
        )

    def full_name(self, role: str, template: str, layer: int | None = None, expert: int | None = None) -> str:
        """``template`` (one of the role's names, or its bias) as a checkpoint name for ``layer`` and ``expert``."""
        spec = self.family.spec(role)
        if self.family.is_layer_role(role):
            template = self.family.layer_prefix + template
        name = template.replace("{i}", str(layer)).replace("{e}", str(expert))
        return name if spec.absolute else self.prefix + name

    def name(self, role: str, layer: int | None = None, expert: int | None = None) -> str | None:
        """The tensor name holding ``role`` (first alternative present), or None when absent (or unknown)."""
        try:
            spec = self.family.spec(role)
        except KeyError:
            return None
        for template in spec.names:
            full = self.full_name(role, template, layer, expert)
            if full in self._names:
                return full
        return None

    def bias_name(self, role: str, layer: int | None = None, expert: int | None = None) -> str | None:
        """The tensor name holding ``role``'s bias, or None when the family or the checkpoint has none."""
        spec = self.family.spec(role)
        if spec.bias is None or self.name(role, layer, expert) is None:
            return None
        full = self.full_name(role, spec.bias, layer, expert)
        return full if full in self._names else None

    def has(self, role: str, layer: int | None = None, expert: int | None = None) -> bool:
        return self.name(role, layer, expert) is not None

    def require(self, role: str, layer: int | None = None, expert: int | None = None) -> str:
        n = self.name(role, layer, expert)
        if n is None:
            if role not in self.family.roles():
                raise MissingTensor(f"family {self.family.name} has no role {role!r}", self.handle.name)
            want = self.full_name(role, self.family.spec(role).names[0], layer, expert)
            raise MissingTensor(f"missing tensor {want!r} (role {role}, layer {layer})", self.handle.name)
        return n

    def experts(self, layer: int, role: str = "experts.up") -> list[int]:
        """Expert indices present for ``role`` in ``layer`` (empty for dense layers)."""
        if role not in self.family.layer:
            return []
        n = self.cfg("n_experts")
        if isinstance(n, int) and 0 < n <= MAX_EXPERTS:
            return [e for e in range(n) if self.has(role, layer, e)]
        return []

    def layer_roles(self, layer: int) -> list[str]:
        """Roles present in ``layer`` (experts counted once if expert 0 is present)."""
        return [r for r in self.family.layer if self.has(r, layer, 0)]

    @cached_property
    def sites(self) -> dict[str, TensorSite]:
        """Every checkpoint tensor some role names (weight or bias, analysed layers only), by name, and the
        family's buffers (role :data:`BUFFER`, no axis labels).

        A fused tensor (GPT-2's c_attn) is listed once, under the first role that names it.
        """
        out: dict[str, TensorSite] = {}
        for role in self.family.roles():
            spec = self.family.spec(role)
            layers: list[int | None] = list(self.layers) if self.family.is_layer_role(role) else [None]
            for layer in layers:
                experts: Iterable[int | None] = (
                    self.experts(layer, role) if role.startswith("experts.") and layer is not None else [None]
                )
                for expert in experts:
                    weight = self.name(role, layer, expert)
                    if weight is None:
                        continue
                    out.setdefault(weight, TensorSite(role, layer, expert, False, spec.stored_axes))
                    bias = self.bias_name(role, layer, expert)
                    if bias is not None:
                        out.setdefault(bias, TensorSite(role, layer, expert, True, spec.bias_axes))
        for template in self.family.buffers:
            for layer in self.layers if "{i}" in template else [None]:
                name = self.prefix + template.replace("{i}", str(layer))
                if name in self._names:
                    out.setdefault(name, TensorSite(BUFFER, layer, None, False, ()))
        return out

    def layer_of(self, name: str) -> int | None:
        """The layer index in a checkpoint tensor name (``model.layers.7.…`` → 7), or None outside the layers."""
        match = self._layer_pattern.match(name)
        return None if match is None else int(match.group(1))

    @cached_property
    def _layer_pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.prefix + self.family.layer_prefix).replace(r"\{i\}", r"(\d+)"))

    # -- reads ------------------------------------------------------------------------------------------
    def read(
        self, role: str, layer: int | None = None, expert: int | None = None, dtype: Any = np.float64
    ) -> np.ndarray:
        """The role's matrix in [out, in] orientation (or vector), split from fused tensors if needed.

        A role tied to another (``lm_head`` with ``tied_to: embed``) reads that role's tensor when tied.
        """
        role = self._source_role(role)
        name = self.require(role, layer, expert)
        spec = self.family.spec(role)
        w = self.handle.tensor(name, dtype)
        if spec.layout == "conv1d" and w.ndim == 2:
            w = w.T
        return self._unfuse(name, w, spec)

    def bias(
        self, role: str, layer: int | None = None, expert: int | None = None, dtype: Any = np.float64
    ) -> np.ndarray | None:
        """The role's bias vector (split like its weight when fused), or None when the checkpoint has none."""
        full = self.bias_name(role, layer, expert)
        if full is None:
            return None
        weight = self.require(role, layer, expert)
        return self._unfuse(weight, self.handle.tensor(full, dtype), self.family.spec(role))

    def _split_rows(self, weight_name: str, spec: RoleSpec) -> slice | None:
        """Rows of a fused tensor (GPT-2 c_attn, Phi-3 qkv_proj/gate_up_proj) that belong to this role."""
        split = spec.split
        if split is None or not weight_name.endswith(split.of):
            return None
        sizes = [self.dims[p] for p in split.parts]
        start = sum(sizes[: split.index])
        return slice(start, start + sizes[split.index])

    def _unfuse(self, weight_name: str, w: np.ndarray, spec: RoleSpec) -> np.ndarray:
        rows = self._split_rows(weight_name, spec)
        if rows is not None and spec.split is not None:
            sizes = [self.dims[p] for p in spec.split.parts]
            if sum(sizes) != w.shape[0]:
                raise CorruptCheckpoint(
                    f"{weight_name}: fused size {w.shape[0]} != {' + '.join(map(str, sizes))} expected from config",
                    self.handle.name,
                )
            w = w[rows]
        return np.ascontiguousarray(w)

    def role_module(self, role: str, layer: int) -> tuple[str, slice] | None:
        """Where a loaded model computes ``role`` in ``layer``: the module path inside the layer and the slice of
        its output's last axis that is the role (all of it unless the tensor is fused), or None when absent.

        Activation tests hook these modules; the path comes from the same registry data as the tensor names.
        """
        name = self.name(role, layer)
        if name is None or not self.family.is_layer_role(role):
            return None
        inner = name[len(self.prefix + self.family.layer_prefix.replace("{i}", str(layer))) :]
        path = inner.rsplit(".", 1)[0]
        rows = self._split_rows(name, self.family.spec(role))
        return path, slice(None) if rows is None else rows

    def read_rows(self, role: str, idx: Any, dtype: Any = np.float64) -> np.ndarray:
        """Rows of a vocabulary-indexed role (``embed``, ``lm_head``) without reading the rest."""
        return self.handle.rows(self.require(self._source_role(role)), idx, dtype)

    def norm(self, role: str, layer: int | None = None) -> Norm:
        """A norm's effective gain (offset applied, e.g. Gemma 1 + w) and bias if it has one."""
        spec = self.family.spec(role)
        gain = self.read(role, layer) + self.family.norm_offset
        bias = self.bias(role, layer)
        kind = spec.kind or "rms"
        if kind == "rms_or_layer":
            kind = "layer" if bias is not None else "rms"
        return Norm(role, layer, kind, gain, bias, spec.placement or "pre")

    def norms_present(self) -> list[tuple[str, int | None]]:
        """(role, layer) of every norm in the checkpoint, in family-file order, skipping extra layers."""
        out: list[tuple[str, int | None]] = []
        for role in self.family.norm_roles():
            if self.family.is_layer_role(role):
                out += [(role, i) for i in self.layers if self.has(role, i)]
            elif self.has(role):
                out.append((role, None))
        return out


def find_module(model: Any, paths: Sequence[str]) -> Any:
    """The first dotted attribute path that exists on a loaded ``transformers`` model (e.g. its layer list)."""
    for path in paths:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise MissingTensor(f"model {type(model).__name__} has none of the modules {list(paths)}")
