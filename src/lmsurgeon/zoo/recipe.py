"""What the zoo contains, per profile: tokenizers, architectures, seeds and training lengths, and its hash.

Everything that changes a weight is in the recipe, and the recipe's hash (with the corpus sha256 and
``ZOO_CODE_VERSION``) names the build: a folder holding a zoo with the same hash is reused as it is.

Models (every profile has all of them; ``test`` is smaller and shorter):

* ``gpt2-bpe``: GPT-2 (tied head, LayerNorm, learned positions) on the byte-level BPE tokenizer.
* ``llama-sp``: Llama (RMSNorm, rotary, GQA, untied head), wider, on the SentencePiece-style tokenizer;
  with ``gpt2-bpe`` the pair for a cross-architecture, cross-tokenizer merge.
* ``deep-llama``: a deep narrow Llama (16 layers in both profiles) for layer-swap analysis.
* ``lin-base`` and its descendants ``lin-finetune`` (every weight moved, other data split), ``lin-permuted``
  (hidden units permuted, then lightly trained), ``lin-pruned`` (middle layers dropped, lightly healed) and
  ``lin-gammafold`` (norm gains folded into the linears; same function, no training).
* ``lin-indep-1..3``: same config, tokenizer and data as ``lin-base`` but other seeds: the hard negatives.
* ``gpt2-code``: GPT-2 (narrower than ``llama-sp``, byte-level BPE) trained only on the training documents
  with doctest code (``>>>``): the donor of the merge's domain scenario, where ``llama-sp`` (trained on all of
  the general text) is the base and :func:`domain_texts` gives the domain's search and held-out text.
* ``adv-*``: the adversarial family (methods.md §A7–§A11), cases made from ``gpt2-bpe`` and ``llama-sp`` to
  evade a lineage test (laundered, depth up-scaled, width-pruned, re-embedded, MoE-upcycled; truth derived) or
  to frame an innocent model (norm gains or the embedding pasted into an independent one; truth independent).
  Each entry of ``zoo.json`` carries ``kind: "adversarial"``, its case and its ground truth.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from lmsurgeon.zoo.tokenizers import TokenizerSpec, bytelevel_spec, sentencepiece_spec, wordpiece_spec

ZOO_CODE_VERSION = 2  # bump whenever a code change would change the weights a recipe produces or what it records
PROFILES = ("full", "test")
MAX_POSITIONS = 128  # context length of every zoo model (GPT-2's learned positions stop here)
DOMAIN_SPLIT = "domain"  # a model recipe's split: the train split's documents of the domain
DOMAIN_MARK = ">>>"  # the domain: standard-library docstrings with doctest code


def domain_texts(docs: list[str]) -> list[str]:
    """The documents of the zoo's domain (code examples in docstrings), in their order."""
    return [doc for doc in docs if DOMAIN_MARK in doc]


@dataclass(frozen=True)
class ArchSpec:
    """A decoder's shape; ``family`` is ``gpt2`` or ``llama``."""

    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tie: bool


@dataclass(frozen=True)
class ModelRecipe:
    """One zoo model: how it is made (from scratch or from ``parent``) and how long it trains."""

    name: str
    arch: ArchSpec
    tokenizer: str
    seed: int
    steps: int
    lr: float
    batch: int
    split: str = "train"
    parent: str | None = None
    transformation: str = "scratch"  # scratch | finetune | permute | prune | gammafold | adversarial
    drop: tuple[int, ...] = ()
    description: str = ""
    case: str | None = None  # adversarial family: the case (laundered, upscaled, ...), see zoo.adversarial
    relative_to: str | None = None  # adversarial family: the zoo model its ground truth is stated against
    truth: str | None = None  # adversarial family: "derived" or "independent" (relative to ``relative_to``)


@dataclass(frozen=True)
class Recipe:
    """A whole zoo: profile name, base seed, context length, evaluation budget, tokenizers, models in build
    order (parents before children)."""

    profile: str
    seed: int
    seq_len: int
    eval_tokens: int | None
    tokenizers: tuple[TokenizerSpec, ...]
    models: tuple[ModelRecipe, ...]

    def model(self, name: str) -> ModelRecipe:
        """The recipe of one model by name."""
        return next(m for m in self.models if m.name == name)

    def tokenizer(self, name: str) -> TokenizerSpec:
        """The spec of one tokenizer by name."""
        return next(t for t in self.tokenizers if t.name == name)


@dataclass(frozen=True)
class _Sizes:
    """The knobs that differ between profiles."""

    seq_len: int
    batch: int
    eval_tokens: int | None
    gpt2: ArchSpec
    llama: ArchSpec
    deep: ArchSpec
    lineage: ArchSpec
    pair_steps: int
    deep_steps: int
    lineage_steps: int
    finetune_steps: int
    light_steps: int
    drop: tuple[int, ...]
    adversarial_steps: int


_FULL = _Sizes(
    seq_len=128,
    batch=8,
    eval_tokens=None,
    gpt2=ArchSpec("gpt2", hidden=128, layers=4, heads=4, kv_heads=4, intermediate=512, tie=True),
    llama=ArchSpec("llama", hidden=192, layers=4, heads=6, kv_heads=2, intermediate=512, tie=False),
    deep=ArchSpec("llama", hidden=128, layers=16, heads=4, kv_heads=2, intermediate=256, tie=False),
    lineage=ArchSpec("llama", hidden=128, layers=4, heads=4, kv_heads=4, intermediate=256, tie=False),
    pair_steps=360,
    deep_steps=240,
    lineage_steps=280,
    finetune_steps=120,
    light_steps=40,
    drop=(2,),
    adversarial_steps=100,
)
_TEST = _Sizes(
    seq_len=64,
    batch=8,
    eval_tokens=4096,
    gpt2=ArchSpec("gpt2", hidden=64, layers=2, heads=2, kv_heads=2, intermediate=256, tie=True),
    llama=ArchSpec("llama", hidden=96, layers=2, heads=3, kv_heads=1, intermediate=256, tie=False),
    deep=ArchSpec("llama", hidden=64, layers=16, heads=2, kv_heads=1, intermediate=128, tie=False),
    lineage=ArchSpec("llama", hidden=64, layers=4, heads=2, kv_heads=2, intermediate=128, tie=False),
    pair_steps=150,
    deep_steps=120,
    lineage_steps=150,
    finetune_steps=50,
    light_steps=20,
    drop=(2,),
    adversarial_steps=20,
)
_SIZES = {"full": _FULL, "test": _TEST}
_TOKENIZERS = (bytelevel_spec("bpe4k", 4000), sentencepiece_spec("sp3k", 3000), wordpiece_spec("wp3500", 3500))


def _lineage(s: _Sizes, seed: int) -> list[ModelRecipe]:
    """``lin-base``, its four descendants and three independent twins (seeds ``seed+1..3``)."""
    base = ModelRecipe(
        "lin-base",
        s.lineage,
        "bpe4k",
        seed,
        s.lineage_steps,
        2e-3,
        s.batch,
        description="lineage root: Llama-style decoder trained from scratch",
    )
    light = {"steps": s.light_steps, "lr": 5e-4, "parent": "lin-base"}
    return [
        base,
        replace(
            base,
            name="lin-finetune",
            seed=seed + 20,
            steps=s.finetune_steps,
            lr=5e-4,
            split="train_b",
            parent="lin-base",
            transformation="finetune",
            description="full fine-tune of lin-base on the disjoint train_b split",
        ),
        replace(
            base,
            name="lin-permuted",
            seed=seed + 21,
            transformation="permute",
            **light,
            description="lin-base with residual dims and FFN units permuted (function-preserving), "
            "then lightly trained",
        ),
        replace(
            base,
            name="lin-pruned",
            seed=seed + 22,
            transformation="prune",
            drop=s.drop,
            **light,
            description=f"lin-base without layer(s) {list(s.drop)}, renumbered, lightly healed",
        ),
        replace(
            base,
            name="lin-gammafold",
            seed=seed + 23,
            steps=0,
            lr=0.0,
            parent="lin-base",
            transformation="gammafold",
            description="lin-base with every RMSNorm gain folded into the following linears; no training",
        ),
        *(
            replace(
                base,
                name=f"lin-indep-{k}",
                seed=seed + k,
                description=f"independent twin of lin-base: same config and data, seed {seed + k}",
            )
            for k in (1, 2, 3)
        ),
    ]


#: The adversarial cases made from each base (methods.md §A7–§A11), in build order: derived first, then the
#: false accusations (truth independent), which start from an independent model of the base's shape.
ADVERSARIAL_CASES = {
    "laundered": ("derived", "every function-preserving re-parameterisation of §A1–§A5 (own permuted tokenizer)"),
    "upscaled": ("derived", "depth up-scaled: two overlapping copies of the layer stack (SOLAR)"),
    "pruned": ("derived", "width-pruned by activation importance: residual dims, heads, MLP units (Minitron)"),
    "reembedded": ("derived", "embedding and head re-initialised, retrained with the body frozen, then unfrozen"),
    "gains-pasted": ("independent", "an independent model of the same shape with the base's norm gains pasted in"),
    "embed-pasted": ("independent", "an independent model with the base's token embedding pasted in, then trained"),
}


def _adversarial(s: _Sizes, seed: int) -> list[ModelRecipe]:
    """The adversarial family: every case of ``ADVERSARIAL_CASES`` from ``gpt2-bpe`` (LayerNorm, tied head) and
    from ``llama-sp`` (RMSNorm, rotary, GQA), plus ``adv-llama-moe`` (MoE-upcycled) and ``adv-llama-indep``, the
    independent Llama the false accusations start from (``gpt2-code`` plays that part for GPT-2)."""
    bases = (
        ("gpt2", "gpt2-bpe", s.gpt2, "bpe4k", "gpt2-code"),
        ("llama", "llama-sp", s.llama, "sp3k", "adv-llama-indep"),
    )
    out = [
        ModelRecipe(
            "adv-llama-indep",
            s.llama,
            "sp3k",
            seed + 30,
            s.pair_steps,
            2e-3,
            s.batch,
            description="independent Llama of llama-sp's shape, tokenizer and data (another seed): the model the "
            "false-accusation cases start from",
            case="independent",
            relative_to="llama-sp",
            truth="independent",
        )
    ]
    cases = [
        *ADVERSARIAL_CASES.items(),
        ("moe", ("derived", "MoE-upcycled: each dense MLP copied into 4 experts, top-2")),
    ]
    for k, (case, (truth, what)) in enumerate(cases):
        for j, (family, base, arch, tokenizer, independent) in enumerate(bases):
            if case == "moe" and family != "llama":
                continue
            out.append(
                ModelRecipe(
                    f"adv-{family}-{case}",
                    arch,
                    tokenizer,
                    seed + 40 + 2 * k + j,
                    s.adversarial_steps,
                    1e-3 if case == "reembedded" else 5e-4,
                    s.batch,
                    split="train_b",
                    parent=base if truth == "derived" else independent,
                    transformation="adversarial",
                    description=f"{what}; relative to {base}",
                    case=case,
                    relative_to=base,
                    truth=truth,
                )
            )
    return out


def build_recipe(profile: str, seed: int = 0) -> Recipe:
    """The recipe of ``profile`` (``full`` or ``test``) for base seed ``seed``."""
    if profile not in _SIZES:
        raise ValueError(f"unknown zoo profile {profile!r}; choose one of {', '.join(PROFILES)}")
    s = _SIZES[profile]
    models = [
        ModelRecipe(
            "gpt2-bpe",
            s.gpt2,
            "bpe4k",
            seed + 10,
            s.pair_steps,
            2e-3,
            s.batch,
            description="GPT-2 on byte-level BPE: one side of the cross-architecture merge pair",
        ),
        ModelRecipe(
            "llama-sp",
            s.llama,
            "sp3k",
            seed + 11,
            s.pair_steps,
            2e-3,
            s.batch,
            description="Llama (GQA, untied head) on SentencePiece-style BPE: the other side",
        ),
        ModelRecipe(
            "deep-llama",
            s.deep,
            "bpe4k",
            seed + 12,
            s.deep_steps,
            1.5e-3,
            s.batch,
            description=f"deep narrow Llama ({s.deep.layers} layers) for layer-swap analysis",
        ),
        *_lineage(s, seed),
        ModelRecipe(
            "gpt2-code",
            s.gpt2,
            "bpe4k",
            seed + 13,
            s.pair_steps,
            2e-3,
            s.batch,
            split=DOMAIN_SPLIT,
            description="GPT-2 trained only on the docstrings with doctest code: the donor of the merge's "
            "domain scenario (base llama-sp)",
        ),
        *_adversarial(s, seed),
    ]
    return Recipe(profile, seed, s.seq_len, s.eval_tokens, _TOKENIZERS, tuple(models))


def recipe_hash(recipe: Recipe, corpus_sha256: str) -> str:
    """sha256 over the recipe, the corpus identity and the code version."""
    payload = {
        "recipe": asdict(recipe),
        "corpus": corpus_sha256,
        "code": ZOO_CODE_VERSION,
        "max_positions": MAX_POSITIONS,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
