"""Drop planners: which k layers to remove, what it costs on held-out text, and which plan to recommend.

Each predictor proposes, for every k = 1…K, a set of layers to drop:

* ``trans``: the k layers with the lowest Trans(i) (eq. 13: a redundant layer barely changes its input);
* ``bi``: the k layers with the lowest Block Influence (ShortGPT);
* ``angular``: the block of k consecutive layers whose input and output are closest in angular distance
  ang_k(ℓ) over each row's last token (Gromov et al.);
* ``dloss``: the k layers whose single drop costs least end to end (Δloss of methods.md §S9);
* ``greedy_validation``: drop one layer at a time, each time the one whose removal gives the lowest loss on the
  validation text (the eval split the predictors are measured on).

The ``oracle`` does the same greedy search by measured *held-out* loss: it peeks at the text every plan is
scored on, so it bounds what a planner could reach and is never recommended. The plan recommended for each k is
the non-oracle plan with the lowest validation loss, so the held-out text plays no part in choosing it.

Every plan is scored from cached layer inputs: a rewired model whose first changed position is p reuses the
captured input h_p and runs only the blocks after it, each with its own captured arguments, then the final
norm and head; orders that share a prefix share its block calls (:func:`shared_prefix_outputs`). That is at
most L block calls per plan and batch instead of reloading and re-running a pruned checkpoint (tested equal to
the written checkpoint's loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmsurgeon.data.bits import bits_per_byte, utf8_bytes
from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.swap.capture import Capture, call_block, capture
from lmsurgeon.swap.e2e import Head, token_losses
from lmsurgeon.swap.engine import Batch
from lmsurgeon.swap.metrics import angle_per_row

PREDICTORS = ("trans", "bi", "angular", "dloss")
VALIDATION_GREEDY = "greedy_validation"
ORACLE = "oracle"
CAPTURE_BUDGET_BYTES = 2 << 30  # keep captured layer inputs between plan sweeps up to this size


def parse_plan_drop(spec: str | int, n_layers: int) -> int:
    """``K`` (layers) or ``P%`` (of the depth, rounded) → K, which must leave at least one layer."""
    text = str(spec).strip()
    try:
        k = round(float(text[:-1]) / 100.0 * n_layers) if text.endswith("%") else int(text)
    except ValueError:
        raise LmsurgeonError(f"--plan-drop {text!r} is neither a layer count K nor a percentage P%") from None
    if not 1 <= k <= n_layers - 1:
        raise LmsurgeonError(f"--plan-drop {text} means dropping {k} of {n_layers} layers; it must be 1…{n_layers - 1}")
    return k


def plan_order(n_layers: int, drops: Sequence[int] = (), swaps: Sequence[int] = ()) -> list[int]:
    """order[p] = the original layer at position p after exchanging each pair (i, i+1) in ``swaps`` (original
    indices, in the given order) and then removing the original layers in ``drops``."""
    order = list(range(n_layers))
    for i in swaps:
        a, b = order.index(i), order.index(i + 1)
        order[a], order[b] = order[b], order[a]
    dropped = set(drops)
    return [j for j in order if j not in dropped]


def first_change(order: Sequence[int]) -> int:
    """The first position whose layer differs from the original model's (len(order) if none does)."""
    for p, j in enumerate(order):
        if p != j:
            return p
    return len(order)


def shared_prefix_outputs(layers, orders: list[tuple[int, ...]], cap: Capture):
    """Yield (order, last hidden state) for each of ``orders``, running each block once per distinct prefix.

    Layer-major (methods.md §S14, §S15): every order starts from the captured h_p at its first change p; then,
    repeatedly, the lowest block any unfinished order needs next is applied to every distinct prefix that needs
    it, so a block is used in one stretch per batch (a streamed model reads it about once) and orders that share
    a prefix share its states. An order is yielded as soon as it is complete; only states that an unfinished
    order still needs are kept. Each block runs with its own captured arguments, as in the rewired checkpoint.
    """
    pos = {o: first_change(o) for o in dict.fromkeys(tuple(o) for o in orders)}
    states: dict[tuple[int, ...], torch.Tensor] = {}

    def state(prefix: tuple[int, ...]) -> torch.Tensor:
        return states[prefix] if prefix in states else cap.h[len(prefix)]  # an unchanged prefix: captured

    for o in [o for o, q in pos.items() if q == len(o)]:  # the original order (or a prefix of it)
        del pos[o]
        yield o, cap.h[len(o)]
    while pos:
        block = min(o[q] for o, q in pos.items())
        for o in [o for o, q in pos.items() if o[q] == block]:
            q = pos[o]
            if o[: q + 1] not in states:
                states[o[: q + 1]] = call_block(layers, block, state(o[:q]), cap)
            pos[o] = q + 1
        for o in [o for o, q in pos.items() if q == len(o)]:
            del pos[o]
            yield o, states[o]
        needed = {o[:q] for o, q in pos.items()}
        for key in [k for k in states if k not in needed]:
            del states[key]


def predicted_bytes(tokenizer, rows: list[list[int]]) -> int:
    """UTF-8 bytes spelled by the tokens the loss predicts (each row's tokens after its first).

    Decoded with special tokens skipped, as the text minus what the row's first token spells, so bits per
    byte divide the NLL of exactly those tokens by the bytes they stand for.
    """
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    heads = [tokenizer.decode(r[:1], skip_special_tokens=True) for r in rows]
    return utf8_bytes(texts) - utf8_bytes(heads)


@dataclass(frozen=True)
class Score:
    """Loss of one rewired model on one text: mean nats per predicted token, and bits per byte."""

    loss: float
    bpb: float


class PlanEvaluator:
    """Scores layer orders on one text split from its captured layer inputs (one capture per batch).

    Captures are kept between calls while they fit in ``budget`` bytes, else each call captures again (one
    forward per batch); either way a plan costs only the blocks after its first change.
    """

    def __init__(
        self,
        model,
        layers,
        layers_paths,
        head: Head,
        batches: list[Batch],
        n_bytes: int,
        budget: int = CAPTURE_BUDGET_BYTES,
    ):
        self.model, self.layers, self.paths, self.head = model, layers, layers_paths, head
        self.batches, self.n_bytes, self.budget = batches, n_bytes, budget
        self._kept: list[Capture] | None = None
        self.plans_scored = 0

    def captures(self):
        """Each batch with its capture (kept when they fit in the budget)."""
        if self._kept is not None:
            yield from zip(self.batches, self._kept, strict=True)
            return
        kept: list[Capture] = []
        size = 0
        for b in self.batches:
            cap = capture(self.model, self.paths, **b.inputs())
            size += sum(h.numel() * h.element_size() for h in cap.h)
            if size <= self.budget:
                kept.append(cap)
            yield b, cap
        if size <= self.budget:
            self._kept = kept

    def scores(self, orders: Sequence[Sequence[int]]) -> list[Score]:
        """Loss and bits per byte of each order on this split (identical orders are computed once)."""
        unique = sorted(dict.fromkeys(tuple(o) for o in orders))
        nll = dict.fromkeys(unique, 0.0)
        n = 0
        for b, cap in self.captures():
            for order, h in shared_prefix_outputs(self.layers, unique, cap):
                ce, _ = token_losses(self.head, h, b.targets, b.loss_sel)
                nll[order] += float(ce.sum())
            n += int(b.loss_sel.sum())
        self.plans_scored += len(unique)
        out = {o: Score(loss=v / max(n, 1), bpb=bits_per_byte(v, self.n_bytes)) for o, v in nll.items()}
        return [out[tuple(o)] for o in orders]

    def angular_by_block(self, max_n: int) -> np.ndarray:
        """ang_n(ℓ) = E_rows arccos(cos(h_ℓ, h_{ℓ+n}))/π at each row's last real token; [max_n + 1, L] with NaN
        where ℓ + n > L (Gromov et al.'s block criterion; n = 1 and 2 are the analysis' ang1 and ang2)."""
        L = len(self.layers)
        sums = np.zeros((max_n + 1, L))
        rows_seen = 0
        for b, cap in self.captures():
            rows = torch.arange(b.input_ids.shape[0], device=b.input_ids.device)
            last = [h[rows, b.last] for h in cap.h]
            rows_seen += int(rows.numel())
            for n in range(1, max_n + 1):
                for ell in range(L - n + 1):
                    sums[n, ell] += float(angle_per_row(last[ell], last[ell + n]).sum())
        out = sums / max(rows_seen, 1)
        for n in range(max_n + 1):
            out[n, L - n + 1 :] = np.nan
        out[0] = np.nan
        return out


def predictor_plans(layer_table: list[dict], ang: np.ndarray, K: int) -> dict[str, list[tuple[int, ...]]]:
    """Layers each predictor drops for k = 1…K (0-based, sorted); ``dloss`` only where Δloss was measured."""
    L = len(layer_table)

    def lowest(key: str) -> list[tuple[int, ...]]:
        ranked = sorted(range(L), key=lambda i: (layer_table[i][key], i))
        return [tuple(sorted(ranked[:k])) for k in range(1, K + 1)]

    plans = {"trans": lowest("trans"), "bi": lowest("bi")}
    blocks = []
    for k in range(1, K + 1):
        start = int(np.nanargmin(ang[k, : L - k + 1]))
        blocks.append(tuple(range(start, start + k)))
    plans["angular"] = blocks
    if all(row.get("dloss_drop") is not None for row in layer_table):
        plans["dloss"] = lowest("dloss_drop")
    return plans


def greedy(
    evaluator: PlanEvaluator, L: int, K: int, tick: Callable[[], None] | None = None
) -> list[tuple[tuple[int, ...], Score]]:
    """Drop one layer at a time, each time the one whose removal scores lowest on ``evaluator``'s text."""
    current: tuple[int, ...] = ()
    out = []
    for _ in range(K):
        candidates = [tuple(sorted((*current, j))) for j in range(L) if j not in current]
        scores = evaluator.scores([plan_order(L, c) for c in candidates])
        best = min(range(len(candidates)), key=lambda c: (scores[c].loss, candidates[c]))
        current = candidates[best]
        out.append((current, scores[best]))
        if tick:
            tick()
    return out


def plan_drops(
    validation: PlanEvaluator,
    heldout: PlanEvaluator,
    layer_table: list[dict],
    K: int,
    tick: Callable[[], None] | None = None,
    search: PlanEvaluator | None = None,
) -> dict:
    """Every strategy's plan for k = 1…K scored on validation and held-out text, the oracle, and the advice.

    ``search`` is the text the non-oracle greedy search drops layers by (default: the validation text). Given
    apart from ``validation``, the advice compares every predictor, the greedy search included, on text none of
    them was fitted to, so a search that overfits its own text cannot win by that (methods.md §S14).

    Returns results.json's ``plans`` (a list of {strategy, k, layers, heldout_loss, heldout_bpb,
    validation_loss, validation_bpb}), ``recommended`` (per k: the non-oracle plan with the lowest validation
    loss) and ``plan_summary`` (baselines, and at k = K the gap to the oracle and which predictor won).
    """
    L = len(layer_table)
    candidates = predictor_plans(layer_table, validation.angular_by_block(K), K)
    validation_greedy = greedy(search or validation, L, K, tick)
    candidates[VALIDATION_GREEDY] = [layers for layers, _ in validation_greedy]
    flat = [(name, k + 1, layers) for name, plans in candidates.items() for k, layers in enumerate(plans)]
    orders = [plan_order(L, layers) for _, _, layers in flat]
    base_order = list(range(L))
    val_scores = validation.scores([base_order, *orders])
    held_scores = heldout.scores([base_order, *orders])
    rows = [
        _row(name, k, layers, held, val)
        for (name, k, layers), held, val in zip(flat, held_scores[1:], val_scores[1:], strict=True)
    ]
    oracle = greedy(heldout, L, K, tick)
    rows += [_row(ORACLE, k + 1, layers, score, None) for k, (layers, score) in enumerate(oracle)]
    recommended = []
    for k in range(1, K + 1):
        pool = [r for r in rows if r["k"] == k and r["strategy"] != ORACLE]
        best = min(pool, key=lambda r: (r["validation_loss"], r["layers"]))
        recommended.append(
            {
                "k": k,
                "strategy": best["strategy"],
                "layers": best["layers"],
                "validation_loss": best["validation_loss"],
                "heldout_loss": best["heldout_loss"],
                "heldout_bpb": best["heldout_bpb"],
            }
        )
    summary = _summary(rows, recommended, K, L, held_scores[0], val_scores[0])
    summary["plans_scored"] = {"validation": validation.plans_scored, "heldout": heldout.plans_scored}
    return {"plans": rows, "recommended": recommended, "plan_summary": summary}


def _row(strategy: str, k: int, layers: tuple[int, ...], held: Score, val: Score | None) -> dict:
    return {
        "strategy": strategy,
        "k": k,
        "layers": list(layers),
        "heldout_loss": held.loss,
        "heldout_bpb": held.bpb,
        "validation_loss": val.loss if val else None,
        "validation_bpb": val.bpb if val else None,
    }


def _summary(rows: list[dict], recommended: list[dict], K: int, L: int, held0: Score, val0: Score) -> dict:
    """Baselines and the verdict at k = K: recommended vs oracle (relative bpb gap), vs BI and angular."""
    at_K = {r["strategy"]: r for r in rows if r["k"] == K}
    rec, oracle = recommended[-1], at_K[ORACLE]
    gap = rec["heldout_bpb"] / oracle["heldout_bpb"] - 1.0
    non_oracle = [r for r in at_K.values() if r["strategy"] != ORACLE]
    winner = min(non_oracle, key=lambda r: (r["heldout_bpb"], r["strategy"]))
    baselines = {s: at_K[s]["heldout_bpb"] for s in ("bi", "angular") if s in at_K}
    return {
        "k_max": K,
        "n_layers": L,
        "fraction": K / L,
        "baseline": {
            "heldout_loss": held0.loss,
            "heldout_bpb": held0.bpb,
            "validation_loss": val0.loss,
            "validation_bpb": val0.bpb,
        },
        "at_k_max": {
            "recommended": rec["strategy"],
            "recommended_bpb": rec["heldout_bpb"],
            "oracle_bpb": oracle["heldout_bpb"],
            "gap_to_oracle": gap,
            "within_5_percent_of_oracle": bool(gap <= 0.05),
            "baselines_bpb": baselines,
            "at_least_as_good_as_baselines": bool(all(rec["heldout_bpb"] <= v + 1e-12 for v in baselines.values())),
            "best_non_oracle_on_heldout": winner["strategy"],
            "best_non_oracle_bpb": winner["heldout_bpb"],
        },
    }


def plan_reorder(validation: PlanEvaluator, heldout: PlanEvaluator, pairs: list[dict], tolerance: float) -> dict:
    """Adjacent swaps, and compositions of disjoint ones, that keep the validation loss within ``tolerance``.

    Candidates are tried safest first (measured end-to-end Δloss of the single swap, else δ; ties by r); each is
    kept if the composition with the swaps kept so far still costs at most ``tolerance`` nats per token on the
    validation text. Swaps sharing a layer with a kept one are skipped (their composition is a 3-cycle, not a
    swap). Each kept composition is then scored on the held-out text.
    """
    L = len(pairs) + 1
    base_val, base_held = validation.scores([list(range(L))])[0], heldout.scores([list(range(L))])[0]
    key = "dloss" if all(p["dloss"] is not None for p in pairs) else "delta"
    ranked = sorted(pairs, key=lambda p: (p[key], p["r"], p["i"]))
    kept: list[int] = []
    steps, rejected = [], []
    for p in ranked:
        i = p["i"]
        if any(abs(i - j) < 2 for j in kept):
            continue
        trial = sorted((*kept, i))
        score = validation.scores([plan_order(L, swaps=trial)])[0]
        if score.loss - base_val.loss <= tolerance:
            kept = trial
            steps.append(
                {
                    "swaps": list(trial),
                    "order": plan_order(L, swaps=trial),
                    "validation_dloss": score.loss - base_val.loss,
                }
            )
        else:
            rejected.append({"swaps": list(trial), "validation_dloss": score.loss - base_val.loss})
    held = heldout.scores([s["order"] for s in steps])
    for step, score in zip(steps, held, strict=True):
        step.update(
            {"heldout_loss": score.loss, "heldout_bpb": score.bpb, "heldout_dloss": score.loss - base_held.loss}
        )
    safe = [
        {"i": p["i"], "j": p["i"] + 1, key: p[key], "delta": p["delta"]}
        for p in ranked
        if key == "dloss" and p["dloss"] <= tolerance
    ]
    return {
        "tolerance": tolerance,
        "ranked_by": key,
        "single_swaps_within_tolerance": safe,
        "steps": steps,
        "rejected": rejected,
        "chosen": steps[-1] if steps else None,
        "baseline": {"validation_loss": base_val.loss, "heldout_loss": base_held.loss, "heldout_bpb": base_held.bpb},
    }
