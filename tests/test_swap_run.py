"""The whole analysis: results.json (lmsurgeon/swap@1), figures, report, CLI; MiniLM and the zoo's deep decoder."""

import json
import math

import pytest

from lmsurgeon.cli import main
from lmsurgeon.swap import analyze
from tests.swap_models import llama, save_with_tokenizer, tokenizer

PAIR_KEYS = {"i", "trans_i", "trans_j", "dep_ij", "dep_ji", "r", "delta", "delta_linear", "bi", "angular", "dloss",
             "ppl_ratio", "kl"}
FIGURES = {"fig2_r_vs_delta.png", "fig3_components.png", "fig4_deltaprime_vs_delta.png", "depth_profile.png"}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    tok = tokenizer()
    return save_with_tokenizer(llama(len(tok), layers=4), tok, tmp_path_factory.mktemp("m") / "llama")


def test_results_json_has_the_issue_schema_and_matches_the_returned_dict(tiny_llama, tmp_path):
    out = tmp_path / "run"
    res = analyze(tiny_llama, tokens=1500, seq_len=64, out=out, bootstrap=200, apply=1, drop=3)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    assert res["schema"] == "lmsurgeon/swap@1" and len(res["pairs"]) == 3 and len(res["layers"]) == 4
    assert set(res["pairs"][0]) >= PAIR_KEYS
    for key in ("r_vs_delta", "linear_vs_delta", "bi_vs_delta", "angular_vs_delta", "r_vs_dloss",
                "delta_vs_dloss"):
        assert {"rho", "ci", "n", "n_degenerate"} <= set(res["spearman"][key])
    p = res["pairs"][1]
    assert math.isclose(p["r"], p["trans_i"] * p["trans_j"] * (p["dep_ij"] + p["dep_ji"]), rel_tol=1e-12)
    assert res["tokens"]["eval"] >= 1500 and res["tokens"]["fit"] >= 1500
    assert {f.name for f in (out / "figures").iterdir()} >= FIGURES
    assert "Safest swaps" in (out / "report.html").read_text()
    # the written swap's measured Δloss is the cached end-to-end Δloss of that pair
    swap = res["apply"]["results"][0]
    assert swap["path"] == "swap_1_2" and (out / "swap_1_2" / "model.safetensors").exists()
    assert math.isclose(swap["dloss"], res["pairs"][1]["dloss"], rel_tol=1e-4, abs_tol=1e-6)
    drop = res["apply"]["results"][1]
    assert drop["n_layers"] == 3
    assert math.isclose(drop["dloss"], res["layers"][3]["dloss_drop"], rel_tol=1e-4, abs_tol=1e-6)


def test_cli_swap_writes_a_run_folder_and_rejects_a_bad_index(tiny_llama, tmp_path):
    assert main(["swap", str(tiny_llama), "--tokens", "600", "--seq-len", "64", "--bootstrap", "50",
                 "--no-e2e", "--out", str(tmp_path / "cli")]) == 0
    res = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert res["pairs"][0]["dloss"] is None and res["ranking"][0]["by"] == "delta"
    assert main(["swap", str(tiny_llama), "--apply", "3", "--out", str(tmp_path / "bad")]) == 1


def test_minilm_encoder_gets_delta_trans_dep_and_no_dloss(tmp_path):
    res = analyze("minilm", tokens=1024, seq_len=64, out=tmp_path / "m", bootstrap=200)
    assert res["model"]["encoder"] and not res["dloss_applicable"] and len(res["pairs"]) == 5
    assert all(p["dloss"] is None and p["delta"] > 0 and p["r"] > 0 for p in res["pairs"])
    assert "r_vs_dloss" not in res["spearman"] and res["spearman"]["r_vs_delta"]["n"] == 5


def test_zoo_deep_decoder_r_predicts_delta(test_zoo, tmp_path):
    zoo_dir, _ = test_zoo
    res = analyze(zoo_dir / "deep-llama", tokens=4096, seq_len=128, out=tmp_path / "z", bootstrap=500)
    sp = res["spearman"]
    print("deep-llama Spearman r vs δ", sp["r_vs_delta"], "δ' vs δ", sp["linear_vs_delta"])
    assert len(res["pairs"]) == 15
    # a trained 16-layer decoder: the paper reports 0.91; a clearly positive ρ is the regression check here
    assert sp["r_vs_delta"]["rho"] > 0.5 and sp["linear_vs_delta"]["rho"] > 0.5
