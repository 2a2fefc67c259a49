"""The in-memory merge session: fits once, then patches rows in place, evaluates and restores (spec §2.5, §8.3).

Base B is loaded once as a transformers model; the donor is only read for E_D (and H_D), always on CPU float32.
A trial writes its blended rows with `index_copy_`, evaluates, and puts the kept original rows back, verifying
them bit for bit, so no trial ever reloads B.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from lmsurgeon.arch import Layout
from lmsurgeon.errors import BadNumbers, LmsurgeonError, OutputExists
from lmsurgeon.merge.align import Alignment, fit_alignment, norm_quantile, soft_clip
from lmsurgeon.merge.blend import alpha_schedule, blend_rows, centred_cosine
from lmsurgeon.merge.monitors import Evaluation, PromptEvaluator, relative_ppl, sym_kl
from lmsurgeon.merge.vocab import SharedVocab, canonical_vocab, shared_vocab

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

CAUTIOUS = {"target_emb_frac": 0.50, "alpha_cap_emb": 0.80, "alpha_floor_emb": 0.02, "min_tau_emb": 0.60,
            "target_head_rows": 3000, "alpha_cap_head": 0.60, "alpha_floor_head": 0.10, "min_tau_head": 0.72,
            "use_soft_clip": True}


@dataclass
class StagePlan:
    """What one stage needs per trial, precomputed: pool rows, originals, mapped rows (clip on/off), cosines."""

    name: str
    weight: torch.Tensor  # the live parameter (V_B × d_B)
    idx: torch.Tensor  # base row ids of the pool, int64
    original: torch.Tensor  # kept original rows, B's dtype
    Y: np.ndarray  # float32 original rows
    E_tilde: dict[bool, np.ndarray]  # use_soft_clip → mapped donor rows (float32)
    cos: dict[bool, np.ndarray]
    alignment: Alignment

    def apply(self, k: int, min_tau: float, alpha_floor: float, alpha_cap: float, clip: bool,
              gamma: float) -> dict:
        sched = alpha_schedule(self.cos[clip], k, min_tau, alpha_floor, alpha_cap, gamma)
        if sched.rows.size:
            new = blend_rows(self.Y[sched.rows], self.E_tilde[clip][sched.rows], sched.alpha)
            new_t = torch.from_numpy(new).to(self.weight.dtype)
            if not torch.isfinite(new_t).all():
                raise BadNumbers(f"stage {self.name}: blended rows overflow {self.weight.dtype}")
            rows_t = torch.from_numpy(sched.rows)
            with torch.no_grad():
                self.weight.index_copy_(0, self.idx[rows_t], new_t)
        return {"rows": int(sched.rows.size), "tau": sched.tau,
                "alpha_mean": float(sched.alpha.mean()) if sched.alpha.size else 0.0}

    def restore(self) -> None:
        """Put the kept rows back and verify them bit for bit."""
        with torch.no_grad():
            self.weight.index_copy_(0, self.idx, self.original)
        if not torch.equal(self.weight.index_select(0, self.idx), self.original):
            raise LmsurgeonError(f"stage {self.name}: restore did not give the original rows back")


def _tokenizer_json(handle) -> str:
    text = handle.read_text("tokenizer.json")
    if text is None:
        raise LmsurgeonError("no tokenizer.json (fast tokenizer needed for token correspondence)", handle.name)
    return text


def _head_is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is None or out.weight is model.get_input_embeddings().weight


def _build_stage(name: str, weight: torch.Tensor, D: np.ndarray, shared: SharedVocab, q: float,
                 omp_init: tuple[list[int], np.ndarray] | None = None, omp_k: int = 64) -> StagePlan:
    """Fit on S; with `omp_init` = (base ids, donor vectors) the OMP candidates join the pool P."""
    idx = torch.tensor(shared.base_ids, dtype=torch.long)
    W = weight.detach().float().numpy()
    X = D[np.asarray(shared.donor_ids)]
    if not (np.isfinite(X).all() and np.isfinite(W).all()):
        raise BadNumbers(f"stage {name}: non-finite values in embeddings")
    Y_S = weight.detach().index_select(0, idx).float().numpy()
    ali = fit_alignment(X.astype(np.float64), Y_S.astype(np.float64))  # float64: donor == base maps exactly
    mapped = ali.map(X.astype(np.float64))
    if omp_init is not None and omp_init[0]:
        from lmsurgeon.merge.omp import omp_rows

        extra_ids, V = omp_init
        mapped = np.concatenate([mapped, omp_rows(X, Y_S, V, omp_k)])
        idx = torch.cat([idx, torch.tensor(extra_ids, dtype=torch.long)])
    original = weight.detach().index_select(0, idx).clone()
    Y = original.float().numpy()
    clipped = soft_clip(mapped, Y.astype(np.float64), norm_quantile(W, q))
    E = {False: mapped.astype(np.float32), True: clipped.astype(np.float32)}
    cos = {c: centred_cosine(E[c], Y, ali.mu_Y) for c in (False, True)}
    return StagePlan(name, weight, idx, original, Y, E, cos, ali)


def _finite(values: np.ndarray, tensor: str, where: str) -> np.ndarray:
    """A donor matrix with NaN/Inf would spread them through the alignment into every blended row."""
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise BadNumbers(f"{tensor} holds {bad} NaN/Inf values; it cannot be a donor", where)
    return values


class MergeSession:
    """B in memory with its Stage A/B plans; `trial(params)` merges, measures, restores unless asked to keep."""

    def __init__(self, base: str, donor: str, texts: list[str], *, dtype: str = "fp32", max_shared: int = 50_000,
                 ppl_cap: float = 2.5, kl_topk: int = 512, kl_positions: str = "tail:8", gamma: float = 12.0,
                 on_stage_a_fail: str = "rollback", batch_size: int = 8, max_length: int = 512,
                 clip_quantile: float = 0.99, device: str = "cpu", trust_remote_code: bool = False,
                 init_nonshared: str | None = None, omp_k: int = 64):
        from lmsurgeon.io import open_model

        if ppl_cap <= 1.0:
            raise LmsurgeonError(f"--ppl-cap must be > 1 (got {ppl_cap})")
        if dtype not in DTYPES:
            raise LmsurgeonError(f"--dtype {dtype!r}: one of bf16, fp16, fp32")
        t0 = time.perf_counter()
        self.base_handle, self.donor_handle = open_model(base), open_model(donor)
        self.ppl_cap, self.kl_topk, self.gamma, self.on_stage_a_fail = ppl_cap, kl_topk, gamma, on_stage_a_fail
        cb = canonical_vocab(_tokenizer_json(self.base_handle))
        cd = canonical_vocab(_tokenizer_json(self.donor_handle))
        self.model = self.base_handle.load_model(dtype=DTYPES[dtype], device=device,
                                                 trust_remote_code=trust_remote_code)
        emb = self.model.get_input_embeddings().weight
        self.shared = shared_vocab(cb, cd, max_shared)
        dl = Layout(self.donor_handle)
        E_D = _finite(self.donor_handle.tensor(dl.require("embed"), dtype=np.float32), dl.require("embed"),
                      self.donor_handle.name)
        self.shared = _drop_out_of_range(self.shared, emb.shape[0], E_D.shape[0])
        self.omp = None
        if init_nonshared == "omp":
            self.omp = _omp_targets(cb, self.shared, self.donor_handle.tokenizer, E_D, emb.shape[0])
        self.stage_a = _build_stage("A", emb, E_D, self.shared, clip_quantile,
                                    self.omp and (self.omp["ids"], self.omp["V_emb"]), omp_k)
        self.tied = _head_is_tied(self.model)
        self.stage_b = None
        if not self.tied:
            H_D = (_finite(self.donor_handle.tensor(dl.name("lm_head"), dtype=np.float32), dl.name("lm_head"),
                           self.donor_handle.name) if dl.has("lm_head") and not dl.tied else E_D)
            omp_b = None
            if self.omp is not None:
                from lmsurgeon.merge.omp import donor_vectors

                omp_b = (self.omp["ids"], donor_vectors(self.omp["texts"], self.donor_handle.tokenizer, H_D)[0])
            self.stage_b = _build_stage("B", self.model.get_output_embeddings().weight, H_D, self.shared,
                                        clip_quantile, omp_b, omp_k)
        pad = self.base_handle.config.get("pad_token_id")
        self.max_length = min(max_length, Layout(self.base_handle).max_positions or max_length)
        self.evaluator = PromptEvaluator(self.base_handle.tokenizer, texts, batch_size=batch_size,
                                         max_length=self.max_length, positions=kl_positions,
                                         pad_id=pad if isinstance(pad, int) else 0, device=device)
        t1 = time.perf_counter()
        self.base_eval: Evaluation = self.evaluator.evaluate(self.model, keep_head_inputs=self.stage_b is not None)
        self.seconds = {"setup": t1 - t0, "base_eval": time.perf_counter() - t1}
        self.head_only = self.stage_b is not None and self._head_reproduces_model()

    def trial(self, params: dict, keep: bool = False) -> dict:
        """One merge with `params`; returns the stats; restores B unless `keep` (then the merged model stays)."""
        p = {**CAUTIOUS, **params}
        t0 = time.perf_counter()
        clip = bool(p["use_soft_clip"])
        k_a = int(np.floor(p["target_emb_frac"] * len(self.stage_a.idx)))
        a = self.stage_a.apply(k_a, p["min_tau_emb"], p["alpha_floor_emb"], p["alpha_cap_emb"], clip, self.gamma)
        ev_a = self.evaluator.evaluate(self.model, self.head_only) if a["rows"] else self.base_eval
        a.update(ppl=ev_a.ppl, r=relative_ppl(ev_a, self.base_eval))
        current, n_evals = ev_a, 1 if a["rows"] else 0
        b = {"rows": 0, "outcome": "skipped_tied"}
        if a["r"] > self.ppl_cap:
            a["outcome"] = "rolled_back" if self.on_stage_a_fail == "rollback" else "kept_over_cap"
            if self.on_stage_a_fail == "rollback":
                self.stage_a.restore()
                current = self.base_eval
            if self.stage_b is not None:
                b = {"rows": 0, "outcome": "skipped_guard"}
        else:
            a["outcome"] = "applied"
            if self.stage_b is not None:
                k_b = min(int(p["target_head_rows"]), len(self.stage_b.idx))
                b = self.stage_b.apply(k_b, p["min_tau_head"], p["alpha_floor_head"], p["alpha_cap_head"], clip,
                                       self.gamma)
                ev_b = self._evaluate_stage_b(current) if b["rows"] else current
                n_evals += 1 if b["rows"] and not self.head_only else 0
                b.update(ppl=ev_b.ppl, r=relative_ppl(ev_b, self.base_eval))
                if b["r"] > self.ppl_cap:
                    b["outcome"] = "rolled_back"
                    self.stage_b.restore()
                else:
                    b["outcome"] = "applied"
                    current = ev_b
        r = relative_ppl(current, self.base_eval)
        kl = 0.0 if current is self.base_eval else sym_kl(current, self.base_eval, self.kl_topk)
        if not keep:
            self.restore()
        return {"params": p, "r": r, "sym_kl": kl, "r_A": a.get("r"), "r_B": b.get("r"), "stage_a": a,
                "stage_b": b, "n_evals": n_evals, "seconds": time.perf_counter() - t0}

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's logits from the LM head's input (Gemma-2-style final soft-capping applied)."""
        z = self.model.get_output_embeddings()(h)
        cfg = getattr(self.model.config, "get_text_config", lambda: self.model.config)()
        cap = getattr(cfg, "final_logit_softcapping", None)
        return torch.tanh(z / cap) * cap if cap else z

    def _head_reproduces_model(self) -> bool:
        """Stage B may reuse the body's outputs only if the head alone gives the model's own numbers."""
        ev = self.evaluator.evaluate_head(self.head_logits, self.base_eval.head_inputs)
        same = abs(ev.nll_sum - self.base_eval.nll_sum) <= 1e-6 * max(1.0, abs(self.base_eval.nll_sum))
        return same and torch.allclose(ev.logprobs, self.base_eval.logprobs, rtol=1e-5, atol=1e-5)

    def _evaluate_stage_b(self, before: Evaluation) -> Evaluation:
        """Stage B changes only the head: reuse the body's outputs from Stage A's (or B's own) evaluation."""
        if self.head_only and before.head_inputs is not None:
            return self.evaluator.evaluate_head(self.head_logits, before.head_inputs)
        return self.evaluator.evaluate(self.model)

    def restore(self) -> None:
        self.stage_a.restore()
        if self.stage_b is not None:
            self.stage_b.restore()

    def save(self, path) -> None:
        """Save the current (merged) model with B's tokenizer files, safetensors only."""
        from pathlib import Path

        from lmsurgeon.io.model import quiet_transformers

        with quiet_transformers():
            self.model.save_pretrained(path, safe_serialization=True)
        src = Path(self.base_handle.local_dir())
        for f in src.iterdir():  # tokenizer files travel with the model: B's tokenizer is kept
            if "tokenizer" in f.name or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
                shutil.copy2(f, Path(path) / f.name)

    def fit_summary(self) -> dict:
        out = {"stage_a": self.stage_a.alignment.summary()}
        if self.stage_b is not None:
            out["stage_b"] = self.stage_b.alignment.summary()
        return out


def _omp_targets(cb, shared: SharedVocab, donor_tokenizer, E_D: np.ndarray, V_B: int) -> dict:
    """Base tokens outside S, their text, and their donor vectors (mean row of the donor tokenisation)."""
    from lmsurgeon.merge.omp import donor_vectors

    in_s = set(shared.base_ids)
    ids, texts, undecodable = [], [], 0
    for (space, body), i in sorted(cb.keys.items(), key=lambda kv: kv[1]):
        if i in in_s or i >= V_B:
            continue
        try:
            texts.append((" " if space else "") + body.decode("utf-8"))
            ids.append(i)
        except UnicodeDecodeError:
            undecodable += 1
    V, ok = donor_vectors(texts, donor_tokenizer, E_D)
    keep = np.flatnonzero(ok)
    return {"ids": [ids[j] for j in keep], "texts": [texts[j] for j in keep], "V_emb": V[keep],
            "skipped": undecodable + int((~ok).sum())}


def _drop_out_of_range(shared: SharedVocab, V_B: int, V_D: int) -> SharedVocab:
    """Tokenizer ids beyond the embedding matrices (padding mismatch) cannot be matched."""
    keep = [j for j, (b, d) in enumerate(zip(shared.base_ids, shared.donor_ids, strict=True)) if b < V_B and d < V_D]
    if not keep:
        raise LmsurgeonError("no shared tokens within the embedding matrices")
    if len(keep) == len(shared.base_ids):
        return shared
    return SharedVocab([shared.base_ids[j] for j in keep], [shared.donor_ids[j] for j in keep],
                       {**shared.overlap, "shared_used": len(keep)})


def run_merge(base: str, donor: str, out=None, trials: int | None = 48, *, dtype: str = "fp32",
              prompts_file=None, eval_text=None, max_prompts: int = 64, max_shared: int = 50_000,
              ppl_cap: float = 2.5, kl_topk: int = 512, kl_positions: str = "tail:8", seed: int = 0,
              storage: str | None = None, study_name: str = "lmsurgeon-merge", resume: bool = False,
              worker: bool = False, save_topk: int = 0, select: str = "knee", select_max_rel_ppl: float = 1.2,
              params: dict | None = None, space=None, gamma: float = 12.0, on_stage_a_fail: str = "rollback",
              batch_size: int = 8, max_length: int = 512, donor_on_cpu: bool = True, device: str = "cpu",
              trust_remote_code: bool = False, progress: bool = False, init_nonshared: str | None = None,
              omp_k: int = 64, callbacks=()) -> dict:
    """Merge `donor`'s embedding (and head) rows into `base`; returns exactly the results.json dict.

    trials > 0: an Optuna study (journal next to `out`, or `storage`); trials 0/None: one merge with `params`
    (default: the cautious end of every range). `worker=True` only runs trials of a shared study and writes
    nothing; it returns {"worker": True, "trials_run": n}.
    """
    from pathlib import Path

    import optuna

    from lmsurgeon.data import load_texts
    from lmsurgeon.merge import search
    from lmsurgeon.merge.report import build_report, pareto_figure, trials_csv
    from lmsurgeon.report import RunFolder
    from lmsurgeon.report.runfolder import default_out_dir

    del donor_on_cpu  # implied: only E_D/H_D are read, on CPU float32 (spec §6)
    out = Path(out) if out is not None else default_out_dir("merge")
    space_d = search.load_space(space)
    journal = None
    if not worker and storage is None and trials:
        journal = search.prepare_journal(out, resume)
    elif not worker and not resume and out.exists() and any(out.iterdir()):
        raise OutputExists("output folder exists and is not empty (choose another --out)", out)
    texts = load_texts(prompts_file, "validation")[:max_prompts] if max_prompts else load_texts(prompts_file)
    t0 = time.perf_counter()
    session = MergeSession(base, donor, texts, dtype=dtype, max_shared=max_shared, ppl_cap=ppl_cap,
                           kl_topk=kl_topk, kl_positions=kl_positions, gamma=gamma,
                           on_stage_a_fail=on_stage_a_fail, batch_size=batch_size, max_length=max_length,
                           device=device, trust_remote_code=trust_remote_code, init_nonshared=init_nonshared,
                           omp_k=omp_k)
    timings = {"setup_seconds": session.seconds["setup"], "ppl_eval_seconds": session.seconds["base_eval"]}
    fp = search.fingerprint(session.base_handle.inputs(), session.donor_handle.inputs(), texts, ppl_cap, kl_topk,
                            kl_positions, max_shared, dtype, gamma, on_stage_a_fail, space_d, init_nonshared, omp_k)
    records: list[dict] = []
    if trials:
        study = search.open_study(search.make_storage(storage, journal), study_name, seed, fp)
        if storage is None:
            search.fail_dead_trials(study)
        before = {t.number for t in study.get_trials(deepcopy=False)}
        search.run_trials(study, session, space_d, trials, callbacks, progress)
        if worker:
            mine = [t for t in study.get_trials(deepcopy=False) if t.number not in before
                    and t.user_attrs.get("pid") == os.getpid()]
            return {"worker": True, "trials_run": len(mine)}
        reap = search.fail_dead_trials if storage is None else optuna.storages.fail_stale_trials
        search.wait_for_running(study, reap)
        if search.n_complete(study) < trials:   # a worker died mid-trial while we waited: finish its share
            search.run_trials(study, session, space_d, trials, callbacks, progress)
            search.wait_for_running(study, reap)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            st = t.user_attrs["stats"]
            records.append({"number": t.number, "r": t.values[0], "sym_kl": t.values[1],
                            "params": st["params"], "stats": st})
    else:
        st = session.trial(params or {})
        records.append({"number": 0, "r": st["r"], "sym_kl": st["sym_kl"], "params": st["params"], "stats": st})
    timings["search_seconds"] = time.perf_counter() - t0 - timings["setup_seconds"] - timings["ppl_eval_seconds"]
    front = search.pareto_front(records, ppl_cap)
    best = search.select_best(front, select, select_max_rel_ppl)
    per_trial = [t["stats"]["seconds"] for t in records]
    per_eval = [t["stats"]["seconds"] / max(t["stats"]["n_evals"], 1) for t in records]
    timings.update(trial_seconds_mean=float(np.mean(per_trial)),
                   trial_cost_per_ppl_eval=float(np.mean(per_eval)) / max(session.seconds["base_eval"], 1e-9),
                   trial_cost_vs_one_ppl_eval=float(np.mean(per_trial)) / max(session.seconds["base_eval"], 1e-9))

    with RunFolder(out, command="merge", seed=seed, overwrite=resume) as run:
        (run.path / "stats").mkdir()
        for t in records:
            run.write_json(f"stats/trial_{t['number']:04d}.json", {"number": t["number"], **t["stats"]})
        (run.path / "trials.csv").write_text(trials_csv(records))
        heldout = None
        if best is not None:
            if eval_text is not None:  # held-out r: reported, never used for selection
                held = PromptEvaluator(session.base_handle.tokenizer, load_texts(eval_text)[:max_prompts],
                                       batch_size=batch_size, max_length=session.max_length, positions=kl_positions)
                base_held = held.evaluate(session.model)
                session.trial(best["params"], keep=True)
                heldout = relative_ppl(held.evaluate(session.model), base_held)
            else:
                session.trial(best["params"], keep=True)
            session.save(run.path / "best_model")
            session.restore()
            for t in [f for f in front if f["number"] != best["number"]][:max(save_topk, 0)]:
                session.trial(t["params"], keep=True)
                session.save(run.path / "topk" / f"trial_{t['number']:04d}")
                session.restore()
        brief = [{"number": t["number"], "r": t["r"], "sym_kl": t["sym_kl"], "params": t["params"]} for t in front]
        run.write_json("pareto.json", brief)
        run.write_json("best.json", best and {k: best[k] for k in ("number", "r", "sym_kl", "params", "stats")})
        rel = run.save_figure(pareto_figure(records, front, best, ppl_cap), "pareto")
        shutil.copy2(run.path / rel, run.path / "pareto.png")
        if journal is not None and journal.exists():
            shutil.copy2(journal, run.path / "study.journal")
        body = {"base": str(base), "donor": str(donor), "tied": session.tied, "dtype": dtype,
                "ppl_cap": ppl_cap, "kl_topk": kl_topk, "kl_positions": kl_positions, "select": select,
                "storage": "journal" if storage is None else storage.split("://")[0],
                "study_name": study_name if trials else None, "n_trials": len(records),
                "overlap": session.shared.overlap, "fit": session.fit_summary(), "base_ppl": session.base_eval.ppl,
                "n_prompts": len(session.evaluator.seqs), "pareto": brief, "best": best and
                {k: best[k] for k in ("number", "r", "sym_kl", "params")},
                "best_stats": best and best["stats"], "heldout_r": heldout,
                "best_model": "best_model" if best is not None else None, "fingerprint": fp,
                "omp": session.omp and {"rows": len(session.omp["ids"]), "skipped": session.omp["skipped"],
                                        "k": omp_k}}
        results = run.write_results(body, inputs=session.base_handle.inputs() + session.donor_handle.inputs(),
                                    timings=timings)
        run.write_report(build_report(results, rel))
    if journal is not None and journal.exists():
        journal.unlink()
    return results
