"""``lmsurgeon swap``: thin layer over :func:`lmsurgeon.swap.analyze`."""

from __future__ import annotations

import click

from lmsurgeon.cli.common import emit, json_option, out_option, progress_enabled, seed_option

EPILOG = """\b
Examples:
  lmsurgeon swap ./deep-model                          # built-in corpus: fit on train, measure on validation
  lmsurgeon swap minilm                                # encoders too (δ, Trans, Dep; no Δloss)
  lmsurgeon swap gpt2-large --data webtext.train.jsonl --eval-data webtext.valid.jsonl --device cuda
  lmsurgeon swap ./deep-model --apply 7 --out runs/s7  # also write runs/s7/swap_7_8/ and its perplexity
  lmsurgeon swap ./deep-model --drop 12 --tokens 16384 --seq-len 256
  lmsurgeon swap ./deep-model --json > results.json
"""


@click.command("swap", epilog=EPILOG)
@click.argument("model")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Fit text (.jsonl with 'text' or blank-line separated); default: built-in corpus.")
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text for δ, δ', Δloss, perplexity (default: half of --data, or the corpus validation split).")
@click.option("--tokens", type=int, default=65_536, show_default=True, help="Eval budget in real tokens.")
@click.option("--fit-tokens", type=int, default=None, help="Fit budget in real tokens [default: max(tokens, 8·d)].")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per row (one document per row).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1 ...")
@click.option("--dtype", default="auto", show_default=True,
              help="auto (float32 if it fits in 60% of device memory), float32, bfloat16, float16.")
@click.option("--window", type=int, default=4, show_default=True, help="Tokens mixed into X̂ (eq. 12).")
@click.option("--ridge", type=float, default=1e-6, show_default=True, help="λ of the least-squares fit (0: lstsq).")
@click.option("--skip-first", type=int, default=0, show_default=True, help="Drop the first N positions per row.")
@click.option("--bootstrap", type=int, default=2000, show_default=True, help="Bootstrap resamples for the CIs.")
@click.option("--no-e2e", is_flag=True, help="Skip the end-to-end Δloss/KL of each swap and drop.")
@click.option("--batch-tokens", type=int, default=8192, show_default=True, help="Padded tokens per batch.")
@click.option("--apply", "apply_", type=int, default=None, help="Write swap_I_{I+1}/ with layers I and I+1 swapped.")
@click.option("--drop", type=int, default=None, help="Write drop_I/ with layer I removed.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@out_option
@json_option
@seed_option
def swap(model, data, eval_data, tokens, fit_tokens, seq_len, device, dtype, window, ridge, skip_first, bootstrap,
         no_e2e, batch_tokens, apply_, drop, overwrite, out, as_json, seed) -> None:
    """Which adjacent layers of MODEL can be exchanged (or dropped) while its computation barely changes?

    Measures the swap effect δ of every adjacent pair exactly from cached layer inputs (O(L) block calls),
    predicts it with the paper's r = Trans·Trans·(Dep + Dep) and the linearised δ', reports the end-to-end
    loss change, Block Influence and angular-distance baselines, and Spearman correlations with bootstrap CIs.
    """
    from lmsurgeon.report import default_out_dir
    from lmsurgeon.swap import analyze

    out = out if out is not None else default_out_dir("swap")
    r = analyze(model, data, eval_data=eval_data, tokens=tokens, fit_tokens=fit_tokens, seq_len=seq_len,
                device=device, dtype=dtype, out=out, seed=seed, window=window, ridge=ridge, skip_first=skip_first,
                bootstrap=bootstrap, e2e=not no_e2e, apply=apply_, drop=drop, batch_tokens=batch_tokens,
                progress=progress_enabled() and not as_json, overwrite=overwrite)
    sp = r["spearman"]
    lines = [f"{r['model']['source']}: {r['model']['n_layers']} layers, {r['tokens']['fit']} fit / "
             f"{r['tokens']['eval']} eval tokens",
             f"Spearman r vs δ = {_num(sp['r_vs_delta']['rho'])} (paper 0.91), "
             f"δ' vs δ = {_num(sp['linear_vs_delta']['rho'])} (paper 0.91)"]
    for row in r["ranking"][:5]:
        lines.append(f"  #{row['rank']} layers {row['i']}↔{row['j']}: δ={_num(row['delta'])}  "
                     f"Δloss={_num(row['dloss'])}  r={_num(row['r'])}")
    if r.get("apply"):
        a = r["apply"]
        lines.append(f"wrote {a['path']}: perplexity {_num(a['ppl_before'])} → {_num(a['ppl_after'])}")
    emit(r, as_json, lines, out)


def _num(x) -> str:
    return "—" if x is None else f"{x:.4g}"
