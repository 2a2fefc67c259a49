"""``LineageConfig``: every choice a lineage run makes, in one place.

The ``lmsurgeon lineage`` options are generated from its fields (each field's metadata carries the help text),
:func:`lmsurgeon.lineage.compare` takes it (or the same names as keywords), and ``results.json`` records it
under ``config`` so a run says exactly how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lmsurgeon.errors import LmsurgeonError

ALL_TESTS = ("awm", "phi_u", "circuits", "phi_match", "act_cka")
ALIGN_METHODS = ("auto", "permutation", "procrustes")  # sound.ALIGNMENT_FITS implements the last two
DEPTHS = ("relative", "monotone")
#: the smallest value each budget accepts (unbiased CKA needs 4 items; a null needs 2 draws)
BUDGET_MINIMA = {"max_tokens": 2, "max_items": 4, "permutations": 2, "max_units": 2, "best_experts": 1}


def _cli(help: str, *, kind: str = "value", choices: tuple[str, ...] | None = None) -> dict:
    """Field metadata for the CLI: ``kind`` is value (an integer), text, flag, list (comma-separated), multiple
    (repeatable) or path (an existing file)."""
    return {"help": help, "kind": kind, "choices": choices}


def parse_act_layers(spec: str | int) -> int | None:
    """``--act-layers``: ``auto`` → 0 (decided per pair from the memory budget), ``all`` → None, ``N`` ≥ 1 → N."""
    text = str(spec).strip().lower()
    if text == "auto":
        return 0
    if text == "all":
        return None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise LmsurgeonError(f"{spec!r} is not auto, all or a number of blocks ≥ 1", "--act-layers")


@dataclass(frozen=True)
class LineageConfig:
    """How ``compare`` analyses its sources. Sequences are stored as tuples; unknown names fail at once."""

    naive_only: bool = field(
        default=False, metadata=_cli("Only the norm-gain report (reads only norm tensors).", kind="flag")
    )
    tests: tuple[str, ...] = field(
        default=ALL_TESTS,
        metadata=_cli(
            "Comma-separated sound tests: awm, phi_u, circuits, phi_match (activations), act_cka (activations).",
            kind="list",
        ),
    )
    circuit_layers: int = field(
        default=8,
        metadata=_cli("Layers of the wider model whose attention circuits the circuits test compares (evenly spread)."),
    )
    null: tuple[str, ...] = field(
        default=(), metadata=_cli("A known independent model for the null (repeatable).", kind="multiple")
    )
    focus_layer: int | None = field(
        default=None, metadata=_cli("Headline layer of the naive table (default 10, else the middle layer).")
    )
    depth: str = field(
        default="relative",
        metadata=_cli(
            "How the naive table pairs layers of models of different depth: nearest relative depth, or the "
            "increasing map that maximises Pearson.",
            choices=DEPTHS,
        ),
    )
    align: str = field(
        default="auto",
        metadata=_cli(
            "Residual alignment for the weight tests: auto (the orthogonal map only when held-out shared tokens "
            "support it decisively over the signed permutation), permutation, or procrustes (undoes rotations).",
            choices=ALIGN_METHODS,
        ),
    )
    text: str | None = field(
        default=None, metadata=_cli("Text for the activation test (default: bundled corpus).", kind="path")
    )
    seed: int = field(default=0, metadata=_cli("Random seed."))
    all_pairs: bool = field(
        default=False, metadata=_cli("Compare every pair of SOURCES, not only A against each other.", kind="flag")
    )
    # budgets of the weight tests (methods.md §L7.2.3): what they read and compute, whatever the model's size
    max_tokens: int = field(
        default=32_768, metadata=_cli("Shared tokens whose embedding rows the residual alignment reads (at most).")
    )
    max_items: int = field(
        default=1024, metadata=_cli("awm: residual dimensions sampled as CKA items per layer (at most).")
    )
    permutations: int = field(default=20, metadata=_cli("awm: item permutations of its permutation null."))
    max_units: int = field(default=4096, metadata=_cli("phi_u: MLP units of B sampled per layer or expert (at most)."))
    best_experts: int = field(
        default=2, metadata=_cli("phi_u: expert pairs compared per MoE layer, the best matched by router rows.")
    )
    act_layers: str = field(
        default="auto",
        metadata=_cli(
            "Leading blocks the activation tests run: auto (all when both models fit in memory, else the first 4), "
            "all, or a number N (methods.md §L7.4.4).",
            kind="text",
        ),
    )
    max_memory: str | None = field(
        default=None,
        metadata=_cli(
            "Memory the activation tests' weights may use, e.g. 6GiB [default: memory available now]; a larger "
            "model runs one block at a time (methods.md §L7.4.4).",
            kind="text",
        ),
    )

    def __post_init__(self) -> None:
        tests = tuple(t for t in self.tests.split(",") if t) if isinstance(self.tests, str) else tuple(self.tests)
        object.__setattr__(self, "tests", tests)
        object.__setattr__(self, "null", tuple(str(n) for n in self.null))
        unknown = set(tests) - set(ALL_TESTS)
        if unknown:
            raise LmsurgeonError(f"unknown tests {sorted(unknown)} (known: {', '.join(ALL_TESTS)})", "--tests")
        if self.align not in ALIGN_METHODS:
            raise LmsurgeonError(f"unknown alignment {self.align!r} (known: {', '.join(ALIGN_METHODS)})", "--align")
        if self.circuit_layers < 3:
            raise LmsurgeonError(f"needs at least 3 layers, got {self.circuit_layers}", "--circuit-layers")
        parse_act_layers(self.act_layers)  # one clear error for a bad --act-layers before anything is read
        object.__setattr__(self, "act_layers", str(self.act_layers))
        if self.depth not in DEPTHS:
            raise LmsurgeonError(f"unknown depth pairing {self.depth!r} (known: {', '.join(DEPTHS)})", "--depth")
        for name, least in BUDGET_MINIMA.items():
            if getattr(self, name) < least:
                raise LmsurgeonError(
                    f"must be at least {least}, got {getattr(self, name)}", "--" + name.replace("_", "-")
                )

    @classmethod
    def build(cls, config: LineageConfig | None = None, **options) -> LineageConfig:
        """``config`` (default: all defaults) with the given fields replaced; an unknown name is a TypeError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown lineage option(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return dataclasses.replace(config or cls(), **options)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
