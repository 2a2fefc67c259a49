"""Optuna multi-objective search over the blend hyperparameters, and the study's storage and journal.

methods.md §M4, §M8.3.

Objectives: minimise r (relative perplexity), maximise symKL (how far the outputs moved). The study lives in a
journal file next to the run folder by default, so a killed run resumes with the next trial number; a
`postgresql://` storage lets several processes or machines run trials of one study (`worker=True`).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import optuna

from lmsurgeon.errors import LmsurgeonError, OutputExists
from lmsurgeon.report.progress import stage
from lmsurgeon.report.results import jsonable

SPACE = {  # name → (low, high) floats, ints, or a list of choices (methods.md §M4)
    "target_emb_frac": (0.50, 0.80),
    "alpha_cap_emb": (0.80, 0.95),
    "alpha_floor_emb": (0.02, 0.10),
    "min_tau_emb": (0.50, 0.60),
    "target_head_rows": (3000, 20000),
    "alpha_cap_head": (0.60, 0.95),
    "alpha_floor_head": (0.10, 0.25),
    "min_tau_head": (0.60, 0.72),
    "use_soft_clip": [True, False],
}
DOMAIN_SPACE = {  # --objective domain: the domain gate (methods.md §M10)
    # blend rows of tokens the base predicts worse than gate_frac · log2(V) bits (1: worse than a uniform guess)
    "gate_frac": (0.60, 1.40),
    "alpha_emb": (0.0, 0.50),  # one blend rate for every gated embedding row (0: embedding left alone)
    "alpha_head": (0.0, 1.0),  # one blend rate for every gated head row (1: the mapped donor row itself)
    "use_soft_clip": [True, False],
}
HEAD_PARAMS = ("target_head_rows", "alpha_cap_head", "alpha_floor_head", "min_tau_head", "alpha_head")


def load_space(path: str | Path | None, objective: str = "seed") -> dict:
    """The search space of the objective (the seed's schedule, or the domain gate), with `--space FILE` (JSON of
    the same shape) overriding single entries."""
    default = DOMAIN_SPACE if objective == "domain" else SPACE
    space = dict(default)
    if path is not None:
        try:
            over = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise LmsurgeonError(f"cannot read the search space: {e}", path) from None
        unknown = set(over) - set(default)
        if unknown:
            raise LmsurgeonError(f"unknown parameters {sorted(unknown)}", path)
        space.update({k: tuple(v) if len(v) == 2 and not isinstance(v[0], bool) else list(v) for k, v in over.items()})
    return space


def suggest(trial: optuna.Trial, space: dict, tied: bool) -> dict:
    params = {}
    for name, rng in space.items():
        if tied and name in HEAD_PARAMS:
            continue  # Stage B never runs on a tied base: do not search what cannot matter
        if isinstance(rng, list):
            params[name] = trial.suggest_categorical(name, rng)
        elif isinstance(rng[0], int) and isinstance(rng[1], int):
            params[name] = trial.suggest_int(name, rng[0], rng[1])
        else:
            params[name] = trial.suggest_float(name, float(rng[0]), float(rng[1]))
    return params


def make_storage(storage: str | None, journal: Path):
    """Journal file by default; `postgresql://…` (or any SQLAlchemy URL) → RDBStorage with heartbeats."""
    if storage is None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(journal)))
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    for attempt in range(5):  # workers starting together race to create the schema: the loser retries
        try:
            return RDBStorage(
                storage,
                heartbeat_interval=60,
                grace_period=180,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
            )
        except Exception as e:  # sqlalchemy IntegrityError/ProgrammingError on concurrent CREATE
            if attempt == 4 or "already exists" not in str(e):
                raise LmsurgeonError(f"cannot open the Optuna storage: {str(e).splitlines()[0]}") from None
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def open_study(storage, study_name: str, seed: int, fingerprint: str, objective: str = "seed") -> optuna.Study:
    """TPE multivariate + constant liar; refuse a changed fingerprint.

    `seed`: minimise r, maximise symKL. `domain`: minimise search-text bits per byte, with the general-text
    constraint (≤ 0 when feasible) set on each trial, so the sampler learns where trials are feasible.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=seed)
    directions = ["minimize"] if objective == "domain" else ["minimize", "maximize"]
    study = optuna.create_study(
        storage=storage, study_name=study_name, directions=directions, sampler=sampler, load_if_exists=True
    )
    old = study.user_attrs.get("fingerprint")
    if old is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif old != fingerprint:
        raise LmsurgeonError(
            f"study {study_name!r} was started with other inputs or settings (fingerprint "
            f"{old[:12]} ≠ {fingerprint[:12]}); use another --out/--study-name"
        )
    return study


ORPHAN_GRACE_S = 10.0


def fail_dead_trials(study: optuna.Study, grace: float = ORPHAN_GRACE_S) -> int:
    """Journal storage has no heartbeat: RUNNING trials of this host whose process is gone are failed and
    their parameters enqueued again, so numbering continues and no work is lost.

    A trial that never recorded its process (its worker was killed between creating it and its first write, a
    window of milliseconds) cannot be checked; it counts as gone once it has been running for ``grace`` seconds.
    """
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _gone(t, host, grace):
            continue
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, skip_if_exists=False)
        n += 1
    return n


def _gone(t: optuna.trial.FrozenTrial, host: str, grace: float) -> bool:
    pid = t.user_attrs.get("pid")
    if pid is None:
        return t.datetime_start is None or _age_seconds(t.datetime_start) > grace
    return t.user_attrs.get("host") == host and not _alive(pid)


def _age_seconds(start: datetime.datetime) -> float:
    now = datetime.datetime.now(start.tzinfo) if start.tzinfo else datetime.datetime.now()
    return (now - start).total_seconds()


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def n_complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def general_constraint(stats: dict, base_general_bpb: float, tolerance: float) -> float:
    """≤ 0 when the trial's general-text bits per byte stay within the base's × (1 + tolerance); a trial whose
    general text was not evaluated (it did not lower the search text's) carries its own positive excess."""
    if stats.get("general_bpb") is None:
        return float(stats["general_excess"])
    return stats["general_bpb"] - base_general_bpb * (1.0 + tolerance)


def best_feasible_bpb(study: optuna.Study, ppl_cap: float) -> float | None:
    """The lowest search-text bits per byte among the study's finished feasible trials: a later trial that does
    not beat it cannot be the best (§M10), so its general text need not be evaluated."""
    values = [
        t.user_attrs["stats"]["bpb"]
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if "stats" in t.user_attrs
        and t.user_attrs["stats"].get("general_bpb") is not None
        and float(t.user_attrs["stats"].get("general_excess", 0.0)) <= 0
        and t.user_attrs["stats"]["r"] <= ppl_cap
    ]
    return min(values, default=None)


def run_trials(study: optuna.Study, session, space: dict, trials: int, callbacks=(), progress: bool = False) -> None:
    """Run trials until the study holds `trials` COMPLETE ones (shared by every worker of the study)."""
    domain = session.config.objective == "domain"

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        stage(f"merge: trial {trial.number}")
        params = suggest(trial, space, session.tied)
        stats = session.trial(params, search_bar=best_feasible_bpb(study, session.ppl_cap) if domain else None)
        trial.set_user_attr("stats", jsonable(stats))
        if domain:
            trial.set_constraint(
                "general_bpb", general_constraint(stats, session.base_general.bpb, session.config.tolerance)
            )
            return (stats["bpb"],)
        return stats["r"], stats["sym_kl"]

    left = trials - n_complete(study)
    if left <= 0:
        return
    stop = optuna.study.MaxTrialsCallback(trials, states=(optuna.trial.TrialState.COMPLETE,))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=left, callbacks=[stop, *callbacks], show_progress_bar=progress)


def wait_for_running(study: optuna.Study, reap=None, timeout: float = 3600.0, poll: float = 1.0) -> None:
    """A finaliser waits until no other worker is still running a trial of the study.

    ``reap(study)`` is called on every poll to fail the trials of dead workers (:func:`fail_dead_trials` for a
    journal, heartbeat-based ``optuna.storages.fail_stale_trials`` for an RDB), so a killed worker cannot make
    the finaliser wait for ever.
    """
    t0 = time.time()
    while True:
        if reap is not None:
            reap(study)
        if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            return
        if time.time() - t0 > timeout:
            raise LmsurgeonError("other workers are still running trials after the wait limit")
        time.sleep(poll)


def pareto_front(records: list[dict], ppl_cap: float) -> list[dict]:
    """Non-dominated trials (min r, max symKL) among those with r ≤ ppl_cap, in trial order."""
    ok = [t for t in records if t["r"] <= ppl_cap]
    front = []
    for t in ok:
        dominated = any(
            o["r"] <= t["r"] and o["sym_kl"] >= t["sym_kl"] and (o["r"] < t["r"] or o["sym_kl"] > t["sym_kl"])
            for o in ok
        )
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: t["number"])


def feasible_domain(records: list[dict], ppl_cap: float, base_general_bpb: float, tolerance: float) -> list[dict]:
    """`--objective domain`: the trials under the guard whose general text stays within the tolerance, in
    order of search-text bits per byte (ties: lower trial number); the first is the best."""
    ok = [t for t in records if t["r"] <= ppl_cap and general_constraint(t["stats"], base_general_bpb, tolerance) <= 0]
    return sorted(ok, key=lambda t: (t["stats"]["bpb"], t["number"]))


def select_best(front: list[dict], how: str = "knee", max_rel_ppl: float = 1.2) -> dict | None:
    """`knee`: nearest to (best r, best symKL) after min-max normalisation; `max-kl`: largest symKL with
    r ≤ max_rel_ppl. Ties go to the lower trial number."""
    if not front:
        return None
    if how == "max-kl":
        ok = [t for t in front if t["r"] <= max_rel_ppl] or [min(front, key=lambda t: (t["r"], t["number"]))]
        return max(ok, key=lambda t: (t["sym_kl"], -t["number"]))
    r = np.array([t["r"] for t in front])
    kl = np.array([t["sym_kl"] for t in front])
    nr = (r - r.min()) / (np.ptp(r) or 1.0)
    nk = (kl.max() - kl) / (np.ptp(kl) or 1.0)
    dist = np.hypot(nr, nk)
    best = min(range(len(front)), key=lambda i: (round(float(dist[i]), 12), front[i]["number"]))
    return front[best]


def journal_path(out: Path) -> Path:
    """Where the journal lives while the run folder is being built (a hidden sibling; copied in at the end)."""
    return out.parent / f".{out.name}.study.journal"


def prepare_journal(out: Path, resume: bool) -> Path:
    journal = journal_path(out)
    finished = out / "study.journal"
    if resume:
        if not journal.exists() and finished.exists():
            shutil.copy2(finished, journal)
        return journal
    if journal.exists():
        raise OutputExists("an interrupted study exists for this --out (pass --resume to continue it)", journal)
    if out.exists() and any(out.iterdir()):
        raise OutputExists("output folder exists and is not empty (choose another --out or --resume)", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return journal
