"""``lmsurgeon lineage``: thin layer over :func:`lmsurgeon.lineage.compare`."""

from __future__ import annotations

import click

from lmsurgeon.cli.common import emit, json_option, out_option, progress_enabled, seed_option

EPILOG = """\b
Examples:
  lmsurgeon lineage minilm ./my-finetune                 # naive report + sound tests + verdict
  lmsurgeon lineage A B C                                # A vs B and A vs C
  lmsurgeon lineage A B C --all-pairs                    # A vs B, A vs C and B vs C
  lmsurgeon lineage A B C --naive-only                   # the seed's norm-gain comparison only
  lmsurgeon lineage A B --tests awm,phi_u --null I1 --null I2   # z against known independent models
  lmsurgeon lineage A B --align procrustes               # B's residual stream may be rotated (folded gains)
  lmsurgeon lineage A B --json > results.json
"""


@click.command("lineage", epilog=EPILOG)
@click.argument("sources", nargs=-1, required=True)
@out_option
@json_option
@seed_option
@click.option("--naive-only", is_flag=True, help="Only the norm-gain report (reads only norm tensors).")
@click.option("--tests", default="awm,phi_u,phi_match,act_cka", show_default=True,
              help="Comma-separated sound tests: awm, phi_u, phi_match (activations), act_cka (activations).")
@click.option("--null", "null", multiple=True, help="A known independent model for the null (repeatable).")
@click.option("--focus-layer", type=int, default=None, help="Headline layer of the naive table (default 10).")
@click.option("--depth", type=click.Choice(["relative", "monotone"]), default="relative", show_default=True)
@click.option("--align", type=click.Choice(["permutation", "procrustes"]), default="permutation", show_default=True,
              help="Residual alignment for the weight tests; procrustes undoes rotations (folded gains).")
@click.option("--text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text for the activation test (default: bundled corpus).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--all-pairs", is_flag=True, help="Compare every pair of SOURCES, not only A against each other.")
def lineage(sources, out, as_json, seed, naive_only, tests, null, focus_layer, depth, align, text, overwrite,
            all_pairs) -> None:
    """Is model B derived from model A? With SOURCES A B C ... compares A against each other source
    (A vs B, A vs C, ...); --all-pairs compares every pair.

    Naive numbers (raw cosine of norm gains) are shown beside their corrections; the verdict
    (derived / independent / inconclusive) comes only from the sound tests.
    """
    from lmsurgeon.lineage import compare

    if len(sources) < 2:
        raise click.UsageError("give at least two models")
    results = compare(list(sources), out, naive_only=naive_only, tests=tuple(t for t in tests.split(",") if t),
                      null=list(null), focus_layer=focus_layer, depth=depth, align=align, text=text, seed=seed,
                      overwrite=overwrite, progress=progress_enabled() and not as_json,
                      all_pairs=all_pairs)
    lines = []
    for p in results["pairs"]:
        zs = ", ".join(f"{t['name']} z={t['z']:.1f}" if t.get("applies") and t.get("z") is not None
                       else f"{t['name']} n/a" for t in p["tests"])
        lines.append(f"{p['a']} vs {p['b']}: {p['verdict']}  (naive raw cosine {_num(p['naive']['mean_raw_cosine'])}, "
                     f"Pearson {_num(p['naive']['mean_pearson'])}; {zs})")
    emit(results, as_json, lines, out if out is not None else None)


def _num(x: float | None) -> str:
    """Three decimals, or 'undefined' where the statistic is (constant vectors)."""
    return "undefined" if x is None else f"{x:.3f}"

