"""The small error hierarchy every layer raises and the CLI turns into one line and an exit code.

A message always names the file (or source) and the problem, so a user never needs the traceback.
"""

from __future__ import annotations

from pathlib import Path


class LmsurgeonError(Exception):
    """Base class: a problem with the user's input or environment, not a bug (CLI exit code 1)."""

    def __init__(self, problem: str, path: str | Path | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class SourceNotFound(LmsurgeonError):
    """A path, hub repository, revision or file that does not exist."""


class CorruptCheckpoint(LmsurgeonError):
    """A safetensors file, index or config that is malformed, truncated or inconsistent."""


class UnsafeInput(LmsurgeonError):
    """Input that would make lmsurgeon leave its folder or run foreign code (path traversal, pickles, remote code)."""


class UnknownArchitecture(LmsurgeonError):
    """config.json names a model family the registry does not describe."""


class MissingTensor(LmsurgeonError):
    """A tensor a capability needs is not in the checkpoint."""


class RemoteError(LmsurgeonError):
    """The hub (or a mirror) could not be reached or answered wrongly after retries."""


class BadNumbers(LmsurgeonError):
    """NaN/Inf or otherwise unusable values where a statistic needs finite numbers."""


class OutputExists(LmsurgeonError):
    """The run folder already exists and would be overwritten."""
