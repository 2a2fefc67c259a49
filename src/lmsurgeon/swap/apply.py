"""``--apply i`` / ``--drop i``: write a rewired checkpoint that ``transformers`` loads as is (methods.md §S11, §S12).

Layer tensors are renamed through the registry's layer template (``layers.{i}.``), so no per-family code is
needed; ``num_hidden_layers`` and every per-layer config list (``layer_types``: sliding vs full attention) are
permuted or cut the same way, so each block keeps its attention type where it moves. ``layer_idx`` is derived
from the position when transformers builds the model, which re-indexes the KV cache slots. Families that derive
a layer's behaviour from its index alone (GPT-2's ``scale_attn_by_inverse_layer_idx``) are refused.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmsurgeon.arch import find_module
from lmsurgeon.data.bits import bits_per_byte
from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.streaming import StreamedModel
from lmsurgeon.swap.engine import Batch
from lmsurgeon.swap.plan import ORACLE, plan_order

INDEX_LISTS = ("mlp_only_layers",)  # config lists that hold layer indices rather than one value per layer
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "generation_config.json",
    "added_tokens.json",
)


def new_order(n_layers: int, swap: int | None = None, drop: int | None = None) -> list[int]:
    """order[k] = the old layer that becomes layer k (one swap and/or one drop; see :func:`plan_order`)."""
    return plan_order(n_layers, drops=() if drop is None else (drop,), swaps=() if swap is None else (swap,))


def rewire_config(config: dict, layout, order: list[int]) -> dict:
    """A copy of config.json for the new layer order (text sub-config edited where the family nests it)."""
    L = layout.n_layers
    cfg = json.loads(json.dumps(config))
    text = layout.family.text_config(cfg)
    if text.get("scale_attn_by_inverse_layer_idx"):
        raise LmsurgeonError(
            "scale_attn_by_inverse_layer_idx ties each GPT-2 block's attention scale to its index;"
            " a moved block would compute something else, so the rewiring is refused"
        )
    n_key = layout.family.config_keys["n_layers"]
    n_key = n_key if isinstance(n_key, str) else next(k for k in n_key if k in text)
    text[n_key] = len(order)
    for key, val in list(text.items()):
        if isinstance(val, list) and len(val) == L and key not in INDEX_LISTS:
            text[key] = [val[o] for o in order]
        elif key in INDEX_LISTS and isinstance(val, list):
            text[key] = sorted(order.index(o) for o in val if o in order)
    return cfg


def rename_map(names: list[str], layout, order: list[int]) -> dict[str, str | None]:
    """Old tensor name → new name (None: dropped) via the family's layer template."""
    pat = re.compile(
        "^(" + re.escape(layout.prefix) + re.escape(layout.family.layer_prefix).replace(r"\{i\}", r")(\d+)(") + ")(.*)$"
    )
    where = {old: new for new, old in enumerate(order)}
    shift = len(order) - layout.n_layers
    out = {}
    for name in names:
        m = pat.match(name)
        if not m:
            out[name] = name
            continue
        old = int(m.group(2))
        new = where.get(old) if old < layout.n_layers else old + shift  # extra layers (MTP) keep their place
        out[name] = None if new is None else f"{m.group(1)}{new}{m.group(3)}{m.group(4)}"
    return out


def write_rewired(handle, layout, dest: Path, order: list[int]) -> Path:
    """Write config, tokenizer files and renamed safetensors shards of the rewired model into ``dest``, one
    output shard in memory at a time (:func:`lmsurgeon.io.write.write_shards`)."""
    from lmsurgeon.io.write import from_handle, write_shards

    config = rewire_config(handle.config, layout, order)  # refuses before anything is written
    dest.mkdir(parents=True, exist_ok=False)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_side_files(handle, dest)
    mapping = rename_map(handle.names(), layout, order)
    write_shards(dest, [from_handle(handle, old, new) for old, new in mapping.items() if new is not None])
    return dest


def _copy_side_files(handle, dest: Path) -> None:
    local = handle.local_dir()
    if isinstance(local, Path) or Path(str(local)).is_dir():
        for f in Path(local).iterdir():
            if f.is_file() and f.name in TOKENIZER_FILES:
                shutil.copy2(f, dest / f.name)
        return
    for name in TOKENIZER_FILES:
        text = handle.read_text(name)
        if text is not None:
            (dest / name).write_text(text)


def mean_loss(model, batches: list[Batch]) -> float | None:
    """Mean next-token cross-entropy over the batches' real positions (padding and last positions excluded)."""
    if isinstance(model, StreamedModel):
        if model.head is None:
            return None
    elif not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return None
    total, n = nll_total(model, batches)
    return total / max(n, 1)


def nll_total(model, batches: list[Batch]) -> tuple[float, int]:
    """Summed next-token NLL (nats) of whole forwards over the batches' loss positions, and their count.

    ``model``: a transformers model, or a :class:`lmsurgeon.streaming.StreamedModel` (a checkpoint larger than
    the memory budget, its blocks read one at a time), whose per-token NLL covers the same positions."""
    total, n = 0.0, 0
    with torch.inference_mode():
        for b in batches:
            sel = b.loss_sel
            if isinstance(model, StreamedModel):
                per_token = model.nll(b.input_ids, b.attention_mask)  # column t: token t+1; NaN off the text
                total += float(per_token[sel[:, :-1]].double().sum())
            else:
                logits = model(**b.inputs(), use_cache=False).logits.float()
                logp = torch.log_softmax(logits[sel], dim=-1)
                total += float(-logp.gather(1, b.targets[sel][:, None]).double().sum())
            n += int(sel.sum())
    return total, n


def load_rewired(dest: Path, kind: str, dtype, device, like=None):
    """The written model back: with transformers, or streamed within the same budget when the model it was
    written from streams (``like``, a :class:`StreamedModel`), so that checking a rewritten 100B-class model
    needs no more memory than analysing it did."""
    from lmsurgeon.io import open_model

    if isinstance(like, StreamedModel):
        return StreamedModel(
            open_model(dest), kind=kind, dtype=dtype, device=device, max_memory=like.plan.budget, mode="stream"
        )
    return open_model(dest).load_model(kind, dtype=dtype, device=device)


@contextlib.contextmanager
def set_aside(model) -> Iterator[None]:
    """While another model is read: a streamed model's resident embedding, final norm and head are freed, and read
    again afterwards (its cached blocks stay); the rewritten model then has the room the budget planned for."""
    if not isinstance(model, StreamedModel):
        yield
        return
    kept = sorted((s for s in model.resident if isinstance(s, str)), key=str)
    model.release(kept)
    try:
        yield
    finally:
        model.load(kept)


def apply_and_evaluate(
    handle,
    layout,
    run_dir: Path,
    batches: list[Batch],
    kind: str,
    dtype,
    device,
    swap: int | None = None,
    drop: int | None = None,
    model=None,
) -> dict:
    """Write swap_i_{i+1}/ and/or drop_i/ under the run folder; load each back and measure eval perplexity.

    ``model``: the base as analysed (a :class:`StreamedModel` when it streams; the rewritten models then stream
    within the same budget, one at a time)."""
    base = model if model is not None else handle.load_model(kind, dtype=dtype, device=device)
    before = mean_loss(base, batches)
    out = {"loss_before": before, "ppl_before": _ppl(before), "results": []}
    jobs = (
        [("swap", swap, f"swap_{swap}_{swap + 1}", f"layers {swap} and {swap + 1} exchanged")]
        if swap is not None
        else []
    )
    jobs += [("drop", drop, f"drop_{drop}", f"layer {drop} removed")] if drop is not None else []
    for what, i, folder, desc in jobs:
        order = new_order(layout.n_layers, swap=i if what == "swap" else None, drop=i if what == "drop" else None)
        dest = write_rewired(handle, layout, Path(run_dir) / folder, order)
        with set_aside(base):
            rewired = load_rewired(dest, kind, dtype, device, like=base)
            after = mean_loss(rewired, batches)
            del rewired
        out["results"].append(
            {
                "kind": what,
                "i": i,
                "path": folder,
                "description": desc,
                "order": order,
                "n_layers": len(order),
                "loss_after": after,
                "ppl_after": _ppl(after),
                "dloss": None if after is None or before is None else after - before,
            }
        )
    first = out["results"][0]
    out.update(
        {
            "path": first["path"],
            "description": first["description"],
            "loss_after": first["loss_after"],
            "ppl_after": first["ppl_after"],
        }
    )
    return out


def _ppl(loss: float | None) -> float | None:
    return float(np.exp(loss)) if loss is not None else None


def resolve_plan(spec: str, body: dict, n_layers: int) -> tuple[list[int], list[int], str]:
    """``--apply-plan`` → (layers to drop, pairs to swap, where the plan came from); indices are original, 0-based.

    ``recommended`` / ``oracle``: the plan at the largest k of ``--plan-drop``; ``reorder``: the composition of
    swaps ``--plan-reorder`` chose; otherwise ``drop:3,5;swap:7`` (either part optional).
    """
    text = spec.strip()
    if text in ("recommended", ORACLE):
        if "plans" not in body:
            raise LmsurgeonError(f"--apply-plan {text} needs --plan-drop")
        if text == "recommended":
            rec = body["recommended"][-1]
            return list(rec["layers"]), [], f"recommended at k = {rec['k']} ({rec['strategy']})"
        k = body["plan_summary"]["k_max"]
        row = next(r for r in body["plans"] if r["strategy"] == ORACLE and r["k"] == k)
        return list(row["layers"]), [], f"oracle at k = {k}"
    if text == "reorder":
        chosen = (body.get("reorder") or {}).get("chosen")
        if chosen is None:
            raise LmsurgeonError("--apply-plan reorder needs --plan-reorder to have found a swap within tolerance")
        return [], list(chosen["swaps"]), "reorder plan"
    drops: list[int] = []
    swaps: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        what, _, numbers = part.partition(":")
        try:
            values = [int(v) for v in numbers.split(",") if v.strip()]
        except ValueError:
            values = None
        if what.strip() not in ("drop", "swap") or not values:
            raise LmsurgeonError(
                f"--apply-plan {spec!r}: expected 'recommended', 'oracle', 'reorder' or 'drop:3,5;swap:7'"
            )
        (drops if what.strip() == "drop" else swaps).extend(values)
    for i in drops:
        _check(0 <= i < n_layers, f"--apply-plan drops layer {i}, outside 0…{n_layers - 1}")
    for i in swaps:
        _check(0 <= i < n_layers - 1, f"--apply-plan swaps pair {i}, outside 0…{n_layers - 2}")
    _check(len(set(drops)) == len(drops), "--apply-plan drops a layer twice")
    _check(len(drops) < n_layers, "--apply-plan would drop every layer")
    return sorted(drops), swaps, "given"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LmsurgeonError(message)


def plan_folder(drops: list[int], swaps: list[int]) -> str:
    parts = (["drop", *map(str, drops)] if drops else []) + (["swap", *map(str, swaps)] if swaps else [])
    return "plan_" + "_".join(parts) if parts else "plan_identity"


def apply_plan(
    handle, layout, run_dir: Path, body: dict, cfg, evaluators, kind: str, dtype, fit_batches, streamed=None
) -> dict:
    """Write the plan's model, load it back with transformers, and check it: held-out loss of whole forwards
    against the cached-input estimate, greedy generation with the KV cache against uncached argmax decoding,
    and (``--heal-steps``) held-out loss before and after training the layers next to each cut.

    ``streamed``: the run's base streams (:class:`StreamedModel`); the written model is then checked streamed
    within the same budget, and the generation check, which needs transformers' KV cache over the whole model in
    memory, is not run (``cached_equals_uncached`` is None, with the reason)."""
    L = layout.n_layers
    drops, swaps, source = resolve_plan(cfg.apply_plan, body, L)
    order = plan_order(L, drops, swaps)
    folder = plan_folder(drops, swaps)
    dest = write_rewired(handle, layout, Path(run_dir) / folder, order)
    heldout = evaluators[1]
    cached = heldout.scores([order])[0]
    before = heldout.scores([list(range(L))])[0].loss
    with set_aside(streamed):
        rewired = load_rewired(dest, kind, dtype, cfg.device, like=streamed)
        total, n = nll_total(rewired, heldout.batches)
        generation = (
            generation_check(rewired, heldout.batches[0])
            if streamed is None
            else {
                "cached_equals_uncached": None,
                "not_run": "the model streams: transformers' cached generation needs the whole model in memory",
            }
        )
        healed = None
        if cfg.heal_steps > 0:  # refused up front for a streamed model
            layers = find_module(rewired, layout.family.modules["layers"])
            healed_dir = Path(run_dir) / f"{folder}_healed"
            healed = heal(rewired, layers, order, L, fit_batches, heldout, cfg.heal_steps, healed_dir, dest)
        del rewired  # a streamed one's resident tables go before the base's are read again
    out = {
        "path": folder,
        "source": source,
        "drops": drops,
        "swaps": swaps,
        "order": order,
        "n_layers": len(order),
        "heldout_loss": total / max(n, 1),
        "heldout_bpb": bits_per_byte(total, heldout.n_bytes),
        "heldout_loss_from_cache": cached.loss,
        "heldout_loss_before": before,
        "generation": generation,
    }
    if healed is not None:
        out["heal"] = healed
    return out


def generation_check(model, batch: Batch, prompt_len: int = 16, new_tokens: int = 16) -> dict:
    """Greedy ``generate`` with the KV cache vs argmax decoding by whole uncached forwards, on one prompt."""
    n = min(prompt_len, int(batch.attention_mask[0].sum()))
    prompt = batch.input_ids[:1, :n]
    with torch.inference_mode():
        gen = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
        seq = prompt
        for _ in range(new_tokens):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return {"prompt_tokens": n, "new_tokens": new_tokens, "cached_equals_uncached": bool(torch.equal(gen, seq))}


def heal(
    model,
    layers,
    order: list[int],
    n_layers: int,
    fit_batches: list[Batch],
    heldout,
    steps: int,
    dest: Path,
    source: Path,
    lr: float = 1e-4,
) -> dict:
    """Continued training of the layers next to each cut (the new positions around a removed layer, and both
    layers of a swapped pair) on the fit text; everything else frozen. Saves the healed model to ``dest``."""
    trained = sorted(p for p in cut_neighbours(order, n_layers) if 0 <= p < len(layers))
    before_total, n = nll_total(model, heldout.batches)
    for param in model.parameters():
        param.requires_grad_(False)
    params = [q for p in trained for q in layers[p].parameters()]
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        b = fit_batches[step % len(fit_batches)]
        labels = b.input_ids.masked_fill(~b.attention_mask.bool(), -100)
        loss = model(**b.inputs(), labels=labels, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for q in params:
        q.requires_grad_(False)
    after_total, _ = nll_total(model, heldout.batches)
    model.save_pretrained(dest, safe_serialization=True)
    for f in Path(source).iterdir():
        if f.name in TOKENIZER_FILES and not (dest / f.name).exists():
            shutil.copy2(f, dest / f.name)
    return {
        "steps": steps,
        "lr": lr,
        "trained_layers": trained,
        "path": dest.name,
        "heldout_loss_before": before_total / max(n, 1),
        "heldout_loss_after": after_total / max(n, 1),
        "heldout_bpb_before": bits_per_byte(before_total, heldout.n_bytes),
        "heldout_bpb_after": bits_per_byte(after_total, heldout.n_bytes),
    }


def cut_neighbours(order: list[int], n_layers: int) -> set[int]:
    """New positions on both sides of every joint where the original order breaks (a removed layer between
    them, or a moved layer); −1 and len(order) stand for the embedding and the head side."""
    out = set()
    for p in range(len(order) + 1):
        prev = order[p - 1] if p > 0 else -1
        nxt = order[p] if p < len(order) else n_layers
        if nxt != prev + 1:  # a gap (dropped layers) or a jump (reordered) between positions p−1 and p
            out.update({p - 1, p})
    return out
