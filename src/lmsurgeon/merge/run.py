"""The in-memory merge session: fits once, then patches rows in place, evaluates and restores (methods.md §M2.5, §M8.3).

Base B is loaded once as a transformers model; the donor is only read for rows of E_D (and H_D), on CPU in float32
(after the search, `quality.donor_bpb` loads it as a model, in `--dtype` and layer-streamed when it does not fit,
to measure its own bits per byte). A trial
writes its blended rows with `index_copy_`, evaluates, and puts the kept original rows back, verifying them bit
for bit, so no trial ever reloads B. `run_merge` is the API: texts, session, search, quality, run folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmsurgeon.arch import Layout
from lmsurgeon.errors import BadNumbers, LmsurgeonError, OutputExists
from lmsurgeon.merge import quality
from lmsurgeon.merge.align import Alignment, fit_alignment, norm_quantile, soft_clip_scale
from lmsurgeon.merge.blend import alpha_schedule, blend_rows, centred_cosine
from lmsurgeon.merge.config import DTYPES, MergeConfig, study_fingerprint
from lmsurgeon.merge.monitors import Evaluation, HeadDelta, PromptEvaluator, relative_ppl, sym_kl
from lmsurgeon.merge.quality import MergeTexts, merge_texts
from lmsurgeon.merge.streamed import StreamedLM, load_lm
from lmsurgeon.merge.vocab import SharedVocab, canonical_vocab, shared_vocab
from lmsurgeon.report.progress import stage

STAGE_CHUNK_ROWS = 8192  # pool rows mapped, clipped and compared at a time
CLIP_QUANTILE = 0.99  # soft clip: mapped rows keep at most the base's 99th-percentile row norm

CAUTIOUS = {
    "target_emb_frac": 0.50,
    "alpha_cap_emb": 0.80,
    "alpha_floor_emb": 0.02,
    "min_tau_emb": 0.60,
    "target_head_rows": 3000,
    "alpha_cap_head": 0.60,
    "alpha_floor_head": 0.10,
    "min_tau_head": 0.72,
    "use_soft_clip": True,
}


@dataclass
class StagePlan:
    """What one stage needs per trial, precomputed: pool rows, originals, mapped rows (clip on/off), cosines."""

    name: str
    weight: torch.Tensor  # the live parameter (V_B × d_B)
    idx: torch.Tensor  # base row ids of the pool, int64
    original: torch.Tensor  # kept original rows, B's dtype
    mapped: np.ndarray  # the mapped donor rows ẽ_i, float32
    clip_scale: np.ndarray  # the soft clip's factor per row (1 where it does not shrink), float64
    cos: dict[bool, np.ndarray]  # use_soft_clip → centred cosine per pool row
    alignment: Alignment
    last_ids: list[int] = field(default_factory=list)  # base ids the last `apply` wrote
    written: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # pool rows not original

    def Y_rows(self, rows: np.ndarray) -> np.ndarray:
        """The original base rows at pool positions ``rows`` in float32 (taken from ``original``, not kept twice)."""
        return self.original[torch.from_numpy(np.asarray(rows, dtype=np.int64))].float().numpy()

    def E_rows(self, clip: bool, rows: np.ndarray) -> np.ndarray:
        """The mapped donor rows at pool positions ``rows``, soft-clipped when ``clip``, in float32.

        Only the unclipped rows and one factor per row are kept: at 50,000 shared rows of a 4,096-wide model a
        second float32 copy (and the float32 copy of the originals) would each be 0.8 GB per stage."""
        rows = np.asarray(rows, dtype=np.int64)
        return _clipped(self.mapped[rows], self.clip_scale[rows]) if clip else self.mapped[rows]

    def apply(self, k: int, min_tau: float, alpha_floor: float, alpha_cap: float, clip: bool, gamma: float) -> dict:
        sched = alpha_schedule(self.cos[clip], k, min_tau, alpha_floor, alpha_cap, gamma)
        out = self._write(sched.rows, sched.alpha, clip)
        return {"rows": out["rows"], "tau": sched.tau, "alpha_mean": out["alpha_mean"]}

    def apply_gated(self, gate: np.ndarray, alpha: float, clip: bool) -> dict:
        """The domain gate's merge (methods.md §M10): the pool rows where `gate` holds, all at one rate α."""
        rows = np.flatnonzero(gate) if alpha > 0 else np.zeros(0, dtype=np.int64)
        return self._write(rows, np.full(rows.size, alpha), clip)

    def _write(self, rows: np.ndarray, alpha: np.ndarray, clip: bool) -> dict:
        """Blend pool positions `rows` at rates `alpha` into the live weight; remember which base ids moved (a row
        written with its own value, α = 0, did not)."""
        moved = rows
        if rows.size:
            new = blend_rows(self.Y_rows(rows), self.E_rows(clip, rows), alpha)
            new_t = torch.from_numpy(new).to(self.weight.dtype)
            if not torch.isfinite(new_t).all():
                raise BadNumbers(f"stage {self.name}: blended rows overflow {self.weight.dtype}")
            rows_t = torch.from_numpy(rows)
            with torch.no_grad():
                self.weight.index_copy_(0, self.idx[rows_t], new_t)
            moved = rows[(new_t != self.original[rows_t]).any(-1).numpy()]
        self.last_ids = self.idx[torch.from_numpy(moved)].tolist()
        self.written = np.union1d(self.written, moved).astype(np.int64)  # a kept merge may be merged again
        return {"rows": int(rows.size), "alpha_mean": float(alpha.mean()) if alpha.size else 0.0}

    def restore(self) -> None:
        """Put the kept rows back and verify them bit for bit."""
        with torch.no_grad():
            self.weight.index_copy_(0, self.idx, self.original)
        if not torch.equal(self.weight.index_select(0, self.idx), self.original):
            raise LmsurgeonError(f"stage {self.name}: restore did not give the original rows back")
        self.written = np.zeros(0, dtype=np.int64)

    def moved(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Base ids of the rows now blended and their original values."""
        rows = torch.from_numpy(self.written)
        return self.idx[rows], self.original[rows]


def _tokenizer_json(handle) -> str:
    text = handle.read_text("tokenizer.json")
    if text is None:
        raise LmsurgeonError("no tokenizer.json (fast tokenizer needed for token correspondence)", handle.name)
    return text


def _head_is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is None or out.weight is model.get_input_embeddings().weight


def _row_norms(weight: torch.Tensor, rows: int = 8192) -> np.ndarray:
    """Row norms of the base matrix in float32, a block of rows at a time: the soft clip's K_q needs only these,
    and a float32 copy of a 151,552 × 4,096 bf16 embedding would be 2.5 GB."""
    w = weight.detach()
    return np.concatenate([np.linalg.norm(w[a : a + rows].float().numpy(), axis=1) for a in range(0, w.shape[0], rows)])


def _build_stage(
    name: str,
    weight: torch.Tensor,
    D: np.ndarray,
    shared: SharedVocab,
    q: float,
    omp_init: tuple[list[int], np.ndarray] | None = None,
    omp_k: int = 64,
    chunk_rows: int = STAGE_CHUNK_ROWS,
) -> StagePlan:
    """Fit on S; with `omp_init` = (base ids, donor vectors) the OMP candidates join the pool P.

    The fit runs in float64 a block of rows at a time (``fit_similarity``), and the pool's mapped rows, soft-clip
    factors and cosines are computed ``chunk_rows`` rows at a time, so no float64 copy of the pool exists: at
    50,000 shared rows of 4,096 wide each such copy is 1.6 GB."""
    idx = torch.tensor(shared.base_ids, dtype=torch.long)
    norms = _row_norms(weight)
    X = D[np.asarray(shared.donor_ids)]
    if not (np.isfinite(X).all() and np.isfinite(norms).all()):
        raise BadNumbers(f"stage {name}: non-finite values in embeddings")
    Y_S = weight.detach().index_select(0, idx).float().numpy()
    ali = fit_alignment(X, Y_S, dtype=np.float64)  # float64: donor == base maps exactly
    extra = None
    if omp_init is not None and omp_init[0]:
        from lmsurgeon.merge.omp import omp_rows

        extra_ids, V = omp_init
        extra = omp_rows(X, Y_S, V, omp_k)
        idx = torch.cat([idx, torch.tensor(extra_ids, dtype=torch.long)])
    del Y_S
    original = weight.detach().index_select(0, idx).clone()
    K_q, n_shared, n = norm_quantile(norms, q), X.shape[0], int(idx.numel())
    mapped = np.empty((n, weight.shape[1]), dtype=np.float32)
    clip_scale = np.empty(n, dtype=np.float64)
    cos = {False: np.empty(n), True: np.empty(n)}
    for a in range(0, n, chunk_rows):
        b = slice(a, min(a + chunk_rows, n))
        parts = [ali.map(X[a : min(b.stop, n_shared)])] if a < n_shared else []
        if b.stop > n_shared and extra is not None:
            parts.append(extra[max(a - n_shared, 0) : b.stop - n_shared])
        block = np.concatenate(parts) if len(parts) > 1 else parts[0]
        Y = original[b].float().numpy()
        scale = soft_clip_scale(np.linalg.norm(block, axis=1), np.linalg.norm(Y.astype(np.float64), axis=1), K_q)
        mapped[b], clip_scale[b] = block, scale
        cos[False][b] = centred_cosine(mapped[b], Y, ali.mu_Y)  # the gate's cosines are those of the rows written
        cos[True][b] = centred_cosine(_clipped(mapped[b], scale), Y, ali.mu_Y)
    return StagePlan(name, weight, idx, original, mapped, clip_scale, cos, ali)


def _clipped(mapped: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Soft-clipped rows in float32 from the kept float32 mapped rows and their clip factors: what
    :meth:`StagePlan.E_rows` writes and what the gate's cosines are computed on."""
    return (mapped * scale[:, None]).astype(np.float32)


def _finite(values: np.ndarray, tensor: str, where: str) -> np.ndarray:
    """A donor matrix with NaN/Inf would spread them through the alignment into every blended row."""
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise BadNumbers(f"{tensor} holds {bad} NaN/Inf values; it cannot be a donor", where)
    return values


class DonorMatrix:
    """The donor's embedding or head, read by rows when the merge indexes it (``D[ids]``), never whole.

    Why: the merge uses the donor rows of the shared tokens (at most ``--max-shared``) and of the texts the
    baselines and OMP tokenise; a 100B-class donor's table is 3.2 GB in float32 (Solar-Open-100B: 196,608 × 4,096),
    which a merge under a few GiB cannot hold twice (embedding and head). Rows come through ``ModelHandle.rows``
    (one range per run of consecutive rows, locally or over HTTP) in float32, checked for NaN/Inf as they are read.
    """

    def __init__(self, handle, name: str):
        self.handle, self.name = handle, name
        self.shape = tuple(handle.info(name).shape)

    def __getitem__(self, ids) -> np.ndarray:
        rows = np.asarray(ids, dtype=np.int64)
        return _finite(self.handle.rows(self.name, rows, np.float32), self.name, self.handle.name)


class MergeSession:
    """B in memory with its Stage A/B plans; `trial(params)` merges, measures, restores unless asked to keep.

    Settings come from `config` (a :class:`MergeConfig`); keyword arguments override single fields of it.
    With `general_texts` every trial is also measured on them (bits per byte), for `--objective domain`'s
    constraint.
    """

    def __init__(
        self,
        base: str,
        donor: str,
        texts: list[str],
        config: MergeConfig | None = None,
        general_texts: list[str] | None = None,
        **overrides: Any,
    ):
        from lmsurgeon.io import open_model

        cfg = (config or MergeConfig()).with_overrides(**overrides)
        self.config = cfg
        t0 = time.perf_counter()
        self.base_handle, self.donor_handle = open_model(base), open_model(donor)
        self.ppl_cap, self.kl_topk, self.gamma, self.on_stage_a_fail = (
            cfg.ppl_cap,
            cfg.kl_topk,
            cfg.gamma,
            cfg.on_stage_a_fail,
        )
        cb = self.base_vocab = canonical_vocab(_tokenizer_json(self.base_handle))
        cd = canonical_vocab(_tokenizer_json(self.donor_handle))
        self.model = load_lm(self.base_handle, cfg, DTYPES[cfg.dtype])
        self.streamed = isinstance(self.model, StreamedLM)
        emb = self.model.get_input_embeddings().weight
        self.shared = shared_vocab(cb, cd, cfg.max_shared)
        dl = Layout(self.donor_handle)
        E_D = self.E_D = DonorMatrix(self.donor_handle, dl.require("embed"))
        self.shared = _drop_out_of_range(self.shared, emb.shape[0], E_D.shape[0])
        self.omp = None
        if cfg.init_nonshared == "omp":
            self.omp = _omp_targets(cb, self.shared, self.donor_handle.tokenizer, E_D, emb.shape[0])
        self.stage_a = _build_stage(
            "A", emb, E_D, self.shared, CLIP_QUANTILE, self.omp and (self.omp["ids"], self.omp["V_emb"]), cfg.omp_k
        )
        self.tied = _head_is_tied(self.model)
        self.stage_b = None
        self.H_D = E_D
        if not self.tied:
            H_D = DonorMatrix(self.donor_handle, dl.name("lm_head")) if dl.has("lm_head") and not dl.tied else E_D
            self.H_D = H_D
            omp_b = None
            if self.omp is not None:
                from lmsurgeon.merge.omp import donor_vectors

                omp_b = (self.omp["ids"], donor_vectors(self.omp["texts"], self.donor_handle.tokenizer, H_D)[0])
            self.stage_b = _build_stage(
                "B", self.model.get_output_embeddings().weight, H_D, self.shared, CLIP_QUANTILE, omp_b, cfg.omp_k
            )
        self.max_length = min(cfg.max_length, Layout(self.base_handle).max_positions or cfg.max_length)
        self.evaluator = self.prompt_evaluator(texts)
        t1 = time.perf_counter()
        self.base_eval: Evaluation = self.evaluator.evaluate(
            self.model, keep_head_inputs=self.stage_b is not None, keep_token_nll=cfg.objective == "domain"
        )
        self.seconds = {"setup": t1 - t0, "base_eval": time.perf_counter() - t1}
        self.head_only = self.stage_b is not None and self._head_reproduces_model()
        self.difficulty = self._difficulty() if self.base_eval.token_nll is not None else None
        self.general = self.base_general = None
        if general_texts is not None:
            self.general = self.prompt_evaluator(general_texts)
            self.base_general = self.general.evaluate(self.model, keep_head_inputs=self.head_only)
        if self._head_rows_update_exactly():
            head = self.model.get_output_embeddings()
            self.evaluator.keep_head_cache(self.base_eval, head.weight, head.bias)
            if self.general is not None and self.base_general is not None:
                self.general.keep_head_cache(self.base_general, head.weight, head.bias)

    def prompt_evaluator(self, texts: list[str]) -> PromptEvaluator:
        """An evaluator of `texts` with the base's tokenizer and this session's batching and KL positions."""
        pad = self.base_handle.config.get("pad_token_id")
        return PromptEvaluator(
            self.base_handle.tokenizer,
            texts,
            batch_size=self.config.batch_size,
            max_length=self.max_length,
            positions=self.config.kl_positions,
            pad_id=pad if isinstance(pad, int) else 0,
            device=self.config.device,
        )

    def _difficulty(self) -> dict[str, np.ndarray]:
        """Per base token id, the base's mean loss in bits on the search text (NaN: never seen there), as the
        next token's target (``head``: how well the base predicts the token) and as the context just before it
        (``emb``: how well the base predicts what follows the token). The domain gate reads these (§M10)."""
        V = self.model.get_input_embeddings().weight.shape[0]
        sums = {k: torch.zeros(V, dtype=torch.float64) for k in ("emb", "head")}
        counts = {k: torch.zeros(V, dtype=torch.float64) for k in ("emb", "head")}
        for b, nll in zip(self.evaluator.batches, self.base_eval.token_nll or [], strict=True):
            valid = b["valid"].cpu()
            ids, loss = b["ids"].cpu(), nll[valid].double() / np.log(2.0)
            for key, at in (("head", ids[:, 1:][valid]), ("emb", ids[:, :-1][valid])):
                sums[key].index_add_(0, at, loss)
                counts[key].index_add_(0, at, torch.ones_like(loss))
        return {k: (sums[k] / counts[k]).numpy() for k in sums}  # 0/0 → NaN: no evidence, never gated

    def gate(self, stage: StagePlan, key: str, gate_frac: float) -> np.ndarray:
        """The domain gate over a stage's pool: rows of tokens the base predicts worse than f·log2(V) bits."""
        assert self.difficulty is not None, "the domain gate needs the base's per-token losses (objective domain)"
        V = self.model.get_input_embeddings().weight.shape[0]
        with np.errstate(invalid="ignore"):
            return self.difficulty[key][stage.idx.numpy()] > gate_frac * np.log2(V)

    def _apply_a(self, p: dict, clip: bool) -> dict:
        if "gate_frac" in p:
            return self.stage_a.apply_gated(self.gate(self.stage_a, "emb", p["gate_frac"]), p["alpha_emb"], clip)
        k_a = int(np.floor(p["target_emb_frac"] * len(self.stage_a.idx)))
        return self.stage_a.apply(k_a, p["min_tau_emb"], p["alpha_floor_emb"], p["alpha_cap_emb"], clip, self.gamma)

    def _apply_b(self, p: dict, clip: bool) -> dict:
        assert self.stage_b is not None
        if "gate_frac" in p:
            return self.stage_b.apply_gated(self._head_gate(p), p["alpha_head"], clip)
        return self.stage_b.apply(*self._head_schedule(p), clip, self.gamma)

    def _head_gate(self, p: dict) -> np.ndarray:
        assert self.stage_b is not None
        return self.gate(self.stage_b, "head", p["gate_frac"])

    def _head_schedule(self, p: dict) -> tuple[int, float, float, float]:
        assert self.stage_b is not None
        k_b = min(int(p["target_head_rows"]), len(self.stage_b.idx))
        return k_b, p["min_tau_head"], p["alpha_floor_head"], p["alpha_cap_head"]

    def _planned_head_ids(self, p: dict, clip: bool) -> torch.Tensor | None:
        """The base ids Stage B will blend if Stage A passes its guard (a fresh trial on the base's head; None
        otherwise): Stage A's evaluation keeps their share of each re-run position's mass, so Stage B's update
        there needs no logits of the old rows (§M8.3)."""
        if self.stage_b is None or self.stage_b.written.size or not self.head_only:
            return None
        if "gate_frac" in p:
            rows = np.flatnonzero(self._head_gate(p)) if p["alpha_head"] > 0 else np.zeros(0, dtype=np.int64)
        else:
            k, min_tau, floor, cap = self._head_schedule(p)
            rows = alpha_schedule(self.stage_b.cos[clip], k, min_tau, floor, cap, self.gamma).rows
        return self.stage_b.idx[torch.from_numpy(rows)] if rows.size else None

    def trial(self, params: dict, keep: bool = False, search_bar: float | None = None) -> dict:
        """One merge with `params`; returns the stats; restores B unless `keep` (then the merged model stays).

        `params` holding ``gate_frac`` are the domain gate's (§M10: ``gate_frac``, ``alpha_emb``, ``alpha_head``);
        any others are the seed's schedule, its cautious defaults filling what is missing."""
        p = {"use_soft_clip": True, **params} if "gate_frac" in params else {**CAUTIOUS, **params}
        t0 = time.perf_counter()
        clip = bool(p["use_soft_clip"])
        a = self._apply_a(p, clip)
        planned = self._planned_head_ids(p, clip) if a["rows"] else None
        ev_a = self._evaluate_body(self.evaluator, self.base_eval, planned) if a["rows"] else self.base_eval
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
                b = self._apply_b(p, clip)
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
        stats = {
            "params": p,
            "r": r,
            "sym_kl": kl,
            "r_A": a.get("r"),
            "r_B": b.get("r"),
            "stage_a": a,
            "stage_b": b,
            "n_evals": n_evals,
            "bpb": current.bpb,
        }
        if self.general is not None:
            stats.update(self._general(current, a, b, search_bar))
            stats["n_evals"] += stats.pop("general_evals")
        if not keep:
            self.restore()
        return {**stats, "seconds": time.perf_counter() - t0}

    def _general(self, current: Evaluation, a: dict, b: dict, search_bar: float | None = None) -> dict:
        """General-text bits per byte of the merge in place, and the domain constraint (≤ 0: feasible).

        Unchanged model: the base's numbers. Under ``--objective domain`` a merge that does not lower the search
        text's bits per byte (below `search_bar`, the best feasible trial's so far, when given) cannot be chosen,
        so its general text is not evaluated (``general_bpb`` None) and
        the constraint is the search loss it caused (> 0, infeasible). A merge of the head alone reuses the
        general text's body outputs."""
        assert self.general is not None and self.base_general is not None
        limit = self.base_general.bpb * (1.0 + self.config.tolerance)
        if current is self.base_eval:
            return {
                "general_bpb": self.base_general.bpb,
                "general_excess": self.base_general.bpb - limit,
                "general_evals": 0,
            }
        bar = self.base_eval.bpb if search_bar is None else min(search_bar, self.base_eval.bpb)
        if self.config.objective == "domain" and current.bpb >= bar:
            return {"general_bpb": None, "general_excess": current.bpb - bar + 1e-12, "general_evals": 0}
        head_alone = a["rows"] == 0 or a.get("outcome") == "rolled_back"
        if head_alone and self.head_only and self.base_general.head_inputs is not None:
            ev = self.general.evaluate_incremental(
                self.model, self.head_logits, self.base_general, delta=self._head_delta()
            )
            evals = 0
        else:
            ev, evals = self._evaluate_body(self.general, self.base_general), 1
        return {"general_bpb": ev.bpb, "general_excess": ev.bpb - limit, "general_evals": evals}

    def _evaluate_body(
        self, evaluator: PromptEvaluator, base: Evaluation, head_ids: torch.Tensor | None = None
    ) -> Evaluation:
        """An evaluation after Stage A moved embedding rows: prompts without a moved token reuse the base's body
        outputs when the head alone reproduces the model (in memory, §M8.3); otherwise the whole model runs.
        `head_ids`: the head rows Stage B will move (their share of each re-run position's mass is kept)."""
        if self.head_only and base.head_inputs is not None and not self.streamed:
            return evaluator.evaluate_incremental(
                self.model,
                self.head_logits,
                base,
                changed_ids=self.stage_a.last_ids,
                delta=self._head_delta(),
                share_of=head_ids,
            )
        return evaluator.evaluate(self.model, self.head_only)

    def _head_delta(self) -> HeadDelta | None:
        """The head rows Stage B has blended now (None: the head is the base's)."""
        if self.stage_b is None or not self.stage_b.written.size:
            return None
        ids, old = self.stage_b.moved()
        head = self.model.get_output_embeddings()
        return HeadDelta(ids, old, head.weight, head.bias)

    def _head_rows_update_exactly(self) -> bool:
        """Whether moved head rows may update the base's log-normalisers (§M8.3) instead of the full head
        running: the head alone gives the model's numbers, with no final soft-capping (which bends each logit
        through tanh) and in float32 or float64 (a lower-precision head's own rounding is not reproduced)."""
        if not self.head_only or self.streamed:
            return False
        cfg = getattr(self.model.config, "get_text_config", lambda: self.model.config)()
        weight = self.model.get_output_embeddings().weight
        return not getattr(cfg, "final_logit_softcapping", None) and weight.dtype in (torch.float32, torch.float64)

    def changed_rows(self) -> list[int]:
        """Base token ids whose embedding row the current (kept) merge moved."""
        return sorted(set(self.stage_a.last_ids))

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
            return self.evaluator.evaluate_incremental(
                self.model, self.head_logits, self.base_eval, before=before, delta=self._head_delta()
            )
        return self.evaluator.evaluate(self.model)

    def restore(self) -> None:
        self.stage_a.restore()
        if self.stage_b is not None:
            self.stage_b.restore()

    def save(self, path) -> None:
        """Save the current (merged) model with B's tokenizer files, safetensors only."""
        from pathlib import Path

        from lmsurgeon.io.model import quiet_transformers

        if isinstance(self.model, StreamedLM):
            names = self.model.parameter_names()
            weights = {"embed": self.model.get_input_embeddings().weight}
            if "lm_head" in names:
                weights["lm_head"] = self.model.get_output_embeddings().weight
            self.model.save_pretrained(path, {names[k]: w for k, w in weights.items()})
        else:
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


def _omp_targets(cb, shared: SharedVocab, donor_tokenizer, E_D: DonorMatrix, V_B: int) -> dict:
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
    return {
        "ids": [ids[j] for j in keep],
        "texts": [texts[j] for j in keep],
        "V_emb": V[keep],
        "skipped": undecodable + int((~ok).sum()),
    }


def _drop_out_of_range(shared: SharedVocab, V_B: int, V_D: int) -> SharedVocab:
    """Tokenizer ids beyond the embedding matrices (padding mismatch) cannot be matched."""
    keep = [j for j, (b, d) in enumerate(zip(shared.base_ids, shared.donor_ids, strict=True)) if b < V_B and d < V_D]
    if not keep:
        raise LmsurgeonError("no shared tokens within the embedding matrices")
    if len(keep) == len(shared.base_ids):
        return shared
    return SharedVocab(
        [shared.base_ids[j] for j in keep],
        [shared.donor_ids[j] for j in keep],
        {**shared.overlap, "shared_used": len(keep)},
    )


def run_merge(
    base: str,
    donor: str,
    out: str | Path | None = None,
    config: MergeConfig | None = None,
    *,
    callbacks=(),
    progress: bool = False,
    documents: dict[str, list[str]] | None = None,
    **overrides: Any,
) -> dict:
    """Merge `donor`'s embedding (and head) rows into `base`; returns the results.json dict plus ``out``, the
    run folder.

    Settings come from `config` (:class:`MergeConfig`); keyword arguments override single fields, so
    ``run_merge(b, d, out, trials=8)`` is ``run_merge(b, d, out, MergeConfig(trials=8))``. trials > 0: an Optuna
    study (journal next to `out`, or `storage`); trials 0: one merge with `params` (default: the cautious end of
    every range). `worker=True` only runs trials of a shared study and writes nothing; it returns
    {"worker": True, "trials_run": n}. `callbacks` are Optuna trial callbacks; `progress` shows a progress bar.
    `documents` ({"search": [...], "heldout": [...]}) gives the search and held-out text in memory instead of
    `prompts_file`/`eval_file`; the run folder keeps them under ``texts/``.
    """
    from lmsurgeon.merge import search
    from lmsurgeon.report.runfolder import default_out_dir

    cfg = (config or MergeConfig()).with_overrides(**overrides)
    out = Path(out) if out is not None else default_out_dir("merge")
    journal = _prepare_output(out, cfg)
    space = search.load_space(cfg.space, cfg.objective)
    texts = merge_texts(cfg, documents)
    general = texts.general if cfg.objective == "domain" else None
    stage("merge: fitting the donor map and evaluating the base")
    session = MergeSession(base, donor, texts.search, cfg, general_texts=general)
    fp = study_fingerprint(
        session.base_handle.inputs(), session.donor_handle.inputs(), texts.search, cfg, space, general_texts=general
    )
    t0 = time.perf_counter()
    if cfg.trials:
        records = _search(session, cfg, space, journal, fp, callbacks, progress)
        if cfg.worker:
            return {"worker": True, "trials_run": records}
    else:
        records = [_record(0, session.trial(cfg.params or {}))]
    timings = _timings(session, records, search_seconds=time.perf_counter() - t0)
    stage("merge: baselines, held-out and general text, run folder")
    results = _write_run_folder(out, journal, base, donor, session, cfg, texts, records, fp, timings)
    if journal is not None and journal.exists():
        journal.unlink()
    return {**results, "out": str(out)}


def _prepare_output(out: Path, cfg: MergeConfig) -> Path | None:
    """Refuse to overwrite a finished run; return where the study's journal lives (None: no journal)."""
    from lmsurgeon.merge import search

    if cfg.worker:
        return None
    if cfg.storage is None and cfg.trials:
        return search.prepare_journal(out, cfg.resume)
    if not cfg.resume and out.exists() and any(out.iterdir()):
        raise OutputExists("output folder exists and is not empty (choose another --out)", out)
    return None


def _record(number: int, stats: dict) -> dict:
    return {"number": number, "r": stats["r"], "sym_kl": stats["sym_kl"], "params": stats["params"], "stats": stats}


def _search(
    session: MergeSession, cfg: MergeConfig, space: dict, journal: Path | None, fp: str, callbacks, progress: bool
) -> list[dict] | int:
    """Run (or join, or resume) the study until it holds `trials` finished trials; their records in order.

    A worker returns only how many trials it ran itself. A finaliser waits for the other workers and runs the
    share of any that died, so the study it reads is complete.
    """
    import optuna

    from lmsurgeon.merge import search

    study = search.open_study(search.make_storage(cfg.storage, journal), cfg.study_name, cfg.seed, fp, cfg.objective)
    if cfg.storage is None:
        search.fail_dead_trials(study)
    before = {t.number for t in study.get_trials(deepcopy=False)}
    search.run_trials(study, session, space, cfg.trials, callbacks, progress)
    if cfg.worker:
        return len(
            [
                t
                for t in study.get_trials(deepcopy=False)
                if t.number not in before and t.user_attrs.get("pid") == os.getpid()
            ]
        )
    reap = search.fail_dead_trials if cfg.storage is None else optuna.storages.fail_stale_trials
    search.wait_for_running(study, reap)
    if search.n_complete(study) < cfg.trials:  # a worker died mid-trial while we waited: finish its share
        search.run_trials(study, session, space, cfg.trials, callbacks, progress)
        search.wait_for_running(study, reap)
    return [
        _record(t.number, t.user_attrs["stats"])
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    ]


def _timings(session: MergeSession, records: list[dict], search_seconds: float) -> dict:
    """Setup, base evaluation and search time, and what one trial costs against one perplexity evaluation."""
    per_trial = [t["stats"]["seconds"] for t in records]
    per_eval = [t["stats"]["seconds"] / max(t["stats"]["n_evals"], 1) for t in records]
    base_eval = max(session.seconds["base_eval"], 1e-9)
    return {
        "setup_seconds": session.seconds["setup"],
        "ppl_eval_seconds": session.seconds["base_eval"],
        "search_seconds": search_seconds,
        "trial_seconds_mean": float(np.mean(per_trial)),
        "trial_cost_per_ppl_eval": float(np.mean(per_eval)) / base_eval,
        "trial_cost_vs_one_ppl_eval": float(np.mean(per_trial)) / base_eval,
    }


def _select(session: MergeSession, cfg: MergeConfig, records: list[dict]) -> tuple[list[dict], dict | None]:
    """The trials the choice is made among (the Pareto front, or the feasible trials of `--objective domain`)
    and the best of them, chosen on the search text only."""
    from lmsurgeon.merge import search

    if cfg.objective == "domain":
        front = search.feasible_domain(records, cfg.ppl_cap, session.base_general.bpb, cfg.tolerance)
        return front, front[0] if front else None
    front = search.pareto_front(records, cfg.ppl_cap)
    return front, search.select_best(front, cfg.select, cfg.select_max_rel_ppl)


def _measure_quality(session: MergeSession, cfg: MergeConfig, texts: MergeTexts, best: dict | None) -> dict:
    """The `bpb` block: base, donor, the best trial and the baselines on the search, held-out and general text,
    and which model is recommended (the best trial only if it beats the base on held-out text)."""
    evaluators = {
        "search": session.evaluator,
        "heldout": session.prompt_evaluator(texts.heldout),
        "general": session.general or session.prompt_evaluator(texts.general),
    }
    model = session.model
    base_ev = {
        "search": session.base_eval,
        "heldout": evaluators["heldout"].evaluate(model),
        "general": session.base_general or evaluators["general"].evaluate(model),
    }
    base_row = quality.measure(base_ev)
    best_row = None
    if best is not None:
        session.trial(best["params"], keep=True)
        best_row = {
            "name": f"trial {best['number']}",
            "trial": best["number"],
            **quality.measure(quality.evaluate_texts(model, evaluators), base_ev),
            "blended_fraction_by_class": quality.blended_fraction_by_class(session, session.changed_rows()),
        }
        session.restore()
    session.trial({}, keep=True)
    baselines = [
        {"name": "base", **base_row},
        {"name": "seed-defaults", **quality.measure(quality.evaluate_texts(model, evaluators), base_ev)},
    ]
    session.restore()
    for name, build in quality.BASELINES.items():
        patches = build(session)
        baselines.append({"name": name, **quality.measure(quality.evaluate_texts(model, evaluators), base_ev)})
        for patch in reversed(patches):
            patch.restore()
    choice, reason = quality.recommend(base_row, best_row, cfg)
    others = [b["heldout"] for b in baselines if b["name"] != "base"]
    return {
        "base": base_row,
        "donor": quality.donor_bpb(session, texts),
        "best": best_row if choice == "trial" else {"name": "base", **base_row},
        "best_trial": best_row,
        "baselines": baselines,
        "recommended": choice,
        "reason": reason,
        "best_trial_beats_every_baseline": None
        if best_row is None
        else bool(best_row["heldout"] < min([base_row["heldout"], *others])),
    }


def _write_run_folder(
    out: Path,
    journal: Path | None,
    base: str,
    donor: str,
    session: MergeSession,
    cfg: MergeConfig,
    texts: MergeTexts,
    records: list[dict],
    fp: str,
    timings: dict,
) -> dict:
    """Choose the best trial, measure it and the baselines, save the recommended model (and the next
    `save_topk`), and write every file of the run."""
    from lmsurgeon.merge.report import build_report, pareto_figure, trials_csv
    from lmsurgeon.report import RunFolder

    front, best = _select(session, cfg, records)
    t0 = time.perf_counter()
    bpb = _measure_quality(session, cfg, texts, best)
    timings["quality_seconds"] = time.perf_counter() - t0
    with RunFolder(out, command="merge", seed=cfg.seed, overwrite=cfg.resume) as run:
        (run.path / "stats").mkdir()
        for t in records:
            run.write_json(f"stats/trial_{t['number']:04d}.json", {"number": t["number"], **t["stats"]})
        (run.path / "trials.csv").write_text(trials_csv(records))
        for name in texts.in_memory:  # one document a line, so blank lines inside a document survive
            lines = (json.dumps({"text": d}, ensure_ascii=False) for d in getattr(texts, name))
            (run.path / "texts").mkdir(exist_ok=True)
            (run.path / "texts" / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        _save_models(session, cfg, run.path, best if bpb["recommended"] == "trial" else None, front)
        brief = [{"number": t["number"], "r": t["r"], "sym_kl": t["sym_kl"], "params": t["params"]} for t in front]
        run.write_json("pareto.json", brief)
        run.write_json("best.json", best and {k: best[k] for k in ("number", "r", "sym_kl", "params", "stats")})
        rel = run.save_figure(pareto_figure(records, front, best, cfg.ppl_cap), "pareto")
        shutil.copy2(run.path / rel, run.path / "pareto.png")
        if journal is not None and journal.exists():
            shutil.copy2(journal, run.path / "study.journal")
        body = {
            "base": str(base),
            "donor": str(donor),
            "tied": session.tied,
            "streamed": session.streamed,
            "dtype": cfg.dtype,
            "objective": cfg.objective,
            "tolerance": cfg.tolerance,
            "ppl_cap": cfg.ppl_cap,
            "kl_topk": cfg.kl_topk,
            "kl_positions": cfg.kl_positions,
            "select": cfg.select,
            "storage": "journal" if cfg.storage is None else cfg.storage.split("://")[0],
            "study_name": cfg.study_name if cfg.trials else None,
            "n_trials": len(records),
            "texts": texts.summary(),
            "bpb": bpb,
            "overlap": session.shared.overlap,
            "fit": session.fit_summary(),
            "base_ppl": session.base_eval.ppl,
            "n_prompts": len(session.evaluator.seqs),
            "pareto": brief,
            "best": best and {k: best[k] for k in ("number", "r", "sym_kl", "params")},
            "best_stats": best and best["stats"],
            "heldout_r": bpb["best_trial"] and bpb["best_trial"]["heldout_r"],
            "best_model": "best_model",
            "fingerprint": fp,
            "omp": session.omp and {"rows": len(session.omp["ids"]), "skipped": session.omp["skipped"], "k": cfg.omp_k},
        }
        results = run.write_results(
            body, inputs=session.base_handle.inputs() + session.donor_handle.inputs(), timings=timings
        )
        run.write_report(build_report(results, rel))
    return results


def _save_models(
    session: MergeSession, cfg: MergeConfig, folder: Path, recommended: dict | None, front: list[dict]
) -> None:
    """Save the recommended model as best_model/ (the base itself when no trial is recommended) and `save_topk`
    more trials of the front under topk/."""
    if recommended is not None:
        session.trial(recommended["params"], keep=True)
    session.save(folder / "best_model")
    session.restore()
    skip = recommended["number"] if recommended is not None else None
    for t in [f for f in front if f["number"] != skip][: max(cfg.save_topk, 0)]:
        session.trial(t["params"], keep=True)
        session.save(folder / "topk" / f"trial_{t['number']:04d}")
        session.restore()


def run_domain_merge(
    base: str,
    donor: str,
    out: str | Path,
    search_docs: list[str],
    heldout_docs: list[str],
    *,
    trials: int = 16,
    seed: int = 0,
    max_prompts: int = 32,
    **overrides: Any,
) -> dict:
    """`--objective domain` on documents given in memory (kept in the run folder under ``texts/``); general text
    stays the corpus test split unless `general_file` is given.

    The demo's domain scenario is ``run_domain_merge(zoo("llama-sp"), zoo("gpt2-code"), out,
    domain_texts(corpus.split("train_b")), domain_texts(corpus.split("validation")))``
    (``lmsurgeon.zoo.recipe.domain_texts``, ``lmsurgeon.data.load_corpus``).
    """
    return run_merge(
        base,
        donor,
        out,
        trials=trials,
        seed=seed,
        max_prompts=max_prompts,
        documents={"search": search_docs, "heldout": heldout_docs},
        objective="domain",
        **overrides,
    )
