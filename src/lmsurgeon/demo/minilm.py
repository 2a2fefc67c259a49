"""Lineage cases made from the real all-MiniLM-L6-v2: a fine-tuned, a hidden-unit-permuted and a layer-pruned copy.

The zoo's models are small and trained here; these copies carry a real pretrained model through the same
transformations, so the lineage verdict is shown on weights nobody in this project chose. They are cached by
a hash of the recipe below and MiniLM's own header, so the demo makes them once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from lmsurgeon.io import open_model
from lmsurgeon.io.model import minilm_path
from lmsurgeon.io.stores import cache_root
from lmsurgeon.report.progress import stage, task
from lmsurgeon.report.runfolder import atomic_write_json

RECIPE = {
    "format": 1,
    "finetune_steps": 120,
    "lr": 1e-4,
    "batch": 8,
    "seq_len": 64,
    "mask_rate": 0.15,
    "permute_seed": 11,
    "drop_layers": [2, 4],
    "seed": 0,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
COPIES = ("minilm-finetuned", "minilm-permuted", "minilm-pruned")


def derived_dir() -> Path:
    """Keyed by content only (no paths or mtimes), so every install of the same MiniLM shares the copies."""
    weights = minilm_path() / "model.safetensors"
    with weights.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = hashlib.sha256(f.read(min(n, 1 << 24))).hexdigest()
    config = hashlib.sha256((minilm_path() / "config.json").read_bytes()).hexdigest()
    key = json.dumps({"recipe": RECIPE, "weights": [weights.stat().st_size, header], "config": config}, sort_keys=True)
    return cache_root() / "minilm-derived" / hashlib.sha256(key.encode()).hexdigest()[:12]


def ensure_minilm_copies(progress: bool = False) -> dict[str, Path]:
    """``{name: folder}`` of the three derived copies, made (about half a minute on a CPU) if not cached."""
    root = derived_dir()
    folders = {name: root / name for name in COPIES}
    if all((f / "model.safetensors").is_file() for f in folders.values()):
        return folders
    from transformers import AutoModel

    from lmsurgeon.io.model import quiet_transformers

    torch.manual_seed(RECIPE["seed"])
    with quiet_transformers():
        base = AutoModel.from_pretrained(str(minilm_path())).eval()
    makers = {
        "minilm-finetuned": lambda: finetune_mlm(base, progress),
        "minilm-permuted": lambda: permuted(base),
        "minilm-pruned": lambda: pruned(base),
    }
    for name, make in makers.items():
        if not (folders[name] / "model.safetensors").is_file():
            stage(f"demo: make {name}")
            model, facts = make()
            with quiet_transformers():
                save_copy(model, folders[name], {"parent": "minilm", "transform": name.split("-")[1], **facts})
    return folders


def save_copy(model, folder: Path, facts: dict) -> None:
    """Save a model folder with MiniLM's tokenizer, renamed into place only when complete."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in TOKENIZER_FILES:
        if (minilm_path() / f).is_file():
            shutil.copy(minilm_path() / f, tmp / f)
    atomic_write_json(tmp / "lineage.json", facts)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def finetune_mlm(base, progress: bool = False):
    """Masked-LM fine-tuning of every encoder weight, predicting tokens through the tied word embeddings."""
    import copy

    from lmsurgeon.data import load_texts

    model = copy.deepcopy(base).train()
    tok = open_model("minilm").tokenizer
    batches = token_batches(tok, load_texts(None, "train"), RECIPE["batch"], RECIPE["seq_len"])
    mask_id = tok.token_to_id("[MASK]")
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"])
    gen = torch.Generator().manual_seed(RECIPE["seed"])
    steps, losses = RECIPE["finetune_steps"], []
    with task("fine-tune MiniLM", steps, progress) as advance:
        for step in range(steps):
            ids = batches[step % len(batches)]
            masked = (torch.rand(ids.shape, generator=gen) < RECIPE["mask_rate"]) & (ids > 103)
            inputs = ids.masked_fill(masked, mask_id)
            hidden = model(input_ids=inputs).last_hidden_state
            logits = hidden[masked] @ model.embeddings.word_embeddings.weight.T
            loss = torch.nn.functional.cross_entropy(logits, ids[masked])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            advance(step + 1)
    return model.eval(), {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1]}


def token_batches(tok, texts: list[str], batch: int, seq_len: int) -> list[torch.Tensor]:
    """Fixed-length windows of the tokenised corpus, ``[CLS] ... [SEP]``, grouped into batches."""
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    stream: list[int] = []
    for text in texts[:4000]:
        stream += tok.encode(text, add_special_tokens=False).ids
    body = seq_len - 2
    windows = [[cls, *stream[i : i + body], sep] for i in range(0, len(stream) - body, body)]
    n = len(windows) // batch * batch
    return [torch.tensor(windows[i : i + batch]) for i in range(0, n, batch)]


def permuted(base):
    """Residual and FFN hidden units permuted (function unchanged, checked on a sentence)."""
    from lmsurgeon.zoo.transforms import permute_model

    model, _ = permute_model(base, RECIPE["permute_seed"])
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        a, b = base(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
    order = _residual_order(base, model)
    err = float((a[..., order] - b).abs().max() / a.abs().max())
    return model, {"permute_seed": RECIPE["permute_seed"], "max_relative_output_change": err}


def _residual_order(base, model) -> torch.Tensor:
    """The residual permutation, recovered from the (permuted) word-embedding columns."""
    a = base.embeddings.word_embeddings.weight[:200].T
    b = model.embeddings.word_embeddings.weight[:200].T
    return torch.cdist(b, a).argmin(dim=1)


def pruned(base):
    from lmsurgeon.zoo.transforms import prune_model

    return prune_model(base, RECIPE["drop_layers"]), {"dropped_layers": RECIPE["drop_layers"]}
