"""Run-folder outputs of a merge: stats/, pareto.json, best.json, trials.csv, the Pareto figure and report.html."""

from __future__ import annotations

import csv
import io

from lmsurgeon.report import Report, Section
from lmsurgeon.report.figures import new_figure


def trials_csv(records: list[dict]) -> str:
    cols = [
        "number",
        "r",
        "sym_kl",
        "bpb",
        "general_bpb",
        "r_A",
        "r_B",
        "rows_A",
        "rows_B",
        "outcome_A",
        "outcome_B",
        "seconds",
    ]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols + sorted({k for t in records for k in t["params"]}))
    w.writeheader()
    for t in records:
        s = t["stats"]
        w.writerow(
            {
                "number": t["number"],
                "r": t["r"],
                "sym_kl": t["sym_kl"],
                "bpb": s.get("bpb"),
                "general_bpb": s.get("general_bpb"),
                "r_A": s.get("r_A"),
                "r_B": s.get("r_B"),
                "rows_A": s["stage_a"]["rows"],
                "rows_B": s["stage_b"]["rows"],
                "outcome_A": s["stage_a"]["outcome"],
                "outcome_B": s["stage_b"]["outcome"],
                "seconds": s["seconds"],
                **t["params"],
            }
        )
    return buf.getvalue()


def pareto_figure(records: list[dict], front: list[dict], best: dict | None, ppl_cap: float):
    """r vs symKL for every trial; front joined, best starred, the cap as a dashed line."""
    fig, ax = new_figure()
    ax.scatter([t["r"] for t in records], [t["sym_kl"] for t in records], s=14, c="0.6", label="trials")
    fr = sorted(front, key=lambda t: t["r"])
    ax.plot([t["r"] for t in fr], [t["sym_kl"] for t in fr], "o-", c="tab:blue", ms=4, label="Pareto front")
    if best is not None:
        ax.scatter([best["r"]], [best["sym_kl"]], marker="*", s=180, c="tab:red", zorder=5, label="best")
    ax.axvline(ppl_cap, ls="--", c="tab:orange", label=f"ppl cap {ppl_cap:g}")
    ax.set_xlabel("relative perplexity r (lower is safer)")
    ax.set_ylabel("symmetric top-K KL (higher = moved more)")
    ax.legend(fontsize=8)
    return fig


def bpb_table(bpb: dict) -> list[dict]:
    """One row per model: bits per byte on each text and the held-out change against the base."""
    base = bpb["base"]["heldout"]
    rows = [{"model": "donor (own tokenizer)", **_texts(bpb["donor"]), "held-out vs base": None}]
    entries = [*bpb["baselines"], *([bpb["best_trial"]] if bpb["best_trial"] else [])]
    for e in entries:
        rows.append({"model": e["name"], **_texts(e), "held-out vs base": f"{e['heldout'] / base - 1:+.2%}"})
    return rows


def _texts(row: dict) -> dict:
    return {
        "search": round(row["search"], 4),
        "held-out": round(row["heldout"], 4),
        "general": round(row["general"], 4),
    }


def class_table(bpb: dict) -> list[dict]:
    """Held-out bits per byte per token class for the base, the best trial and the baselines, and the share
    of each class's rows the best trial moved."""
    entries = [*bpb["baselines"], *([bpb["best_trial"]] if bpb["best_trial"] else [])]
    rows = [
        {"model": e["name"], **{c: v if v is None else round(v, 4) for c, v in e["heldout_by_class"].items()}}
        for e in entries
    ]
    if bpb["best_trial"]:
        frac = bpb["best_trial"]["blended_fraction_by_class"]
        rows.append(
            {"model": "rows moved by the best trial", **{c: v if v is None else f"{v:.1%}" for c, v in frac.items()}}
        )
    return rows


def build_report(results: dict, figure: str | None) -> Report:
    ov = results["overlap"]
    best = results.get("best") or {}
    bpb = results["bpb"]
    summary = {
        "recommended": bpb["recommended"],
        "why": bpb["reason"],
        "held-out bits per byte (base → recommended)": f"{bpb['base']['heldout']:.4f} → {bpb['best']['heldout']:.4f}",
        "general bits per byte (base → recommended)": f"{bpb['base']['general']:.4f} → {bpb['best']['general']:.4f}",
        "objective": results["objective"],
        "shared tokens": f"{ov['shared_used']} of {ov['shared']} ({ov['frac_base']:.1%} of base vocab)",
        "trials": results["n_trials"],
        "best trial": best.get("number"),
        "best r": best.get("r"),
        "best symKL": best.get("sym_kl"),
        "held-out r": results.get("heldout_r"),
        "tied base head": results["tied"],
    }
    texts = ", ".join(f"{k}: {v['source']} ({v['documents']} documents)" for k, v in results["texts"].items())
    fit = [{"stage": k, **v} for k, v in results["fit"].items()]
    front = [{"trial": t["number"], "r": t["r"], "symKL": t["sym_kl"]} for t in results["pareto"]]
    sections = [
        Section(
            "Bits per byte",
            text="Lower is better; fair across tokenizers (NLL in bits over the UTF-8 bytes "
            "of the text). The best trial is chosen on the search text only; held-out text shows whether it "
            f"generalises, general text whether it costs elsewhere. Texts: {texts}.",
            table=bpb_table(bpb),
        ),
        Section(
            "Bits per byte by token class (held-out text)",
            text="Where the blend helps or hurts: digits, "
            "whitespace, punctuation, multi-byte (non-ASCII) and ordinary words.",
            table=class_table(bpb),
        ),
        Section(
            "Token overlap",
            text="Tokens matched on canonical (leading-space, bytes) keys; raw string overlap shown for contrast.",
            table=[{k: v for k, v in ov.items() if not isinstance(v, dict)}],
        ),
        Section(
            "Alignment (Procrustes + Umeyama)",
            text="Fitted once on the shared rows; residual is ‖sX_cR − Y_c‖/‖Y_c‖.",
            table=fit,
        ),
        Section(
            "Pareto front",
            text="Every trial's relative perplexity against how far it moved the outputs.",
            table=front,
            figures=[figure] if figure else [],
        ),
    ]
    note = (
        f"Best trial keeps r = {best.get('r', float('nan')):.4f} (cap {results['ppl_cap']}) with symKL = "
        f"{best.get('sym_kl', float('nan')):.3g}."
        if best
        else "No trial stayed under the cap."
    )
    return Report(
        title="Cross-architecture embedding merge",
        summary=summary,
        how_to_read="r is the merged model's perplexity over the base's on the search prompts; symKL "
        "is the mean symmetric top-K KL of next-token distributions at the tail positions."
        "\n\nsymKL measures effect size, not quality: the guard keeps r under the cap.",
        sections=sections + [Section("Closing note", text=note)],
    )
