"""The family file schema: typed dataclasses and one strict loader for ``arch/families/*.json``.

A family file is data every capability trusts, so a typo must not fall back to a default silently: the loader
rejects unknown keys, missing required keys and roles, wrong types and dangling role references, each with one
line naming the file and the key (:class:`InvalidFamilyFile`). ``docs/adding-a-family.md`` documents every key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from lmsurgeon.errors import LmsurgeonError

T = TypeVar("T")

#: Axis labels: which permutation (or rotation) an axis follows when a model is transformed without changing
#: its function. ``hidden``: the residual stream, one permutation for the whole model; ``mlp``: the units of
#: one MLP (per layer, and per expert for routed experts); ``heads`` / ``kv_heads``: attention heads in blocks of
#: ``head_dim`` (query heads, and the key/value heads they share under grouped-query attention; one
#: permutation of key/value heads per layer carries its query heads along); ``None``: left alone (vocabulary,
#: experts, within-head dimensions).
HIDDEN, MLP, HEADS, KV_HEADS = "hidden", "mlp", "heads", "kv_heads"
AXIS_LABELS = (HIDDEN, MLP, HEADS, KV_HEADS, None)

#: Every role a family may declare. A new role is a new word capabilities must learn, so it is added here.
KNOWN_ROLES = (
    "embed",
    "pos_embed",
    "type_embed",
    "embed_norm",
    "attn_norm",
    "q",
    "k",
    "v",
    "o",
    "q_norm",
    "k_norm",
    "attn_post_norm",
    "mlp_norm",
    "gate",
    "up",
    "down",
    "mlp_post_norm",
    "router",
    "router_bias",
    "experts.gate",
    "experts.up",
    "experts.down",
    "shared.gate",
    "shared.up",
    "shared.down",
    "shared.router",
    "final_norm",
    "lm_head",
    "pooler",
    "mlm_dense",
    "mlm_norm",
    "mlm_decoder",
    "mlm_bias",
)
#: Roles every family declares (capabilities ask for them without checking); decoders also need a head.
REQUIRED_ROLES = ("embed", "attn_norm", "q", "k", "v", "o", "mlp_norm", "up", "down")
REQUIRED_DECODER_ROLES = ("final_norm", "lm_head")
#: Sizes a fused tensor's parts may be given in (computed from config.json by the layout).
SPLIT_DIMS = ("hidden_size", "q_dim", "kv_dim", "intermediate_size", "head_dim")
CONFIG_KEYS = (
    "n_layers",
    "hidden_size",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "intermediate_size",
    "n_experts",
    "tie",
    "sub_config",
)
MODULE_KEYS = ("layers", "final_norm", "lm_head")
NORM_KINDS = ("rms", "layer", "rms_or_layer")
PLACEMENTS = ("pre", "post", "inner")
STORAGE_LAYOUTS = ("linear", "conv1d")
SKIP_LAYERS = ("beyond_n_layers",)


class InvalidFamilyFile(LmsurgeonError):
    """A family file that breaks the schema: the message names the file and the offending key."""


@dataclass(frozen=True)
class Split:
    """Which rows of a fused tensor (``of``) belong to a role: part ``index`` of ``parts`` (config sizes)."""

    of: str
    parts: tuple[str, ...]
    index: int


@dataclass(frozen=True)
class RoleSpec:
    """One role of a family: where its tensor lives and the facts transforms and analyses need about it.

    ``axes`` labels the weight's axes in the ``[out, in]`` convention whatever the storage (vectors: one
    label); a bias follows the weight's output axis. Norms carry ``kind`` and ``placement``; a pre-norm's
    ``feeds`` lists the roles its output enters (the linear maps its gain folds into).
    """

    role: str
    names: tuple[str, ...]
    axes: tuple[str | None, ...]
    bias: str | None = None
    absolute: bool = False
    layout: str = "linear"
    split: Split | None = None
    kind: str | None = None
    placement: str | None = None
    feeds: tuple[str, ...] = ()
    tied_to: str | None = None

    @property
    def is_norm(self) -> bool:
        return self.kind is not None

    @property
    def foldable(self) -> bool:
        """A pre-norm whose output only enters linear maps: its gain can move into them (methods.md §L3)."""
        return self.placement == "pre" and bool(self.feeds)

    @property
    def stored_axes(self) -> tuple[str | None, ...]:
        """``axes`` in the order the checkpoint stores them (Conv1D keeps matrices as ``[in, out]``)."""
        return self.axes[::-1] if self.layout == "conv1d" and len(self.axes) == 2 else self.axes

    @property
    def bias_axes(self) -> tuple[str | None, ...]:
        """The bias vector's axis label: the weight's output axis (a norm's bias runs along its gain)."""
        return self.axes[:1]


@dataclass(frozen=True)
class Family:
    """One architecture family as described by its data file (validated; see :func:`load_family`)."""

    name: str
    description: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    prefixes: tuple[str, ...]
    config_keys: Mapping[str, str | tuple[str, ...]]
    modules: Mapping[str, tuple[str, ...]]
    pre_weights: Mapping[str, RoleSpec]
    layer_prefix: str
    layer: Mapping[str, RoleSpec]
    post_weights: Mapping[str, RoleSpec]
    norm_offset: float = 0.0
    skip_layers: str | None = None
    encoder: bool = False
    buffers: tuple[str, ...] = ()
    source: str = ""

    def roles(self) -> list[str]:
        return [*self.pre_weights, *self.layer, *self.post_weights]

    def spec(self, role: str) -> RoleSpec:
        for table in (self.pre_weights, self.layer, self.post_weights):
            if role in table:
                return table[role]
        raise KeyError(f"family {self.name} has no role {role!r}")

    def is_layer_role(self, role: str) -> bool:
        return role in self.layer

    def norm_roles(self) -> list[str]:
        """Roles that are norms (they carry a ``kind``), in data-file order."""
        return [r for r in self.roles() if self.spec(r).is_norm]

    def foldable_norms(self) -> list[str]:
        """Norm roles whose gain folds into the linear maps they feed (pre-norms with ``feeds``), in file order."""
        return [r for r in self.norm_roles() if self.spec(r).foldable]

    def text_config(self, config: dict) -> dict:
        """The config section that describes the language model (multimodal wrappers nest it)."""
        sub = self.config_keys.get("sub_config")
        n_layers = self.config_keys["n_layers"]
        keys = [n_layers] if isinstance(n_layers, str) else list(n_layers)
        if isinstance(sub, str) and isinstance(config.get(sub), dict) and not any(k in config for k in keys):
            return config[sub]
        return config


# ------------------------------------------------------------------------------------------------ loader


def load_family(path: str | Path) -> Family:
    """Read and validate one family file; any deviation from the schema raises :class:`InvalidFamilyFile`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidFamilyFile(f"not a readable JSON file ({str(e).splitlines()[0]})", path.name) from None
    return family_from_data(data, path.name)


def family_from_data(data: Any, where: str) -> Family:
    """A :class:`Family` from a parsed family file; ``where`` (the file name) prefixes every error."""
    r = _Reader(where)
    top = r.obj(data, "")
    r.keys(
        top,
        "",
        required=("family", "description", "model_types", "config", "modules", "layer_prefix", "layer"),
        optional=(
            "architectures",
            "prefixes",
            "encoder",
            "norm_offset",
            "skip_layers",
            "pre_weights",
            "post_weights",
            "buffers",
        ),
    )
    encoder = r.typed(top.get("encoder", False), "encoder", bool, "a boolean")
    layer_prefix = r.string(top["layer_prefix"], "layer_prefix")
    if "{i}" not in layer_prefix:
        r.fail("layer_prefix", f"must contain '{{i}}' (the layer index), got {layer_prefix!r}")
    tables = {t: r.obj(top.get(t, {}), t) for t in ("pre_weights", "layer", "post_weights")}
    declared = [role for table in tables.values() for role in table]
    specs = {
        t: {role: _role(r, spec, f"{t}.{role}", role, t == "layer", declared) for role, spec in table.items()}
        for t, table in tables.items()
    }
    required = REQUIRED_ROLES + (() if encoder else REQUIRED_DECODER_ROLES)
    for role in required:
        if role not in declared:
            table = "pre_weights" if role == "embed" else "post_weights" if role in REQUIRED_DECODER_ROLES else "layer"
            r.fail(f"{table}.{role}", "missing required role")
    skip = top.get("skip_layers")
    if skip is not None and skip not in SKIP_LAYERS:
        r.fail("skip_layers", f"must be one of {list(SKIP_LAYERS)}, got {skip!r}")
    return Family(
        name=r.string(top["family"], "family"),
        description=r.string(top["description"], "description"),
        model_types=r.strings(top["model_types"], "model_types", nonempty=True),
        architectures=r.strings(top.get("architectures", []), "architectures"),
        prefixes=r.strings(top.get("prefixes", [""]), "prefixes", nonempty=True),
        config_keys=_config(r, top["config"]),
        modules=_modules(r, top["modules"], encoder),
        pre_weights=specs["pre_weights"],
        layer_prefix=layer_prefix,
        layer=specs["layer"],
        post_weights=specs["post_weights"],
        norm_offset=r.number(top.get("norm_offset", 0.0), "norm_offset"),
        skip_layers=skip,
        encoder=encoder,
        buffers=r.strings(top.get("buffers", []), "buffers"),
        source=where,
    )


def _config(r: _Reader, data: Any) -> dict[str, str | tuple[str, ...]]:
    cfg = r.obj(data, "config")
    r.keys(cfg, "config", required=("n_layers", "hidden_size"), optional=CONFIG_KEYS)
    out: dict[str, str | tuple[str, ...]] = {}
    for key, value in cfg.items():
        where = f"config.{key}"
        out[key] = value if isinstance(value, str) and value else r.strings(value, where, nonempty=True)
    if isinstance(out.get("sub_config"), tuple):
        r.fail("config.sub_config", "must be one string (the key of the nested text config)")
    return out


def _modules(r: _Reader, data: Any, encoder: bool) -> dict[str, tuple[str, ...]]:
    mods = r.obj(data, "modules")
    r.keys(
        mods, "modules", required=("layers",) if encoder else ("layers", "final_norm", "lm_head"), optional=MODULE_KEYS
    )
    return {key: r.strings(value, f"modules.{key}", nonempty=True) for key, value in mods.items()}


def _role(r: _Reader, data: Any, where: str, role: str, in_layer: bool, declared: list[str]) -> RoleSpec:
    if role not in KNOWN_ROLES:
        r.fail(where, f"unknown role {role!r} (known roles: {', '.join(KNOWN_ROLES)})")
    d = r.obj(data, where)
    r.keys(
        d,
        where,
        required=("name", "axes"),
        optional=("bias", "absolute", "layout", "split", "kind", "placement", "feeds", "tied_to"),
    )
    raw_names = d["name"]
    names = (raw_names,) if isinstance(raw_names, str) else r.strings(raw_names, f"{where}.name", nonempty=True)
    if not all(names):
        r.fail(f"{where}.name", "names must not be empty")
    axes = _axes(r, d["axes"], f"{where}.axes")
    kind = r.choice(d.get("kind"), f"{where}.kind", NORM_KINDS)
    placement = r.choice(d.get("placement"), f"{where}.placement", PLACEMENTS)
    if (kind is None) != (placement is None):
        r.fail(where, "a norm needs both 'kind' and 'placement' (and other roles neither)")
    feeds = r.strings(d.get("feeds", []), f"{where}.feeds")
    for fed in feeds:
        if fed not in declared:
            r.fail(f"{where}.feeds", f"names {fed!r}, which the family does not declare")
    if feeds and placement != "pre":
        r.fail(f"{where}.feeds", "only a pre-norm feeds linear maps (placement must be 'pre')")
    tied_to = d.get("tied_to")
    if tied_to is not None and (not isinstance(tied_to, str) or tied_to not in declared):
        r.fail(f"{where}.tied_to", f"must name a role of the family, got {tied_to!r}")
    bias = d.get("bias")
    if bias is not None:
        r.string(bias, f"{where}.bias")
    if ("{e}" in json.dumps(raw_names)) != role.startswith("experts."):
        r.fail(f"{where}.name", "routed-expert roles (experts.*), and only they, have '{e}' in their names")
    if in_layer and d.get("absolute"):
        r.fail(f"{where}.absolute", "a per-layer role cannot have an absolute name")
    return RoleSpec(
        role=role,
        names=names,
        axes=axes,
        bias=bias,
        absolute=r.typed(d.get("absolute", False), f"{where}.absolute", bool, "a boolean"),
        layout=r.choice(d.get("layout", "linear"), f"{where}.layout", STORAGE_LAYOUTS) or "linear",
        split=_split(r, d["split"], f"{where}.split") if "split" in d else None,
        kind=kind,
        placement=placement,
        feeds=feeds,
        tied_to=tied_to,
    )


def _axes(r: _Reader, data: Any, where: str) -> tuple[str | None, ...]:
    if not isinstance(data, list) or not 1 <= len(data) <= 2:
        r.fail(where, f"must be a list of one or two axis labels, got {_short(data)}")
    for label in data:
        if label not in AXIS_LABELS:
            r.fail(where, f"axis label must be one of {list(AXIS_LABELS)}, got {_short(label)}")
    return tuple(data)


def _split(r: _Reader, data: Any, where: str) -> Split:
    d = r.obj(data, where)
    r.keys(d, where, required=("of", "parts", "index"), optional=())
    parts = r.strings(d["parts"], f"{where}.parts", nonempty=True)
    for part in parts:
        if part not in SPLIT_DIMS:
            r.fail(f"{where}.parts", f"{part!r} is not a size the layout knows ({', '.join(SPLIT_DIMS)})")
    index = r.typed(d["index"], f"{where}.index", int, "an integer")
    if not 0 <= index < len(parts):
        r.fail(f"{where}.index", f"must index one of the {len(parts)} parts, got {index}")
    return Split(of=r.string(d["of"], f"{where}.of"), parts=parts, index=index)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Reader:
    """Type checks that raise one :class:`InvalidFamilyFile` line naming the file and the dotted key."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, problem: str) -> NoReturn:
        raise InvalidFamilyFile(f"key '{key}': {problem}" if key else problem, self.where)

    def keys(self, d: dict, where: str, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
        for key in d:
            if key not in required and key not in optional:
                known = ", ".join(sorted({*required, *optional}))
                self.fail(f"{where}.{key}" if where else key, f"unknown key (known here: {known})")
        for key in required:
            if key not in d:
                self.fail(f"{where}.{key}" if where else key, "missing required key")

    def obj(self, value: Any, where: str) -> dict:
        return value if isinstance(value, dict) else self.fail(where, f"must be an object, got {_short(value)}")

    def typed(self, value: Any, where: str, kind: type[T], what: str) -> T:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(where, f"must be {what}, got {_short(value)}")
        return value

    def string(self, value: Any, where: str) -> str:
        return self.typed(value, where, str, "a string")

    def number(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(where, f"must be a number, got {_short(value)}")
        return float(value)

    def strings(self, value: Any, where: str, nonempty: bool = False) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(where, f"must be a list of strings, got {_short(value)}")
        if nonempty and not value:
            self.fail(where, "must not be empty")
        return tuple(value)

    def choice(self, value: Any, where: str, allowed: tuple[str, ...]) -> str | None:
        if value is not None and value not in allowed:
            self.fail(where, f"must be one of {list(allowed)}, got {_short(value)}")
        return value
