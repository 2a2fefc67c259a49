"""Options and output helpers every command shares, so each command file stays a thin layer over the API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from lmsurgeon.report.progress import show_stage_lines
from lmsurgeon.report.results import jsonable


def out_option(f):
    """``--out DIR`` (default ``runs/<command>-<timestamp>``)."""
    return click.option(
        "--out",
        "out",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Run folder to write (default: runs/<command>-<timestamp>).",
    )(f)


def json_option(f):
    """``--json``: print results.json to stdout instead of the human summary."""
    return click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")(f)


def seed_option(f):
    return click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")(f)


def emit(results: dict[str, Any], as_json: bool, summary_lines: list[str], run_dir: Path | str | None = None) -> None:
    """Print either the results as JSON (``--json``) or a short human summary ending with the run folder.

    ``run_dir`` defaults to ``results["out"]``, where every command's API returns the folder it wrote (a
    command without ``--out`` writes to ``runs/<command>-<timestamp>``, which the user would otherwise have to
    go and find). The last lines are ``run folder: <absolute path>`` and, when it has one, ``report: <path>``.
    """
    if as_json:
        click.echo(json.dumps(jsonable(results), indent=2, allow_nan=False))
        return
    for line in summary_lines:
        click.echo(line)
    if run_dir is None:
        run_dir = results.get("out")
    if run_dir is not None:
        folder = Path(run_dir).resolve()
        click.echo(f"run folder: {folder}")
        if (folder / "report.html").is_file():
            click.echo(f"report: {folder / 'report.html'}")


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to draw live progress bars, given the command's ``--progress/--no-progress`` (None: not given).

    By default bars are drawn only on an interactive terminal (stderr); elsewhere (CI, a log file) every command
    prints one plain line per stage instead (switched on for each command by the ``lmsurgeon`` group, see
    :mod:`lmsurgeon.report.progress`). ``--progress`` forces bars and ``--no-progress`` shows neither.
    """
    if progress is not None:
        show_stage_lines(False)
        return progress
    return sys.stderr.isatty()
