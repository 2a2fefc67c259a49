"""``lmsurgeon merge`` and ``lmsurgeon compare-generation``: thin layers over :mod:`lmsurgeon.merge`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lmsurgeon.cli.common import emit, json_option, out_option, progress_enabled
from lmsurgeon.errors import LmsurgeonError

EPILOG = """\b
Examples:
  lmsurgeon merge --base ./qwen --donor ./gemma --out tuned --trials 48       # Optuna search (journal in tuned/)
  lmsurgeon merge --base B --donor D --out tuned --trials 48 --resume        # continue an interrupted study
  lmsurgeon merge --base B --donor D --out one --trials 0                    # one cautious merge, no search
  lmsurgeon merge --base B --donor D --out t --storage postgresql://u@host/db --trials 96      # finaliser
  lmsurgeon merge --base B --donor D --storage postgresql://u@host/db --trials 96 --worker     # more machines
"""

GEN_EPILOG = """\b
Examples:
  lmsurgeon compare-generation --base ./qwen --merged tuned/best_model --prompts prompts.txt --out gen
  lmsurgeon compare-generation --base B --merged M --prompts p.txt --seed 42 --max-new-tokens 64
"""


def config_options(command):
    """One click option per :class:`MergeConfig` field, with the field's help, default and choices."""
    from lmsurgeon.merge.config import cli_fields, option_name

    for f in reversed(cli_fields()):
        meta, default = f.metadata, f.default
        shown = default is not None and not isinstance(default, bool)
        kw: dict = {"help": meta["help"], "default": default, "show_default": shown}
        if meta["kind"] in ("file", "json_file"):
            kw["type"] = click.Path(exists=True, dir_okay=False)
        elif meta["choices"]:
            kw["type"] = click.Choice(list(meta["choices"]))
        elif isinstance(default, bool):
            kw["is_flag"] = True
        elif default is not None:
            kw["type"] = type(default)
        command = click.option(option_name(f), f.name, **kw)(command)
    return command


@click.command("merge", epilog=EPILOG)
@click.option("--base", required=True, help="Base model (its architecture, config and tokenizer are kept).")
@click.option("--donor", required=True, help="Donor model (only its embedding and head rows are read).")
@out_option
@json_option
@config_options
def merge(base, donor, out, as_json, **settings) -> None:
    """Move the base's embedding (and untied head) rows toward a donor's, across tokenizers and widths.

    Shared tokens are matched on canonical byte keys, the donor space is mapped by Procrustes + Umeyama
    scale, rows are blended under a perplexity guard, and Optuna searches the blend (relative perplexity
    vs symmetric KL). The best merge is saved once as best_model/.
    """
    from lmsurgeon.merge import MergeConfig, run_merge

    if settings["params"] is not None:
        try:
            settings["params"] = json.loads(Path(settings["params"]).read_text())
        except ValueError as e:
            raise LmsurgeonError(f"not JSON: {e}", settings["params"]) from None
    results = run_merge(base, donor, out, MergeConfig(**settings), progress=progress_enabled() and not as_json)
    if results.get("worker"):
        emit(results, as_json, [f"worker ran {results['trials_run']} trials"])
        return
    best, bpb = results["best"] or {}, results["bpb"]
    lines = [
        f"bits per byte on held-out text: base {bpb['base']['heldout']:.4f}, recommended "
        f"{bpb['best']['heldout']:.4f} ({bpb['recommended']}); general text: base {bpb['base']['general']:.4f}, "
        f"recommended {bpb['best']['general']:.4f}",
        bpb["reason"],
        f"shared tokens: {results['overlap']['shared_used']} (of {results['overlap']['shared']})",
        f"base perplexity {results['base_ppl']:.3f}; trials {results['n_trials']}; "
        f"Pareto front {len(results['pareto'])}",
        f"best: trial {best.get('number')} r={best.get('r')} symKL={best.get('sym_kl')}",
    ]
    emit(results, as_json, lines, results["out"])


@click.command("compare-generation", epilog=GEN_EPILOG)
@click.option("--base", required=True)
@click.option("--merged", required=True)
@click.option("--tokenizer", default=None, help="Tokenizer source (default: the base's).")
@click.option("--prompts", required=True, type=click.Path(exists=True, dir_okay=False), help="One prompt a line.")
@out_option
@json_option
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="fp32", show_default=True)
@click.option("--trust-remote-code", is_flag=True)
@click.option(
    "--streaming",
    type=click.Choice(["auto", "stream", "plain"]),
    default="auto",
    show_default=True,
    help="Stream each model's blocks from its checkpoint: auto when it does not fit --max-memory.",
)
@click.option("--max-memory", default=None, help="Memory budget for --streaming auto, e.g. 6GiB (default: free).")
def compare_generation(
    base,
    merged,
    tokenizer,
    prompts,
    out,
    as_json,
    seed,
    max_new_tokens,
    dtype,
    trust_remote_code,
    streaming,
    max_memory,
) -> None:
    """Greedy, deterministic answers of base and merged to the same prompts, side by side."""
    from lmsurgeon.merge import compare_generation as run

    results = run(
        base,
        merged,
        prompts,
        out,
        tokenizer=tokenizer,
        seed=seed,
        max_new_tokens=max_new_tokens,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        streaming=streaming,
        max_memory=max_memory,
    )
    s = results["summary"]
    emit(results, as_json, [f"{s['identical']} of {s['prompts']} answers identical"], out)
