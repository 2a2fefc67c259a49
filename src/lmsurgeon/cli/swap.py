"""``lmsurgeon swap``: thin layer over :func:`lmsurgeon.swap.analyze`; its options come from ``SwapConfig``."""

from __future__ import annotations

from dataclasses import fields

import click

from lmsurgeon.cli.common import emit, json_option, out_option, progress_enabled
from lmsurgeon.swap.config import SwapConfig

EPILOG = """\b
Examples:
  lmsurgeon swap ./deep-model                          # built-in corpus: fit on train, measure on validation
  lmsurgeon swap minilm                                # encoders too (δ, Trans, Dep; no Δloss)
  lmsurgeon swap gpt2-large --data webtext.train.jsonl --eval-data webtext.valid.jsonl --device cuda
  lmsurgeon swap ./deep-model --apply 7 --out runs/s7  # also write runs/s7/swap_7_8/ and its perplexity
  lmsurgeon swap ./deep-model --drop 12 --tokens 16384 --seq-len 256
  lmsurgeon swap ./deep-model --json > results.json
  lmsurgeon swap ./deep-model --plan-drop 25% --apply-plan recommended   # which quarter of the layers to drop
  lmsurgeon swap ./deep-model --plan-reorder --apply-plan 'drop:3,5;swap:9'
"""


def config_options(command):
    """One click option per :class:`SwapConfig` field: flag, type, default and help from the field itself."""
    defaults = SwapConfig()
    for f in reversed(fields(SwapConfig)):
        meta, default = f.metadata, getattr(defaults, f.name)
        if meta.get("negate"):
            option = click.option(meta["flag"], f.name, flag_value=False, default=True, help=meta["help"])
        elif meta["type"] is bool:
            option = click.option(meta["flag"], f.name, is_flag=True, default=default, help=meta["help"])
        else:
            kind = click.Path(exists=True, dir_okay=False) if meta.get("path") else meta["type"]
            option = click.option(
                meta["flag"], f.name, type=kind, default=default, show_default=default is not None, help=meta["help"]
            )
        command = option(command)
    return command


@click.command("swap", epilog=EPILOG)
@click.argument("model")
@config_options
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@out_option
@json_option
def swap(model, overwrite, out, as_json, **options) -> None:
    """Which adjacent layers of MODEL can be exchanged (or dropped) while its computation barely changes?

    Measures the swap effect δ of every adjacent pair exactly from cached layer inputs (O(L) block calls),
    predicts it with the paper's r = Trans·Trans·(Dep + Dep) and the linearised δ', reports the end-to-end
    loss change, Block Influence and angular-distance baselines, and Spearman correlations with bootstrap CIs.
    """
    from lmsurgeon.report import default_out_dir
    from lmsurgeon.swap import analyze

    out = out if out is not None else default_out_dir("swap")
    r = analyze(model, SwapConfig(**options), out=out, progress=progress_enabled() and not as_json, overwrite=overwrite)
    if as_json:
        click.echo(f"run folder: {r['run_dir']}", err=True)
    sp = r["spearman"]
    lines = [
        f"{r['model']['source']}: {r['model']['n_layers']} layers, {r['tokens']['fit']} fit / "
        f"{r['tokens']['eval']} eval tokens",
        f"Spearman r vs δ = {_num(sp['r_vs_delta']['rho'])} (paper 0.91), "
        f"δ' vs δ = {_num(sp['linear_vs_delta']['rho'])} (paper 0.91)",
    ]
    for row in r["ranking"][:5]:
        lines.append(
            f"  #{row['rank']} layers {row['i']}↔{row['j']}: δ={_num(row['delta'])}  "
            f"Δloss={_num(row['dloss'])}  r={_num(row['r'])}"
        )
    if r.get("apply"):
        a = r["apply"]
        lines.append(f"wrote {a['path']}: perplexity {_num(a['ppl_before'])} → {_num(a['ppl_after'])}")
    if r.get("plan_summary"):
        from lmsurgeon.swap.report import plan_verdict

        for rec in r["recommended"]:
            lines.append(
                f"  drop {rec['k']}: layers {rec['layers']} ({rec['strategy']}), held-out "
                f"{_num(rec['heldout_bpb'])} bits/byte"
            )
        lines.append(plan_verdict(r["plan_summary"]))
    if r.get("reorder"):
        chosen = r["reorder"]["chosen"]
        lines.append(
            f"reorder within {r['reorder']['tolerance']} nats: "
            + (
                f"swap pairs {chosen['swaps']} (held-out Δloss {_num(chosen['heldout_dloss'])})"
                if chosen
                else "no swap"
            )
        )
    if r.get("applied_plan"):
        a = r["applied_plan"]
        same = a["generation"]["cached_equals_uncached"]
        check = (
            "generation not checked (streamed)"
            if same is None
            else "cached generation " + ("equals uncached" if same else "DIFFERS FROM uncached")
        )
        lines.append(
            f"wrote {a['path']} ({a['n_layers']} layers): held-out loss {_num(a['heldout_loss_before'])} → "
            f"{_num(a['heldout_loss'])}; {check}"
        )
        if a.get("heal"):
            h = a["heal"]
            lines.append(
                f"healed {h['steps']} steps → {h['path']}: held-out loss {_num(h['heldout_loss_before'])} "
                f"→ {_num(h['heldout_loss_after'])}"
            )
    emit(r, as_json, lines, r["run_dir"])  # ends with the run folder and its report


def _num(x) -> str:
    return "—" if x is None else f"{x:.4g}"
