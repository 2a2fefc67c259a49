"""``build_zoo``: train the zoo's tokenizers and models into Hugging Face folders, resumably and reproducibly.

Every tokenizer and model folder is written into a temporary sibling and renamed into place, carrying a
marker with the recipe hash, so an interrupted build resumes where it stopped and never leaves a half-written
model under a real name. ``zoo.json`` is written last: its presence with the right hash means "complete", and
``build_zoo`` then returns at once. A lock file keeps two processes (pytest-xdist workers, say) from
building the same folder at the same time.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

import lmsurgeon
from lmsurgeon.data.cache import cache_dir, write_atomic
from lmsurgeon.data.corpus import Corpus, load_corpus
from lmsurgeon.errors import LmsurgeonError, OutputExists
from lmsurgeon.io.model import quiet_transformers
from lmsurgeon.zoo.adversarial import CASES
from lmsurgeon.zoo.manifest import MANIFEST, read_manifest
from lmsurgeon.zoo.models import count_params, make_config, new_model
from lmsurgeon.zoo.progress import Bars, bars
from lmsurgeon.zoo.recipe import (
    DOMAIN_SPLIT,
    MAX_POSITIONS,
    ZOO_CODE_VERSION,
    ModelRecipe,
    Recipe,
    build_recipe,
    domain_texts,
    recipe_hash,
)
from lmsurgeon.zoo.tokenizers import load_tokenizer, save_tokenizer, train_tokenizer
from lmsurgeon.zoo.training import TrainPlan, deterministic, encode_stream, perplexity, train
from lmsurgeon.zoo.transforms import fold_model, logit_discrepancy, moved_fraction, permute_model, prune_model

log = logging.getLogger(__name__)

MARKER = "lmsurgeon-zoo.json"
TOKENIZER_DIR = "tokenizers"
LOCK = ".zoo.lock"
MANIFEST_FORMAT = 1
FUNCTION_TOLERANCE = 1e-4  # max relative logit change a function-preserving transform may cause
EVAL_SPLIT = "validation"


def default_zoo_dir(profile: str = "full", seed: int = 0) -> Path:
    """``<cache>/zoo/<profile>-<recipe hash>``: a new recipe (or corpus, or code version) gets a new folder."""
    digest = recipe_hash(build_recipe(profile, seed), load_corpus().sha256)
    return cache_dir("zoo") / f"{profile}-{digest[:12]}"


def ensure_zoo(profile: str = "test", seed: int = 0, progress: bool = False) -> tuple[Path, dict]:
    """``(folder, manifest)`` of the zoo in the cache, built there first if it is not complete yet."""
    folder = default_zoo_dir(profile, seed)
    return folder, build_zoo(folder, profile=profile, seed=seed, progress=progress)


def build_zoo(
    out_dir: str | Path, profile: str = "full", seed: int = 0, progress: bool = True, force: bool = False
) -> dict:
    """Build (or resume, or reuse) the zoo of ``profile`` in ``out_dir`` and return its manifest.

    ``force`` deletes the zoo files already in ``out_dir`` and starts over; without it a folder holding a
    zoo of another recipe, or files that are not a zoo's, raises ``OutputExists``.
    """
    started = time.monotonic()
    corpus = load_corpus()
    recipe = build_recipe(profile, seed)
    digest = recipe_hash(recipe, corpus.sha256)
    out = Path(out_dir).expanduser()
    if not force and (done := complete_manifest(out, digest)) is not None:
        return done
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        if not force and (done := complete_manifest(out, digest)) is not None:
            return done
        _prepare(out, recipe, digest, force)
        with deterministic(seed), bars(progress) as progress_bars:
            build = _Build(out, recipe, digest, corpus, _device(), progress_bars)
            build.run()
        manifest = _manifest(build, time.monotonic() - started)
        write_atomic(out / MANIFEST, json.dumps(manifest, indent=2))
    log.info("%s: zoo %s complete in %.0f s", out, profile, manifest["build_seconds"])
    return manifest


def complete_manifest(out: Path, digest: str) -> dict | None:
    """The manifest of ``out`` if it is a complete zoo of recipe ``digest``, else None."""
    try:
        manifest = read_manifest(out)
    except LmsurgeonError:
        return None
    if manifest.get("recipe_hash") != digest:
        return None
    folders = [out / entry["path"] for entry in manifest["models"].values()]
    return (
        manifest
        if all((f / "config.json").is_file() and (f / "model.safetensors").is_file() for f in folders)
        else None
    )


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``out`` (POSIX); elsewhere builds simply are not serialised."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(out / LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare(out: Path, recipe: Recipe, digest: str, force: bool) -> None:
    """Clear leftovers of crashed builds; refuse (or, with ``force``, delete) what would be overwritten."""
    ours = {MANIFEST, TOKENIZER_DIR, *(m.name for m in recipe.models)}
    for leftover in sorted((out / TOKENIZER_DIR).glob(".*.tmp-*")):
        _remove(leftover)
    for child in sorted(out.iterdir()):
        if child.name == LOCK:
            continue
        if child.name.startswith(".") and ".tmp-" in child.name:
            _remove(child)
        elif child.name not in ours:
            raise OutputExists(f"holds {child.name!r}, which is not part of a zoo; use an empty folder", out)
        elif force:
            _remove(child)
        elif child.name == MANIFEST and read_manifest(out).get("recipe_hash") != digest:
            raise OutputExists("holds a zoo built from another recipe; pass --force to rebuild it", out)
        elif child.is_dir() and child.name != TOKENIZER_DIR and not (child / MARKER).is_file():
            raise OutputExists(f"{child.name}/ is not a zoo model folder; use an empty folder", out)


def _remove(path: Path) -> None:
    """Delete a file or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _device() -> torch.device:
    """CUDA when there is one (faster, but not bit-identical to a CPU build), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _read_marker(folder: Path, digest: str) -> dict | None:
    """The manifest entry a completed folder carries, if it was built from recipe ``digest``."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker.get("entry") if marker.get("recipe_hash") == digest else None


def _publish(final: Path, digest: str, entry: dict, write: Callable[[Path], None]) -> None:
    """Write a folder via a temporary sibling and rename it into place, marker included."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        _remove(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    write_atomic(tmp / MARKER, json.dumps({"recipe_hash": digest, "entry": entry}, indent=2))
    if final.exists():
        _remove(final)
    os.replace(tmp, final)


@dataclass
class _Build:
    """The state of one build: where, what, and the tokenizers, streams and parent models made so far."""

    out: Path
    recipe: Recipe
    digest: str
    corpus: Corpus
    device: torch.device
    bars: Bars
    tokenizers: dict[str, dict] = field(default_factory=dict)
    entries: dict[str, dict] = field(default_factory=dict)
    _raw: dict[str, Tokenizer] = field(default_factory=dict)
    _streams: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    _models: dict[str, torch.nn.Module] = field(default_factory=dict)
    _own_vocabulary: dict[str, tuple[Tokenizer, torch.Tensor]] = field(default_factory=dict)

    def run(self) -> None:
        """Tokenizers first, then models in recipe order (parents before children)."""
        for spec in self.recipe.tokenizers:
            self.tokenizers[spec.name] = self._tokenizer(spec)
        for recipe in self.recipe.models:
            self.entries[recipe.name] = self._model(recipe)

    # ---------------------------------------------------------------------------------------- tokenizers

    def _tokenizer(self, spec) -> dict:
        """Train (or reuse) one tokenizer folder; streams are always encoded with the saved tokenizer.json."""
        folder = self.out / TOKENIZER_DIR / spec.name
        entry = _read_marker(folder, self.digest)
        if entry is None:
            log.info("training tokenizer %s", spec.name)
            tok = train_tokenizer(spec, self.corpus.split("train"))
            entry = {
                "path": f"{TOKENIZER_DIR}/{spec.name}",
                "kind": spec.kind,
                "vocab_size": tok.get_vocab_size(),
                "special_tokens": spec.special,
                "bos_id": tok.token_to_id(spec.special.get("bos_token", spec.special.get("cls_token"))),
                "eos_id": tok.token_to_id(spec.special.get("eos_token", spec.special.get("sep_token"))),
            }
            _publish(folder, self.digest, entry, lambda tmp: save_tokenizer(tok, spec, tmp, MAX_POSITIONS))
        self._raw[spec.name] = load_tokenizer(folder)
        return entry

    def _stream(self, tokenizer: str, split: str) -> torch.Tensor:
        """The token stream of one corpus split (validation capped at the recipe's evaluation budget)."""
        key = (tokenizer, split)
        if key not in self._streams:
            docs = domain_texts(self.corpus.split("train")) if split == DOMAIN_SPLIT else self.corpus.split(split)
            stream = encode_stream(self._raw[tokenizer], docs, self.tokenizers[tokenizer]["eos_id"])
            if split == EVAL_SPLIT and self.recipe.eval_tokens:
                stream = stream[: self.recipe.eval_tokens]
            self._streams[key] = stream
        return self._streams[key]

    def raw_tokenizer(self, name: str) -> Tokenizer:
        """The trained ``tokenizers`` object of tokenizer ``name``."""
        return self._raw[name]

    def set_vocabulary(self, recipe: ModelRecipe, tokenizer: Tokenizer, new_ids: torch.Tensor) -> None:
        """Give model ``recipe.name`` its own permuted tokenizer (old id t is ``new_ids[t]``): it trains and is
        evaluated on the permuted stream, and its folder receives that tokenizer instead of the shared one."""
        self._own_vocabulary[recipe.name] = (tokenizer, new_ids)

    def stream(self, recipe: ModelRecipe, split: str) -> torch.Tensor:
        """The token stream of ``split`` in the ids of ``recipe``'s model (its own vocabulary if it has one)."""
        stream = self._stream(recipe.tokenizer, split)
        own = self._own_vocabulary.get(recipe.name)
        return stream if own is None else own[1][stream]

    def windows(self, recipe: ModelRecipe, split: str, n: int) -> torch.Tensor:
        """The first ``n`` consecutive ``seq_len`` windows [n, seq_len] of ``split`` in the model's ids."""
        return self.stream(recipe, split)[: n * self.recipe.seq_len].view(n, -1).to(self.device)

    def val_ppl(self, model: torch.nn.Module, recipe: ModelRecipe) -> float:
        """Validation perplexity, exactly as ``recompute_perplexity`` computes it from disk."""
        return perplexity(model, self.stream(recipe, EVAL_SPLIT), self.recipe.seq_len)

    # ---------------------------------------------------------------------------------------- models

    def _model(self, recipe: ModelRecipe) -> dict:
        """Make, evaluate and publish one model, or reuse its completed folder."""
        folder = self.out / recipe.name
        entry = _read_marker(folder, self.digest)
        if entry is not None:
            log.info("reusing %s", folder)
            return entry
        started = time.monotonic()
        maker = CASES[recipe.case] if recipe.case is not None else MAKERS[recipe.transformation]
        model, facts = maker(self, recipe)
        entry = self._entry(recipe, model, facts, time.monotonic() - started)
        _publish(folder, self.digest, entry, lambda tmp: self._save(model, recipe, tmp))
        if any(recipe.name in (r.parent, r.relative_to) for r in self.recipe.models):
            self._models[recipe.name] = model
        log.info("%s: val ppl %.2f -> %.2f", recipe.name, entry["initial_val_ppl"], entry["final_val_ppl"])
        return entry

    def parent(self, recipe: ModelRecipe) -> torch.nn.Module:
        """The parent model: from memory, or from its completed folder when the build was resumed."""
        if recipe.parent is None:
            raise LmsurgeonError(f"{recipe.name} has no parent", self.out)
        return self.model(recipe.parent)

    def model(self, name: str) -> torch.nn.Module:
        """An earlier model of this build: from memory, or from its completed folder when the build was resumed."""
        if name not in self._models:
            from transformers import AutoModelForCausalLM

            with quiet_transformers():
                loaded = AutoModelForCausalLM.from_pretrained(
                    str(self.out / name), dtype=torch.float32, local_files_only=True
                )
            self._models[name] = loaded.to(self.device).eval()
        return self._models[name]

    def fresh(self, recipe: ModelRecipe) -> torch.nn.Module:
        """A newly initialised model of the recipe's architecture over its tokenizer's vocabulary."""
        tok = self.tokenizers[recipe.tokenizer]
        config = make_config(recipe.arch, tok["vocab_size"], tok["bos_id"], tok["eos_id"])
        return new_model(config, recipe.seed).to(self.device)

    def train(
        self, recipe: ModelRecipe, model: torch.nn.Module, steps: int | None = None, seed_offset: int = 0
    ) -> None:
        """Train in place for the recipe's steps (or ``steps``) on its split, with a progress bar; a second phase
        passes another ``seed_offset`` so it draws other windows."""
        steps = recipe.steps if steps is None else steps
        if steps == 0:
            return
        plan = TrainPlan(steps, recipe.batch, self.recipe.seq_len, recipe.lr, recipe.seed + seed_offset)
        with self.bars.task(recipe.name, steps) as on_step:
            train(model, self.stream(recipe, recipe.split), plan, on_step=on_step)

    def check_same_function(self, recipe: ModelRecipe, before, after, new_ids: torch.Tensor | None = None) -> float:
        """Relative logit change of a function-preserving transform on validation windows; must be ~0.

        ``new_ids`` maps ``before``'s token ids to ``after``'s when the transform permuted the vocabulary."""
        probe = self._stream(recipe.tokenizer, EVAL_SPLIT)[: 4 * self.recipe.seq_len].view(4, -1).to(self.device)
        error = logit_discrepancy(before, after, probe, new_ids)
        if error > FUNCTION_TOLERANCE:
            raise LmsurgeonError(
                f"{recipe.name}: the {recipe.transformation} transform changed the logits "
                f"(relative error {error:.2e} > {FUNCTION_TOLERANCE})",
                self.out,
            )
        return error

    def _save(self, model: torch.nn.Module, recipe: ModelRecipe, folder: Path) -> None:
        """Model weights and config plus a copy of the tokenizer files (or the model's own permuted tokenizer),
        ready for ``from_pretrained``."""
        with quiet_transformers():
            model.save_pretrained(str(folder))
        if recipe.name in self._own_vocabulary:
            tokenizer = self._own_vocabulary[recipe.name][0]
            save_tokenizer(tokenizer, self.recipe.tokenizer(recipe.tokenizer), folder, MAX_POSITIONS)
            return
        source = self.out / self.tokenizers[recipe.tokenizer]["path"]
        for file in sorted(source.iterdir()):
            if file.is_file() and file.name != MARKER:
                shutil.copy2(file, folder / file.name)

    def _entry(self, recipe: ModelRecipe, model: torch.nn.Module, facts: dict, seconds: float) -> dict:
        """The model's manifest entry: identity, lineage, shape, training and real validation perplexity."""
        config = model.config
        return {
            "name": recipe.name,
            "path": recipe.name,
            "family": recipe.arch.family,
            "architecture": type(model).__name__,
            "tokenizer": recipe.tokenizer,
            "parent": recipe.parent,
            "transformation": recipe.transformation,
            "description": recipe.description,
            "training_steps": recipe.steps,
            "train_split": recipe.split if recipe.steps else None,
            "learning_rate": recipe.lr,
            "batch_size": recipe.batch,
            "seq_len": self.recipe.seq_len,
            "seed": recipe.seed,
            "hidden_size": config.hidden_size,
            "layers": config.num_hidden_layers,
            "attention_heads": config.num_attention_heads,
            "kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
            "intermediate_size": recipe.arch.intermediate,
            "vocab_size": config.vocab_size,
            "tied_embeddings": bool(config.tie_word_embeddings),
            "params": count_params(model),
            **facts,
            "final_val_ppl": self.val_ppl(model, recipe),
            "build_seconds": round(seconds, 2),
        }


# -------------------------------------------------------------------------------------------- makers


def _scratch(build: _Build, recipe: ModelRecipe) -> tuple[torch.nn.Module, dict]:
    """Initialise from the recipe's seed and train on its split."""
    model = build.fresh(recipe)
    initial = build.val_ppl(model, recipe)
    build.train(recipe, model)
    return model, {"initial_val_ppl": initial}


def _finetune(build: _Build, recipe: ModelRecipe) -> tuple[torch.nn.Module, dict]:
    """Copy the parent and train every weight on another split; check that every tensor really moved."""
    parent = build.parent(recipe)
    model = copy.deepcopy(parent)
    initial = build.val_ppl(model, recipe)
    build.train(recipe, model)
    moved = moved_fraction(parent.state_dict(), model.state_dict())
    still = [name for name, fraction in moved.items() if fraction == 0.0]
    if still:
        raise LmsurgeonError(f"{recipe.name}: fine-tuning left {len(still)} tensors unchanged ({still[0]}, ...)")
    return model, {
        "initial_val_ppl": initial,
        "moved_fraction_min": min(moved.values()),
        "moved_fraction_mean": sum(moved.values()) / len(moved),
    }


def _permute(build: _Build, recipe: ModelRecipe) -> tuple[torch.nn.Module, dict]:
    """Permute residual dims and FFN units (checked function-preserving), then train lightly."""
    parent = build.parent(recipe)
    model, _ = permute_model(parent, recipe.seed)
    error = build.check_same_function(recipe, parent, model)
    initial = build.val_ppl(model, recipe)
    build.train(recipe, model)
    return model, {
        "initial_val_ppl": initial,
        "logit_rel_error_before_training": error,
        "permutation_seed": recipe.seed,
    }


def _prune(build: _Build, recipe: ModelRecipe) -> tuple[torch.nn.Module, dict]:
    """Drop the recipe's layers, renumber, then heal with light training."""
    model = prune_model(build.parent(recipe), recipe.drop)
    initial = build.val_ppl(model, recipe)
    build.train(recipe, model)
    return model, {"initial_val_ppl": initial, "dropped_layers": list(recipe.drop)}


def _gammafold(build: _Build, recipe: ModelRecipe) -> tuple[torch.nn.Module, dict]:
    """Fold every RMSNorm gain into the following linears (checked function-preserving); no training."""
    parent = build.parent(recipe)
    model = fold_model(parent)
    error = build.check_same_function(recipe, parent, model)
    return model, {"initial_val_ppl": build.val_ppl(model, recipe), "logit_rel_error": error}


MAKERS: dict[str, Callable[[_Build, ModelRecipe], tuple[torch.nn.Module, dict]]] = {
    "scratch": _scratch,
    "finetune": _finetune,
    "permute": _permute,
    "prune": _prune,
    "gammafold": _gammafold,
}


def _manifest(build: _Build, seconds: float) -> dict:
    """``zoo.json``: the recipe identity, provenance, corpus stats, evaluation settings, tokenizers, models."""
    import tokenizers
    import transformers

    return {
        "format": MANIFEST_FORMAT,
        "profile": build.recipe.profile,
        "seed": build.recipe.seed,
        "recipe_hash": build.digest,
        "code_version": ZOO_CODE_VERSION,
        "build_seconds": round(seconds, 1),
        "built_with": {
            "lmsurgeon": lmsurgeon.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "python": platform.python_version(),
            "device": str(build.device),
        },
        "corpus": build.corpus.stats(),
        "eval": {"split": EVAL_SPLIT, "seq_len": build.recipe.seq_len, "max_tokens": build.recipe.eval_tokens},
        "tokenizers": build.tokenizers,
        "models": build.entries,
    }
