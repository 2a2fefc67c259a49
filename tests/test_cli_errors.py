"""The CLI: one clear line and exit 1 for bad input, a traceback only with --debug, JSON output on request."""

from __future__ import annotations

import json
import subprocess
import sys

from lmsurgeon.cli import main
from lmsurgeon.report.progress import stage
from lmsurgeon.report.runfolder import is_complete


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmsurgeon.cli", *args], capture_output=True, text=True, timeout=120)


def test_missing_source_is_one_line_naming_it_with_exit_code_1(tmp_path):
    p = run_cli("inspect", str(tmp_path / "no-such-model"))
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "no-such-model" in lines[0]
    assert "Traceback" not in p.stderr


def test_debug_flag_shows_the_traceback(tmp_path):
    p = run_cli("--debug", "inspect", str(tmp_path / "no-such-model"))
    assert p.returncode != 0
    assert "Traceback" in p.stderr


def test_corrupt_checkpoint_names_the_file_and_the_problem(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    p = run_cli("inspect", str(folder))
    assert p.returncode == 1
    assert "model.safetensors" in p.stderr
    assert "header length" in p.stderr


def test_usage_errors_exit_2():
    assert main(["inspect"]) == 2
    assert main(["no-such-command"]) == 2


def test_inspect_minilm_writes_a_complete_run_and_prints_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["inspect", "minilm", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    on_disk = json.loads((out / "results.json").read_text())
    assert printed["model"] == on_disk["model"]
    assert on_disk["schema"] == "lmsurgeon/inspect@1"
    assert on_disk["model"]["family"] == "bert"
    assert is_complete(out)
    assert (out / "report.html").is_file()


def test_inspect_ends_with_its_run_folder_and_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["inspect", "minilm", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == [f"run folder: {out.resolve()}", f"report: {out.resolve() / 'report.html'}"]


def test_stage_lines_end_with_the_command(tmp_path, capsys):
    """Under pytest stderr is no terminal, so the command ran with stage lines on; library calls after it don't."""
    assert main(["inspect", "minilm", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    stage("after the command")
    assert capsys.readouterr().err == ""
