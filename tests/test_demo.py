"""``lmsurgeon demo`` end to end on the test zoo: every run present, complete and linked from one report."""

from __future__ import annotations

import json
import re

from lmsurgeon.cli import main
from lmsurgeon.demo.run import lineage_headline, merge_headline, pair_table, swap_headline
from lmsurgeon.report.runfolder import is_complete


def test_demo_writes_every_run_and_one_report_linking_them(tmp_path, test_zoo, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--profile", "test", "--merge-trials", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert set(runs) == {
        "lineage-zoo",
        "lineage-adversarial",
        "lineage-minilm",
        "swap-deep",
        "swap-minilm",
        "merge",
        "generation",
    }
    for name, run in runs.items():
        assert is_complete(out / name), name
        assert run["schema"] == json.loads((out / name / "results.json").read_text())["schema"]
        assert run["result"].strip(), f"{name} has an empty result line"
        assert run["result"] in printed
    html = (out / "report.html").read_text()
    links = set(re.findall(r'href="([^"]+/report\.html)"', html))
    assert links == {f"{name}/report.html" for name in runs}
    assert is_complete(out)
    assert str(out.resolve()) in printed
    verdicts = runs["lineage-zoo"]["verdicts"]
    assert not [pair for pair, v in verdicts.items() if "indep" in pair and v == "derived"]
    assert set(runs["lineage-zoo"]["naive_raw_cosine"]) == set(verdicts)
    entries = test_zoo[1]["models"]
    adversarial = {pair.split(" ~ ")[1]: v for pair, v in runs["lineage-adversarial"]["verdicts"].items()}
    assert adversarial == {name: entries[name]["truth"] for name in adversarial}, adversarial
    merge = json.loads((out / "merge" / "results.json").read_text())
    assert merge["objective"] == "domain"
    assert merge["bpb"]["best"]["heldout"] <= merge["bpb"]["base"]["heldout"]  # never worse than the base
    assert "naive raw cosine" in html
    # stderr is no terminal under pytest: one plain line per demo step instead of bars
    steps = [line for line in captured.err.splitlines() if "demo: step" in line]
    assert len(steps) == len(runs)


def test_top_page_shows_each_lineage_verdict_beside_its_naive_raw_cosine():
    lineage = {
        "pairs": [
            {"a": "zoo/lin-base", "b": "zoo/lin-finetune", "verdict": "derived", "naive": {"mean_raw_cosine": 0.99991}},
            {
                "a": "zoo/lin-base",
                "b": "zoo/lin-indep-1",
                "verdict": "independent",
                "naive": {"mean_raw_cosine": 0.999962},
            },
            {"a": "zoo/lin-base", "b": "zoo/lin-flat", "verdict": "inconclusive", "naive": {"mean_raw_cosine": None}},
        ]
    }
    row = {"run": "Lineage: zoo family", **lineage_headline(lineage)}
    assert row["result"] == "1 of 3 pairs derived"
    assert pair_table(row) == [
        {"pair": "lin-base ~ lin-finetune", "verdict": "derived", "naive raw cosine": "0.99991"},
        {"pair": "lin-base ~ lin-indep-1", "verdict": "independent", "naive raw cosine": "0.99996"},
        {"pair": "lin-base ~ lin-flat", "verdict": "inconclusive", "naive raw cosine": None},
    ]
    assert pair_table({"run": "Layer swap", "result": "Spearman"}) is None


def test_merge_line_leads_with_the_recommendation_and_held_out_bits_per_byte():
    base = {"name": "base", "search": 2.61, "heldout": 2.6, "general": 2.5}
    trial = {"name": "trial 3", "trial": 3, "search": 2.5, "heldout": 2.55, "general": 2.51}
    chosen = {"bpb": {"base": base, "best": trial, "best_trial": trial, "recommended": "trial"}}
    assert merge_headline(chosen)["result"] == (
        "recommends trial 3: held-out 2.6000 → 2.5500 bits per byte, general 2.5000 → 2.5100"
    )
    worse = {**trial, "heldout": 2.7}
    kept = {"bpb": {"base": base, "best": base, "best_trial": worse, "recommended": "base"}}
    assert merge_headline(kept)["result"] == (
        "recommends the base (held-out 2.6000 bits per byte; best trial 2.7000), general 2.5000 → 2.5000"
    )
    assert merge_headline({})["result"] == "no trial kept perplexity under the cap"


def test_swap_line_adds_the_drop_plan_only_when_one_was_made():
    res = {"spearman": {"r_vs_delta": {"rho": 0.91}, "linear_vs_delta": {"rho": 0.5}}}
    assert swap_headline(res)["result"] == "Spearman(r, δ) = 0.910, Spearman(δ', δ) = 0.500"
    res |= {
        "recommended": [{"k": 1, "strategy": "bi", "layers": [5]}, {"k": 2, "strategy": "r_trans", "layers": [3, 5]}],
        "plan_summary": {
            "k_max": 2,
            "n_layers": 8,
            "baseline": {"heldout_bpb": 2.5},
            "at_k_max": {"recommended": "r_trans", "recommended_bpb": 2.6, "oracle_bpb": 2.59},
        },
    }
    assert swap_headline(res)["result"].endswith(
        "; dropping 2 of 8 layers [3, 5] (r_trans): 2.5000 → 2.6000 bits per byte, oracle 2.5900"
    )
