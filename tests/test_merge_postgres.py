"""Two worker processes run one study against a real PostgreSQL server; every trial is recorded once.

Needs Debian's `postgresql` binaries (/usr/lib/postgresql/<v>/bin); .ci/run installs them. Missing binaries
are a failure with a clear message, never a skip.
"""

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lmsurgeon.merge import run_merge


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL binaries not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    return Path(found[-1]).parent


def _as_db_user(cmd: list[str]) -> list[str]:
    """initdb refuses root: run through `runuser -u postgres --` when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres_url():
    bin_dir = _bin_dir()
    root = Path(tempfile.mkdtemp(prefix="lmsurgeon-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        subprocess.run(
            _as_db_user([str(bin_dir / "initdb"), "-A", "trust", "-U", "postgres", "-D", str(data)]),
            check=True,
            capture_output=True,
        )
        subprocess.run(
            _as_db_user(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(root / "log"),
                    "-w",
                    "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_db_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]), capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_study_and_every_trial_is_recorded_once(merge_pair, postgres_url, tmp_path):
    import optuna

    args = [
        "--base",
        str(merge_pair["llama"]),
        "--donor",
        str(merge_pair["gpt2"]),
        "--storage",
        postgres_url,
        "--study-name",
        "pg",
        "--trials",
        "40",
        "--prompts-file",
        str(merge_pair["prompts"]),
        "--max-prompts",
        "6",
        "--seed",
        "5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    optuna.create_study(storage=postgres_url, study_name="pg", directions=["minimize", "maximize"])  # schema
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "lmsurgeon.cli", "merge", *args, "--worker"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [w.communicate(timeout=240) for w in workers]
    for w, (_so, se) in zip(workers, outs, strict=True):
        assert w.returncode == 0, se[-2000:]
    ran = [int(so.split("worker ran ")[1].split()[0]) for so, _ in outs]
    assert min(ran) > 0, ran  # both processes did work
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    numbers = [t.number for t in done]
    assert len(numbers) == len(set(numbers)), numbers  # no trial number twice
    assert len(numbers) >= 40
    assert sum(ran) == len(done)
    res = run_merge(
        str(merge_pair["llama"]),
        str(merge_pair["gpt2"]),
        tmp_path / "final",
        trials=40,
        storage=postgres_url,
        study_name="pg",
        prompts_file=str(merge_pair["prompts"]),
        max_prompts=6,
        seed=5,
    )
    stats = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "final" / "stats").glob("trial_*.json"))
    assert stats == sorted(numbers)
    assert res["n_trials"] == len(numbers)
