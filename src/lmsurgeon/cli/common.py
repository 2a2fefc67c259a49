"""Options and output helpers every command shares, so each command file stays a thin layer over the API."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lmsurgeon.report.results import jsonable


def out_option(f):
    """``--out DIR`` (default ``runs/<command>-<timestamp>``)."""
    return click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Run folder to write (default: runs/<command>-<timestamp>).")(f)


def json_option(f):
    """``--json``: print results.json to stdout instead of the human summary."""
    return click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")(f)


def seed_option(f):
    return click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")(f)


def emit(results: dict, as_json: bool, summary_lines: list[str], run_dir: Path | str | None = None) -> None:
    """Print either the results as JSON (``--json``) or a short human summary ending with the report path."""
    if as_json:
        click.echo(json.dumps(jsonable(results), indent=2, allow_nan=False))
        return
    for line in summary_lines:
        click.echo(line)
    if run_dir is not None:
        report = Path(run_dir) / "report.html"
        click.echo(f"report: {report.resolve() if report.exists() else Path(run_dir).resolve()}")


def progress_enabled() -> bool:
    """Progress bars only on an interactive terminal (CI logs stay readable)."""
    return sys.stderr.isatty()
