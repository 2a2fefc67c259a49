"""compare-generation is deterministic: two runs write byte-identical results.jsonl; the CLI wires both commands."""

import json

from lmsurgeon.cli import main
from lmsurgeon.merge import compare_generation, run_merge
from lmsurgeon.merge.generate import first_diff


def test_two_generation_comparisons_are_byte_identical(merge_pair, tmp_path):
    merged = tmp_path / "merged"
    run_merge(
        str(merge_pair["llama"]),
        str(merge_pair["gpt2"]),
        merged,
        trials=0,
        max_prompts=8,
        prompts_file=str(merge_pair["prompts"]),
        params={"target_emb_frac": 1.0, "min_tau_emb": -1.0, "alpha_cap_emb": 0.95, "min_tau_head": -1.0},
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Return the list of\nSelf-attention lets each token\n", encoding="utf-8")
    runs = [
        compare_generation(
            str(merge_pair["llama"]), str(merged / "best_model"), prompts, tmp_path / f"g{i}", max_new_tokens=12
        )
        for i in range(2)
    ]
    a, b = ((tmp_path / f"g{i}" / "results.jsonl").read_bytes() for i in range(2))
    assert a == b
    recs = [json.loads(line) for line in a.decode().splitlines()]
    assert [r["index"] for r in recs] == [0, 1]
    assert [0 < r["base"]["n_tokens"] <= 12 for r in recs] == [True, True]
    assert (tmp_path / "g0" / "results.md").read_text().count("\n| ") == 3  # header + 2 prompts
    assert runs[0]["summary"]["prompts"] == 2


def test_first_diff_token():
    assert first_diff([1, 2, 3], [1, 2, 3]) is None
    assert first_diff([1, 2, 3], [1, 5, 3]) == 1
    assert first_diff([1, 2], [1, 2, 3]) == 2


def test_cli_merge_and_compare_generation(merge_pair, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "merge",
            "--base",
            str(merge_pair["gpt2"]),
            "--donor",
            str(merge_pair["llama"]),
            "--out",
            str(out),
            "--trials",
            "3",
            "--prompts-file",
            str(merge_pair["prompts"]),
            "--max-prompts",
            "6",
            "--json",
        ]
    )
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_trials"] == 3
    assert (out / "study.journal").exists()
    code = main(
        [
            "merge",
            "--base",
            str(merge_pair["gpt2"]),
            "--donor",
            str(merge_pair["llama"]),
            "--out",
            str(out),
            "--trials",
            "3",
            "--prompts-file",
            str(merge_pair["prompts"]),
        ]
    )
    assert code == 1  # existing folder without --resume: one-line error
    assert main(["merge", "--help"]) == 0
    assert "Examples" in capsys.readouterr().out
    assert main(["compare-generation", "--help"]) == 0


def test_cli_offers_every_config_field_and_no_dead_option(capsys):
    from lmsurgeon.merge.config import cli_fields, option_name

    assert main(["merge", "--help"]) == 0
    text = capsys.readouterr().out
    missing = [option_name(f) for f in cli_fields() if option_name(f) not in text]
    assert missing == []
    assert "--donor-on-cpu" not in text


def test_cli_merge_without_out_prints_its_run_folder(merge_pair, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "merge",
            "--base",
            str(merge_pair["gpt2"]),
            "--donor",
            str(merge_pair["llama"]),
            "--trials",
            "0",
            "--prompts-file",
            str(merge_pair["prompts"]),
            "--max-prompts",
            "4",
        ]
    )
    assert code == 0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    assert f"report: {(runs[0] / 'report.html').resolve()}" in capsys.readouterr().out
