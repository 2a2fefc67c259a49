"""A run folder is built under a temporary sibling name and renamed into place only when complete.

So a folder named like a finished run always is one: a crash or Ctrl-C leaves a ``.tmp-*`` sibling that
nothing reads, never a half-written ``results.json`` or model.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from lmsurgeon.errors import OutputExists
from lmsurgeon.report.results import SCHEMA_PREFIX, jsonable, versions

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lmsurgeon.report.html import Report

COMPLETE_MARKER = ".lmsurgeon-complete"


def default_out_dir(command: str) -> Path:
    """``runs/<command>-<timestamp>`` under the current directory."""
    return Path("runs") / f"{command}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: object) -> None:
    """``obj`` as strict JSON (see :func:`jsonable`), written atomically like :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, (json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n").encode())


class RunFolder:
    """Context manager for one command's output folder.

    Inside the block ``run.path`` is a temporary sibling of ``out``; on success it is renamed to ``out`` and a
    completion marker is written; on an exception it is deleted.
    """

    def __init__(self, out: str | Path | None, command: str, *, overwrite: bool = False, seed: int | None = None):
        self.command = command
        self.out = Path(out) if out is not None else default_out_dir(command)
        self.overwrite = overwrite
        self.seed = seed
        self.started = time.time()
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        """Where to write: the temporary folder inside the ``with`` block, ``out`` once it has completed."""
        if self._path is None:
            raise RuntimeError("RunFolder.path is only defined inside its with block")
        return self._path

    def __enter__(self) -> RunFolder:
        if self.out.exists() and not self.overwrite and any(self.out.iterdir()):
            raise OutputExists("output folder exists and is not empty (choose another --out)", self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        (self._path / "figures").mkdir()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        (self.path / COMPLETE_MARKER).write_text(datetime.now().isoformat() + "\n")
        if self.out.exists():
            trash = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, trash)
            os.replace(self.path, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.path, self.out)
        self._path = self.out

    # -- writers ------------------------------------------------------------------------------------------
    def save_figure(self, fig: Figure, name: str) -> str:
        """Save a matplotlib figure as ``figures/<name>.png``; returns the path relative to the run folder."""
        import matplotlib.pyplot as plt

        rel = f"figures/{name}.png"
        fig.savefig(self.path / rel, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return rel

    def write_json(self, rel: str, obj: object) -> Path:
        """``obj`` as strict JSON at ``rel`` inside the run folder; returns the file's path."""
        path = self.path / rel
        atomic_write_json(path, obj)
        return path

    def envelope(
        self, results: dict[str, Any], *, inputs: list[Any] | None = None, timings: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``results`` with the common header every results.json carries (schema, versions, argv, seed...)."""
        head = {
            "schema": f"{SCHEMA_PREFIX}{self.command}@1",
            "command": self.command,
            "argv": sys.argv[1:],
            "versions": versions(),
            "seed": self.seed,
            "inputs": inputs or [],
        }
        body: dict[str, Any] = {**head, **{k: v for k, v in results.items() if k not in head or v is not None}}
        body.setdefault("timings", {})
        body["timings"] = {
            **(timings or {}),
            **body["timings"],
            "total_seconds": time.time() - self.started,
            "created": datetime.now().isoformat(timespec="seconds"),
        }
        return jsonable(body)

    def write_results(
        self, results: dict[str, Any], *, inputs: list[Any] | None = None, timings: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write results.json (with :meth:`envelope`) and return exactly what was written."""
        body = self.envelope(results, inputs=inputs, timings=timings)
        self.write_json("results.json", body)
        return body

    def write_report(self, report: Report) -> Path:
        """report.html, self-contained (figures embedded), in the run folder."""
        from lmsurgeon.report.html import render_report

        path = self.path / "report.html"
        atomic_write_bytes(path, render_report(report, base=self.path).encode("utf-8"))
        return path


def is_complete(folder: str | Path) -> bool:
    """True when ``folder`` was renamed into place by a finished run (completion marker present)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()
