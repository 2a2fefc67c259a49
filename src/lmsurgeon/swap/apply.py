"""``--apply i`` / ``--drop i``: write a rewired checkpoint that ``transformers`` loads as is (spec §11, §12).

Layer tensors are renamed through the registry's layer template (``layers.{i}.``), so no per-family code is
needed; ``num_hidden_layers`` and every per-layer config list (``layer_types``: sliding vs full attention) are
permuted or cut the same way, so each block keeps its attention type where it moves. ``layer_idx`` is derived
from the position when transformers builds the model, which re-indexes the KV cache slots. Families that derive
a layer's behaviour from its index alone (GPT-2's ``scale_attn_by_inverse_layer_idx``) are refused.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.swap.engine import Batch

SHARD_BYTES = 4 << 30
INDEX_LISTS = ("mlp_only_layers",)  # config lists that hold layer indices rather than one value per layer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "vocab.txt", "tokenizer.model", "generation_config.json", "added_tokens.json")


def new_order(n_layers: int, swap: int | None = None, drop: int | None = None) -> list[int]:
    """order[k] = the old layer that becomes layer k."""
    order = list(range(n_layers))
    if swap is not None:
        order[swap], order[swap + 1] = order[swap + 1], order[swap]
    if drop is not None:
        order.remove(drop)
    return order


def rewire_config(config: dict, layout, order: list[int]) -> dict:
    """A copy of config.json for the new layer order (text sub-config edited where the family nests it)."""
    L = layout.n_layers
    cfg = json.loads(json.dumps(config))
    text = layout.family.text_config(cfg)
    if text.get("scale_attn_by_inverse_layer_idx"):
        raise LmsurgeonError("scale_attn_by_inverse_layer_idx ties each GPT-2 block's attention scale to its index;"
                             " a moved block would compute something else, so the rewiring is refused")
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
    pat = re.compile("^(" + re.escape(layout.prefix) + re.escape(layout.family.layer_prefix)
                     .replace(r"\{i\}", r")(\d+)(") + ")(.*)$")
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


def _raw(handle, name: str) -> torch.Tensor:
    """A tensor in its stored dtype (bf16 stays bf16)."""
    info = handle.info(name)
    if not info.shape:
        return torch.tensor(handle.tensor(name, np.float64).item()).to(_dtype(info.dtype))
    return handle._read_rows(info, 0, info.shape[0]).clone()  # noqa: SLF001 - io's row reader keeps the dtype


def _dtype(name: str) -> torch.dtype:
    from lmsurgeon.io.model import TORCH_DTYPES

    return TORCH_DTYPES[name]


def write_rewired(handle, layout, dest: Path, order: list[int]) -> Path:
    """Write config, tokenizer files and renamed safetensors shards of the rewired model into ``dest``."""
    from safetensors.torch import save_file

    config = rewire_config(handle.config, layout, order)  # refuses before anything is written
    dest.mkdir(parents=True, exist_ok=False)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_side_files(handle, dest)
    mapping = rename_map(handle.names(), layout, order)
    kept = [(old, new) for old, new in mapping.items() if new is not None]
    shards, cur, size = [], {}, 0
    for old, new in kept:
        t = _raw(handle, old).contiguous()
        if cur and size + t.numel() * t.element_size() > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[new] = t
        size += t.numel() * t.element_size()
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(dest / "model.safetensors"), metadata={"format": "pt"})
        return dest
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dest / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
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
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return None
    total, n = 0.0, 0
    with torch.inference_mode():
        for b in batches:
            logits = model(**b.inputs(), use_cache=False).logits.float()
            sel = b.loss_sel
            logp = torch.log_softmax(logits[sel], dim=-1)
            total += float(-logp.gather(1, b.targets[sel][:, None]).double().sum())
            n += int(sel.sum())
    return total / max(n, 1)


def apply_and_evaluate(handle, layout, run_dir: Path, batches: list[Batch], kind: str, dtype, device,
                       swap: int | None = None, drop: int | None = None, model=None) -> dict:
    """Write swap_i_{i+1}/ and/or drop_i/ under the run folder; load each back and measure eval perplexity."""
    from lmsurgeon.io import open_model

    base = model if model is not None else handle.load_model(kind, dtype=dtype, device=device)
    before = mean_loss(base, batches)
    out = {"loss_before": before, "ppl_before": _ppl(before), "results": []}
    jobs = ([("swap", swap, f"swap_{swap}_{swap + 1}", f"layers {swap} and {swap + 1} exchanged")]
            if swap is not None else [])
    jobs += [("drop", drop, f"drop_{drop}", f"layer {drop} removed")] if drop is not None else []
    for what, i, folder, desc in jobs:
        order = new_order(layout.n_layers, swap=i if what == "swap" else None, drop=i if what == "drop" else None)
        dest = write_rewired(handle, layout, Path(run_dir) / folder, order)
        rewired = open_model(dest).load_model(kind, dtype=dtype, device=device)
        after = mean_loss(rewired, batches)
        out["results"].append({"kind": what, "i": i, "path": folder, "description": desc, "order": order,
                               "n_layers": len(order), "loss_after": after, "ppl_after": _ppl(after),
                               "dloss": None if after is None or before is None else after - before})
        del rewired
    first = out["results"][0]
    out.update({"path": first["path"], "description": first["description"], "loss_after": first["loss_after"],
                "ppl_after": first["ppl_after"]})
    return out


def _ppl(loss: float | None) -> float | None:
    return float(np.exp(loss)) if loss is not None else None
