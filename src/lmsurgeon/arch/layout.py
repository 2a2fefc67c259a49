"""A family bound to one checkpoint: which prefix its names use, how many layers, which roles exist.

``Layout.read(role, layer, expert)`` returns a float64 matrix in the ``[out, in]`` convention whatever the
storage (Conv1D transposed, fused tensors split), and norms as *effective* gains (Gemma's 1 + w), so
capabilities compare like with like and never see file names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lmsurgeon.arch.registry import Family, detect_family
from lmsurgeon.errors import CorruptCheckpoint, MissingTensor

MAX_LAYERS = 100_000
MAX_EXPERTS = 100_000


@dataclass
class Norm:
    """A norm's effective gain and (for LayerNorm) bias, as float64 vectors."""

    role: str
    layer: int | None
    kind: str
    gain: np.ndarray
    bias: np.ndarray | None
    placement: str


class Layout:
    """Role-level access to a :class:`~lmsurgeon.io.ModelHandle`."""

    def __init__(self, handle, family: Family | None = None):
        self.handle = handle
        self.family = family or detect_family(handle.config, where=f"{handle.name}: config.json")
        self.config = self.family.text_config(handle.config)
        self._names = set(handle.names())
        self.prefix = self._find_prefix()

    def __repr__(self) -> str:
        return f"Layout({self.handle.name!r}, family={self.family.name}, layers={self.n_layers})"

    # -- config facts -----------------------------------------------------------------------------------
    def cfg(self, key: str, default=None):
        """A config value by the family's logical key (``n_layers``, ``hidden_size``...)."""
        names = self.family.config_keys.get(key, key)
        for name in [names] if isinstance(names, str) else names:
            if self.config.get(name) is not None:
                return self.config[name]
        return default

    def _int_cfg(self, key: str, default: int | None = None, cap: int = 10**9) -> int:
        v = self.cfg(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > cap:
            raise CorruptCheckpoint(f"config {key} = {v!r} is not a sane non-negative integer",
                                    f"{self.handle.name}: config.json")
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
        return {"hidden_size": d, "q_dim": n_heads * head_dim, "kv_dim": n_kv * head_dim,
                "intermediate_size": inter, "head_dim": head_dim, "n_heads": n_heads, "n_kv_heads": n_kv}

    @cached_property
    def layers(self) -> list[int]:
        """Layer indices analysed: 0..n_layers-1 (extra layers such as GLM-4.5's MTP layer are skipped)."""
        return list(range(self.n_layers))

    @cached_property
    def skipped_layers(self) -> list[int]:
        """Layer indices present in the checkpoint beyond ``n_layers`` (e.g. a multi-token-prediction layer)."""
        pat = re.compile(re.escape(self.prefix + self.family.layer_prefix).replace(r"\{i\}", r"(\d+)"))
        found = {int(m.group(1)) for n in self._names if (m := pat.match(n))}
        return sorted(i for i in found if i >= self.n_layers)

    @property
    def norm_offset(self) -> float:
        return self.family.norm_offset

    @cached_property
    def tied(self) -> bool:
        """True when the head shares the embedding matrix (no separate lm_head tensor in the file)."""
        return not self.has("lm_head")

    # -- names ------------------------------------------------------------------------------------------
    def _find_prefix(self) -> str:
        embed = self.family.pre_weights.get("embed", {}).get("name")
        probe = embed or self._first_layer_name()
        for p in self.family.prefixes:
            if p + probe in self._names:
                return p
        raise MissingTensor(f"no {self.family.name} embedding tensor ({probe!r} under prefixes "
                            f"{list(self.family.prefixes)})", self.handle.name)

    def _first_layer_name(self) -> str:
        spec = next(iter(self.family.layer.values()))
        return self.family.layer_prefix.replace("{i}", "0") + _names(spec)[0]

    def _full(self, role: str, template: str, layer: int | None, expert: int | None) -> str:
        spec = self.family.spec(role)
        if self.family.is_layer_role(role):
            template = self.family.layer_prefix + template
        name = template.replace("{i}", str(layer)).replace("{e}", str(expert))
        return name if spec.get("absolute") else self.prefix + name

    def name(self, role: str, layer: int | None = None, expert: int | None = None) -> str | None:
        """The tensor name holding ``role`` (first alternative present), or None when absent (or unknown)."""
        try:
            spec = self.family.spec(role)
        except KeyError:
            return None
        for template in _names(spec):
            full = self._full(role, template, layer, expert)
            if full in self._names:
                return full
        return None

    def has(self, role: str, layer: int | None = None, expert: int | None = None) -> bool:
        return self.name(role, layer, expert) is not None

    def require(self, role: str, layer: int | None = None, expert: int | None = None) -> str:
        n = self.name(role, layer, expert)
        if n is None:
            if role not in self.family.roles():
                raise MissingTensor(f"family {self.family.name} has no role {role!r}", self.handle.name)
            spec = self.family.spec(role)
            want = self._full(role, _names(spec)[0], layer, expert)
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

    # -- reads ------------------------------------------------------------------------------------------
    def read(self, role: str, layer: int | None = None, expert: int | None = None,
             dtype=np.float64) -> np.ndarray:
        """The role's matrix in [out, in] orientation (or vector), split from fused tensors if needed."""
        name = self.require(role, layer, expert)
        spec = self.family.spec(role)
        w = self.handle.tensor(name, dtype)
        if spec.get("layout") == "conv1d" and w.ndim == 2:
            w = w.T
        return self._unfuse(name, w, spec)

    def bias(self, role: str, layer: int | None = None, expert: int | None = None,
             dtype=np.float64) -> np.ndarray | None:
        """The role's bias vector (split like its weight when fused), or None when the checkpoint has none."""
        spec = self.family.spec(role)
        weight = self.name(role, layer, expert)
        if not spec.get("bias") or weight is None:
            return None
        full = self._full(role, spec["bias"], layer, expert)
        if full not in self._names:
            return None
        return self._unfuse(weight, self.handle.tensor(full, dtype), spec)

    def _unfuse(self, weight_name: str, w: np.ndarray, spec: dict) -> np.ndarray:
        """Rows of a fused tensor (GPT-2 c_attn, Phi-3 qkv_proj/gate_up_proj) that belong to this role."""
        split = spec.get("split")
        if split and weight_name.endswith(split["of"]):
            sizes = [self.dims[p] for p in split["parts"]]
            if sum(sizes) != w.shape[0]:
                raise CorruptCheckpoint(f"{weight_name}: fused size {w.shape[0]} != {' + '.join(map(str, sizes))} "
                                        f"expected from config", self.handle.name)
            start = sum(sizes[: split["index"]])
            w = w[start:start + sizes[split["index"]]]
        return np.ascontiguousarray(w)

    def role_module(self, role: str, layer: int) -> tuple[str, slice] | None:
        """Where a loaded model computes ``role`` in ``layer``: the module path inside the layer and the slice of
        its output's last axis that is the role (all of it unless the tensor is fused), or None when absent.

        Activation tests hook these modules; the path comes from the same registry data as the tensor names.
        """
        name = self.name(role, layer)
        if name is None or not self.family.is_layer_role(role):
            return None
        inner = name[len(self.prefix + self.family.layer_prefix.replace("{i}", str(layer))):]
        path = inner.rsplit(".", 1)[0]
        split = self.family.spec(role).get("split")
        if not (split and name.endswith(split["of"])):
            return path, slice(None)
        sizes = [self.dims[p] for p in split["parts"]]
        start = sum(sizes[: split["index"]])
        return path, slice(start, start + sizes[split["index"]])

    def read_rows(self, role: str, idx, dtype=np.float64) -> np.ndarray:
        """Rows of a vocabulary-indexed role (``embed``, ``lm_head``) without reading the rest."""
        return self.handle.rows(self.require(role), idx, dtype)

    def norm(self, role: str, layer: int | None = None) -> Norm:
        """A norm's effective gain (offset applied, e.g. Gemma 1 + w) and bias if it has one."""
        spec = self.family.spec(role)
        gain = self.read(role, layer) + self.family.norm_offset
        bias = self.bias(role, layer)
        kind = spec["kind"]
        if kind == "rms_or_layer":
            kind = "layer" if bias is not None else "rms"
        return Norm(role, layer, kind, gain, bias, spec.get("placement", "pre"))

    def norms_present(self) -> list[tuple[str, int | None]]:
        """(role, layer) of every norm in the checkpoint, per-layer ones first, skipping extra layers."""
        out = []
        for role in self.family.norm_roles():
            if self.family.is_layer_role(role):
                out += [(role, i) for i in self.layers if self.has(role, i)]
            elif self.has(role):
                out.append((role, None))
        return out


def _names(spec: dict) -> list[str]:
    n = spec["name"]
    return list(n) if isinstance(n, list) else [n]


def find_module(model, paths: list[str]):
    """The first dotted attribute path that exists on a loaded ``transformers`` model (e.g. its layer list)."""
    for path in paths:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise MissingTensor(f"model {type(model).__name__} has none of the modules {paths}")
