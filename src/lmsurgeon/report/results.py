"""results.json: a versioned, strictly-JSON record of a run (non-finite numbers become null)."""

from __future__ import annotations

import dataclasses
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_PREFIX = "lmsurgeon/"


def jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths and dataclasses to JSON types; NaN/Inf become None (JSON has none)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def versions() -> dict[str, str | None]:
    """Versions of lmsurgeon and the libraries whose behaviour the numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("lmsurgeon", "torch", "transformers", "safetensors", "numpy", "scipy", "optuna"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
