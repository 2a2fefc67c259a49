"""Reliability of the capabilities (issue 8): the same inputs and seed give the same results.json; a study or a
model write killed with SIGKILL leaves nothing that looks complete, and the rerun resumes or restarts cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from lmsurgeon.lineage import compare
from lmsurgeon.merge import run_merge
from lmsurgeon.merge.search import journal_path
from lmsurgeon.report.runfolder import is_complete
from lmsurgeon.swap import analyze
from tests.lineage_models import random_llama, save
from tests.swap_models import llama, save_with_tokenizer, tokenizer

VOLATILE = {"timings", "argv"}


def stable(results: dict, *folders: Path) -> str:
    """results.json without wall-clock fields, with the run folders' own paths replaced by a placeholder."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in VOLATILE and not k.endswith("seconds")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    text = json.dumps(strip(results), sort_keys=True)
    for k, folder in enumerate(folders):
        text = text.replace(str(folder), f"<out{k}>").replace(folder.name, "<out>")
    return text


def twice(fn, tmp_path: Path) -> tuple[str, str]:
    a, b = tmp_path / "determinism-run-1", tmp_path / "determinism-run-2"
    return stable(fn(a), a), stable(fn(b), b)


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory) -> Path:
    tok = tokenizer()
    return save_with_tokenizer(llama(len(tok), layers=4), tok, tmp_path_factory.mktemp("dec") / "llama")


def test_lineage_twice_gives_identical_results(tmp_path):
    a = save(random_llama(0), tmp_path / "m" / "a")
    b = save(random_llama(1), tmp_path / "m" / "b")
    first, second = twice(lambda out: compare([str(a), str(b)], out=out, seed=5), tmp_path)
    assert first == second


def test_swap_twice_gives_identical_results(tiny_decoder, tmp_path):
    first, second = twice(
        lambda out: analyze(tiny_decoder, tokens=800, seq_len=64, out=out, bootstrap=200, seed=5), tmp_path
    )
    assert first == second


def test_three_trial_merge_twice_gives_identical_results(merge_pair, tmp_path):
    def merge(out):
        return run_merge(
            str(merge_pair["llama"]),
            str(merge_pair["gpt2"]),
            out,
            trials=3,
            seed=5,
            max_prompts=8,
            prompts_file=str(merge_pair["prompts"]),
        )

    first, second = twice(merge, tmp_path)
    assert first == second


# -- kill -9 ---------------------------------------------------------------------------------------------------


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lmsurgeon", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def kill_when(predicate, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"finished before it could be interrupted: {process.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting for the point to interrupt"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def completed_trials(journal: Path) -> dict[int, dict]:
    """Finished trials in the journal; none while the file exists but the study is not yet recorded in it."""
    if not journal.exists():
        return {}
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    try:
        study = optuna.load_study(study_name="lmsurgeon-merge", storage=storage)
    except KeyError:  # the worker has created the journal file but not yet written the study into it
        return {}
    return {t.number: t.params for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE}


def test_kill_9_during_a_merge_study_then_resume_keeps_the_finished_trials(merge_pair, tmp_path):
    out = tmp_path / "study"
    args = [
        "merge",
        "--base",
        str(merge_pair["llama"]),
        "--donor",
        str(merge_pair["gpt2"]),
        "--out",
        str(out),
        "--prompts-file",
        str(merge_pair["prompts"]),
        "--max-prompts",
        "8",
        "--seed",
        "3",
    ]
    journal = journal_path(out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    p = start(*args, "--trials", "200")
    kill_when(lambda: len(completed_trials(journal)) >= 2, p)
    assert not out.exists()  # the run folder appears only when the study is finished
    done = completed_trials(journal)
    total = max(done) + 3
    # A worker killed between creating a trial and its first write leaves a RUNNING trial with no process
    # recorded; the resumed run must fail it after the grace period instead of waiting for it for ever.
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    orphan = optuna.load_study(study_name="lmsurgeon-merge", storage=storage).ask().number
    again = subprocess.run(
        [sys.executable, "-m", "lmsurgeon", *args, "--trials", str(total), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert is_complete(out)
    final = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    states = {t.number: t.state for t in optuna.load_study(study_name="lmsurgeon-merge", storage=final).trials}
    assert states[orphan] == optuna.trial.TrialState.FAIL
    trials = {t["number"]: t for t in (json.loads(f.read_text()) for f in (out / "stats").glob("trial_*.json"))}
    assert set(done) <= set(trials)  # finished trials were kept, with their parameters
    assert all(trials[n]["params"] == {**trials[n]["params"], **params} for n, params in done.items())
    assert json.loads((out / "results.json").read_text())["n_trials"] == len(trials)


def test_kill_9_while_writing_a_model_leaves_no_complete_looking_folder(tiny_decoder, tmp_path):
    out = tmp_path / "swap"
    args = [
        "swap",
        str(tiny_decoder),
        "--tokens",
        "400",
        "--seq-len",
        "64",
        "--bootstrap",
        "20",
        "--apply",
        "1",
        "--out",
        str(out),
    ]

    def writing_the_model() -> bool:
        return any(tmp_path.glob(".swap.tmp-*/swap_1_2/*"))

    p = start(*args)
    kill_when(writing_the_model, p)
    assert not out.exists()
    leftovers = list(tmp_path.glob(".swap.tmp-*"))
    assert leftovers, "the kill came before the run folder existed"
    assert not [f for f in leftovers if is_complete(f)]
    again = subprocess.run([sys.executable, "-m", "lmsurgeon", *args], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert is_complete(out)
    assert (out / "swap_1_2" / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "swap_1_2")


# -- bad numbers ----------------------------------------------------------------------------------------------


def _corrupt(src: Path, dest: Path, tensor: str, value: float, rows: slice = slice(None)) -> Path:
    """A copy of ``src`` with ``tensor[rows]`` overwritten by ``value`` (NaN, Inf or 0)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dest)
    state = load_file(dest / "model.safetensors")
    state[tensor] = state[tensor].copy()
    state[tensor][rows] = value
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def lineage_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bad")
    return save(random_llama(0), root / "a"), save(random_llama(0), root / "same")


def _pair(res: dict) -> dict:
    return res["pairs"][0]


def test_nan_norm_gain_is_reported_and_its_cosine_is_undefined(lineage_pair, tmp_path):
    a, same = lineage_pair
    b = _corrupt(same, tmp_path / "b", "model.layers.1.input_layernorm.weight", float("nan"), slice(0, 3))
    res = compare([str(a), str(b)], out=tmp_path / "run", tests=("awm", "phi_u"))
    bad = res["models"][1]["bad_numbers"]
    assert [x["tensor"] for x in bad] == ["model.layers.1.input_layernorm.weight"]
    assert "3 NaN" in bad[0]["problem"]
    rows = {(r["role"], r["layer_a"]): r for r in res["naive"]["same_layer"][0]["rows"]}
    assert rows[("attn_norm", 1)]["raw_cosine"] is None
    assert rows[("attn_norm", 0)]["raw_cosine"] is not None
    # the sound tests never read norm gains: the identical copy is still recognised
    assert _pair(res)["verdict"] == "derived"
    assert "Bad numbers" in (tmp_path / "run" / "report.html").read_text()


@pytest.mark.parametrize(
    ("tensor", "value", "problem"),
    [
        ("model.embed_tokens.weight", float("nan"), "NaN"),
        ("model.layers.0.self_attn.q_proj.weight", float("inf"), "Inf"),
        ("model.layers.2.mlp.up_proj.weight", 0.0, "all zero"),
    ],
)
def test_bad_weights_make_sound_tests_not_apply_instead_of_deciding(lineage_pair, tmp_path, tensor, value, problem):
    a, same = lineage_pair
    b = _corrupt(same, tmp_path / "b", tensor, value)
    res = compare([str(a), str(b)], out=tmp_path / "run", tests=("awm", "phi_u"))
    problems = {x["tensor"]: x["problem"] for x in res["models"][1]["bad_numbers"]}
    assert tensor in problems
    assert problem in problems[tensor]
    assert _pair(res)["verdict"] == "inconclusive"
    for t in _pair(res)["tests"]:
        assert not t["applies"], t
        assert t["z"] is None, t


def test_nan_weights_are_refused_by_swap_and_merge_with_the_tensor_named(tiny_decoder, merge_pair, tmp_path):
    from lmsurgeon.cli import main

    bad = _corrupt(tiny_decoder, tmp_path / "nan", "model.layers.2.mlp.down_proj.weight", float("nan"), slice(0, 1))
    assert main(["swap", str(bad), "--tokens", "300", "--out", str(tmp_path / "s")]) == 1
    assert not (tmp_path / "s").exists()
    donor = _corrupt(merge_pair["gpt2"], tmp_path / "donor", "transformer.wte.weight", float("inf"), slice(5, 6))
    assert (
        main(
            [
                "merge",
                "--base",
                str(merge_pair["llama"]),
                "--donor",
                str(donor),
                "--trials",
                "1",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 1
    )
    assert not (tmp_path / "m").exists()


def test_dead_and_orphaned_journal_trials_are_failed_live_ones_kept(tmp_path):
    """fail_dead_trials: a RUNNING trial whose recorded pid is gone is failed and its parameters re-enqueued; one
    with a live pid is kept; one that never recorded a process is failed once older than the grace period."""
    from lmsurgeon.merge.search import fail_dead_trials, wait_for_running

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j")))
    study = optuna.create_study(storage=storage, study_name="s", directions=["minimize", "maximize"])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live, orphan = study.ask(), study.ask(), study.ask()
    dead.suggest_float("x", 0.0, 1.0)
    for trial, pid in ((dead, int(gone.stdout)), (live, os.getpid())):
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", pid)
    assert fail_dead_trials(study, grace=3600.0) == 1  # the orphan is still within its grace period
    assert fail_dead_trials(study, grace=0.0) == 1  # now it is not
    states = {t.number: t.state for t in study.trials}
    assert states[dead.number] == states[orphan.number] == optuna.trial.TrialState.FAIL
    assert states[live.number] == optuna.trial.TrialState.RUNNING
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [dead.params]  # its work is queued again
    study.tell(live, [1.0, 0.0])
    wait_for_running(study, reap=fail_dead_trials, timeout=5.0, poll=0.05)  # returns: nothing runs any more
