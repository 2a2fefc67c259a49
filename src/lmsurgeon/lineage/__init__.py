"""Lineage: is model B derived from model A? A faithful naive norm report beside sound, calibrated tests.

``compare(sources, out=None, config=LineageConfig(...))`` returns the ``results.json`` dict (schema
``lmsurgeon/lineage@1``) and the run folder it wrote under ``out``.

``compare`` is imported on first use, so the CLI can build its options from :class:`LineageConfig` without
loading the numerical code, which every other command would then pay for at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmsurgeon.lineage.config import LineageConfig

if TYPE_CHECKING:
    from lmsurgeon.lineage.run import compare

__all__ = ["LineageConfig", "compare"]


def __getattr__(name: str):
    if name == "compare":
        from lmsurgeon.lineage.run import compare

        globals()["compare"] = compare
        return compare
    raise AttributeError(f"module 'lmsurgeon.lineage' has no attribute {name!r}")
