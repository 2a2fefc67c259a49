"""Figures 2–4 of the paper, the depth profile of this model and the self-contained report.html (methods.md §S12)."""

from __future__ import annotations

import numpy as np

from lmsurgeon.report import Report, Section
from lmsurgeon.report.figures import new_figure


def _col(pairs, key):
    return np.array([np.nan if p[key] is None else p[key] for p in pairs], dtype=float)


def _rho_title(name: str, sp: dict | None) -> str:
    if not sp or sp.get("rho") is None:
        return f"{name}: ρ undefined"
    lo, hi = sp["ci"]
    ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None else ""
    return f"{name}: Spearman ρ = {sp['rho']:.2f}{ci} (n = {sp['n']})"


def _scatter(run, pairs, xkey, ykey, xlabel, ylabel, title, name):
    fig, ax = new_figure(5.5, 4.2)
    x, y = _col(pairs, xkey), _col(pairs, ykey)
    ax.scatter(x, y, s=22, color="#4a78c2")
    for p, a, b in zip(pairs, x, y, strict=True):
        if np.isfinite(a) and np.isfinite(b):
            ax.annotate(str(p["i"]), (a, b), fontsize=7, xytext=(2, 2), textcoords="offset points")
    if np.all(x[np.isfinite(x)] > 0) and np.isfinite(x).any():
        ax.set_xscale("log")
    if np.all(y[np.isfinite(y)] > 0) and np.isfinite(y).any():
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return run.save_figure(fig, name)


def draw_figures(run, body: dict) -> dict[str, str]:
    """fig2 (r vs δ), fig3 (components along depth), fig4 (δ' vs δ), depth_profile; names → relative paths."""
    pairs, sp = body["pairs"], body["spearman"]
    figs = {
        "fig2": _scatter(
            run,
            pairs,
            "r",
            "delta",
            "r(i, i+1)  (eq. 1)",
            "δ(i, i+1)  (eq. 2)",
            _rho_title("r vs δ", sp.get("r_vs_delta")) + "  — paper 0.91",
            "fig2_r_vs_delta",
        ),
        "fig4": _scatter(
            run,
            pairs,
            "delta_linear",
            "delta",
            "δ'(i, i+1)  (linear, eq. 16)",
            "δ(i, i+1)",
            _rho_title("δ' vs δ", sp.get("linear_vs_delta")) + "  — paper 0.91",
            "fig4_deltaprime_vs_delta",
        ),
    }
    i = np.array([p["i"] for p in pairs])
    fig, axes = new_figure(7.0, 8.0, nrows=3)
    ax = axes[0, 0]
    ax.plot(i, _col(pairs, "trans_i"), "o-", label="Trans(i)")
    ax.plot(i, _col(pairs, "trans_j"), "s-", label="Trans(i+1)")
    ax.set_ylabel("Trans (non-redundancy)")
    ax.legend(fontsize=8)
    ax.set_title("Components per pair (paper Fig. 3); pair i = layers (i, i+1), 0-based", fontsize=9)
    ax = axes[1, 0]
    ax.plot(i, _col(pairs, "dep_ij"), "o-", label="Dep(i, i+1)")
    ax.plot(i, _col(pairs, "dep_ji"), "s-", label="Dep(i+1, i)")
    ax.set_ylabel("Dep (dependence)")
    ax.legend(fontsize=8)
    ax = axes[2, 0]
    r = _col(pairs, "r")
    ax.plot(i, r, "^-", color="#2a9d3a", label="r = Trans·Trans·(Dep + Dep)")
    if np.isfinite(r).any() and np.all(r[np.isfinite(r)] > 0):
        ax.set_yscale("log")
    ax.set_xlabel("pair i")
    ax.legend(fontsize=8)
    figs["fig3"] = run.save_figure(fig, "fig3_components")

    fig, ax = new_figure(7.0, 4.0)
    for key, label in [
        ("delta", "δ"),
        ("delta_linear", "δ'"),
        ("dloss", "Δloss"),
        ("bi", "BI(i)·BI(i+1)"),
        ("angular", "ang2"),
    ]:
        y = _col(pairs, key)
        if np.isfinite(y).any():
            scale = np.nanmax(np.abs(y)) or 1.0
            ax.plot(i, y / scale, "o-", label=f"{label} (÷{scale:.3g})")
    ax.set_xlabel("pair i")
    ax.set_ylabel("value ÷ its maximum")
    ax.set_title("Depth profile", fontsize=9)
    ax.legend(fontsize=7)
    figs["depth"] = run.save_figure(fig, "depth_profile")
    if body.get("plans"):
        figs["plans"] = _plans_figure(run, body)
    return figs


STRATEGY_LABELS = {
    "trans": "Trans (r components)",
    "bi": "Block Influence",
    "angular": "angular distance (block)",
    "dloss": "single-drop Δloss",
    "greedy_validation": "greedy on the search half of the eval text",
    "oracle": "oracle (greedy on held-out)",
}


def _plans_figure(run, body: dict) -> str:
    """Held-out bits per byte against the number of dropped layers, one line per strategy."""
    fig, ax = new_figure(6.5, 4.2)
    rows = body["plans"]
    for name in dict.fromkeys(r["strategy"] for r in rows):
        pts = sorted((r["k"], r["heldout_bpb"]) for r in rows if r["strategy"] == name)
        style = "k--" if name == "oracle" else "o-"
        ax.plot([k for k, _ in pts], [v for _, v in pts], style, label=STRATEGY_LABELS.get(name, name), ms=4)
    rec = body["recommended"]
    ax.plot(
        [r["k"] for r in rec],
        [r["heldout_bpb"] for r in rec],
        "*",
        color="#d62728",
        ms=12,
        label="recommended",
        zorder=5,
    )
    ax.axhline(body["plan_summary"]["baseline"]["heldout_bpb"], color="grey", lw=0.8, label="no layer dropped")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layers dropped (k)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("Drop plans scored on held-out text", fontsize=9)
    ax.legend(fontsize=7)
    return run.save_figure(fig, "plans_heldout_bpb")


def build_report(results: dict, figs: dict[str, str]) -> Report:
    """The page: verdict first (safest swaps), then the paper's correlations, components and the apply result."""
    sp, pairs, model = results["spearman"], results["pairs"], results["model"]
    best = results["ranking"][0] if results["ranking"] else None
    summary = {
        "model": f"{model['source']} ({model['family']}, {model['n_layers']} layers, d = {model['hidden_size']})",
        "safest swap": (f"layers {best['i']} ↔ {best['j']} (by {best['by']})" if best else None),
        "Spearman r vs δ (paper 0.91)": _fmt_sp(sp.get("r_vs_delta")),
        "Spearman δ' vs δ (paper 0.91)": _fmt_sp(sp.get("linear_vs_delta")),
        "tokens fit / eval": f"{results['tokens']['fit']} / {results['tokens']['eval']}",
        "perplexity (eval)": results.get("perplexity"),
    }
    if results.get("plan_summary"):
        a = results["plan_summary"]["at_k_max"]
        summary[f"drop plan (k = {results['plan_summary']['k_max']})"] = (
            f"{a['recommended']}: {a['recommended_bpb']:.4f} bpb vs oracle {a['oracle_bpb']:.4f} "
            f"({100 * a['gap_to_oracle']:+.1f} %)"
        )
    how = (
        "Each pair i is the adjacent layers (i, i+1), counted from 0 (the paper counts from 1). δ is the "
        "measured local effect of exchanging the two layers on real inputs (eq. 2); r = Trans(i)·Trans(i+1)·"
        "(Dep(i, i+1) + Dep(i+1, i)) predicts it from per-layer linear fits (eqs. 1, 13, 14); δ' is the same "
        "swap effect computed on the linear fits (eq. 16). Δloss is what a user applying the swap pays in "
        "next-token loss; small is safe."
        "\n\nBootstrap CIs resample pairs as if independent; adjacent pairs share a layer, so the intervals "
        "are optimistic. r is a predictor, not a proof: r = 0 implies δ = 0 only under idealised assumptions."
    )
    ranking_rows = [
        {
            "rank": r["rank"],
            "layers": f"{r['i']} ↔ {r['j']}",
            "Δloss": r["dloss"],
            "ppl ratio": r["ppl_ratio"],
            "δ": r["delta"],
            "r": r["r"],
        }
        for r in results["ranking"]
    ]
    corr_rows = [
        {
            "correlation": k,
            "ρ": v["rho"],
            "CI low": v["ci"][0],
            "CI high": v["ci"][1],
            "n": v["n"],
            "degenerate resamples": v["n_degenerate"],
            "paper": {"r_vs_delta": 0.91, "linear_vs_delta": 0.91}.get(k),
        }
        for k, v in sp.items()
    ]
    comp_rows = [
        {
            "pair": p["i"],
            "Trans(i)": p["trans_i"],
            "Trans(i+1)": p["trans_j"],
            "Dep(i,i+1)": p["dep_ij"],
            "Dep(i+1,i)": p["dep_ji"],
            "r": p["r"],
            "δ": p["delta"],
            "δ'": p["delta_linear"],
            "BI pair": p["bi"],
            "ang2": p["angular"],
            "Δloss": p["dloss"],
            "KL": p["kl"],
        }
        for p in pairs
    ]
    layer_rows = [
        {
            "layer": x["i"],
            "Trans": x["trans"],
            "R² fit": x["r2_fit"],
            "R² eval": x["r2_eval"],
            "BI": x["bi"],
            "ang1": x["ang1"],
            "Δloss if dropped": x["dloss_drop"],
        }
        for x in results["layers"]
    ]
    note = "" if results.get("dloss_applicable") else "No LM head (encoder): Δloss, perplexity and KL do not apply."
    sections = [
        Section("Safest swaps", text="Pairs ranked by Δloss (else δ), ties by r.", table=ranking_rows, note=note),
        Section(
            "Correlations beside the paper's",
            text=_shortfall_text(sp, model),
            table=corr_rows,
            figures=[figs["fig2"], figs["fig4"]],
        ),
        Section("Components per pair", table=comp_rows, figures=[figs["fig3"], figs["depth"]]),
        Section(
            "Per layer", text="R² of the linear fit X̂A ≈ X_{i+1} − X_i on the fit and the eval split.", table=layer_rows
        ),
    ]
    if results.get("plans"):
        sections.append(_plans_section(results, figs))
    if results.get("reorder"):
        sections.append(_reorder_section(results["reorder"]))
    if results.get("applied_plan"):
        sections.append(_applied_plan_section(results["applied_plan"]))
    if results.get("apply"):
        a = results["apply"]
        sections.append(
            Section(
                "Applied rewiring",
                text=f"Wrote {a['path']} ({a['description']}).",
                table=[
                    {"": "before", "loss": a["loss_before"], "perplexity": a["ppl_before"]},
                    {"": "after", "loss": a["loss_after"], "perplexity": a["ppl_after"]},
                ],
            )
        )
    return Report(
        title="Layer swap analysis", subtitle=model["source"], summary=summary, how_to_read=how, sections=sections
    )


def plan_verdict(summary: dict) -> str:
    """One sentence: the recommended plan at the largest k against the oracle and the two baselines."""
    a = summary["at_k_max"]
    base = ", ".join(f"{STRATEGY_LABELS[k]} {v:.4f}" for k, v in a["baselines_bpb"].items())
    within = "met" if a["within_5_percent_of_oracle"] else "not met"
    as_good = "yes" if a["at_least_as_good_as_baselines"] else "no"
    return (
        f"At k = {summary['k_max']} of {summary['n_layers']} layers the recommended plan ({a['recommended']}) "
        f"scores {a['recommended_bpb']:.4f} bits per byte on held-out text, the oracle {a['oracle_bpb']:.4f} "
        f"({100 * a['gap_to_oracle']:+.1f} %; target within 5 %: {within}); baselines: {base} (recommended at "
        f"least as good: {as_good})."
        f" Best non-oracle predictor on held-out text: {a['best_non_oracle_on_heldout']} "
        f"({a['best_non_oracle_bpb']:.4f})."
    )


def _plans_section(results: dict, figs: dict) -> Section:
    rows = []
    rec = {(r["k"], r["strategy"]) for r in results["recommended"]}
    for r in sorted(results["plans"], key=lambda r: (r["k"], r["heldout_bpb"])):
        rows.append(
            {
                "k": r["k"],
                "strategy": STRATEGY_LABELS.get(r["strategy"], r["strategy"]),
                "layers dropped": ", ".join(map(str, r["layers"])),
                "held-out loss": r["heldout_loss"],
                "held-out bits/byte": r["heldout_bpb"],
                "validation loss": r["validation_loss"],
                "recommended": "✓" if (r["k"], r["strategy"]) in rec else "",
            }
        )
    summary = results["plan_summary"]
    text = (
        plan_verdict(summary) + "\n\nEach strategy proposes which k layers to drop (0-based); every plan is "
        "scored from cached layer inputs on held-out text that no strategy saw. The recommended plan per k is the "
        "non-oracle plan with the lowest loss on the validation half of the eval text (the greedy search drops "
        "layers by the other half, so no candidate is judged on text it was fitted to); the oracle drops one "
        "layer at a time by held-out loss itself, so it bounds what a planner can reach and is never recommended. "
        f"Without any drop: held-out loss {summary['baseline']['heldout_loss']:.4f}, "
        f"{summary['baseline']['heldout_bpb']:.4f} bits per byte."
    )
    return Section("Drop plans", text=text, table=rows, figures=[figs["plans"]] if "plans" in figs else [])


def _reorder_section(reorder: dict) -> Section:
    rows = [
        {
            "swaps (pairs i↔i+1)": ", ".join(map(str, s["swaps"])),
            "validation Δloss": s["validation_dloss"],
            "held-out Δloss": s["heldout_dloss"],
            "held-out bits/byte": s["heldout_bpb"],
        }
        for s in reorder["steps"]
    ]
    text = (
        f"Adjacent swaps tried safest first (by {reorder['ranked_by']}), each kept while the composition of the "
        f"kept swaps adds at most {reorder['tolerance']} nats per token on the validation text; "
        f"{len(reorder['rejected'])} tried and rejected."
    )
    return Section("Reorder plan", text=text, table=rows)


def _applied_plan_section(a: dict) -> Section:
    table = [
        {"": "before", "held-out loss": a["heldout_loss_before"]},
        {"": "after (loaded checkpoint)", "held-out loss": a["heldout_loss"]},
        {"": "after (from cached inputs)", "held-out loss": a["heldout_loss_from_cache"]},
    ]
    if a.get("heal"):
        h = a["heal"]
        table.append(
            {
                "": f"after healing {h['steps']} steps (layers {h['trained_layers']})",
                "held-out loss": h["heldout_loss_after"],
            }
        )
    gen = a["generation"]
    same = gen["cached_equals_uncached"]
    check = (
        f"Generation not checked: {gen['not_run']}."
        if same is None
        else f"Greedy generation with the KV cache {'equals' if same else 'DIFFERS FROM'} "
        f"uncached argmax decoding over {gen['new_tokens']} tokens."
    )
    text = f"Wrote {a['path']} ({a['source']}: drops {a['drops']}, swaps {a['swaps']}; {a['n_layers']} layers). {check}"
    return Section("Applied plan", text=text, table=table)


def _fmt_sp(v: dict | None) -> str | None:
    if not v or v.get("rho") is None:
        return None
    lo, hi = v["ci"]
    return f"{v['rho']:.3f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "") + f" (n = {v['n']})"


def _shortfall_text(sp: dict, model: dict) -> str:
    parts = [
        "Spearman ρ over adjacent pairs with 95 % percentile bootstrap CIs. The paper (GPT-2 Large, "
        "35 pairs) reports 0.91 for r vs δ and for δ' vs δ."
    ]
    short = [
        k
        for k in ("r_vs_delta", "linear_vs_delta")
        if sp.get(k) and sp[k].get("rho") is not None and sp[k]["rho"] < 0.91
    ]
    if short:
        why = [f"with n = {sp[short[0]]['n']} pairs a rank correlation is coarse and its CI wide"]
        if model.get("encoder"):
            why.append(
                "this is a post-norm encoder: LayerNorm follows each residual add, so X_{i+1} − X_i is not "
                "the layer's update ℓ_i(X_i) that Trans and Dep model, and the linear fit of it is poor "
                "(see R² per layer)"
            )
        parts.append(f"{', '.join(short)} fall(s) short of 0.91 here: " + "; ".join(why) + ".")
    return "\n\n".join(parts)
