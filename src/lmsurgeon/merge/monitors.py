"""Perplexity, bits per byte and symmetric top-K KL on a text (methods.md §M3, §M8.4, §F1).

One forward pass over the prompts gives all three: the token-weighted NLL for perplexity, the same NLL over the
UTF-8 bytes its tokens spell for bits per byte (also split by token class), and the next-token log-probabilities
at the KL positions. The base's log-probabilities are cached once; every later evaluation is compared against
them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from lmsurgeon.data.bits import bits_per_byte
from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.streaming.budget import LOGIT_CHUNK_BYTES

TOKEN_CLASSES = ("digits", "whitespace", "punctuation", "multibyte", "words")
SPECIAL = len(TOKEN_CLASSES)  # class index of added special tokens and padding: counted in perplexity only


def token_class(text: str) -> str:
    """The class of the text one token spells: any non-ASCII character → multibyte; only whitespace →
    whitespace; digits (after leading/trailing whitespace) → digits; no letter or digit → punctuation; else
    words."""
    if any(ord(c) > 127 for c in text):
        return "multibyte"
    core = text.strip()
    if not core:
        return "whitespace"
    if core.isdigit():
        return "digits"
    if not any(c.isalnum() for c in core):
        return "punctuation"
    return "words"


def kl_positions(L: int, spec: str) -> list[int]:
    """T_p for a prompt of L tokens: `tail:N` → {max(0, L−N), …, L−1}; `all` → every position."""
    if spec == "all":
        return list(range(L))
    if spec.startswith("tail:"):
        N = int(spec.split(":", 1)[1])
        if N < 1:
            raise LmsurgeonError(f"--kl-positions {spec}: N must be ≥ 1")
        return list(range(max(0, L - N), L))
    raise LmsurgeonError(f"--kl-positions {spec!r}: expected tail:N or all")


class FreshCache(NamedTuple):
    """One batch's numbers where an evaluation ran the base's head on new head inputs (methods.md §M8.3)."""

    lse: torch.Tensor  # [B, T] float64 log-normaliser, summed over the float32 logits
    target_logit: torch.Tensor  # [B, T−1] float64
    where: torch.Tensor  # [B, T] those positions
    share: torch.Tensor | None = None  # [B, T] float64 Σ_R e^{z_r − L} of the head rows `share_ids` (R)
    share_ids: torch.Tensor | None = None


@dataclass
class Evaluation:
    """Result of one pass: perplexity and the log-probabilities at the KL positions ([n_pos, V], float32)."""

    nll_sum: float
    n_tokens: int
    logprobs: torch.Tensor
    n_bytes: int = 0  # UTF-8 bytes the scored tokens spell
    class_nll: torch.Tensor | None = None  # float64 [len(TOKEN_CLASSES)]: NLL summed per token class
    class_bytes: torch.Tensor | None = None  # int64 [len(TOKEN_CLASSES)]: bytes those tokens spell
    head_inputs: list[torch.Tensor] | None = None  # per batch, what the LM head saw (kept for Stage B)
    token_nll: list[torch.Tensor] | None = None  # per batch, [B, T−1] NLL (nats) of each target (domain gate)
    targets: list[torch.Tensor] = field(default_factory=list)  # per batch, [B, T−1] log-prob of each target
    fresh: list[torch.Tensor] | None = None  # per batch, [B, T] positions whose head input is not the base's
    fresh_cache: list[FreshCache | None] | None = None  # per batch, what a head-row change updates where the
    # base's head ran on new head inputs (§M8.3)
    head_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per batch, float64 (log-normaliser
    # [B, T], target logit [B, T−1]) of the head this evaluation saw: what a head-row change updates (§M8.3)
    top_k: dict[int, tuple] = field(default_factory=dict)  # cached top_k_set(logprobs, K) per K

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens)

    @property
    def bpb(self) -> float:
        """Bits per byte: the NLL of the tokens that spell text, in bits, over the bytes they spell."""
        if self.class_nll is None:
            raise LmsurgeonError("this evaluation kept no per-token NLL (bits per byte unavailable)")
        return bits_per_byte(float(self.class_nll.sum()), self.n_bytes)

    def bpb_by_class(self) -> dict[str, float | None]:
        """Bits per byte of the tokens of each class (None for a class with no bytes in this text)."""
        if self.class_nll is None or self.class_bytes is None:
            raise LmsurgeonError("this evaluation kept no per-token NLL (bits per byte unavailable)")
        return {
            c: bits_per_byte(float(self.class_nll[i]), int(self.class_bytes[i])) if self.class_bytes[i] else None
            for i, c in enumerate(TOKEN_CLASSES)
        }


HEAD_DELTA_MAX_FRACTION = 1 / 3  # more moved head rows than this share of V: the full head is cheaper
CANCELLATION = 1e-6  # a position whose moved rows held more than 1 − this of its mass: full head (§M8.3)
# The same for a log-normaliser taken from float32 logits (a re-run position): its rounding δ grows to δ / (1 − Σ),
# so below 1 − Σ = 0.1 the full head runs (the update stays within 10 δ of the float32 head's own numbers)
CANCELLATION_FLOAT32 = 0.1


class HeadDelta:
    """Head rows a merge moved, relative to the head a base evaluation saw (methods.md §M8.3).

    ``ids`` the base ids, ``old`` and ``new`` their weights (float64; ``old_rows`` and ``new_rows`` in the head's
    dtype), ``weight`` and ``bias`` the live head (for positions that fall back to the full head), ``column``
    each id's column in ``new`` (−1: not moved)."""

    def __init__(self, ids: torch.Tensor, old: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ids = ids.to(weight.device)
        self.ids = ids
        self.old_rows = old.to(weight.device)
        self.new_rows = weight.detach().index_select(0, ids)
        self.old, self.new = self.old_rows.double(), self.new_rows.double()
        self.weight, self.bias = weight, bias
        self.bias_rows = None if bias is None else bias.detach().index_select(0, ids)
        self.row_bias = None if self.bias_rows is None else self.bias_rows.double()
        self.column = torch.full((weight.shape[0],), -1, dtype=torch.long, device=ids.device)
        self.column[ids] = torch.arange(ids.numel(), device=ids.device)

    def logits(self, h64: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """float64 logits of the head rows `rows` (float64, [R, d]) at hidden states `h64`."""
        z = h64 @ rows.T
        return z if self.row_bias is None else z + self.row_bias

    def rows_as_head(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits of the head rows `rows` (``old_rows`` or ``new_rows``) as the head computes them (its dtype)."""
        return torch.nn.functional.linear(h, rows, self.bias_rows).float()


def head_logits64(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Every head row's logit at hidden states `h`, in float64 (the reference the incremental update keeps)."""
    z = h.double() @ weight.detach().double().T
    return z if bias is None else z + bias.detach().double()


def head_normaliser(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor) -> tuple:
    """float64 log-normaliser over every head row [B, T] and the target logits [B, T−1] (targets ``ids[:, 1:]``)
    of hidden states `h`: what :meth:`PromptEvaluator.evaluate_incremental` updates when head rows move."""
    z = head_logits64(h, weight, bias)
    return torch.logsumexp(z, dim=-1), z[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def top_k_indices(logP: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of each row's K largest entries, in no order (ties at the K-th value: any of them). On the CPU
    by a partial sort (numpy's introselect, several times faster than ``torch.topk`` there)."""
    k = min(k, logP.shape[-1])
    if logP.device.type != "cpu" or k == logP.shape[-1] or logP.dtype not in (torch.float32, torch.float64):
        return logP.topk(k, dim=-1, sorted=False).indices
    V = logP.shape[-1]
    order = np.argpartition(logP.detach().numpy(), V - k, axis=-1)[..., V - k :]
    return torch.from_numpy(np.ascontiguousarray(order))


def top_k_set(logP: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P's top-K indices per row and the same set as a [rows, V] membership mask."""
    top = top_k_indices(logP, k)
    return top, torch.zeros_like(logP, dtype=torch.bool).scatter_(-1, top, True)


def sym_kl_topk(
    logP: torch.Tensor,
    logQ: torch.Tensor,
    k: int = 512,
    rest_floor: float = 1e-12,
    p_set: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """½[KL(P̂‖Q̂) + KL(Q̂‖P̂)] per row on U = topK(P) ∪ topK(Q) plus one rest bucket (coarse-graining).

    Works on the ≤ 2K gathered entries per row, never on [rows, V] in float64 (V is 150k for current models);
    U is topK(P) followed by the entries of topK(Q) that P's set lacks. ``p_set``: :func:`top_k_set` of P when
    the caller has it already (the base's is fixed for a whole study). The two KLs are summed as one:
    Σ_U (P − Q)(log P − log Q) + (P_rest − Q_rest)(log P_rest − log Q_rest).
    """
    k = min(k, logP.shape[-1])
    top_p, in_p = p_set if p_set is not None else top_k_set(logP, k)
    top_q = top_k_indices(logQ, k)
    idx = torch.cat([top_p, top_q], dim=-1)
    once = torch.cat([torch.ones_like(top_p, dtype=torch.bool), ~in_p.gather(-1, top_q)], dim=-1)
    lp, lq = logP.gather(-1, idx).double(), logQ.gather(-1, idx).double()
    P, Q = lp.exp().mul_(once), lq.exp().mul_(once)
    P_rest = (1.0 - P.sum(-1)).clamp_min(rest_floor)
    Q_rest = (1.0 - Q.sum(-1)).clamp_min(rest_floor)
    inside = (P.sub_(Q)).mul_(lp.sub_(lq)).sum(-1)
    return 0.5 * (inside + (P_rest - Q_rest) * (P_rest.log() - Q_rest.log()))


class PromptEvaluator:
    """Encoded prompts in a fixed order, batched with right padding; evaluates any model sharing B's tokenizer."""

    def __init__(
        self,
        tokenizer,
        texts: list[str],
        *,
        batch_size: int = 8,
        max_length: int = 512,
        positions: str = "tail:8",
        pad_id: int = 0,
        device: str = "cpu",
    ):
        self.seqs, self.token_bytes, self.token_classes = [], [], []
        for text, enc in zip(texts, tokenizer.encode_batch(list(texts)), strict=True):
            ids = enc.ids[:max_length]
            if len(ids) < 2:
                continue
            spelled, classes = _spelled_bytes(text, enc.offsets[: len(ids)])
            self.seqs.append(ids)
            self.token_bytes.append(spelled)
            self.token_classes.append(classes)
        if not self.seqs:
            raise LmsurgeonError("no prompt has 2 or more tokens (empty prompts)")
        self.batch_size, self.pad_id, self.device = batch_size, pad_id, device
        self.positions = [kl_positions(len(s), positions) for s in self.seqs]
        self.n_tokens = sum(len(s) - 1 for s in self.seqs)
        self.n_bytes = sum(sum(b) for b in self.token_bytes)
        self.class_bytes = torch.zeros(SPECIAL + 1, dtype=torch.int64)
        for spelled, classes in zip(self.token_bytes, self.token_classes, strict=True):
            self.class_bytes.index_add_(0, torch.tensor(classes), torch.tensor(spelled))
        self.class_bytes = self.class_bytes[:-1]
        self.batches = [self._prepare(a) for a in range(0, len(self.seqs), batch_size)]

    def _prepare(self, a: int) -> dict:
        """One right-padded batch, built once: ids, mask, which next-token targets count, and the KL picks."""
        group = self.seqs[a : a + self.batch_size]
        L = max(len(s) for s in group)
        ids = torch.full((len(group), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), L), dtype=torch.long)
        for r, s in enumerate(group):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        cls = torch.full((len(group), L - 1), SPECIAL, dtype=torch.long)
        for r in range(len(group)):
            cls[r, : len(group[r]) - 1] = torch.tensor(self.token_classes[a + r])
        rows = torch.cat([torch.full((len(self.positions[a + r]),), r) for r in range(len(group))])
        cols = torch.cat([torch.tensor(self.positions[a + r]) for r in range(len(group))])
        return {
            "ids": ids.to(self.device),
            "mask": mask.to(self.device),
            "valid": mask[:, 1:].bool().to(self.device),
            "pick": (rows.to(self.device), cols.to(self.device)),
            "classes": cls.flatten().to(self.device),
        }

    @torch.no_grad()
    def evaluate(self, model, keep_head_inputs: bool = False, keep_token_nll: bool = False) -> Evaluation:
        """NLL in float32, summed in float64; log-probs at the KL positions of every prompt, in order.

        ``keep_head_inputs`` also keeps the LM head's input per batch, so a change to the head alone (Stage B)
        is evaluated by :meth:`evaluate_head` without running the transformer body again. ``keep_token_nll``
        keeps every target's NLL (what the domain gate of methods.md §M10 reads). A layer-streamed model
        (anything with a ``head_inputs`` method) computes all batches block by block instead, and its head is
        scored a few prompts at a time (:meth:`_score_hidden`).
        """
        if hasattr(model, "head_inputs"):
            hidden = model.head_inputs([(b["ids"], b["mask"]) for b in self.batches])
            ev = self._score_hidden(model.head_logits, hidden, keep_token_nll)
            ev.head_inputs = hidden if keep_head_inputs else None
            return ev
        seen: list[torch.Tensor] = []
        hook = None
        if keep_head_inputs:
            hook = model.get_output_embeddings().register_forward_hook(
                lambda module, args, output: seen.append(args[0].detach())
            )
        try:
            ev = self._score(
                (model(input_ids=b["ids"], attention_mask=b["mask"]).logits for b in self.batches), keep_token_nll
            )
        finally:
            if hook is not None:
                hook.remove()
        ev.head_inputs = seen if keep_head_inputs else None
        return ev

    @torch.no_grad()
    def evaluate_incremental(
        self,
        model,
        head_logits,
        base: Evaluation,
        *,
        before: Evaluation | None = None,
        changed_ids: list[int] | tuple = (),
        delta: HeadDelta | None = None,
        share_of: torch.Tensor | None = None,
    ) -> Evaluation:
        """:meth:`evaluate` of the model in place, redoing only what a merge changed since `base` (methods.md
        §M8.3); exact up to float rounding when ``head_logits`` reproduces the model, which the merge checks once.

        `changed_ids`: embedding rows moved since `base` (since `before`, when given); `delta`: every head row
        moved since `base` (None: the head is the base's); `before`: an evaluation of the model in place before
        those head rows moved (made by this method, or a full one; default: the base). Per position:
        - from the first moved embedding row of a prompt on, the head input is new: the prompts holding one run
          the body (those of a batch together, the head left out) and the head runs at those positions only;
          under the base's head their log-normalisers (read off the float32 log-softmax) and target logits are
          kept on the result;
        - one whose head input `before` renewed keeps it: moved head rows update the normaliser `before` kept
          (else the full head runs there); an unchanged head keeps `before`'s numbers;
        - any other sees the base's head input: unchanged head → the base's numbers; moved head rows → each
          position's log-normaliser updated from the base's (``base.head_cache``) over those rows only.
        Head inputs are kept for every batch, and which positions differ from the base's. `share_of`: head rows
        about to move; the kept numbers of the re-run positions include their share of the mass, so the update
        needs no logits of those rows' old values."""
        assert base.head_inputs is not None, "the base evaluation kept no head inputs"
        if before is base:
            before = None
        changed = torch.tensor(sorted(set(changed_ids)), dtype=torch.long, device=self.device)
        moved_head = delta is not None and delta.ids.numel() > 0
        use_delta = (
            moved_head
            and base.head_cache is not None
            and delta.ids.numel() <= HEAD_DELTA_MAX_FRACTION * delta.weight.shape[0]
        )
        keep_cache = not moved_head and base.head_cache is not None
        counts = [len(b["pick"][0]) for b in self.batches]
        base_picked = torch.split(base.logprobs, counts)
        before_picked = torch.split(before.logprobs, counts) if before is not None else None
        seen: list[torch.Tensor] = []
        fresh_masks: list[torch.Tensor] = []
        caches: list[FreshCache | None] = []
        share = (
            None if share_of is None or not keep_cache else torch.zeros(base.logprobs.shape[-1], 1, device=self.device)
        )
        if share is not None:
            share[share_of.to(self.device)] = 1.0

        def batch(i: int, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
            positions = b["mask"].bool()
            h_base = base.head_inputs[i]
            h = h_base if before is None else before.head_inputs[i]
            renewed = torch.zeros_like(positions)
            if changed.numel():  # causal: a head input changes from the prompt's first moved row on (padding too)
                renewed = (torch.isin(b["ids"], changed) & positions).cumsum(-1).bool()
            earlier = torch.zeros_like(positions)
            if before is not None:  # a full evaluation (no mask) differs from the base everywhere
                earlier = (before.fresh[i] if before.fresh is not None else torch.ones_like(positions)) & ~renewed
            fresh, prev = renewed & positions, earlier & positions
            rest = positions & ~(fresh | prev)
            cache = None
            if renewed.any():
                run = renewed.any(-1)
                h = h.clone()
                h[renewed] = _body_outputs(model, _sub_batch(b, run)[0])[renewed[run]]
            seen.append(h)
            fresh_masks.append(renewed | earlier)
            if not (fresh.any() or prev.any() or moved_head):
                caches.append(None)
                return base.targets[i], base_picked[i]
            scores = _Scores(b, base_picked[i], head_logits)
            if fresh.any():
                cache = scores.full(fresh, h, keep=keep_cache, share_of=share)
                if cache is not None and share is not None:
                    cache = cache._replace(share_ids=share_of)
            if prev.any():
                assert before is not None and before_picked is not None
                kept = before.fresh_cache[i] if before.fresh_cache is not None else None
                if not moved_head:
                    scores.copy(prev, before.targets[i], before_picked[i])
                elif use_delta and kept is not None and not (prev & ~kept.where).any():
                    assert delta is not None
                    scores.update(prev, h, kept, delta, exact=False)
                else:
                    scores.full(prev, h)
            if rest.any():
                if not moved_head:
                    scores.copy(rest, base.targets[i], base_picked[i])
                elif use_delta:
                    assert base.head_cache is not None and delta is not None
                    scores.update(rest, h_base, base.head_cache[i], delta, exact=True)
                else:
                    scores.full(rest, h_base)
            caches.append(cache)
            return scores.result()

        ev = self._collect(batch(i, b) for i, b in enumerate(self.batches))
        ev.head_inputs, ev.fresh = seen, fresh_masks
        ev.fresh_cache = caches if any(c is not None for c in caches) else None
        return ev

    def keep_head_cache(self, ev: Evaluation, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Keep on `ev` (an evaluation with head inputs) what :meth:`evaluate_incremental` needs to update it
        after head rows move: per batch, the float64 log-normaliser and target logits of the head `weight`."""
        assert ev.head_inputs is not None
        ev.head_cache = [
            head_normaliser(h, weight, bias, b["ids"]) for b, h in zip(self.batches, ev.head_inputs, strict=True)
        ]

    @torch.no_grad()
    def evaluate_head(self, head_logits, head_inputs: list[torch.Tensor]) -> Evaluation:
        """The same numbers with the body's outputs reused: logits = ``head_logits(h)`` per batch."""
        return self._score_hidden(head_logits, head_inputs)

    def _batch_scores(self, b: dict, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch's target log-probs [B, T−1] (float32) and its log-probs at the KL positions."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = logp[:, :-1].gather(-1, b["ids"][:, 1:, None])[..., 0]
        return target, logp[b["pick"]].cpu()

    @torch.no_grad()
    def _score_hidden(self, head_logits, hidden: list[torch.Tensor], keep_token_nll: bool = False) -> Evaluation:
        """:meth:`_score` from the head's inputs: each batch's logits made and scored a few prompts at a time,
        :data:`LOGIT_CHUNK_BYTES` of float32 logits at most. A batch's whole [B, T, V] logits, their float32 copy
        and log-softmax are 1.3 GB at GLM-4.5-Air's 151,552 words for 8 prompts of 130 tokens. Each position's
        numbers depend on its own row only, so they are those of the whole batch."""

        def scores(b: dict, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            B, T = b["ids"].shape
            target = torch.empty((B, T - 1), dtype=torch.float32, device=h.device)
            pick_rows, pick_cols = b["pick"]  # in prompt order, so the chunks' picks concatenate in order
            picks = []
            a, rows = 0, 1  # the first prompt's logits give the vocabulary, and so the chunk
            while a < B:
                logits = head_logits(h[a : a + rows])
                z = a + logits.shape[0]
                mine = (pick_rows >= a) & (pick_rows < z)
                t, p = self._batch_scores(
                    {"ids": b["ids"][a:z], "pick": (pick_rows[mine] - a, pick_cols[mine])}, logits
                )
                target[a:z] = t
                picks.append(p)
                a, rows = z, max(1, LOGIT_CHUNK_BYTES // (4 * T * logits.shape[-1]))
                del logits
            return target, torch.cat(picks)

        return self._collect((scores(b, h) for b, h in zip(self.batches, hidden, strict=True)), keep_token_nll)

    def _score(self, logits_per_batch, keep_token_nll: bool = False) -> Evaluation:
        """Consume one batch's logits at a time (a [B, T, V] tensor per batch, never all batches at once)."""
        return self._collect(
            (self._batch_scores(b, logits) for b, logits in zip(self.batches, logits_per_batch, strict=True)),
            keep_token_nll,
        )

    def _collect(self, scores_per_batch, keep_token_nll: bool = False) -> Evaluation:
        """Sum per-batch (target log-probs, KL-position log-probs) into an evaluation, in float64."""
        nll_sum, picked, token_nll, targets = 0.0, [], [], []
        class_nll = torch.zeros(SPECIAL + 1, dtype=torch.float64, device=self.device)
        for b, (target, pick) in zip(self.batches, scores_per_batch, strict=True):
            nll_sum -= float(torch.where(b["valid"], target, 0.0).sum(dtype=torch.float64))
            class_nll.index_add_(0, b["classes"], -target.flatten().double())
            picked.append(pick)
            targets.append(target)
            if keep_token_nll:
                token_nll.append(torch.where(b["valid"], -target, 0.0).cpu())
        return Evaluation(
            nll_sum,
            self.n_tokens,
            torch.cat(picked),
            n_bytes=self.n_bytes,
            class_nll=class_nll[:-1].cpu(),
            class_bytes=self.class_bytes,
            token_nll=token_nll if keep_token_nll else None,
            targets=targets,
        )


def _body_outputs(model, batch: dict) -> torch.Tensor:
    """The LM head's input at every position of `batch`, the body run alone: a forward pre-hook keeps what the
    head is given and hands it an empty slice, so the head's logits are computed afterwards only where needed."""
    seen: list[torch.Tensor] = []

    def keep_and_skip(module, args):
        seen.append(args[0].detach())
        return (args[0][..., :0, :], *args[1:])

    hook = model.get_output_embeddings().register_forward_pre_hook(keep_and_skip)
    try:
        model(input_ids=batch["ids"], attention_mask=batch["mask"])
    finally:
        hook.remove()
    return seen[-1]


class _Scores:
    """One batch's target log-probs (float64, [B, T−1]) and KL-position log-probs, filled one set of positions
    ([B, T] mask) at a time, each by the cheapest exact way (methods.md §M8.3)."""

    def __init__(self, b: dict, picked_like: torch.Tensor, head_logits):
        ids = b["ids"]
        self.head_logits = head_logits
        self.target = torch.zeros(ids.shape, dtype=torch.float64, device=ids.device)  # last column: no target
        self.next_ids = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # each position's target (last: a stand-in)
        self.picked = torch.empty_like(picked_like)
        self.pick_rows, self.pick_cols = b["pick"]

    def _picks(self, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which KL positions lie in `where` (a mask on the CPU) and their index among its positions."""
        inside = where[self.pick_rows, self.pick_cols]
        rank = where.flatten().cumsum(0).view(where.shape) - 1
        return inside.cpu(), rank[self.pick_rows[inside], self.pick_cols[inside]]

    def copy(self, where: torch.Tensor, targets: torch.Tensor, picked: torch.Tensor) -> None:
        """An evaluation's numbers at positions whose head input and head it shares."""
        t = where[:, :-1]
        self.target[:, :-1][t] = targets[t].double()
        inside = where[self.pick_rows, self.pick_cols].cpu()
        self.picked[inside] = picked[inside]

    def full(
        self, where: torch.Tensor, h: torch.Tensor, keep: bool = False, share_of: torch.Tensor | None = None
    ) -> FreshCache | None:
        """The head at `where`: each target's log-probability z_y − L with L = m + log Σ_v e^{z_v − m} summed over
        the float32 logits in place (no second [positions, V] tensor), the KL positions' log-softmax; with `keep`,
        what a later head-row change updates (log-normaliser, target logit), and with `share_of` (a [V, 1]
        indicator of head rows R) Σ_R e^{z_r − L} from the same pass. The positions are taken
        :data:`LOGIT_CHUNK_BYTES` of float32 logits at a time (8 prompts of 512 tokens at a 151,552-word vocabulary
        would be 2.5 GB at once); each position's numbers depend on its own row only."""
        h_at, next_ids = h[where], self.next_ids[where]
        n, vocab = h_at.shape[0], self.picked.shape[-1]
        inside, k = self._picks(where)
        picked = torch.empty((int(k.numel()), vocab), dtype=self.picked.dtype)
        y_logit = torch.empty(n, dtype=torch.float64, device=h.device)
        lse, total = torch.empty_like(y_logit), torch.empty_like(y_logit)
        share = torch.empty_like(y_logit) if share_of is not None else None
        rows = max(1, LOGIT_CHUNK_BYTES // (4 * vocab))
        for a in range(0, n, rows):
            z = self.head_logits(h_at[a : a + rows]).float()
            b = a + z.shape[0]
            y_logit[a:b] = z.gather(1, next_ids[a:b, None])[:, 0].double()
            mine = (k >= a) & (k < b)
            if mine.any():
                picked[mine.cpu()] = torch.log_softmax(z[k[mine] - a], dim=-1).cpu()
            top = z.amax(-1, keepdim=True)
            e = z.sub_(top).exp_()
            total[a:b] = e.sum(-1).double()
            lse[a:b] = top[:, 0].double() + total[a:b].log()
            if share is not None:
                share[a:b] = (e @ share_of)[:, 0].double() / total[a:b]
            del z, e
        if inside.any():
            self.picked[inside] = picked
        self.target[where] = y_logit - lse
        if not keep:
            return None
        lse_all, y_all = torch.zeros_like(self.target), torch.zeros_like(self.target)
        lse_all[where], y_all[where] = lse, y_logit
        share_all = None
        if share is not None:
            share_all = torch.zeros_like(self.target)
            share_all[where] = share
        return FreshCache(lse_all, y_all[:, :-1], where, share_all)

    def update(
        self,
        where: torch.Tensor,
        h: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | FreshCache,
        delta: HeadDelta,
        exact: bool,
    ) -> None:
        """Head input unchanged since `cache` (log-normaliser L, target logits), head rows R moved since:
        L′ = L + log(1 − Σ_R e^{z_r − L} + Σ_R e^{z′_r − L}), the full head where 1 − Σ_R e^{z_r − L} falls below
        the cancellation limit (the difference would cancel). `exact`: a float64 cache (the base's), updated in
        float64; otherwise one read off float32 logits, updated as precisely as it is (in the head's dtype). The
        KL positions take the full head (their whole distribution is needed), a few per prompt."""
        lse_all, y_all = cache[0], cache[1]
        h_at = h[where]
        lse = lse_all[where]
        if exact:
            h64 = h_at.double()
            z_new, shift = delta.logits(h64, delta.new), lse[:, None]
            rest = 1.0 - (delta.logits(h64, delta.old) - shift).exp_().sum(-1)
        else:
            z_new, shift = delta.rows_as_head(h_at, delta.new_rows), lse.float()[:, None]
            if isinstance(cache, FreshCache) and cache.share is not None and _same_rows(cache.share_ids, delta.ids):
                rest = 1.0 - cache.share[where]  # the old rows' share, summed when the cache was made
            else:
                rest = 1.0 - (delta.rows_as_head(h_at, delta.old_rows) - shift).exp_().sum(-1).double()
        lse_new = lse + torch.log(rest.clamp_min(0.0) + (z_new - shift).exp_().sum(-1).double())
        cancel = rest < (CANCELLATION if exact else CANCELLATION_FLOAT32)
        if cancel.any():
            lse_new[cancel] = torch.logsumexp(head_logits64(h_at[cancel], delta.weight, delta.bias), -1)
        column = delta.column[self.next_ids[where]]
        moved = z_new.gather(1, column.clamp_min(0)[:, None])[:, 0].double()
        kept = torch.nn.functional.pad(y_all, (0, 1))[where]
        self.target[where] = torch.where(column >= 0, moved, kept) - lse_new
        inside, k = self._picks(where)
        if inside.any():
            self.picked[inside] = torch.log_softmax(self.head_logits(h_at[k]).float(), dim=-1).cpu()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.target[:, :-1], self.picked


def _same_rows(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.numel() == b.numel() and torch.equal(a.to(b.device).sort().values, b.sort().values)


def _sub_batch(b: dict, rows: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The prompts `rows` (bool [B]) of a batch as a batch of their own, and which of the batch's KL positions
    are theirs (a mask on the CPU, where the KL positions' log-probs are kept)."""
    pick_rows, pick_cols = b["pick"]
    mine = rows[pick_rows]
    renumber = torch.cumsum(rows.long(), 0) - 1
    sub = {"ids": b["ids"][rows], "mask": b["mask"][rows], "pick": (renumber[pick_rows[mine]], pick_cols[mine])}
    return sub, mine.cpu()


def _spelled_bytes(text: str, offsets: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Per scored token (every token but the first): the UTF-8 bytes of `text` it accounts for, and its class.

    Token j accounts for the text from where the tokens before it end to where it ends, so the scored tokens
    together spell exactly the text after the first token up to the end of the last one (truncation included):
    bits per byte divides their NLL by those bytes and no others. Byte-fallback pieces of one character share
    its offsets; the first of them carries its bytes, the others none. A first token that only marks a word
    start (SentencePiece's prepended ▁) overlaps the next token's offsets and spells nothing. A token the
    tokenizer added (empty offsets) spells nothing and goes to the SPECIAL bucket, which bits per byte leaves
    out.
    """
    spelled, classes = [], []
    end = min(offsets[0][1], offsets[1][0])  # a prepended word marker (▁) shares the next token's offsets
    for start, stop in offsets[1:]:
        chunk = text[end:stop] if stop > end else ""
        spelled.append(len(chunk.encode("utf-8")))
        if start == stop:  # a special token the tokenizer added (</s>, <sep>): it spells no text
            classes.append(SPECIAL)
        else:
            classes.append(TOKEN_CLASSES.index(token_class(chunk or text[start:stop])))
        end = max(end, stop)
    return spelled, classes


def relative_ppl(current: Evaluation, base: Evaluation) -> float:
    """r = PPL(current) / PPL(B)."""
    return current.ppl / base.ppl


def sym_kl(current: Evaluation, base: Evaluation, k: int = 512) -> float:
    """Mean symmetric top-K KL over every (prompt, position) pair; the base's top-K is computed once."""
    k = min(k, base.logprobs.shape[-1])
    if k not in base.top_k:
        base.top_k[k] = top_k_set(base.logprobs, k)
    return float(sym_kl_topk(base.logprobs, current.logprobs, k, p_set=base.top_k[k]).mean())
