"""``lmsurgeon demo``: the whole offline tour in one command, one top-level report linking each run.

Steps: build (or reuse) the zoo; lineage on the zoo's lineage family (with its independent twins as hard
negatives), on its adversarial family (laundered, up-scaled, pruned, re-embedded and upcycled copies, and false
accusations) and on the real MiniLM with copies derived from it; layer-swap analysis of the deep decoder (with a
drop plan) and of MiniLM; a short cross-tokenizer merge study in the zoo's domain scenario (the general Llama
takes embeddings from the GPT-2 trained mostly on code), with a deterministic generation comparison of base and
recommended model. Each step writes its own run folder inside the demo's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmsurgeon.report import Report, RunFolder, Section
from lmsurgeon.report.progress import stage

PROMPTS = [
    "The function returns",
    "To open a file in Python, use",
    "A dictionary maps",
    "The following example shows how to",
    "Raises ValueError if",
    "This module provides",
]
#: headline keys with one entry per lineage pair: shown in the step's own table, not in the one-line summary
PER_PAIR = ("verdicts", "naive_raw_cosine")
#: drop plan of the deep decoder: a quarter of its layers, each plan scored on this many held-out tokens
PLAN_DROP = "25%"
PLAN_TOKENS = 1_024
#: documents of each merge text (search, held-out domain, general)
MERGE_DOCUMENTS = 32
#: the zoo's adversarial family of the Llama (RMSNorm, rotary, grouped-query) base; truths in zoo.json
ADVERSARIAL_LLAMA = [
    "llama-sp",
    "adv-llama-laundered",
    "adv-llama-upscaled",
    "adv-llama-pruned",
    "adv-llama-reembedded",
    "adv-llama-moe",
    "adv-llama-gains-pasted",
    "adv-llama-embed-pasted",
    "adv-llama-indep",
]
LINEAGE_ZOO = [
    "lin-base",
    "lin-finetune",
    "lin-permuted",
    "lin-pruned",
    "lin-gammafold",
    "lin-indep-1",
    "lin-indep-2",
    "lin-indep-3",
]


@dataclass
class Step:
    """One run of the demo: its folder name, what it shows, and the call that writes it."""

    name: str
    title: str
    purpose: str
    call: Callable[[Path], dict]
    headline: Callable[[dict], dict]


def run_demo(
    out: str | Path | None = None,
    *,
    profile: str = "full",
    merge_trials: int = 6,
    progress: bool = False,
    overwrite: bool = False,
) -> dict:
    """Run every step into ``out`` (default ``runs/demo-<timestamp>``) and return the demo's results.json."""
    from lmsurgeon.demo.minilm import ensure_minilm_copies
    from lmsurgeon.zoo import ensure_zoo, model_dir

    timings: dict[str, float] = {}
    with RunFolder(out, command="demo", overwrite=overwrite, seed=0) as run:
        t0 = time.perf_counter()
        stage(f"demo: zoo ({profile} profile; built once, then reused)")
        zoo_dir, manifest = ensure_zoo(profile, progress=progress)
        timings["zoo"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        minilm_copies = ensure_minilm_copies(progress=progress)
        timings["minilm_copies"] = time.perf_counter() - t0

        def zoo_model(name: str) -> str:
            return str(model_dir(zoo_dir, name, manifest))

        steps = build_steps(zoo_model, minilm_copies, merge_trials, progress)
        rows, results = [], {}
        for number, step in enumerate(steps, 1):
            stage(f"demo: step {number}/{len(steps)}, {step.title}")
            t0 = time.perf_counter()
            body = step.call(run.path / step.name)
            timings[step.name] = time.perf_counter() - t0
            results[step.name] = {"schema": body.get("schema"), **step.headline(body)}
            rows.append({"run": step.title, **step.headline(body), "seconds": round(timings[step.name], 1)})
        body = run.write_results(
            {
                "zoo": {
                    "dir": str(zoo_dir),
                    "profile": profile,
                    "recipe_hash": manifest["recipe_hash"],
                    "build_seconds": manifest["build_seconds"],
                },
                "minilm_copies": {k: str(v) for k, v in minilm_copies.items()},
                "runs": results,
            },
            timings=timings,
        )
        run.write_report(demo_report(steps, rows, manifest, timings))
    return {**body, "out": str(run.path)}


def build_steps(
    zoo_model: Callable[[str], str], minilm_copies: dict[str, Path], merge_trials: int, progress: bool
) -> list[Step]:
    from lmsurgeon.data import load_corpus
    from lmsurgeon.lineage import compare
    from lmsurgeon.merge import compare_generation, run_domain_merge
    from lmsurgeon.swap import analyze
    from lmsurgeon.zoo.recipe import domain_texts

    minilm = ["minilm", *(str(p) for p in minilm_copies.values())]
    laundering = [zoo_model(n) for n in ADVERSARIAL_LLAMA]
    zoo_lineage = [zoo_model(n) for n in LINEAGE_ZOO]
    merge_dir: dict[str, Path] = {}

    def merge(out: Path) -> dict:
        corpus = load_corpus()
        res = run_domain_merge(
            zoo_model("llama-sp"),
            zoo_model("gpt2-code"),
            out,
            domain_texts(corpus.split("train_b")),
            domain_texts(corpus.split("validation")),
            trials=merge_trials,
            seed=0,
            max_prompts=MERGE_DOCUMENTS,
            progress=progress,
        )
        merge_dir["out"] = out
        return res

    def generation(out: Path) -> dict:
        prompts = out.parent / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
        return compare_generation(
            zoo_model("llama-sp"), str(merge_dir["out"] / "best_model"), prompts, out, seed=42, max_new_tokens=48
        )

    return [
        Step(
            "lineage-zoo",
            "Lineage: zoo family",
            "lin-base against its fine-tuned, permuted, pruned and "
            "γ-folded descendants and three independently trained twins (the hard negatives).",
            lambda out: compare(zoo_lineage, out=out, progress=progress),
            lineage_headline,
        ),
        Step(
            "lineage-adversarial",
            "Lineage: laundering and false accusations",
            "llama-sp against copies laundered (folded, rotated, per-head maps, permuted, re-tokenised), depth "
            "up-scaled, width-pruned, re-embedded and MoE-upcycled, and against independent models with its norm "
            "gains or its embedding pasted in (the false accusations), all with default options.",
            lambda out: compare(laundering, out=out, progress=progress),
            lineage_headline,
        ),
        Step(
            "lineage-minilm",
            "Lineage: real MiniLM",
            "all-MiniLM-L6-v2 against copies of it fine-tuned, permuted and pruned here.",
            lambda out: compare(minilm, out=out, progress=progress),
            lineage_headline,
        ),
        Step(
            "swap-deep",
            "Layer swap: deep decoder",
            "Trans/Dep/r against the measured swap effect δ on the zoo's deep Llama, and which quarter of its "
            "layers can be dropped: each predictor's plan beside the greedy oracle, on held-out text.",
            lambda out: analyze(
                zoo_model("deep-llama"),
                tokens=4_096,
                seq_len=256,
                plan_drop=PLAN_DROP,
                plan_tokens=PLAN_TOKENS,
                out=out,
                progress=progress,
            ),
            swap_headline,
        ),
        Step(
            "swap-minilm",
            "Layer swap: MiniLM",
            "The same analysis on the real pretrained encoder.",
            lambda out: analyze("minilm", tokens=8_192, seq_len=128, out=out, progress=progress),
            swap_headline,
        ),
        Step(
            "merge",
            "Merge: Llama ← code GPT-2 embeddings",
            f"The domain scenario: a {merge_trials}-trial Optuna study (--objective domain) blending the embeddings "
            "of the GPT-2 trained mostly on code (byte-level BPE against SentencePiece, another width) into the "
            "general Llama's input embeddings and untied lm_head, searched on code documents, scored on held-out "
            "code documents and on general text, beside the baselines.",
            merge,
            merge_headline,
        ),
        Step(
            "generation",
            "Generation: base vs merged",
            "Deterministic greedy decoding of both models.",
            generation,
            generation_headline,
        ),
    ]


def lineage_headline(res: dict) -> dict:
    """The verdict of each pair, and beside it the naive number the verdict replaces.

    ``naive_raw_cosine`` is the mean raw cosine of the pair's norm gains (``pairs[].naive.mean_raw_cosine`` in
    the lineage results.json): about 0.9999 for independently trained models too, which is why it never decides.
    """
    pairs = res.get("pairs", [])
    names = [f"{Path(p['a']).name} ~ {Path(p['b']).name}" for p in pairs]
    verdicts = {name: p["verdict"] for name, p in zip(names, pairs, strict=True)}
    raw_cosine = {name: p["naive"]["mean_raw_cosine"] for name, p in zip(names, pairs, strict=True)}
    derived = sum(v == "derived" for v in verdicts.values())
    return {"result": f"{derived} of {len(pairs)} pairs derived", "verdicts": verdicts, "naive_raw_cosine": raw_cosine}


def swap_headline(res: dict) -> dict:
    """The paper's correlations and, when the run planned drops, what the recommended plan costs at the largest k."""
    rho = res.get("spearman", {})
    line = f"Spearman(r, δ) = {_num(rho.get('r_vs_delta'))}, Spearman(δ', δ) = {_num(rho.get('linear_vs_delta'))}"
    summary = res.get("plan_summary")
    if summary:
        at_k = summary["at_k_max"]
        layers = next((r["layers"] for r in res.get("recommended", []) if r["k"] == summary["k_max"]), [])
        line += (
            f"; dropping {summary['k_max']} of {summary['n_layers']} layers {layers} ({at_k['recommended']}): "
            f"{summary['baseline']['heldout_bpb']:.4f} → {at_k['recommended_bpb']:.4f} bits per byte, "
            f"oracle {at_k['oracle_bpb']:.4f}"
        )
    return {"result": line}


def merge_headline(res: dict) -> dict:
    """What lmsurgeon recommends and what it gains on text the search did not see (bits per byte, fair across
    tokenizers); the seed's perplexity ratio stays in the merge's own report."""
    bpb = res.get("bpb")
    if not bpb:
        return {"result": "no trial kept perplexity under the cap"}
    base, best = bpb["base"], bpb["best"]
    trial = bpb.get("best_trial")
    if bpb["recommended"] == "trial":
        head = f"recommends {best['name']}: held-out {base['heldout']:.4f} → {best['heldout']:.4f} bits per byte"
    else:
        tried = f"; best trial {trial['heldout']:.4f}" if trial else ""
        head = f"recommends the base (held-out {base['heldout']:.4f} bits per byte{tried})"
    return {"result": f"{head}, general {base['general']:.4f} → {best['general']:.4f}"}


def generation_headline(res: dict) -> dict:
    s = res.get("summary", {})
    return {"result": f"{s.get('identical', '?')} of {s.get('prompts', '?')} continuations identical"}


def _num(v) -> str:
    if isinstance(v, dict):
        v = v.get("rho", v.get("value"))
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def pair_table(row: dict) -> list[dict] | None:
    """A lineage step's pairs: verdict of the sound tests beside the naive raw cosine (None for other steps)."""
    verdicts = row.get("verdicts")
    if not verdicts:
        return None
    raw_cosine = row.get("naive_raw_cosine", {})
    return [
        {"pair": pair, "verdict": verdict, "naive raw cosine": _cosine(raw_cosine.get(pair))}
        for pair, verdict in verdicts.items()
    ]


def _cosine(x: float | None) -> str | None:
    """Five decimals: the report's default four significant digits would print 0.99996 as 1."""
    return None if x is None else f"{x:.5f}"


def demo_report(steps: list[Step], rows: list[dict], manifest: dict, timings: dict) -> Report:
    table = [{k: v for k, v in r.items() if k not in PER_PAIR} for r in rows]
    sections = [
        Section(
            "Runs",
            text="Each run has its own report, results.json and figures.",
            table=table,
            links=[(s.title, f"{s.name}/report.html") for s in steps],
        )
    ]
    for step, row in zip(steps, rows, strict=True):
        sections.append(
            Section(
                step.title,
                text=step.purpose,
                links=[("open the report", f"{step.name}/report.html")],
                table=pair_table(row),
            )
        )
    models = [
        {
            "model": m["name"],
            "parent": m.get("parent") or "—",
            "transformation": m.get("transformation") or "—",
            "layers": m.get("layers"),
            "hidden": m.get("hidden_size"),
            "val ppl": m.get("final_val_ppl"),
        }
        for m in manifest["models"].values()
    ]
    sections.append(
        Section(
            "The zoo",
            text=f"Built offline from the corpus (profile {manifest['profile']}, recipe "
            f"{manifest['recipe_hash'][:12]}) in {manifest['build_seconds']:.0f} s; reused from the "
            "cache on later runs.",
            table=models,
        )
    )
    total = sum(timings.values())
    return Report(
        title="lmsurgeon demo",
        subtitle=f"{len(steps)} runs in {total:.0f} s",
        summary={r["run"]: r["result"] for r in rows},
        how_to_read="Every line above is one run; open its report for the figures and the evidence. "
        "Lineage verdicts are derived / independent / inconclusive per pair, shown beside "
        "the naive raw cosine of the two models' norm gains, which is close to 1 for related "
        "and independent models alike and so never decides; the swap rows "
        "give the paper's correlations and the drop plan's held-out cost; the merge row gives the "
        "recommended model's bits per byte on held-out text against the base's (lower is better; the base is "
        "recommended when no trial beats it).",
        sections=sections,
    )
