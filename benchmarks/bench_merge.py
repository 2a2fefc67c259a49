"""Merge trial cost: in-place patch/evaluate/restore vs one perplexity evaluation vs reloading B per trial,
and trials per minute with 1 and 2 worker processes on one shared Optuna storage.

    python benchmarks/bench_merge.py [--profile full|test] [--zoo DIR] [--trials 8] [--worker-trials 16]
                                     [--storage URL]

Default storage for the worker rows is a SQLite file (any RDB URL, e.g. postgresql://..., works the same);
`--worker-trials 0` leaves the worker rows out. `--zoo DIR` uses an already built zoo folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _params(rng) -> dict:
    return {
        "target_emb_frac": rng.uniform(0.5, 0.8),
        "alpha_cap_emb": rng.uniform(0.8, 0.95),
        "alpha_floor_emb": rng.uniform(0.02, 0.1),
        "min_tau_emb": rng.uniform(0.5, 0.6),
        "target_head_rows": int(rng.integers(3000, 20000)),
        "alpha_cap_head": rng.uniform(0.6, 0.95),
        "alpha_floor_head": rng.uniform(0.1, 0.25),
        "min_tau_head": rng.uniform(0.6, 0.72),
        "use_soft_clip": bool(rng.integers(2)),
    }


def _domain_params(rng) -> dict:
    """A random point of the domain gate's search space (methods.md §M10)."""
    from lmsurgeon.merge.search import DOMAIN_SPACE

    lo, hi = zip(*(DOMAIN_SPACE[k] for k in ("gate_frac", "alpha_emb", "alpha_head")), strict=True)
    f, ae, ah = rng.uniform(lo, hi)
    return {"gate_frac": f, "alpha_emb": ae, "alpha_head": ah, "use_soft_clip": bool(rng.integers(2))}


STAGES = {  # what a trial spends its time on, as bench_merge reports it
    "_evaluate_body": "Stage A: body where moved rows sit, head there",
    "_evaluate_stage_b": "Stage B guard: moved head rows on kept sums",
    "sym_kl": "symmetric top-K KL",
}


def _time_parts(session) -> dict[str, list[float]]:
    """Wrap the session's stage evaluations and the KL so every call adds its seconds to the returned lists."""
    from lmsurgeon.merge import run

    parts: dict[str, list[float]] = {name: [] for name in STAGES}

    def timing(name, fn):
        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[name].append(time.perf_counter() - t0)

        return wrapped

    for name in ("_evaluate_body", "_evaluate_stage_b"):
        setattr(session, name, timing(name, getattr(session, name)))
    run.sym_kl = timing("sym_kl", run.sym_kl)
    return parts


def _domain_rows(zoo_dir: Path, trials: int, timed) -> tuple[float, float, float, int]:
    """The zoo domain scenario (llama-sp ← gpt2-code, `--objective domain`): interleaved rounds of one base
    evaluation of the domain search text and one gate trial (general text included); medians."""
    from lmsurgeon.data import load_corpus, load_texts
    from lmsurgeon.merge import MergeConfig, MergeSession
    from lmsurgeon.zoo.recipe import domain_texts

    search = domain_texts(load_corpus().split("train_b"))[:32]
    cfg = MergeConfig(objective="domain")
    s = MergeSession(
        str(zoo_dir / "llama-sp"), str(zoo_dir / "gpt2-code"), search, cfg, general_texts=load_texts(None, "test")[:32]
    )
    s.trial(_domain_params(np.random.default_rng(1)))  # untimed, as in main()
    rng = np.random.default_rng(0)
    evals, stats, bar = [], [], None
    for _ in range(trials):
        evals.append(timed(lambda: s.evaluator.evaluate(s.model)))
        stats.append(s.trial(_domain_params(rng), search_bar=bar))  # as the study passes its best feasible trial
        st = stats[-1]
        if st["general_bpb"] is not None and st["general_excess"] <= 0 and st["r"] <= s.ppl_cap:
            bar = st["bpb"] if bar is None else min(bar, st["bpb"])
    general = sum(st["general_bpb"] is not None and st["stage_a"]["rows"] > 0 for st in stats)
    t_eval = float(np.median(evals))
    t_trial = float(np.median([st["seconds"] for st in stats]))
    t_mean = float(np.mean([st["seconds"] for st in stats]))
    return t_eval, t_trial, t_mean, general


def _workers(n: int, base: str, donor: str, trials: int, storage: str, name: str) -> float:
    """Wall seconds for `n` worker processes to finish `trials` trials of one study (startup included)."""
    args = [
        sys.executable,
        "-m",
        "lmsurgeon.cli",
        "merge",
        "--base",
        base,
        "--donor",
        donor,
        "--storage",
        storage,
        "--study-name",
        name,
        "--trials",
        str(trials),
        "--max-prompts",
        "32",
        "--worker",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // n))}
    t0 = time.perf_counter()
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"worker failed: {' '.join(args)}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="full")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--worker-trials", type=int, default=16)
    ap.add_argument("--storage", default=None)
    ap.add_argument("--zoo", default=None, help="an already built zoo folder (default: the profile's, built if needed)")
    ap.add_argument("--domain-trials", type=int, default=16, help="rounds of the domain scenario's rows (0: none)")
    a = ap.parse_args()

    from lmsurgeon.data import load_texts
    from lmsurgeon.merge import MergeSession
    from lmsurgeon.zoo import ensure_zoo

    zoo_dir = Path(a.zoo) if a.zoo else ensure_zoo(a.profile)[0]
    base, donor = str(zoo_dir / "llama-sp"), str(zoo_dir / "gpt2-bpe")
    texts = load_texts(None, "validation")[:32]
    s = MergeSession(base, donor, texts)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    # Interleaved rounds (evaluation, trial), medians of each: measured back to back, the two drift apart with the
    # CPU's state and the ratio moved by ±0.15 between runs. Inside each trial the stages are timed as they run.
    s.trial(_params(np.random.default_rng(1)))  # untimed: the base's evaluation warmed the evaluation, this the trial
    parts = _time_parts(s)
    rng = np.random.default_rng(0)
    evals, stats = [], []
    for _ in range(a.trials):
        evals.append(timed(lambda: s.evaluator.evaluate(s.model)))
        stats.append(s.trial(_params(rng)))
    t_eval = float(np.median(evals))
    t_trial = float(np.median([st["seconds"] for st in stats]))
    t_trial_mean = float(np.mean([st["seconds"] for st in stats]))
    shares = {name: sum(ts) / a.trials for name, ts in parts.items()}
    head_only, s.head_only = s.head_only, False  # Stage B re-running the body: the straightforward way
    rng = np.random.default_rng(0)
    t_full_b = float(np.median([s.trial(_params(rng))["seconds"] for _ in range(a.trials)]))
    s.head_only = head_only
    t_reload = []
    for _ in range(3):
        t0 = time.perf_counter()
        s.base_handle.load_model()
        t_reload.append(time.perf_counter() - t0)
    t_reload_trial = float(np.median(t_reload)) + t_trial

    domain = _domain_rows(zoo_dir, a.domain_trials, timed) if a.domain_trials else None

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in (1, 2) if a.worker_trials else ():
            url = a.storage or f"sqlite:///{Path(tmp) / f'w{n}.db'}"
            secs = _workers(n, base, donor, a.worker_trials, url, f"bench-{n}-{time.time_ns()}")
            rows.append((n, secs, 60 * a.worker_trials / secs))

    print(f"zoo pair llama-sp (base) ← gpt2-bpe (donor), {zoo_dir.name}, {len(s.evaluator.seqs)} prompts")
    print(f"{'measure':48s} {'seconds':>9s} {'ratio':>8s}")
    print(f"{'one perplexity evaluation':48s} {t_eval:9.3f} {1.0:8.2f}")
    print(
        f"{'in-place trial (patch, evaluate, restore)':48s} {t_trial:9.3f} {t_trial / t_eval:8.2f}   "
        f"(target ≤ 1.2; Stage B from the body's kept outputs: {head_only})"
    )
    for name, label in STAGES.items():
        print(f"{'  ' + label:48s} {shares[name]:9.3f} {shares[name] / t_eval:8.2f}   (mean per trial)")
    rest = t_trial_mean - sum(shares.values())
    print(f"{'  patching, restoring, bookkeeping':48s} {rest:9.3f} {rest / t_eval:8.2f}   (mean per trial)")
    print(f"{'trial with Stage B re-running the body':48s} {t_full_b:9.3f} {t_full_b / t_eval:8.2f}")
    print(f"{'reload B + trial (naive)':48s} {t_reload_trial:9.3f} {t_reload_trial / t_eval:8.2f}")
    print(f"{'naive / in-place':48s} {'':9s} {t_reload_trial / t_trial:8.2f}")
    if domain is not None:
        d_eval, d_trial, d_mean, n_general = domain
        print(f"domain scenario llama-sp ← gpt2-code, --objective domain, {a.domain_trials} gate trials")
        print(f"{'one perplexity evaluation (domain search text)':48s} {d_eval:9.3f} {1.0:8.2f}")
        print(
            f"{'gate trial (patch, evaluate, general, restore)':48s} {d_trial:9.3f} {d_trial / d_eval:8.2f}   "
            f"(median; target ≤ 1.2; mean {d_mean / d_eval:.2f}; {n_general} trials re-ran the body on general text)"
        )
    for n, secs, tpm in rows:
        print(
            f"{f'{n} worker process(es), {a.worker_trials} trials, wall':48s} {secs:9.2f}   "
            f"{tpm:6.1f} trials/min (process start included)"
        )


if __name__ == "__main__":
    main()
