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


def _cli(help: str, *, kind: str = "value", choices: tuple[str, ...] | None = None) -> dict:
    """Field metadata for the CLI: ``kind`` is value, flag, list (comma-separated), multiple (repeatable) or
    path (an existing file)."""
    return {"help": help, "kind": kind, "choices": choices}


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
        if self.depth not in DEPTHS:
            raise LmsurgeonError(f"unknown depth pairing {self.depth!r} (known: {', '.join(DEPTHS)})", "--depth")

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
