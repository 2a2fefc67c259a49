"""The architecture registry: one JSON file per family under ``families/``, one loader, no per-model branches.

A family maps *roles* (``attn_norm``, ``q``, ``experts.up``, ``lm_head``...) to tensor-name templates with
``{i}`` (layer) and ``{e}`` (expert), plus facts capabilities need: norm kind/bias/offset/placement, which
linears a norm feeds (for γ-folding), storage layout (``conv1d`` is [in, out]), fused-tensor splits and layers
to skip. Adding a family is adding a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from lmsurgeon.errors import CorruptCheckpoint, UnknownArchitecture


@dataclass(frozen=True)
class Family:
    """One architecture family as described by its data file."""

    name: str
    description: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    prefixes: tuple[str, ...]
    config_keys: dict
    modules: dict
    pre_weights: dict
    layer_prefix: str
    layer: dict
    post_weights: dict
    norm_offset: float = 0.0
    skip_layers: str | None = None
    encoder: bool = False
    raw: dict = field(default_factory=dict, repr=False)

    def roles(self) -> list[str]:
        return [*self.pre_weights, *self.layer, *self.post_weights]

    def spec(self, role: str) -> dict:
        for table in (self.pre_weights, self.layer, self.post_weights):
            if role in table:
                return table[role]
        raise KeyError(f"family {self.name} has no role {role!r}")

    def is_layer_role(self, role: str) -> bool:
        return role in self.layer

    def norm_roles(self) -> list[str]:
        """Roles that are norms (they carry a ``kind``), in data-file order."""
        return [r for r in self.roles() if "kind" in self.spec(r)]

    def text_config(self, config: dict) -> dict:
        """The config section that describes the language model (multimodal wrappers nest it)."""
        sub = self.config_keys.get("sub_config")
        if sub and isinstance(config.get(sub), dict) and self.config_keys["n_layers"] not in config:
            return config[sub]
        return config


@cache
def families() -> dict[str, Family]:
    """Every family shipped in ``lmsurgeon/arch/families/*.json``, by name."""
    out = {}
    for entry in sorted(resources.files("lmsurgeon.arch.families").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            fam = _family_from_data(data)
            out[fam.name] = fam
    return out


def _family_from_data(d: dict) -> Family:
    return Family(
        name=d["family"], description=d.get("description", ""), model_types=tuple(d["model_types"]),
        architectures=tuple(d.get("architectures", [])), prefixes=tuple(d.get("prefixes", [""])),
        config_keys=d["config"], modules=d.get("modules", {}), pre_weights=d.get("pre_weights", {}),
        layer_prefix=d["layer_prefix"], layer=d["layer"], post_weights=d.get("post_weights", {}),
        norm_offset=float(d.get("norm_offset", 0.0)), skip_layers=d.get("skip_layers"),
        encoder=bool(d.get("encoder", False)), raw=d,
    )


def detect_family(config: dict, where: str = "config.json") -> Family:
    """The family whose ``model_types`` holds config's ``model_type``, else whose ``architectures`` match."""
    if not isinstance(config, dict):
        raise CorruptCheckpoint("config.json is not a JSON object", where)
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if not isinstance(model_type, str | None) or not isinstance(archs, list):
        raise CorruptCheckpoint(f"model_type must be a string and architectures a list, got {model_type!r} and "
                                f"{archs!r}", where)
    for fam in families().values():
        if model_type in fam.model_types:
            return fam
    for fam in families().values():
        if any(a in fam.architectures for a in archs if isinstance(a, str)):
            return fam
    known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in families().values())
    raise UnknownArchitecture(f"unknown architecture model_type={model_type!r} architectures={archs!r}; "
                              f"known families: {known}", where)
