"""Run folder for ``lineage``: results.json, figures and a report.html that puts the verdict first."""

from __future__ import annotations

import numpy as np

from lmsurgeon.lineage.results import OtherNulls, PairResult, TestResult
from lmsurgeon.report import Report, RunFolder, Section
from lmsurgeon.report.figures import new_figure

HOW_TO_READ = """The verdict comes only from the sound tests (awm: CKA of aligned q/k weights; phi_u: do up-rows and \
down-columns pick the same MLP units; circuits: per-layer attention circuits Σ_h W_Q W_Kᵀ and Σ_h W_V W_O after \
residual alignment; phi_match: do the MLP units' activations and readouts on the same words pick the same \
units, for every MLP kind). Each z is \
measured against a stated null: awm against independently trained models (the shipped calibration, or --null \
models), unless the pair does not clear its own wrong layer pairs by 3 standard deviations, in which case that \
lower z is shown; circuits against the pair's own wrong-layer circuit pairs; phi_u and phi_match analytically. \
The decisive z is the second largest (two tests must agree): derived needs it ≥ 5; independent needs it < 3 and \
no test ≥ 5; anything else is inconclusive. A derived pair lists the tests it evaded and what the data suggests \
(rotation, per-head maps, vocabulary permutation). act_cka (hidden-state CKA) is shown for its layer map and \
never decides. The residual alignment (--align auto) is a signed permutation unless an orthogonal map fits \
held-out shared tokens decisively better; when the shared tokens fix no common basis (a re-embedded body, an \
unrelated tokenizer) and the widths agree, the stored basis is tried too and the weight tests' p-values pay for \
the choice (Šidák); the line under each pair gives the evidence.

What each test is invariant to (a function-preserving rewrite it cannot be fooled by; methods.md §L7.7.1): \
awm: residual permutation and sign flips, folded gains, head order and orthogonal per-head maps, vocabulary \
permutation (tokens matched by string), a rotation when the orthogonal alignment is used; not general per-head \
maps. phi_u: residual permutation, sign flips and (aligned) rotation, folded gains, MLP unit permutation and \
scaling, vocabulary permutation. circuits: residual permutation, sign flips and (aligned) rotation, folded \
gains, head order and any invertible per-head map on q/k and v/o, vocabulary permutation. phi_match: all of \
these, being computed from activations on the same words. Naive numbers are invariant to none of the \
re-parameterisations that matter.

The naive columns reproduce the original claims: raw cosine of norm gains, and the weight-σ fingerprint \
(Pearson across layers of the per-layer standard deviations of Q/K/V/O). Compare the cosine with the shuffled \
control (the cosine expected from the value distribution alone): when they agree, the cosine carried no \
evidence. Pearson (centered cosine) near 0 means no shared pattern; gains can also be folded away entirely \
(γ-fold table). Independent models of one recipe score high on the weight-σ fingerprint too, and a per-head \
rescaling sets it at will."""


def _num(x) -> str:
    """Four decimals, or 'undefined' (constant vectors give no correlation, not NaN and not 0)."""
    return "undefined" if x is None or not np.isfinite(x) else f"{x:.4f}"


def _heatmap(run, M, title, name, xlabel, ylabel, marks=None) -> str:
    fig, ax = new_figure(5, 4)
    im = ax.imshow(np.asarray(M, dtype=float), aspect="auto", cmap="viridis", origin="lower")
    bar = fig.colorbar(im, ax=ax)
    bar.formatter.set_useOffset(False)  # values like 0.99998 read as such, not as an offset above the title
    bar.update_ticks()
    if not np.isfinite(np.asarray(M, dtype=float)).any():
        ax.text(
            0.5,
            0.5,
            "undefined everywhere\n(constant vectors, e.g. folded gains)",
            transform=ax.transAxes,
            ha="center",
            va="center",
        )
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


def _hist(run, models) -> str:
    fig, ax = new_figure(6, 3.5)
    for m in models:
        vals = np.concatenate([v for r, per in m.norms.items() if not r.endswith(".bias") for v in per.values()])
        ax.hist(vals, bins=60, alpha=0.5, label=m.name)
    ax.set(title="all norm gains", xlabel="gain", ylabel="count")
    ax.legend(fontsize=7)
    return run.save_figure(fig, "gain_histograms")


def _tests_table(p: PairResult) -> list[dict]:
    return [
        {
            "test": t.name,
            "applies": t.applies,
            "statistic": t.statistic,
            "z": t.z,
            "-log10 p": t.neg_log10_p,
            "null": None if t.null is None else f"{t.null.source}: {t.null.mean:.3g} ± {t.null.std:.3g}",
            "reason": "; ".join(r for r in (t.reason, _blocks_note(t)) if r),
        }
        for t in p.tests
    ]


def _blocks_note(t) -> str:
    """Which blocks an activation test ran, when not every block of both models (``--act-layers``, §L7.4.4)."""
    run = t.run
    if not run or run["blocks"] == run["of"]:
        return ""
    how = ", ".join(f"{dt}{' streamed' if s else ''}" for dt, s in zip(run["dtype"], run["streamed"], strict=True))
    return f"first {run['blocks'][0]}/{run['of'][0]} and {run['blocks'][1]}/{run['of'][1]} blocks ({how})"


def _weight_std_note(p: PairResult) -> str:
    """The second dispute's weight-σ fingerprint beside the norm cosine (never evidence, methods.md §L2.1)."""
    w = p.naive.weight_std
    if w is None:
        return "weight-σ fingerprint not read"
    if not w.get("applies"):
        return f"weight-σ fingerprint: {w.get('reason')}"
    roles = ", ".join(f"{r} {_num(v)}" for r, v in w["per_role"].items())
    return f"weight-σ fingerprint (Pearson across layers) {_num(w['fingerprint'])} ({roles})"


def _alignment_note(p: PairResult) -> str:
    """Which residual map the weight tests used and, for --align auto, the held-out evidence for it."""
    a = p.alignment
    if a is None:
        return "no residual alignment"
    ev = a.evidence or {}
    if "margin_z" in ev:
        return (
            f"alignment {a.method} (auto: held-out |corr| permutation {_num(ev['held_out_corr_permutation'])}, "
            f"orthogonal {_num(ev['held_out_corr_procrustes'])}, margin z {ev['margin_z']:.1f}, "
            f"misfit closed {ev['misfit_closed']:.0%}; orthogonal needs z ≥ {ev['threshold_z']:g} and "
            f"{ev['threshold_closed']:.0%} closed)"
        ) + _stored_basis_note(ev.get("stored_basis"))
    note = f"alignment {a.method}" + (f" ({ev['reason']})" if "reason" in ev else "")
    return note + _stored_basis_note(ev.get("stored_basis"))


def _stored_basis_note(st: dict | None) -> str:
    """The stored-basis look of --align auto (methods.md §L7.1.4): the candidates' awm z and the correction."""
    if not st:
        return ""
    zs = ", ".join(f"{k} {_num(v)}" for k, v in st["awm_z"].items())
    return f"; stored basis tried ({st['reason']}): awm z {zs}; kept {st['chosen']}, Šidák over {st['looks']} looks"


def _verdict_note(p: PairResult) -> str:
    v = p.verdict
    if v.decisive_test is None:
        return "no decisive z"
    out = f"decisive z {v.decisive_z:.1f} ({v.decisive_test}), strongest {v.strongest_z:.1f} ({v.strongest_test})"
    if v.evaded:
        out += f"; evaded: {', '.join(v.evaded)}"
    if v.suggested:
        out += f"; suggested: {' | '.join(v.suggested)}"
    return out


def _phi_figure(run, t: TestResult, name) -> str:
    fig, ax = new_figure(6, 3)
    ax.bar(range(len(t.per_layer)), [_finite_or_zero(p.neg_log10_p) for p in t.per_layer])
    ax.set(title=f"{t.name} per matched layer", xlabel="matched layer pair", ylabel="-log10 p_l")
    return run.save_figure(fig, name)


def _finite_or_zero(x) -> float:
    """A bar height: undefined values (results.json's null) are drawn as 0."""
    return float(x) if x is not None and np.isfinite(x) else 0.0


def _evidence_figure(run, p: PairResult, name) -> str | None:
    """Left: each applicable test's z against the verdict thresholds. Right: the awm statistic beside its nulls
    (independents and the pair's own wrong layer maps), drawn as normal densities with their mean and std."""
    from scipy.stats import norm

    from lmsurgeon.lineage.verdict import DECISIVE, T_HI, T_LO

    tests = [t for t in p.tests if t.applies and t.z is not None]
    if not tests:
        return None
    fig, axes = new_figure(11, 3.4, ncols=2)
    ax, bx = axes[0]
    ax.barh(
        [t.name for t in tests],
        [t.z for t in tests],
        color=["tab:blue" if t.name in DECISIVE else "tab:gray" for t in tests],
    )
    ax.set_xscale("symlog", linthresh=10)
    for x, style in ((T_LO, ":"), (T_HI, "--")):
        ax.axvline(x, color="k", ls=style, lw=1)
    ax.set(title="z per test (dotted T_lo, dashed T_hi; grey: never decisive)", xlabel="z (symlog)")
    awm = next((t for t in tests if t.name == "awm"), None)
    if awm is None:
        bx.set_axis_off()
        return run.save_figure(fig, name)
    others = awm.nulls or OtherNulls()
    nulls = {
        k: v
        for k, v in (
            ("unmatched_layers", others.unmatched_layers),
            ("independents", others.independents),
            ("own", others.own),
        )
        if v is not None and np.isfinite(v.std)
    }
    x = np.linspace(-0.05, 1.05, 600)
    for label, nl in nulls.items():
        bx.plot(x, norm.pdf(x, nl.mean, max(nl.std, 1e-3)), label=f"{label}: {nl.mean:.3f} ± {nl.std:.3f}")
    bx.axvline(awm.statistic, color="tab:red", label=f"observed {awm.statistic:.3f}")
    bx.set(title="awm statistic (mean matched CKA) and its nulls", xlabel="mean matched CKA", ylabel="density")
    bx.legend(fontsize=7)
    return run.save_figure(fig, name)


def _pair_figures(run, k: int, p: PairResult, ma, mb, focus_layer: int) -> list[str]:
    """The evidence figure, the naive heatmaps and element-wise plots, and each test's own figure."""
    figs = []
    gain_roles = [r for r in p.matrices if not r.endswith(".bias")][:2]
    for role in gain_roles:
        mats = p.matrices[role]
        figs.append(_heatmap(run, mats["raw"], f"{role}: raw cosine", f"p{k}_{role}_raw", p.b, p.a))
        figs.append(_heatmap(run, mats["pearson"], f"{role}: Pearson", f"p{k}_{role}_pearson", p.b, p.a))
    for role in gain_roles:
        a, b = ma.norms[role].get(focus_layer), mb.norms[role].get(focus_layer)
        if a is not None and b is not None and a.shape == b.shape:
            figs.append(_elementwise(run, a, b, f"{role} layer {focus_layer}", f"p{k}_{role}_elementwise"))
    for t in p.tests:
        if t.name in ("awm", "act_cka") and t.applies:
            figs.append(
                _heatmap(
                    run,
                    t.matrix,
                    f"{t.name} CKA (dots: layer map)",
                    f"p{k}_{t.name}_cka",
                    "B layer",
                    "A layer",
                    t.layer_map,
                )
            )
        if t.name in ("phi_u", "phi_match") and t.applies:
            figs.append(_phi_figure(run, t, f"p{k}_{t.name}"))
    evidence = _evidence_figure(run, p, f"p{k}_evidence")
    return ([evidence] if evidence else []) + figs


def write_run(out, body: dict, models, pairs: list[PairResult], *, seed, timings, overwrite=False) -> dict:
    """Figures and HTML for the body assembled by :func:`lmsurgeon.lineage.run.compare`; returns what
    results.json holds plus ``out``, the run folder."""
    by_name = {m.name: m for m in models}
    with RunFolder(out, command="lineage", seed=seed, overwrite=overwrite) as run:
        sections = []
        gfig = _hist(run, models)
        fl = body["naive"]["focus_layer"]
        for k, p in enumerate(pairs):
            figs = _pair_figures(run, k, p, by_name[p.a], by_name[p.b], fl)
            sections.append(
                Section(
                    f"{p.a} vs {p.b}: {p.verdict.label}",
                    text="; ".join(p.verdict.reasons),
                    table=_tests_table(p) or None,
                    figures=figs,
                    note=f"naive: mean raw cosine {_num(p.naive.mean_raw_cosine)}, mean "
                    f"Pearson {_num(p.naive.mean_pearson)}, shuffled control "
                    f"{_num(p.naive.mean_shuffled)}; {_weight_std_note(p)}; {_alignment_note(p)}; "
                    f"{_verdict_note(p)}; layer map "
                    f"{None if p.layer_map is None else [list(m) for m in p.layer_map]}",
                )
            )
            focus = p.naive_table["focus"]
            if focus:
                sections.append(
                    Section(f"{p.a} vs {p.b}: same-layer table at layer {fl} (the seed's headline)", table=focus)
                )
            if p.gamma_fold:
                sections.append(
                    Section(
                        f"γ-fold demonstration ({p.a} folded)",
                        table=p.gamma_fold["rows"][:12],
                        text="Folding A's gains into the linear maps they feed keeps A's function; "
                        "u = 1 leaves raw cosine at the shuffled level and Pearson undefined, "
                        "a transplant of B's gains forges raw = Pearson = 1.",
                    )
                )
        sections.append(Section("Gain distributions", figures=[gfig]))
        sections.append(
            Section(
                "Models and bytes read",
                table=[{k: v for k, v in m.items() if k != "bad_numbers"} for m in body["models"]],
            )
        )
        bad = [{"model": m["name"], **b} for m in body["models"] for b in m.get("bad_numbers", [])]
        if bad:
            sections.insert(
                0,
                Section(
                    "Bad numbers",
                    table=bad,
                    text="These tensors hold NaN, Inf or only zeros. Correlations that touch "
                    "them are undefined, and a sound test that read one does not apply.",
                ),
            )
        results = run.write_results(body, inputs=[i for m in models for i in m.layout.handle.inputs()], timings=timings)
        run.write_report(
            Report(
                title="lmsurgeon lineage",
                how_to_read=HOW_TO_READ,
                sections=sections,
                summary={f"{p.a} vs {p.b}": p.verdict.label for p in pairs},
            )
        )
    return {**results, "out": str(run.path)}
