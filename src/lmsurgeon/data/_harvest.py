"""Collect docstrings and help topics from the standard library; run as ``python -I _harvest.py``.

It runs in a child interpreter because importing ~500 stdlib modules changes global state (signal handlers,
codec registries, warnings filters) that the caller should not inherit. It prints one JSON list of raw texts
on stdout; ordering and filtering are the parent's job.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import sys
import sysconfig
import warnings
from pathlib import Path

# Modules whose import does something (open a browser, print, start Tk), are tests, or are shadowed by
# site-packages shims (distutils via setuptools), so their text would depend on more than the Python version.
SKIP = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "test",
        "tests",
        "lib2to3",
        "ensurepip",
        "venv",
        "distutils",
        "pydoc_data",
        "__main__",
        "readline",
        "msilib",
        "winreg",
        "winsound",
        "msvcrt",
        "nt",
        "xxsubtype",
        "xxlimited",
        "xxlimited_35",
    }
)
STDLIB_DIRS = tuple({str(Path(sysconfig.get_paths()[key]).resolve()) for key in ("stdlib", "platstdlib")})


def _is_skipped(dotted: str) -> bool:
    """Private, test and side-effect modules are left out at every level of the dotted name."""
    return any(part.startswith("_") or part.startswith("test") or part in SKIP for part in dotted.split("."))


def _is_stdlib(module) -> bool:
    """Built-in, or a file under the interpreter's own library folders (not site-packages)."""
    path = getattr(module, "__file__", None)
    if path is None:
        return True
    resolved = str(Path(path).resolve())
    return resolved.startswith(STDLIB_DIRS) and "site-packages" not in resolved


def _quiet_import(dotted: str):
    """Import with stdout/stderr swallowed; a module that cannot load here is simply not part of the corpus."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            module = importlib.import_module(dotted)
    except BaseException:  # noqa: BLE001 - ImportError, SystemExit, OSError: all mean "not on this install"
        return None
    return module if _is_stdlib(module) else None


def _modules() -> list:
    """Every importable public stdlib module and submodule, in sorted name order."""
    found = {}
    for name in sorted(sys.stdlib_module_names):
        if _is_skipped(name) or (module := _quiet_import(name)) is None:
            continue
        found[name] = module
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + ".", onerror=lambda _: None):
            if not _is_skipped(info.name) and (sub := _quiet_import(info.name)) is not None:
                found[info.name] = sub
    return [found[name] for name in sorted(found)]


def _member_docs(obj) -> list[str]:
    """Docstrings of an object's public functions, classes, methods and properties."""
    docs = []
    for name, value in sorted(vars(obj).items()):
        if name.startswith("_") or not (
            inspect.isroutine(value) or inspect.isclass(value) or isinstance(value, property)
        ):
            continue
        if isinstance(getattr(value, "__doc__", None), str):
            docs.append(value.__doc__)
        if inspect.isclass(value) and not inspect.isclass(obj):  # one level: module -> class -> methods
            docs.extend(_member_docs(value))
    return docs


def _help_topics() -> list[str]:
    """The language reference pages behind ``help('topic')``, shipped with every CPython as pydoc_data."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [topics[key] for key in sorted(topics)]


def harvest() -> dict[str, list[str]]:
    """Raw docstrings and help topics; the parent normalises, filters and splits them."""
    warnings.simplefilter("ignore")
    docstrings = []
    for module in _modules():
        if isinstance(module.__doc__, str):
            docstrings.append(module.__doc__)
        docstrings.extend(_member_docs(module))
    return {"docstrings": docstrings, "topics": _help_topics()}


if __name__ == "__main__":
    sys.stdout.write(json.dumps(harvest()))
