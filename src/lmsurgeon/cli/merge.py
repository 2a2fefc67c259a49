"""``lmsurgeon merge`` and ``lmsurgeon compare-generation``: thin layers over :mod:`lmsurgeon.merge`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lmsurgeon.cli.common import emit, json_option, out_option, progress_enabled, seed_option
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


@click.command("merge", epilog=EPILOG)
@click.option("--base", required=True, help="Base model (its architecture, config and tokenizer are kept).")
@click.option("--donor", required=True, help="Donor model (only its embedding and head rows are read).")
@out_option
@json_option
@seed_option
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="fp32", show_default=True)
@click.option("--donor-on-cpu", is_flag=True, help="Accepted for the seed's CLI; always implied.")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Prompts driving the guard and objectives (default: built-in corpus, validation split).")
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Held-out text for the reported held-out r (never used for selection).")
@click.option("--max-prompts", type=int, default=64, show_default=True)
@click.option("--max-shared", type=int, default=50_000, show_default=True, help="Cap on shared tokens (0 = all).")
@click.option("--ppl-cap", type=float, default=2.5, show_default=True, help="Guard: max relative perplexity.")
@click.option("--kl-topk", type=int, default=512, show_default=True)
@click.option("--kl-positions", default="tail:8", show_default=True, help="tail:N or all.")
@click.option("--trials", type=int, default=48, show_default=True, help="Optuna trials (0 = one merge).")
@click.option("--storage", default=None, help="Optuna storage URL (default: journal file in the run folder).")
@click.option("--study-name", default="lmsurgeon-merge", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted study in --out.")
@click.option("--worker", is_flag=True, help="Only run trials of a shared --storage study; write nothing.")
@click.option("--save-topk", type=int, default=0, show_default=True, help="Also save the next N Pareto trials.")
@click.option("--select", type=click.Choice(["knee", "max-kl"]), default="knee", show_default=True)
@click.option("--select-max-rel-ppl", type=float, default=1.2, show_default=True)
@click.option("--params", "params_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON parameters for a single merge (--trials 0).")
@click.option("--space", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON overriding search ranges.")
@click.option("--gamma", type=float, default=12.0, show_default=True)
@click.option("--on-stage-a-fail", type=click.Choice(["rollback", "keep"]), default="rollback", show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-length", type=int, default=512, show_default=True)
@click.option("--init-nonshared", type=click.Choice(["omp"]), default=None,
              help="Also initialise non-shared rows by OMP over the shared anchors.")
@click.option("--omp-k", type=int, default=64, show_default=True)
@click.option("--trust-remote-code", is_flag=True)
def merge(base, donor, out, as_json, seed, dtype, donor_on_cpu, prompts_file, eval_text, max_prompts, max_shared,
          ppl_cap, kl_topk, kl_positions, trials, storage, study_name, resume, worker, save_topk, select,
          select_max_rel_ppl, params_file, space, gamma, on_stage_a_fail, batch_size, max_length,
          init_nonshared, omp_k, trust_remote_code) -> None:
    """Move the base's embedding (and untied head) rows toward a donor's, across tokenizers and widths.

    Shared tokens are matched on canonical byte keys, the donor space is mapped by Procrustes + Umeyama
    scale, rows are blended under a perplexity guard, and Optuna searches the blend (relative perplexity
    vs symmetric KL). The best merge is saved once as best_model/.
    """
    from lmsurgeon.merge import run_merge

    params = None
    if params_file:
        try:
            params = json.loads(Path(params_file).read_text())
        except ValueError as e:
            raise LmsurgeonError(f"not JSON: {e}", params_file) from None
    results = run_merge(base, donor, out, trials, dtype=dtype, prompts_file=prompts_file, eval_text=eval_text,
                        max_prompts=max_prompts, max_shared=max_shared, ppl_cap=ppl_cap, kl_topk=kl_topk,
                        kl_positions=kl_positions, seed=seed, storage=storage, study_name=study_name,
                        resume=resume, worker=worker, save_topk=save_topk, select=select,
                        select_max_rel_ppl=select_max_rel_ppl, params=params, space=space, gamma=gamma,
                        on_stage_a_fail=on_stage_a_fail, batch_size=batch_size, max_length=max_length,
                        donor_on_cpu=donor_on_cpu, trust_remote_code=trust_remote_code,
                        init_nonshared=init_nonshared, omp_k=omp_k,
                        progress=progress_enabled() and not as_json)
    if results.get("worker"):
        emit(results, as_json, [f"worker ran {results['trials_run']} trials"])
        return
    best = results["best"] or {}
    lines = [f"shared tokens: {results['overlap']['shared_used']} (of {results['overlap']['shared']})",
             f"base perplexity {results['base_ppl']:.3f}; trials {results['n_trials']}; "
             f"Pareto front {len(results['pareto'])}",
             f"best: trial {best.get('number')} r={best.get('r')} symKL={best.get('sym_kl')}"]
    emit(results, as_json, lines, out if out is not None else None)


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
def compare_generation(base, merged, tokenizer, prompts, out, as_json, seed, max_new_tokens, dtype,
                       trust_remote_code) -> None:
    """Greedy, deterministic answers of base and merged to the same prompts, side by side."""
    from lmsurgeon.merge import compare_generation as run

    results = run(base, merged, prompts, out, tokenizer=tokenizer, seed=seed, max_new_tokens=max_new_tokens,
                  dtype=dtype, trust_remote_code=trust_remote_code)
    s = results["summary"]
    emit(results, as_json, [f"{s['identical']} of {s['prompts']} answers identical"], out)
