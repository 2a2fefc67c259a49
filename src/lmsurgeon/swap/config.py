"""``SwapConfig``: every setting of one swap analysis, in one place.

The CLI's options are generated from these fields (flag, type, default and help text live in each field's
metadata), ``analyze(model, config=SwapConfig(...))`` takes the object, and results.json records the settings
from it, so an option cannot exist in one of the three and be missing or different in another.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

WINDOW = 4  # tokens mixed into X̂ (eq. 12)
RIDGE = 1e-6  # λ of the least-squares fit, relative to tr(G)/d


def _option(default, flag: str, type_, help_: str, **extra):
    """A config field and the command-line option that sets it (``negate``: a --no-X flag that stores False)."""
    return field(default=default, metadata={"flag": flag, "type": type_, "help": help_, **extra})


@dataclass(frozen=True)
class SwapConfig:
    """Settings of ``lmsurgeon swap`` (methods.md §S5–§S12); defaults are the spec's."""

    data: str | None = _option(
        None,
        "--data",
        str,
        "Fit text (.jsonl with 'text' or blank-line separated); default: built-in corpus.",
        path=True,
    )
    eval_data: str | None = _option(
        None,
        "--eval-data",
        str,
        "Text for δ, δ', Δloss, perplexity (default: half of --data, or the corpus validation split).",
        path=True,
    )
    tokens: int = _option(65_536, "--tokens", int, "Eval budget in real tokens.")
    fit_tokens: int | None = _option(
        None, "--fit-tokens", int, "Fit budget in real tokens [default: max(tokens, 8·d)]."
    )
    seq_len: int = _option(512, "--seq-len", int, "Tokens per row (one document per row).")
    device: str = _option("cpu", "--device", str, "cpu, cuda, cuda:1 ...")
    dtype: str = _option(
        "auto", "--dtype", str, "auto (float32 if it fits in 60% of device memory), float32, bfloat16, float16."
    )
    window: int = _option(WINDOW, "--window", int, "Tokens mixed into X̂ (eq. 12).")
    ridge: float = _option(RIDGE, "--ridge", float, "λ of the least-squares fit (0: lstsq).")
    skip_first: int = _option(0, "--skip-first", int, "Drop the first N positions per row.")
    bootstrap: int = _option(2000, "--bootstrap", int, "Bootstrap resamples for the CIs.")
    e2e: bool = _option(True, "--no-e2e", bool, "Skip the end-to-end Δloss/KL of each swap and drop.", negate=True)
    batch_tokens: int = _option(8192, "--batch-tokens", int, "Padded tokens per batch.")
    apply: int | None = _option(None, "--apply", int, "Write swap_I_{I+1}/ with layers I and I+1 swapped.")
    drop: int | None = _option(None, "--drop", int, "Write drop_I/ with layer I removed.")
    seed: int = _option(0, "--seed", int, "Random seed.")
    max_memory: str | None = _option(
        None,
        "--max-memory",
        str,
        "Memory the weights may use, e.g. 6GiB [default: memory available now]; a larger model is layer-streamed.",
    )
    streaming: str = _option(
        "auto",
        "--streaming",
        str,
        "auto (stream blocks from the checkpoint only when the model does not fit --max-memory), stream, plain.",
    )
    plan_drop: str | None = _option(
        None,
        "--plan-drop",
        str,
        "K or P%: which K layers (or P% of them) to drop; "
        "each predictor's plan and a greedy oracle scored on held-out text.",
    )
    heldout_data: str | None = _option(
        None,
        "--heldout-data",
        str,
        "Held-out text plans are scored on (default: the corpus test split, or a third of the eval documents).",
        path=True,
    )
    plan_tokens: int | None = _option(None, "--plan-tokens", int, "Held-out budget in real tokens [default: --tokens].")
    plan_reorder: bool = _option(
        False,
        "--plan-reorder",
        bool,
        "Also plan compositions of adjacent swaps that keep the validation loss within --reorder-tolerance.",
    )
    reorder_tolerance: float = _option(
        0.01, "--reorder-tolerance", float, "Validation loss (nats per token) a reordering may add."
    )
    apply_plan: str | None = _option(
        None,
        "--apply-plan",
        str,
        "Write the rewired model: 'recommended' (the "
        "advice at the largest k), 'oracle', 'reorder', or e.g. 'drop:3,5;swap:7' "
        "(0-based original indices).",
    )
    heal_steps: int = _option(
        0,
        "--heal-steps",
        int,
        "Train the layers next to each cut of --apply-plan for N "
        "steps on the fit text; held-out loss before and after.",
    )

    def with_options(self, **options) -> SwapConfig:
        """A copy with some fields changed; an unknown name is a TypeError naming it and the known ones."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown swap option(s) {', '.join(unknown)}; SwapConfig has {', '.join(sorted(known))}")
        return replace(self, **options)
