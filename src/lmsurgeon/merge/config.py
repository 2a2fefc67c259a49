"""`MergeConfig`: every parameter of a merge, written once.

The command line's options, the study fingerprint and `run_merge`'s keyword arguments are all read off this
one frozen dataclass, so a parameter added here appears in all three and cannot drift between them. Each field's
metadata carries its help text (`help`), its allowed values (`choices`), whether it names a file (`kind`), and
whether it defines the study (`study`): a resumed study must have been started with the same values of those.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any

import torch

from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.report.results import jsonable

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = tuple(DTYPES)

# `study` values: ALWAYS fields enter the fingerprint in declaration order (the order studies were fingerprinted
# in before this class existed, so they still resume); WHEN_CHANGED fields were added later and enter it only
# when they differ from their default, which keeps the fingerprint of every study that did not use them.
ALWAYS, WHEN_CHANGED = "always", "when_changed"


def _param(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    kind: str | None = None,
    study: str | None = None,
    cli: bool = True,
    default_factory: Any = MISSING,
) -> Any:
    meta = {"help": help, "choices": choices, "kind": kind, "study": study, "cli": cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class MergeConfig:
    """How to merge, search and report; the defaults are the seed's. See methods.md §M for the formulas."""

    # -- what defines the study (fingerprint order: do not reorder; append new fields below with WHEN_CHANGED)
    ppl_cap: float = _param(2.5, "Guard: max relative perplexity of a stage.", study=ALWAYS)
    kl_topk: int = _param(512, "K of the symmetric top-K KL.", study=ALWAYS)
    kl_positions: str = _param("tail:8", "Positions the KL is measured at: tail:N or all.", study=ALWAYS)
    max_shared: int = _param(50_000, "Cap on shared tokens (0 = all).", study=ALWAYS)
    dtype: str = _param("fp32", "Dtype the base is loaded and merged in.", choices=DTYPE_NAMES, study=ALWAYS)
    gamma: float = _param(12.0, "Steepness of the logistic α schedule.", study=ALWAYS)
    on_stage_a_fail: str = _param(
        "rollback", "What to do when Stage A trips the guard.", choices=("rollback", "keep"), study=ALWAYS
    )
    space: str | None = _param(None, "JSON overriding search ranges.", kind="file", study=ALWAYS)
    init_nonshared: str | None = _param(
        None, "Also initialise non-shared rows by OMP over the shared anchors.", choices=("omp",), study=ALWAYS
    )
    omp_k: int = _param(64, "Anchors per OMP row.", study=ALWAYS)
    max_length: int = _param(512, "Tokens kept per prompt.", study=WHEN_CHANGED)
    objective: str = _param(
        "seed",
        "seed: minimise relative perplexity and maximise symKL on the search text; "
        "domain: minimise bits per byte on the search text with general-text bits per "
        "byte at most the base's × (1 + --tolerance).",
        choices=("seed", "domain"),
        study=WHEN_CHANGED,
    )
    tolerance: float = _param(
        0.005, "--objective domain: how much worse than the base general text may get.", study=WHEN_CHANGED
    )

    # -- the text the merge is measured on
    prompts_file: str | None = _param(
        None,
        "Search text: drives the guard and the objectives (default: built-in corpus, validation split).",
        kind="file",
    )
    eval_file: str | None = _param(
        None,
        "Held-out text, never searched on: the best trial is reported on it "
        "(default: the next documents of the search text's source).",
        kind="file",
    )
    general_file: str | None = _param(
        None, "General text the merge must not make worse (default: built-in corpus, test split).", kind="file"
    )
    max_prompts: int = _param(64, "Documents read from each text (0 = all).")

    # -- the search
    trials: int = _param(48, "Optuna trials (0 = one merge).")
    seed: int = _param(0, "Random seed of the sampler.")
    storage: str | None = _param(None, "Optuna storage URL (default: journal file in the run folder).")
    study_name: str = _param("lmsurgeon-merge", "Name of the Optuna study.")
    resume: bool = _param(False, "Continue an interrupted study in --out.")
    worker: bool = _param(False, "Only run trials of a shared --storage study; write nothing.")
    params: dict | None = _param(None, "JSON parameters for a single merge (--trials 0).", kind="json_file")
    select: str = _param("knee", "How the best trial is chosen from the Pareto front.", choices=("knee", "max-kl"))
    select_max_rel_ppl: float = _param(1.2, "--select max-kl: the largest relative perplexity allowed.")
    save_topk: int = _param(0, "Also save the next N Pareto trials.")

    # -- how it runs (never changes a number)
    batch_size: int = _param(8, "Prompts per forward pass.")
    device: str = _param("cpu", "Torch device of the base model.", cli=False)
    trust_remote_code: bool = _param(False, "Allow the base's own modelling code.")
    streaming: str = _param(
        "auto",
        "Run the base (and the donor's own evaluation) layer-streamed: auto streams only when the model does not "
        "fit --max-memory; the numbers are the same either way.",
        choices=("auto", "stream", "plain"),
    )
    max_memory: str | None = _param(None, "Memory budget for --streaming auto, e.g. 6GiB (default: what is free).")

    def __post_init__(self) -> None:
        if self.ppl_cap <= 1.0:
            raise LmsurgeonError(f"--ppl-cap must be > 1 (got {self.ppl_cap})")
        if self.tolerance < 0:
            raise LmsurgeonError(f"--tolerance must be ≥ 0 (got {self.tolerance})")
        for f in fields(self):
            choices = f.metadata["choices"]
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise LmsurgeonError(f"{option_name(f)} {value!r}: one of {', '.join(choices)}")

    def with_overrides(self, **overrides: Any) -> MergeConfig:
        """A copy with some fields changed; an unknown name is a TypeError, as for any keyword argument."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown merge parameter(s): {', '.join(unknown)}")
        return replace(self, **overrides)

    def study_values(self, space: dict) -> list:
        """The values that define the study, in fingerprint order; `space` is the loaded search space."""
        values = []
        for f in fields(self):
            value = space if f.name == "space" else getattr(self, f.name)
            if f.metadata["study"] == ALWAYS:
                values.append(value)
            elif f.metadata["study"] == WHEN_CHANGED and getattr(self, f.name) != f.default:
                values.append({f.name: value})
        return values


def option_name(f: Field) -> str:
    """The command-line spelling of a field: ``ppl_cap`` → ``--ppl-cap``."""
    return "--" + f.name.replace("_", "-")


def cli_fields() -> list[Field]:
    """The fields the command line offers, in declaration order."""
    return [f for f in fields(MergeConfig) if f.metadata["cli"]]


def fingerprint(*parts: Any) -> str:
    """sha256 of the JSON of ``parts``: equal exactly when the study's inputs and settings are equal."""
    return hashlib.sha256(json.dumps(jsonable(parts), sort_keys=True, default=str).encode()).hexdigest()


def study_fingerprint(
    base_inputs: list,
    donor_inputs: list,
    texts: list[str],
    config: MergeConfig,
    space: dict,
    general_texts: list[str] | None = None,
) -> str:
    """What a resumed study must share with the one it continues: both models' files, the search texts and
    every study-defining field of ``config`` (and the general texts when they constrain the objective)."""
    extra = [] if general_texts is None else [{"general_texts": general_texts}]
    return fingerprint(base_inputs, donor_inputs, texts, *config.study_values(space), *extra)
