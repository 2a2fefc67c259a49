"""The architecture registry: one JSON file per family under ``families/``, one loader, no per-model branches.

A family maps *roles* (``attn_norm``, ``q``, ``experts.up``, ``lm_head``...) to tensor-name templates with
``{i}`` (layer) and ``{e}`` (expert), plus facts capabilities need: norm kind/bias/offset/placement, which
linears a norm feeds (for γ-folding), storage layout (``conv1d`` is [in, out]), fused-tensor splits, the axis
labels function-preserving transforms permute, tied heads and layers to skip. The schema and its strict loader
are in :mod:`lmsurgeon.arch.schema`; ``docs/adding-a-family.md`` says how to add a family (a file).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from lmsurgeon.arch.schema import Family, InvalidFamilyFile, family_from_data, load_family
from lmsurgeon.errors import CorruptCheckpoint, UnknownArchitecture

__all__ = ["Family", "InvalidFamilyFile", "detect_family", "families", "load_family"]


@cache
def families() -> dict[str, Family]:
    """Every family shipped in ``lmsurgeon/arch/families/*.json``, by name (each file validated on first use)."""
    out: dict[str, Family] = {}
    for entry in sorted(resources.files("lmsurgeon.arch.families").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            try:
                data = json.loads(entry.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise InvalidFamilyFile(f"not valid JSON ({e})", entry.name) from None
            fam = family_from_data(data, entry.name)
            if fam.name != entry.name.removesuffix(".json"):
                raise InvalidFamilyFile(
                    f"key 'family': {fam.name!r} must equal the file name without .json", entry.name
                )
            out[fam.name] = fam
    return out


def detect_family(config: object, where: str = "config.json") -> Family:
    """The family whose ``model_types`` holds config's ``model_type``, else whose ``architectures`` match."""
    if not isinstance(config, dict):
        raise CorruptCheckpoint("config.json is not a JSON object", where)
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if not isinstance(model_type, str | None) or not isinstance(archs, list):
        raise CorruptCheckpoint(
            f"model_type must be a string and architectures a list, got {model_type!r} and {archs!r}", where
        )
    for fam in families().values():
        if model_type in fam.model_types:
            return fam
    for fam in families().values():
        if any(a in fam.architectures for a in archs if isinstance(a, str)):
            return fam
    known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in families().values())
    raise UnknownArchitecture(
        f"unknown architecture model_type={model_type!r} architectures={archs!r}; known families: {known}", where
    )
