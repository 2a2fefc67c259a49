"""Interrupted work, for real: a subprocess killed with SIGKILL mid-way, then the same command run again.

Nothing may look complete when it is not (no manifest, no completion marker, no half-written model folder
under its final name), and a rerun resumes or restarts cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lmsurgeon.zoo.build import MARKER
from lmsurgeon.zoo.manifest import MANIFEST


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lmsurgeon", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_for(predicate, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"finished before it could be interrupted: {process.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting for the point to interrupt"
        time.sleep(0.05)


def finished_models(zoo: Path) -> dict[str, float]:
    """Model folders under their final names, with the mtime of their weights."""
    return {
        p.name: (p / "model.safetensors").stat().st_mtime
        for p in zoo.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / MARKER).is_file()
    }


def test_kill_9_during_zoo_build_then_rerun_resumes_without_redoing_finished_models(tmp_path):
    zoo = tmp_path / "zoo"
    p = start("zoo", "build", str(zoo), "--profile", "test", "--no-progress")
    wait_for(lambda: zoo.is_dir() and len(finished_models(zoo)) >= 2, p)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (zoo / MANIFEST).exists()  # an interrupted zoo never looks complete
    for folder in zoo.iterdir():  # every folder under a model's name is a complete model
        if folder.is_dir() and not folder.name.startswith(".") and folder.name != "tokenizers":
            assert (folder / MARKER).is_file(), folder
            assert (folder / "model.safetensors").is_file(), folder
    before = finished_models(zoo)

    again = subprocess.run(
        [sys.executable, "-m", "lmsurgeon", "zoo", "build", str(zoo), "--profile", "test", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr
    manifest = json.loads((zoo / MANIFEST).read_text())
    after = finished_models(zoo)
    assert set(manifest["models"]) == set(after)
    assert all(after[name] == mtime for name, mtime in before.items())  # finished models were kept, not rebuilt
    assert not [p.name for p in zoo.iterdir() if ".tmp-" in p.name]
