"""``lmsurgeon lineage``: thin layer over :func:`lmsurgeon.lineage.compare`; its analysis options are generated
from the fields of :class:`lmsurgeon.lineage.LineageConfig`."""

from __future__ import annotations

import dataclasses

import click

from lmsurgeon.cli.common import emit, json_option, out_option, progress_enabled
from lmsurgeon.lineage.config import LineageConfig

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

_CONFIG_FIELDS = dataclasses.fields(LineageConfig)


def config_options(f):
    """One click option per :class:`LineageConfig` field (``--field-name``), in the fields' order."""
    for fld in reversed(_CONFIG_FIELDS):
        meta, flag = fld.metadata, "--" + fld.name.replace("_", "-")
        kw: dict = {"help": meta["help"]}
        if meta["kind"] == "flag":
            kw["is_flag"] = True
        elif meta["kind"] == "list":
            kw |= {"default": ",".join(fld.default), "show_default": True}
        elif meta["kind"] == "multiple":
            kw["multiple"] = True
        elif meta["kind"] == "path":
            kw |= {"type": click.Path(exists=True, dir_okay=False), "default": fld.default}
        elif meta["kind"] == "text":
            kw |= {"type": str, "default": fld.default}
        elif meta["choices"]:
            kw |= {"type": click.Choice(meta["choices"]), "default": fld.default, "show_default": True}
        else:
            kw |= {"type": int, "default": fld.default, "show_default": fld.default is not None}
        f = click.option(flag, fld.name, **kw)(f)
    return f


@click.command("lineage", epilog=EPILOG)
@click.argument("sources", nargs=-1, required=True)
@out_option
@json_option
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@config_options
def lineage(sources, out, as_json, overwrite, **options) -> None:
    """Is model B derived from model A? With SOURCES A B C ... compares A against each other source
    (A vs B, A vs C, ...); --all-pairs compares every pair.

    Naive numbers (raw cosine of norm gains) are shown beside their corrections; the verdict
    (derived / independent / inconclusive) comes only from the sound tests.
    """
    from lmsurgeon.lineage import compare

    if len(sources) < 2:
        raise click.UsageError("give at least two models")
    results = compare(
        list(sources), out, LineageConfig(**options), overwrite=overwrite, progress=progress_enabled() and not as_json
    )
    lines = []
    for p in results["pairs"]:
        zs = ", ".join(
            f"{t['name']} z={t['z']:.1f}" if t.get("applies") and t.get("z") is not None else f"{t['name']} n/a"
            for t in p["tests"]
        )
        lines.append(
            f"{p['a']} vs {p['b']}: {p['verdict']}  (naive raw cosine {_num(p['naive']['mean_raw_cosine'])}, "
            f"Pearson {_num(p['naive']['mean_pearson'])}; {zs})"
        )
    emit(results, as_json, lines, results["out"])


def _num(x: float | None) -> str:
    """Three decimals, or 'undefined' where the statistic is (constant vectors)."""
    return "undefined" if x is None else f"{x:.3f}"
