"""Reading a built zoo: its manifest, its models through transformers, and a perplexity recomputed from disk.

Everything here goes through the files a user would use (``from_pretrained`` on the model folder), so a
recomputed perplexity that matches ``zoo.json`` shows the folder, not just the build's memory, is right.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmsurgeon.data.corpus import load_corpus
from lmsurgeon.errors import CorruptCheckpoint, SourceNotFound
from lmsurgeon.io.model import quiet_transformers
from lmsurgeon.zoo.tokenizers import load_tokenizer
from lmsurgeon.zoo.training import encode_stream, perplexity

MANIFEST = "zoo.json"


def read_manifest(zoo_dir: str | Path) -> dict:
    """The parsed ``zoo.json`` of a built zoo."""
    path = Path(zoo_dir).expanduser() / MANIFEST
    if not path.is_file():
        raise SourceNotFound("no zoo.json: not a built zoo (run `lmsurgeon zoo build`)", path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CorruptCheckpoint(f"unreadable manifest ({err})", path) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), dict):
        raise CorruptCheckpoint("manifest has no 'models' table", path)
    return manifest


def model_dir(zoo_dir: str | Path, name: str, manifest: dict | None = None) -> Path:
    """The folder of model ``name``."""
    manifest = manifest or read_manifest(zoo_dir)
    if name not in manifest["models"]:
        raise SourceNotFound(f"no model {name!r} in this zoo; it has {', '.join(manifest['models'])}", zoo_dir)
    return Path(zoo_dir).expanduser() / manifest["models"][name]["path"]


def load_model(zoo_dir: str | Path, name: str):
    """``(model, tokenizer)`` of one zoo model, loaded offline by transformers, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_dir(zoo_dir, name)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model.eval(), tokenizer


def recompute_perplexity(zoo_dir: str | Path, name: str) -> float:
    """Validation perplexity of a model loaded from its folder, evaluated exactly as the build did."""
    manifest = read_manifest(zoo_dir)
    folder = model_dir(zoo_dir, name, manifest)
    entry, settings = manifest["models"][name], manifest["eval"]
    eos_id = entry.get("eos_id", manifest["tokenizers"][entry["tokenizer"]]["eos_id"])  # own vocabulary: own id
    stream = encode_stream(load_tokenizer(folder), load_corpus().split(settings["split"]), eos_id)
    if settings["max_tokens"]:
        stream = stream[: settings["max_tokens"]]
    model, _ = load_model(zoo_dir, name)
    return perplexity(model, stream, settings["seq_len"])
