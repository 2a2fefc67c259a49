"""Run folder for ``lineage``: results.json, figures and a report.html that puts the verdict first."""

from __future__ import annotations

import numpy as np

from lmsurgeon.report import Report, RunFolder, Section
from lmsurgeon.report.figures import new_figure

HOW_TO_READ = """The verdict comes only from the sound tests (awm: CKA of aligned q/k weights; phi_u: do up-rows and \
down-columns pick the same MLP units; phi_match: do gate outputs and up outputs on the same words pick the same \
MLP units, which survives rotations of the residual stream). Each z is measured against a stated null: awm \
against independently trained models (the shipped calibration, or --null models), unless the pair does not clear \
its own wrong layer maps (same basis, separately initialised weights) by 3 standard deviations, in which case \
that lower z is shown; phi_u and phi_match analytically. derived needs max z ≥ 5 and min z ≥ 3; independent \
needs every z < 3. act_cka (hidden-state CKA) is shown for its layer map and never decides.

The naive columns reproduce the original claim: raw cosine of norm gains. Compare it with the shuffled control \
(the cosine expected from the value distribution alone): when they agree, the cosine carried no evidence. \
Pearson (centered cosine) near 0 means no shared pattern; gains can also be folded away entirely (γ-fold table)."""


def _num(x) -> str:
    """Four decimals, or 'undefined' (constant vectors give no correlation, not NaN and not 0)."""
    return "undefined" if x is None or not np.isfinite(x) else f"{x:.4f}"


def _heatmap(run, M, title, name, xlabel, ylabel, marks=None) -> str:
    fig, ax = new_figure(5, 4)
    im = ax.imshow(np.asarray(M, dtype=float), aspect="auto", cmap="viridis", origin="lower")
    bar = fig.colorbar(im, ax=ax)
    bar.formatter.set_useOffset(False)   # values like 0.99998 read as such, not as an offset above the title
    bar.update_ticks()
    if not np.isfinite(np.asarray(M, dtype=float)).any():
        ax.text(0.5, 0.5, "undefined everywhere\n(constant vectors, e.g. folded gains)", transform=ax.transAxes,
                ha="center", va="center")
    if marks:
        ax.plot([m[1] for m in marks], [m[0] for m in marks], "r.", ms=6)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return run.save_figure(fig, name)


def _elementwise(run, a, b, title, name) -> str:
    fig, axes = new_figure(9, 3.5, ncols=2)
    ax1, ax2 = axes[0]
    ax1.scatter(a, b, s=4, alpha=0.5)
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    ax1.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax1.set(title=title, xlabel="A gain[k]", ylabel="B gain[k]")
    ax2.plot(a, lw=0.7, label="A")
    ax2.plot(b, lw=0.7, label="B")
    ax2.set(xlabel="element k", ylabel="gain")
    ax2.legend()
    return run.save_figure(fig, name)


def _hist(run, nvs, names) -> str:
    fig, ax = new_figure(6, 3.5)
    for n, nv in zip(names, nvs, strict=True):
        vals = np.concatenate([v for r, per in nv.items() if not r.endswith(".bias") for v in per.values()])
        ax.hist(vals, bins=60, alpha=0.5, label=n)
    ax.set(title="all norm gains", xlabel="gain", ylabel="count")
    ax.legend(fontsize=7)
    return run.save_figure(fig, "gain_histograms")


def _tests_table(p) -> list[dict]:
    return [{"test": t["name"], "applies": t.get("applies"), "statistic": t.get("statistic"), "z": t.get("z"),
             "-log10 p": t.get("neg_log10_p"),
             "null": None if not t.get("null") else f"{t['null']['source']}: {t['null']['mean']:.3g} ± "
                                                   f"{t['null']['std']:.3g}",
             "reason": t.get("reason", "")} for t in p.get("tests", [])]


def _phi_figure(run, t, name) -> str:
    fig, ax = new_figure(6, 3)
    ax.bar(range(len(t["per_layer"])), [p["neg_log10_p"] or 0 for p in t["per_layer"]])
    ax.set(title=f"{t['name']} per matched layer", xlabel="matched layer pair", ylabel="-log10 p_l")
    return run.save_figure(fig, name)


def _evidence_figure(run, p, name) -> str | None:
    """Left: each applicable test's z against the verdict thresholds. Right: the awm statistic beside its nulls
    (independents and the pair's own wrong layer maps), drawn as normal densities with their mean and std."""
    from scipy.stats import norm

    from lmsurgeon.lineage.verdict import DECISIVE, T_HI, T_LO

    tests = [t for t in p.get("tests", []) if t.get("applies") and t.get("z") is not None]
    if not tests:
        return None
    fig, axes = new_figure(11, 3.4, ncols=2)
    ax, bx = axes[0]
    zs = [t["z"] for t in tests]
    ax.barh([t["name"] for t in tests], zs,
            color=["tab:blue" if t["name"] in DECISIVE else "tab:gray" for t in tests])
    ax.set_xscale("symlog", linthresh=10)
    for x, style in ((T_LO, ":"), (T_HI, "--")):
        ax.axvline(x, color="k", ls=style, lw=1)
    ax.set(title="z per test (dotted T_lo, dashed T_hi; grey: never decisive)", xlabel="z (symlog)")
    awm = next((t for t in tests if t["name"] == "awm"), None)
    if awm is None:
        bx.set_axis_off()
        return run.save_figure(fig, name)
    nulls = {k: v for k, v in (awm.get("nulls") or {}).items()
             if isinstance(v, dict) and np.isfinite(v.get("std") or np.nan) and k != "permutation"}
    x = np.linspace(-0.05, 1.05, 600)
    for label, nl in nulls.items():
        bx.plot(x, norm.pdf(x, nl["mean"], max(nl["std"], 1e-3)), label=f"{label}: {nl['mean']:.3f} ± {nl['std']:.3f}")
    bx.axvline(awm["statistic"], color="tab:red", label=f"observed {awm['statistic']:.3f}")
    bx.set(title="awm statistic (mean matched CKA) and its nulls", xlabel="mean matched CKA", ylabel="density")
    bx.legend(fontsize=7)
    return run.save_figure(fig, name)


def write_run(out, body, layouts, nvs, pairs, names, *, seed, timings, overwrite=False) -> dict:
    """Figures and HTML for the body assembled by :func:`lmsurgeon.lineage.run.compare`."""
    with RunFolder(out, command="lineage", seed=seed, overwrite=overwrite) as run:
        sections = []
        gfig = _hist(run, nvs, names)
        fl = body["naive"]["focus_layer"]
        for k, p in enumerate(pairs):
            figs = []
            gain_roles = [r for r in p["_matrices"] if not r.endswith(".bias")]
            for role, mats in [(r, p["_matrices"][r]) for r in gain_roles[:2]]:
                figs.append(_heatmap(run, mats["raw"], f"{role}: raw cosine", f"p{k}_{role}_raw",
                                     p["b"], p["a"]))
                figs.append(_heatmap(run, mats["pearson"], f"{role}: Pearson", f"p{k}_{role}_pearson",
                                     p["b"], p["a"]))
            x, y = names.index(p["a"]), names.index(p["b"])
            for role in gain_roles[:2]:
                a, b = nvs[x][role].get(fl), nvs[y][role].get(fl)
                if a is not None and b is not None and a.shape == b.shape:
                    figs.append(_elementwise(run, a, b, f"{role} layer {fl}", f"p{k}_{role}_elementwise"))
            for t in p.get("tests", []):
                if t["name"] in ("awm", "act_cka") and t.get("applies"):
                    marks = t["layer_map"] if t["name"] == "act_cka" else [[i, j] for i, j in
                                                                             _index_map(t, layouts, x, y)]
                    figs.append(_heatmap(run, t["matrix"], f"{t['name']} CKA (dots: layer map)",
                                         f"p{k}_{t['name']}_cka", "B layer", "A layer", marks))
                if t["name"] in ("phi_u", "phi_match") and t.get("applies"):
                    figs.append(_phi_figure(run, t, f"p{k}_{t['name']}"))
            evidence = _evidence_figure(run, p, f"p{k}_evidence")
            figs = ([evidence] if evidence else []) + figs
            focus = [r for r in body["naive"]["same_layer"][k]["focus"]]
            sections.append(Section(f"{p['a']} vs {p['b']}: {p['verdict']}", text="; ".join(p["reasons"]),
                                    table=_tests_table(p) or None, figures=figs,
                                    note=f"naive: mean raw cosine {_num(p['naive']['mean_raw_cosine'])}, mean "
                                         f"Pearson {_num(p['naive']['mean_pearson'])}, shuffled control "
                                         f"{_num(p['naive']['mean_shuffled'])}; layer map {p.get('layer_map')}"))
            if focus:
                sections.append(Section(f"{p['a']} vs {p['b']}: same-layer table at layer {fl} (the seed's headline)",
                                        table=focus))
            if p.get("gamma_fold"):
                sections.append(Section(f"γ-fold demonstration ({p['a']} folded)", table=p["gamma_fold"]["rows"][:12],
                                        text="Folding A's gains into the linear maps they feed keeps A's function; "
                                             "u = 1 leaves raw cosine at the shuffled level and Pearson undefined, "
                                             "a transplant of B's gains forges raw = Pearson = 1."))
        sections.append(Section("Gain distributions", figures=[gfig],
                                table=[{"model": n, **{k: v for k, v in r.items()}} for n in names
                                       for r in body["naive"]["gain_summary"][n][:0]] or None))
        sections.append(Section("Models and bytes read",
                                table=[{k: v for k, v in m.items() if k != "bad_numbers"} for m in body["models"]]))
        bad = [{"model": m["name"], **b} for m in body["models"] for b in m.get("bad_numbers", [])]
        if bad:
            sections.insert(0, Section("Bad numbers", table=bad,
                                       text="These tensors hold NaN, Inf or only zeros. Correlations that touch "
                                            "them are undefined, and a sound test that read one does not apply."))
        results = run.write_results(body, inputs=[i for lay in layouts for i in lay.handle.inputs()],
                                    timings=timings)
        run.write_report(Report(title="lmsurgeon lineage", how_to_read=HOW_TO_READ, sections=sections,
                                summary={f"{p['a']} vs {p['b']}": p["verdict"] for p in pairs}))
    return results


def _index_map(t, layouts, x, y):
    la, lb = layouts[x].layers, layouts[y].layers
    return [[la.index(a), lb.index(b)] for a, b in t["layer_map"]]
