"""The whole analysis: results.json (lmsurgeon/swap@1), figures, report, CLI; MiniLM and the zoo's deep decoder."""

import json
import math
from dataclasses import fields
from pathlib import Path

import pytest

from lmsurgeon.cli import main
from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.swap import SwapConfig, analyze
from tests.swap_models import llama, save_with_tokenizer, tokenizer

PAIR_KEYS = {
    "i",
    "trans_i",
    "trans_j",
    "dep_ij",
    "dep_ji",
    "r",
    "delta",
    "delta_linear",
    "bi",
    "angular",
    "dloss",
    "ppl_ratio",
    "kl",
}
FIGURES = {"fig2_r_vs_delta.png", "fig3_components.png", "fig4_deltaprime_vs_delta.png", "depth_profile.png"}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    tok = tokenizer()
    return save_with_tokenizer(llama(len(tok), layers=4), tok, tmp_path_factory.mktemp("m") / "llama")


def test_results_json_has_the_issue_schema_and_matches_the_returned_dict(tiny_llama, tmp_path):
    out = tmp_path / "run"
    res = analyze(tiny_llama, tokens=1500, seq_len=64, out=out, bootstrap=200, apply=1, drop=3)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    assert res["schema"] == "lmsurgeon/swap@1"
    assert len(res["pairs"]) == 3
    assert len(res["layers"]) == 4
    assert set(res["pairs"][0]) >= PAIR_KEYS
    for key in ("r_vs_delta", "linear_vs_delta", "bi_vs_delta", "angular_vs_delta", "r_vs_dloss", "delta_vs_dloss"):
        assert {"rho", "ci", "n", "n_degenerate"} <= set(res["spearman"][key])
    p = res["pairs"][1]
    assert math.isclose(p["r"], p["trans_i"] * p["trans_j"] * (p["dep_ij"] + p["dep_ji"]), rel_tol=1e-12)
    assert res["tokens"]["eval"] >= 1500
    assert res["tokens"]["fit"] >= 1500
    assert {f.name for f in (out / "figures").iterdir()} >= FIGURES
    assert "Safest swaps" in (out / "report.html").read_text()
    # the written swap's measured Δloss is the cached end-to-end Δloss of that pair
    swap = res["apply"]["results"][0]
    assert swap["path"] == "swap_1_2"
    assert (out / "swap_1_2" / "model.safetensors").exists()
    assert math.isclose(swap["dloss"], res["pairs"][1]["dloss"], rel_tol=1e-4, abs_tol=1e-6)
    drop = res["apply"]["results"][1]
    assert drop["n_layers"] == 3
    assert math.isclose(drop["dloss"], res["layers"][3]["dloss_drop"], rel_tol=1e-4, abs_tol=1e-6)


def test_cli_swap_writes_a_run_folder_prints_it_without_out_and_rejects_a_bad_index(
    tiny_llama, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(["swap", str(tiny_llama), "--tokens", "600", "--seq-len", "64", "--bootstrap", "50", "--no-e2e"]) == 0
    captured = capsys.readouterr()
    printed = [line for line in captured.out.splitlines() if line.startswith("run folder: ")]
    assert len(printed) == 1
    # stderr is no terminal under pytest: the batch stage is one timed line, not a redrawn bar
    assert [ln for ln in captured.err.splitlines() if "swap: fit and eval batches" in ln] != []
    run_dir = Path(printed[0].removeprefix("run folder: "))
    assert run_dir.parent == (tmp_path / "runs").resolve()
    res = json.loads((run_dir / "results.json").read_text())
    assert res["run_dir"] == str(run_dir)
    assert res["pairs"][0]["dloss"] is None
    assert res["ranking"][0]["by"] == "delta"
    assert main(["swap", str(tiny_llama), "--apply", "3", "--out", str(tmp_path / "bad")]) == 1


def test_cli_options_are_generated_from_swap_config_with_its_defaults():
    from lmsurgeon.cli.swap import swap

    params = {p.name: p for p in swap.params}
    for f in fields(SwapConfig):
        assert f.name in params, f"SwapConfig.{f.name} has no command-line option"
        assert params[f.name].default == getattr(SwapConfig(), f.name), f.name
    assert params["e2e"].opts == ["--no-e2e"]


def test_analyze_rejects_an_unknown_option_by_name(tiny_llama, tmp_path):
    with pytest.raises(TypeError, match="unknown swap option.*tokenz"):
        analyze(tiny_llama, tokenz=100, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_minilm_encoder_gets_delta_trans_dep_and_no_dloss(tmp_path):
    res = analyze("minilm", tokens=1024, seq_len=64, out=tmp_path / "m", bootstrap=200)
    assert res["model"]["encoder"] is True
    assert res["dloss_applicable"] is False
    assert len(res["pairs"]) == 5
    assert [p["dloss"] for p in res["pairs"]] == [None] * 5
    assert min(p["delta"] for p in res["pairs"]) > 0
    assert min(p["r"] for p in res["pairs"]) > 0
    assert "r_vs_dloss" not in res["spearman"]
    assert res["spearman"]["r_vs_delta"]["n"] == 5


def test_zoo_deep_decoder_r_predicts_delta(test_zoo, tmp_path):
    zoo_dir, _ = test_zoo
    res = analyze(zoo_dir / "deep-llama", tokens=4096, seq_len=128, out=tmp_path / "z", bootstrap=500)
    sp = res["spearman"]
    print("deep-llama Spearman r vs δ", sp["r_vs_delta"], "δ' vs δ", sp["linear_vs_delta"])
    assert len(res["pairs"]) == 15
    # a trained 16-layer decoder: the paper reports 0.91; a clearly positive ρ is the regression check here
    assert sp["r_vs_delta"]["rho"] > 0.5
    assert sp["linear_vs_delta"]["rho"] > 0.5


def test_cli_plan_drop_prints_the_recommendation_and_the_verdict_against_the_oracle(tiny_llama, tmp_path, capsys):
    assert (
        main(
            [
                "swap",
                str(tiny_llama),
                "--tokens",
                "600",
                "--seq-len",
                "64",
                "--bootstrap",
                "20",
                "--no-e2e",
                "--plan-drop",
                "2",
                "--apply-plan",
                "oracle",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert {r["strategy"] for r in res["plans"]} == {"trans", "bi", "angular", "greedy_validation", "oracle"}
    for rec in res["recommended"]:
        assert f"  drop {rec['k']}: layers {rec['layers']} ({rec['strategy']})" in out
    assert "At k = 2 of 4 layers the recommended plan" in out
    oracle = next(r for r in res["plans"] if r["strategy"] == "oracle" and r["k"] == 2)
    assert res["applied_plan"]["drops"] == oracle["layers"]
    assert f"wrote {res['applied_plan']['path']} (2 layers)" in out


def test_heal_steps_without_a_plan_to_apply_is_refused_before_anything_is_written(tiny_llama, tmp_path):
    with pytest.raises(LmsurgeonError, match="--heal-steps .* --apply-plan"):
        analyze(tiny_llama, heal_steps=10, out=tmp_path / "h")
    assert not (tmp_path / "h").exists()
