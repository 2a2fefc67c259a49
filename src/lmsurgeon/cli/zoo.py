"""``lmsurgeon zoo build DIR``: train the offline model zoo (tokenizers, decoders, lineage family)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lmsurgeon.cli.common import json_option, progress_enabled

EXAMPLES = """\b
Examples:
  lmsurgeon zoo build ./zoo                  # the full zoo (about 8 minutes on a 2-core CPU)
  lmsurgeon zoo build ./zoo-test --profile test
  lmsurgeon zoo build ./zoo --seed 1         # the same recipe from other seeds
  lmsurgeon zoo build ./zoo --force          # delete the zoo files there and rebuild
  lmsurgeon zoo build ./zoo --json | jq '.models[\"lin-base\"].final_val_ppl'"""


@click.group("zoo", epilog=EXAMPLES)
def zoo() -> None:
    """Small real models with known lineage, trained offline on the standard library's docstrings."""


@zoo.command("build", epilog=EXAMPLES)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--profile",
    type=click.Choice(["full", "test"]),
    default="full",
    show_default=True,
    help="full: the demo's zoo; test: smaller and shorter (about a minute), same model kinds.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Base seed of every model.")
@click.option("--force", is_flag=True, help="Delete the zoo files already in DIRECTORY and rebuild.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal).")
@json_option
def build_cmd(directory: Path, profile: str, seed: int, force: bool, progress: bool | None, as_json: bool) -> None:
    """Build (or resume, or reuse when complete) the zoo in DIRECTORY and list its models.

    DIRECTORY receives one Hugging Face folder per model, the tokenizers and zoo.json (lineage, training
    steps, validation perplexity and seed of every model).
    """
    from lmsurgeon.zoo import build_zoo

    bars = progress_enabled(progress)
    manifest = build_zoo(directory, profile=profile, seed=seed, progress=bars and not as_json, force=force)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    for line in summary_lines(manifest):
        click.echo(line)
    click.echo(f"zoo folder: {directory.resolve()}")
    click.echo(f"manifest: {(directory / 'zoo.json').resolve()}")


def summary_lines(manifest: dict) -> list[str]:
    """One line per model: name, family, layers x hidden, tokenizer, parent, validation perplexity."""
    lines = [
        f"profile {manifest['profile']}, recipe {manifest['recipe_hash'][:12]}, "
        f"built in {manifest['build_seconds']:.0f} s"
    ]
    for entry in manifest["models"].values():
        lines.append(
            f"  {entry['name']:<14} {entry['family']:<6} {entry['layers']:>2} x {entry['hidden_size']:<4} "
            f"{entry['tokenizer']:<7} parent {entry['parent'] or '-':<9} "
            f"val ppl {entry['initial_val_ppl']:8.1f} -> {entry['final_val_ppl']:7.2f}"
        )
    return lines
