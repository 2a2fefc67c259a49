"""``lmsurgeon inspect SOURCE``."""

from __future__ import annotations

from pathlib import Path

import click

from lmsurgeon.cli.common import emit, json_option, out_option


@click.command(
    "inspect",
    epilog="""\b
Examples:
  lmsurgeon inspect minilm
  lmsurgeon inspect ./models/my-llama --out runs/llama-inspect
  lmsurgeon inspect org/name@main --json     # hub: headers and norms by HTTP range reads""",
)
@click.argument("source")
@click.option("--endpoint", default=None, help="Hub endpoint (default: $HF_ENDPOINT or huggingface.co).")
@out_option
@json_option
def inspect_cmd(source: str, endpoint: str | None, out: Path | None, as_json: bool) -> None:
    """Family, layers, roles and norm-gain summary of a checkpoint (reads headers and norms only)."""
    from lmsurgeon.inspect import run

    kwargs = {"endpoint": endpoint} if endpoint else {}
    result = run(source, out=out, **kwargs)
    m = result["model"]
    emit(
        result,
        as_json,
        [
            f"{m['name']}: family {m['family']}, {m['n_layers']} layers, hidden {m['hidden_size']}, "
            f"tied head {m['tied_head']}, {m['n_tensors']} tensors",
            f"norms read: {len(result['norms'])}, bytes read: {result['bytes_read']:,}",
        ],
        result["out"],
    )
