"""Where lmsurgeon keeps what it builds once and reuses: the corpus, the model zoo.

One root, ``$LMSURGEON_CACHE`` or ``~/.cache/lmsurgeon``, so a CI job or a test session can point every cache
at a scratch folder with a single environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmsurgeon.io.stores import cache_root

__all__ = ["cache_dir", "cache_root", "write_atomic"]


def cache_dir(kind: str) -> Path:
    """``<root>/<kind>``, created on demand (``kind`` is ``corpus`` or ``zoo``)."""
    path = cache_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write a text file so readers see either the old content or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
