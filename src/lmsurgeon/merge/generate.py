"""Deterministic greedy generation of base vs merged on fixed prompts (methods.md §M5).

Determinism is asked of PyTorch, never assumed: CUBLAS_WORKSPACE_CONFIG is set before CUDA starts,
`torch.use_deterministic_algorithms(True)` makes an op without a deterministic kernel raise, and every RNG is
seeded from `seed`. Two runs with the same inputs therefore write byte-identical results.jsonl.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np

from lmsurgeon.errors import LmsurgeonError


def make_deterministic(seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line, in order; blank lines ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise LmsurgeonError(f"cannot read prompts: {e.strerror}", path) from None
    prompts = [ln for ln in lines if ln.strip()]
    if not prompts:
        raise LmsurgeonError("the prompts file holds no prompt", path)
    return prompts


def _encode(tok, prompt: str):
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tok(prompt, return_tensors="pt")["input_ids"]


def greedy(model, tok, prompt: str, max_new_tokens: int, max_positions: int | None = None) -> dict:
    """Batch 1, do_sample=False, num_beams=1; returns text, new token ids and seconds.

    With a learned position table (``max_positions``) the prompt keeps its last tokens and generation stops at
    the table's end, instead of indexing past it.
    """
    import torch

    ids = _encode(tok, prompt).to(model.device)
    if max_positions:
        ids = ids[:, -(max_positions - 1) :]
        max_new_tokens = max(0, min(max_new_tokens, max_positions - ids.shape[1]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad if pad is not None else 0,
        )
    new = out[0, ids.shape[1] :].tolist()
    return {
        "text": tok.decode(new, skip_special_tokens=True),
        "ids": new,
        "n_tokens": len(new),
        "seconds": time.perf_counter() - t0,
    }


def greedy_streamed(lm, tok, prompt: str, max_new_tokens: int, max_positions: int | None = None) -> dict:
    """:func:`greedy` on a layer-streamed model (methods.md §M11): no KV cache, every block streams once per
    new token; the same argmax tokens as ``generate`` (same logits to float rounding), stopping at the same
    end-of-sequence ids."""
    import torch

    ids = _encode(tok, prompt)[0].tolist()
    if max_positions:
        ids = ids[-(max_positions - 1) :]
        max_new_tokens = max(0, min(max_new_tokens, max_positions - len(ids)))
    eos = lm.model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    new: list[int] = []
    t0 = time.perf_counter()
    while len(new) < max_new_tokens:
        token = int(torch.argmax(lm.next_token_logits(ids + new)))
        new.append(token)
        if token in stop:
            break
    return {
        "text": tok.decode(new, skip_special_tokens=True),
        "ids": new,
        "n_tokens": len(new),
        "seconds": time.perf_counter() - t0,
    }


def first_diff(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing generated token; None when identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_generation(
    base: str,
    merged: str,
    prompts: str | Path,
    out=None,
    *,
    tokenizer: str | None = None,
    seed: int = 42,
    max_new_tokens: int = 256,
    dtype: str = "fp32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    streaming: str = "auto",
    max_memory: str | None = None,
) -> dict:
    """Greedy answers of both models to each prompt → results.jsonl, results.md, results.json (diff summary).

    ``streaming``: ``auto`` streams a model's blocks from its checkpoint when it does not fit ``max_memory``,
    ``stream``/``plain`` force a path; the answers are the same (methods.md §M11)."""
    make_deterministic(seed)
    from lmsurgeon.io import open_model
    from lmsurgeon.merge.config import DTYPES
    from lmsurgeon.report import Report, RunFolder, Section

    texts = read_prompts(prompts)
    hb, hm = open_model(base), open_model(merged)
    tok = open_model(tokenizer).load_tokenizer(trust_remote_code) if tokenizer else hb.load_tokenizer(trust_remote_code)
    from lmsurgeon.merge.streamed import StreamedLM
    from lmsurgeon.streaming import wants_streaming

    records = []
    models: dict = {}
    for name, h in (("base", hb), ("merged", hm)):
        if wants_streaming(h, DTYPES[dtype], streaming, max_memory, device):
            models[name] = StreamedLM(h, dtype=DTYPES[dtype], device=device, batch_size=1, max_memory=max_memory)
        else:
            models[name] = h.load_model(dtype=DTYPES[dtype], device=device, trust_remote_code=trust_remote_code)
    run_greedy = {n: greedy_streamed if isinstance(m, StreamedLM) else greedy for n, m in models.items()}
    from lmsurgeon.arch import Layout

    limits = [Layout(h).max_positions for h in (hb, hm)]
    limit = min((v for v in limits if v), default=None)
    for i, p in enumerate(texts):
        rb = run_greedy["base"](models["base"], tok, p, max_new_tokens, limit)
        rm = run_greedy["merged"](models["merged"], tok, p, max_new_tokens, limit)
        d = first_diff(rb["ids"], rm["ids"])
        records.append(
            {
                "index": i,
                "prompt": p,
                "base": {k: rb[k] for k in ("text", "n_tokens", "seconds")},
                "merged": {k: rm[k] for k in ("text", "n_tokens", "seconds")},
                "identical": d is None,
                "first_diff_token": d,
            }
        )
    n_same = sum(r["identical"] for r in records)
    diffs = [r["first_diff_token"] for r in records if r["first_diff_token"] is not None]
    summary = {
        "prompts": len(records),
        "identical": n_same,
        "different": len(records) - n_same,
        "first_diff_token_median": float(np.median(diffs)) if diffs else None,
    }
    with RunFolder(out, command="compare-generation", seed=seed) as run:
        # results.jsonl carries no timings, so two runs with the same inputs are byte-identical
        lines = [
            json.dumps(
                {**r, "base": {**r["base"], "seconds": None}, "merged": {**r["merged"], "seconds": None}},
                ensure_ascii=False,
                sort_keys=True,
            )
            for r in records
        ]
        (run.path / "results.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (run.path / "timings.json").write_text(
            json.dumps(
                [{"index": r["index"], "base": r["base"]["seconds"], "merged": r["merged"]["seconds"]} for r in records]
            )
        )
        (run.path / "results.md").write_text(_markdown(records, summary), encoding="utf-8")
        results = run.write_results(
            {
                "base": str(base),
                "merged": str(merged),
                "max_new_tokens": max_new_tokens,
                "streamed": {n: isinstance(m, StreamedLM) for n, m in models.items()},
                "summary": summary,
                "records": records,
            },
            inputs=hb.inputs() + hm.inputs(),
        )
        run.write_report(
            Report(
                title="Generation comparison",
                summary=summary,
                how_to_read="Greedy decoding of the same prompts by both models; "
                "first_diff_token is where the merged answer departs.",
                sections=[
                    Section(
                        "Answers",
                        table=[
                            {
                                "#": r["index"],
                                "prompt": r["prompt"],
                                "base": r["base"]["text"],
                                "merged": r["merged"]["text"],
                                "first diff": r["first_diff_token"],
                            }
                            for r in records
                        ],
                    )
                ],
            )
        )
    return results


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def _markdown(records: list[dict], summary: dict) -> str:
    rows = [
        "# Generation comparison",
        "",
        f"{summary['identical']} of {summary['prompts']} answers identical.",
        "",
        "| # | prompt | base | merged | first diff token |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        diff = r["first_diff_token"] if r["first_diff_token"] is not None else "="
        rows.append(
            f"| {r['index']} | {_cell(r['prompt'])} | {_cell(r['base']['text'])} | "
            f"{_cell(r['merged']['text'])} | {diff} |"
        )
    return "\n".join(rows) + "\n"
