"""``lmsurgeon demo``: the main job, offline."""

from __future__ import annotations

from pathlib import Path

import click

from lmsurgeon.cli.common import emit, json_option, out_option, progress_enabled


@click.command(
    "demo",
    epilog="""\b
Examples:
  lmsurgeon demo                         # zoo, lineage, swap, merge: ~14 min on 2 cores at first, ~2 min cached
  lmsurgeon demo --out runs/tour         # choose the run folder
  lmsurgeon demo --profile test          # the small test zoo: a quicker, rougher tour""",
)
@out_option
@click.option(
    "--profile",
    type=click.Choice(["full", "test"]),
    default="full",
    show_default=True,
    help="Which zoo to build or reuse.",
)
@click.option("--merge-trials", type=int, default=6, show_default=True, help="Trials of the merge study.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal).")
@json_option
def demo(out: Path | None, profile: str, merge_trials: int, progress: bool | None, as_json: bool) -> None:
    """Build (or reuse) the zoo, then run lineage, swap and merge on it and on the real MiniLM."""
    from lmsurgeon.demo import run_demo

    res = run_demo(out, profile=profile, merge_trials=merge_trials, progress=progress_enabled(progress))
    lines = [f"{name}: {r.get('result', '')}" for name, r in res["runs"].items()]
    emit(res, as_json, lines, res["out"])
