"""``analyze``: the whole swap analysis of one model (methods.md §S5–§S12), returning what results.json holds."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from lmsurgeon.arch import Layout, find_module
from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.io import open_model
from lmsurgeon.report import RunFolder
from lmsurgeon.report.progress import stage, task
from lmsurgeon.swap.config import SwapConfig
from lmsurgeon.swap.e2e import find_head
from lmsurgeon.swap.engine import Batch, eval_pass, finish, fit_pass
from lmsurgeon.swap.metrics import dep, r_of, spectral_norm, trans
from lmsurgeon.swap.plan import PlanEvaluator, parse_plan_drop, plan_drops, plan_reorder, predicted_bytes
from lmsurgeon.swap.stats import spearman_ci

MIN_ROW_TOKENS = 16
PAPER = {"model": "openai-community/gpt2-large", "pairs": 35, "r_vs_delta": 0.91, "linear_vs_delta": 0.91}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


def analyze(
    source, config: SwapConfig | None = None, *, out=None, progress: bool = False, overwrite: bool = False, **options
) -> dict:
    """Analyse every adjacent layer pair of ``source`` and write a run folder; returns results.json's dict.

    Settings come from ``config`` (default :class:`SwapConfig`), with any keyword ``options`` (its field names:
    ``tokens=4096, seq_len=128, apply=3`` ...) applied on top. ``data`` is the fit text (None: the built-in
    corpus's train split, eval on its validation split); ``eval_data`` feeds δ, δ', Δloss and perplexity (absent
    with ``data``: ``data``'s documents shuffled with ``seed`` and split 50/50). ``tokens`` is the eval budget in
    real tokens; the fit budget is ``fit_tokens`` or max(tokens, 8·d). ``apply=i`` also writes
    ``swap_i_{i+1}/``, ``drop=i`` writes ``drop_i/``. The run folder is ``out`` (default
    ``runs/swap-<timestamp>``); its final path is ``results["run_dir"]``.
    """
    if config is not None and not isinstance(config, SwapConfig):
        raise TypeError(f"config must be a SwapConfig, not {type(config).__name__}")
    cfg = (config or SwapConfig()).with_options(**options)
    if cfg.heal_steps and cfg.apply_plan is None:
        raise LmsurgeonError("--heal-steps heals the model --apply-plan writes; give --apply-plan too")
    with RunFolder(out, command="swap", seed=cfg.seed, overwrite=overwrite) as run:  # refuses a used --out first
        t0 = time.time()
        timings: dict[str, float] = {}
        handle = open_model(source)
        layout = Layout(handle)
        family = layout.family
        torch_dtype = resolve_dtype(cfg.dtype, cfg.device, handle)
        kind = "base" if family.encoder else "causal-lm"
        model, layers, streamed = load_for_swap(handle, layout, kind, torch_dtype, cfg)
        if streamed is not None and cfg.heal_steps:
            raise LmsurgeonError(
                "--heal-steps trains through the whole model, which streams here (it does not fit --max-memory,"
                " or --streaming stream): heal in memory, or leave --heal-steps out",
                handle.name,
            )
        tokenizer = handle.load_tokenizer()
        L, d = len(layers), layout.hidden_size
        if L < 2:
            raise LmsurgeonError(f"a swap needs at least 2 layers, the model has {L}", handle.name)
        _check_index(cfg.apply, L - 1, "--apply")
        _check_index(cfg.drop, L, "--drop")
        head_owner = streamed.model if streamed is not None else model
        head = find_head(head_owner, family) if cfg.e2e else None  # no head: δ, δ', Trans, Dep only
        timings["load_seconds"] = time.time() - t0

        seq_len = min(cfg.seq_len, layout.max_positions or cfg.seq_len)  # learned position tables end there
        fit_texts, eval_texts, data_desc = split_texts(cfg.data, cfg.eval_data, cfg.seed)
        planning = cfg.plan_drop is not None or cfg.plan_reorder or cfg.apply_plan is not None
        if planning:
            eval_texts, heldout_texts, data_desc["heldout"] = heldout_split(cfg, eval_texts)
        fit_budget = cfg.fit_tokens or max(cfg.tokens, 8 * d)
        pad_id = _pad_id(tokenizer)
        fit_rows = tokenize_rows(tokenizer, fit_texts, seq_len, fit_budget)
        eval_rows = tokenize_rows(tokenizer, eval_texts, seq_len, cfg.tokens)
        if not fit_rows or not eval_rows:
            raise LmsurgeonError(
                f"no text row has at least {MIN_ROW_TOKENS} tokens", str(cfg.data or "built-in corpus")
            )
        fit_batches = make_batches(fit_rows, cfg.batch_tokens, seq_len, pad_id, cfg.device, cfg.skip_first)
        eval_batches = make_batches(eval_rows, cfg.batch_tokens, seq_len, pad_id, cfg.device, cfg.skip_first)

        with _progress(progress, len(fit_batches) + len(eval_batches)) as tick:
            t1 = time.time()
            fit = fit_pass(model, family.modules["layers"], fit_batches, L, d, cfg.window, cfg.ridge, cfg.device, tick)
            timings["fit_seconds"] = time.time() - t1
            t1 = time.time()
            if streamed is not None and head is not None:
                streamed.load_head()  # after the fit pass, which never reads it
            S = eval_pass(
                model, layers, family.modules["layers"], eval_batches, fit, head, cfg.window, cfg.device, tick
            )
            ev = finish(S, head is not None)
            timings["eval_seconds"] = time.time() - t1

        body = assemble(fit, ev, L, d, head is not None, cfg.bootstrap, cfg.seed)
        body.update(
            {
                "run_dir": str(run.out.resolve()),
                "model": {
                    "source": str(source),
                    "family": family.name,
                    "n_layers": L,
                    "hidden_size": d,
                    "encoder": family.encoder,
                    "dtype": str(torch_dtype).replace("torch.", ""),
                    "device": cfg.device,
                    "streaming": {
                        "mode": cfg.streaming,
                        "streamed": streamed is not None and streamed.streaming,
                        "memory": streamed.describe() if streamed is not None else None,
                    },
                },
                "settings": settings(cfg, data_desc, seq_len, fit_budget, e2e=head is not None),
                "tokens": {
                    "fit": fit.n_fit,
                    "eval": ev["n_tokens"],
                    "eval_rows": ev["n_rows"],
                    "fit_rows": len(fit_rows),
                    "loss_tokens": ev["n_loss_tokens"],
                },
                "paper": PAPER,
            }
        )
        from lmsurgeon.swap.report import build_report, draw_figures

        evaluators = None
        if planning:
            t1 = time.time()
            plan_head = head or find_head(head_owner, family)
            if plan_head is None:
                raise LmsurgeonError(
                    "--plan-drop, --plan-reorder and --apply-plan score plans by next-token loss, "
                    "which needs a model with an LM head",
                    handle.name,
                )
            heldout_rows = tokenize_rows(tokenizer, heldout_texts, seq_len, cfg.plan_tokens or cfg.tokens)
            if not heldout_rows:
                raise LmsurgeonError(f"no held-out row has at least {MIN_ROW_TOKENS} tokens", data_desc["heldout"])
            heldout_batches = make_batches(heldout_rows, cfg.batch_tokens, seq_len, pad_id, cfg.device)
            # the greedy search drops layers by one half of the eval rows, and every plan is compared on the
            # other half (validation), apart from the held-out text that reports them (methods.md §S14)
            search_rows, selection_rows = (eval_rows[0::2], eval_rows[1::2]) if len(eval_rows) > 1 else (eval_rows,) * 2
            evaluators = make_evaluators(
                model,
                layers,
                family.modules["layers"],
                plan_head,
                tokenizer,
                (make_batches(selection_rows, cfg.batch_tokens, seq_len, pad_id, cfg.device), selection_rows),
                (heldout_batches, heldout_rows),
                (make_batches(search_rows, cfg.batch_tokens, seq_len, pad_id, cfg.device), search_rows),
            )
            body["tokens"]["heldout"] = sum(len(r) for r in heldout_rows)
            if cfg.plan_drop is not None:
                stage(f"swap: drop plans up to k = {cfg.plan_drop}")
                k_max = parse_plan_drop(cfg.plan_drop, L)
                body.update(plan_drops(*evaluators[:2], body["layers"], k_max, search=evaluators[2]))
            if cfg.plan_reorder:
                stage("swap: reorder plans")
                body["reorder"] = plan_reorder(*evaluators[:2], body["pairs"], cfg.reorder_tolerance)
            timings["plan_seconds"] = time.time() - t1

        body["apply"] = None
        if cfg.apply is not None or cfg.drop is not None:
            from lmsurgeon.swap.apply import apply_and_evaluate

            t1 = time.time()
            body["apply"] = apply_and_evaluate(
                handle,
                layout,
                run.path,
                eval_batches,
                kind,
                torch_dtype,
                cfg.device,
                swap=cfg.apply,
                drop=cfg.drop,
                model=model if streamed is None else streamed.sm,
            )
            timings["apply_seconds"] = time.time() - t1
        if cfg.apply_plan is not None:
            from lmsurgeon.swap.apply import apply_plan

            t1 = time.time()
            body["applied_plan"] = apply_plan(
                handle,
                layout,
                run.path,
                body,
                cfg,
                evaluators,
                kind,
                torch_dtype,
                fit_batches,
                streamed=None if streamed is None else streamed.sm,
            )
            timings["apply_plan_seconds"] = time.time() - t1
        if streamed is not None:
            body["model"]["streaming"]["block_loads"] = streamed.layers.loads
        figures = draw_figures(run, body)
        timings["analysis_seconds"] = time.time() - t0
        results = run.write_results(body, inputs=handle.inputs(), timings=timings)
        run.write_report(build_report(results, figures))
    return results


def load_for_swap(handle, layout, kind: str, dtype: torch.dtype, cfg: SwapConfig):
    """(model, its blocks, the StreamedSwapModel or None): the model in memory where it fits (``--streaming
    auto`` within ``--max-memory``, or ``plain``), else a skeleton whose blocks stream from the checkpoint
    (methods.md §S15). Both give the engine the same captures and block calls."""
    from lmsurgeon.streaming import wants_streaming
    from lmsurgeon.swap.streamed import StreamedSwapModel

    if not wants_streaming(handle, dtype, cfg.streaming, cfg.max_memory, cfg.device):
        model = handle.load_model(kind, dtype=dtype, device=cfg.device)
        return model, find_module(model, layout.family.modules["layers"]), None
    streamed = StreamedSwapModel(handle, kind, dtype, cfg.device, max_memory=cfg.max_memory, mode="stream")
    stage(f"swap: {streamed.describe()}")
    return streamed, streamed.layers, streamed


def make_evaluators(model, layers, layers_paths, head, tokenizer, *splits):
    """Plan evaluators over each split given as (batches, rows): validation, held-out, and the search split."""
    return tuple(
        PlanEvaluator(model, layers, layers_paths, head, batches, predicted_bytes(tokenizer, rows))
        for batches, rows in splits
    )


def heldout_split(cfg: SwapConfig, eval_texts: list[str]) -> tuple[list[str], list[str], str]:
    """(eval documents, held-out documents, description): the text plans are scored on, apart from the eval
    split every predictor and the recommendation use.

    ``--heldout-data`` if given; with the built-in corpus only, its test split; else the last third of the eval
    documents shuffled with ``seed`` (the eval split keeps the rest, so it shrinks when planning).
    """
    from lmsurgeon.data import load_texts

    if cfg.heldout_data is not None:
        return eval_texts, load_texts(cfg.heldout_data, "test"), str(cfg.heldout_data)
    if cfg.data is None and cfg.eval_data is None:
        return eval_texts, load_texts(None, "test"), "built-in corpus: test"
    docs = list(eval_texts)
    if len(docs) < 3:
        raise LmsurgeonError(
            "planning needs held-out text: give --heldout-data, or at least 3 eval documents to set a third aside",
            str(cfg.eval_data or cfg.data),
        )
    random.Random(cfg.seed + 1).shuffle(docs)
    cut = len(docs) - len(docs) // 3
    return docs[:cut], docs[cut:], f"a third of the eval documents (shuffled, seed {cfg.seed + 1})"


def settings(cfg: SwapConfig, data_desc: dict, seq_len: int, fit_budget: int, *, e2e: bool) -> dict:
    """results.json's ``settings``: the configuration as it was applied (effective seq_len and budgets)."""
    return {
        "data": data_desc,
        "seq_len": seq_len,
        "fit_tokens_budget": fit_budget,
        "eval_tokens_budget": cfg.tokens,
        "window": cfg.window,
        "ridge": cfg.ridge,
        "skip_first": cfg.skip_first,
        "bootstrap": cfg.bootstrap,
        "min_row_tokens": MIN_ROW_TOKENS,
        "e2e": e2e,
        "batch_tokens": cfg.batch_tokens,
        "streaming": cfg.streaming,
        "max_memory": cfg.max_memory,
        "padding": "right",
        "special_tokens": "tokenizer default",
    }


def _check_index(i: int | None, n: int, flag: str) -> None:
    if i is not None and not 0 <= i < n:
        raise LmsurgeonError(f"{flag} {i} is out of range (0…{n - 1})")


def resolve_dtype(dtype: str | None, device: str, handle) -> torch.dtype:
    """``auto``: float32 if it fits in 60 % of the device's memory, else the checkpoint dtype (methods.md §S7)."""
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise LmsurgeonError(f"unknown --dtype {dtype!r} (auto, {', '.join(sorted(DTYPES))})")
        return DTYPES[dtype]
    if not str(device).startswith("cuda"):
        return torch.float32
    n_params = sum(int(np.prod(info.shape)) for info in handle.header().values())
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    if 4 * n_params < 0.6 * total:
        return torch.float32
    saved = handle.config.get("dtype") or handle.config.get("torch_dtype") or "bfloat16"
    return DTYPES.get(str(saved), torch.bfloat16)


def split_texts(data, eval_data, seed: int) -> tuple[list[str], list[str], dict]:
    """Fit and eval documents per methods.md §S7."""
    from lmsurgeon.data import load_texts

    if data is None and eval_data is None:
        return (
            load_texts(None, "train"),
            load_texts(None, "validation"),
            {"fit": "built-in corpus: train", "eval": "built-in corpus: validation"},
        )
    if eval_data is not None:
        fit = load_texts(data, "train") if data is not None else load_texts(None, "train")
        return (
            fit,
            load_texts(eval_data, "validation"),
            {"fit": str(data or "built-in corpus: train"), "eval": str(eval_data)},
        )
    docs = list(load_texts(data, "train"))
    random.Random(seed).shuffle(docs)
    half = max(1, len(docs) // 2)
    if len(docs) < 2:
        raise LmsurgeonError("--data needs at least 2 documents to split into fit and eval halves", str(data))
    return (
        docs[:half],
        docs[half:],
        {"fit": f"{data} (shuffled half 1, seed {seed})", "eval": f"{data} (shuffled half 2, seed {seed})"},
    )


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def tokenize_rows(tokenizer, texts: list[str], seq_len: int, budget: int) -> list[list[int]]:
    """One document per row, cut at seq_len, rows under 16 tokens skipped, until ``budget`` real tokens."""
    rows, total = [], 0
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=seq_len)["input_ids"]
        if len(ids) < MIN_ROW_TOKENS:
            continue
        rows.append(list(ids))
        total += len(ids)
        if total >= budget:
            break
    return rows


def make_batches(
    rows: list[list[int]], batch_tokens: int, seq_len: int, pad_id: int, device, skip_first: int = 0
) -> list[Batch]:
    """Right-padded batches of about ``batch_tokens`` padded positions each."""
    per = max(1, batch_tokens // max(1, seq_len))
    out = []
    for a in range(0, len(rows), per):
        chunk = rows[a : a + per]
        T = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for k, r in enumerate(chunk):
            ids[k, : len(r)] = torch.tensor(r)
            mask[k, : len(r)] = 1
        out.append(Batch(ids.to(device), mask.to(device), skip_first))
    return out


@contextmanager
def _progress(enabled: bool, total: int, label: str = "swap: fit and eval batches") -> Iterator[Callable[[], None]]:
    """One stage of ``total`` batches: its stage line in a log, a bar on a terminal; yields ``tick()``."""
    done = 0
    with task(label, total, enabled) as update:

        def tick() -> None:
            nonlocal done
            done += 1
            update(done)

        yield tick


def assemble(fit, ev: dict, L: int, d: int, has_head: bool, bootstrap: int, seed: int) -> dict:
    """Per-layer and per-pair tables, Spearman correlations with CIs, and the safest-swap ranking."""
    A = fit.A  # a streamed fit's A_i are on disk: each is read once here and once per pair below
    T, snorm = [], []
    for a in A:
        T.append(trans(a))
        snorm.append(spectral_norm(a))
    floor = 1e-12 * max(snorm) if snorm else 0.0
    layers = [
        {
            "i": i,
            "trans": T[i],
            "r2_fit": fit.r2_fit[i],
            "r2_eval": ev["r2_eval"][i],
            "bi": ev["bi"][i],
            "ang1": ev["ang1"][i],
            "spectral_norm": snorm[i],
            "dloss_drop": ev["dloss_drop"][i] if has_head else None,
            "kl_drop": ev["kl_drop"][i] if has_head else None,
        }
        for i in range(L)
    ]
    pairs = []
    A_next = A[0] if L > 1 else None
    for i in range(L - 1):
        A_i, A_next = A_next, A[i + 1]
        pair_norms = (snorm[i], snorm[i + 1])
        d_ij = dep(A_i, A_next, floor, pair_norms)
        d_ji = dep(A_next, A_i, floor, pair_norms[::-1])
        dl = ev["dloss_swap"][i] if has_head else None
        pairs.append(
            {
                "i": i,
                "j": i + 1,
                "trans_i": T[i],
                "trans_j": T[i + 1],
                "dep_ij": d_ij,
                "dep_ji": d_ji,
                "r": r_of(T[i], T[i + 1], d_ij, d_ji),
                "delta": ev["delta"][i],
                "delta_linear": ev["delta_linear"][i],
                "bi": ev["bi"][i] * ev["bi"][i + 1],
                "angular": ev["ang2"][i],
                "trans_product": T[i] * T[i + 1],
                "dep_sum": d_ij + d_ji,
                "dep_flagged": bool(min(snorm[i], snorm[i + 1]) < floor),
                "dloss": dl,
                "ppl_ratio": float(np.exp(dl)) if dl is not None else None,
                "kl": ev["kl_swap"][i] if has_head else None,
            }
        )
    return {
        "layers": layers,
        "pairs": pairs,
        "spearman": correlations(pairs, has_head, bootstrap, seed),
        "ranking": ranking(pairs),
        "loss": ev.get("loss"),
        "perplexity": float(np.exp(ev["loss"])) if has_head else None,
        "dloss_applicable": has_head,
    }


PREDICTORS = {
    "r": "r",
    "linear": "delta_linear",
    "bi": "bi",
    "angular": "angular",
    "trans": "trans_product",
    "dep": "dep_sum",
}


def correlations(pairs: list[dict], has_head: bool, bootstrap: int, seed: int) -> dict:
    """Spearman ρ (95 % bootstrap CI over pairs) of each predictor vs δ and vs Δloss, and δ vs Δloss."""
    col = {k: [p[k] for p in pairs] for k in pairs[0]} if pairs else {}
    out = {}
    for target in ["delta", "dloss"] if has_head else ["delta"]:
        for name, key in PREDICTORS.items():
            out[f"{name}_vs_{target}"] = spearman_ci(col[key], col[target], n_boot=bootstrap, seed=seed)
    if has_head:
        out["delta_vs_dloss"] = spearman_ci(col["delta"], col["dloss"], n_boot=bootstrap, seed=seed)
    return out


def ranking(pairs: list[dict]) -> list[dict]:
    """Safest swaps first: by Δloss where there is a head, else by δ; ties broken by r."""
    by = "dloss" if pairs and pairs[0]["dloss"] is not None else "delta"
    order = sorted(pairs, key=lambda p: (p[by], p["r"]))
    return [
        {
            "rank": k + 1,
            "i": p["i"],
            "j": p["j"],
            "by": by,
            "dloss": p["dloss"],
            "ppl_ratio": p["ppl_ratio"],
            "delta": p["delta"],
            "r": p["r"],
        }
        for k, p in enumerate(order)
    ]
