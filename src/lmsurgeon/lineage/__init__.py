"""Lineage: is model B derived from model A? A faithful naive norm report beside sound, calibrated tests.

``compare(sources, out=None, ...)`` returns exactly the ``results.json`` dict (schema ``lmsurgeon/lineage@1``).
"""

from lmsurgeon.lineage.run import compare, run

__all__ = ["compare", "run"]
