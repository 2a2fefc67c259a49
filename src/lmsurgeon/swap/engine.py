"""The two passes of a swap analysis: fit A_i on the fit split, then measure everything on the eval split.

Per batch: one captured forward, then running sums of every statistic, then the cache is discarded (methods.md §S8),
so memory is ≈ (L+1)·B·T·d activations plus d² float64 per layer. The eval pass per batch:

* δ(i, i+1): block i on block i+1's output on h_i (2 block calls per pair, the inner one reused by drops);
* δ'(i, i+1): X̂_i (A_iA_{i+1} − A_{i+1}A_i), no model call;
* BI(i), ang1(i), ang2(i), eval-split R²;
* end-to-end (decoders): from the exchanged pair's output (and from L_{i+1}(h_i) for dropping layer i) run
  the remaining blocks, final norm and head: Δloss, KL(p_orig ‖ p_swap).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lmsurgeon.streaming.spill import DiskTensors
from lmsurgeon.swap.capture import Capture, call_block, capture, swapped_output, token_delta
from lmsurgeon.swap.e2e import Head, reference_logp, token_losses
from lmsurgeon.swap.linear import LinearFit, accumulate, new_sums, pair_inputs, solve
from lmsurgeon.swap.metrics import angle_per_row, cosine_per_token, delta_linear_per_token, r_squared


@dataclass
class Batch:
    """One right-padded batch and the token selections every statistic uses."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    skip_first: int = 0

    @property
    def sel(self) -> torch.Tensor:
        """Real positions counted by δ, δ', BI, R² and the fit: not padding, not among the first skip_first."""
        pos = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)[None, :]
        return self.attention_mask.bool() & (pos >= self.skip_first)

    @property
    def last(self) -> torch.Tensor:
        """Index of each row's last real token (angular distance of Gromov et al.)."""
        return self.attention_mask.sum(1) - 1

    @property
    def loss_sel(self) -> torch.Tensor:
        """Positions that predict a real next token (padding and each row's last position excluded)."""
        m = self.attention_mask.bool()
        out = torch.zeros_like(m)
        out[:, :-1] = m[:, :-1] & m[:, 1:]
        return out

    @property
    def targets(self) -> torch.Tensor:
        t = torch.zeros_like(self.input_ids)
        t[:, :-1] = self.input_ids[:, 1:]
        return t

    def inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


@dataclass
class EvalSums:
    """Running sums over the eval split; ``finish`` turns them into per-layer and per-pair means."""

    n_layers: int
    n_tok: int = 0
    n_rows: int = 0
    n_loss: int = 0
    delta: np.ndarray = None
    delta_lin: np.ndarray = None
    bi_cos: np.ndarray = None
    ang1: np.ndarray = None
    ang2: np.ndarray = None
    resid: np.ndarray = None
    y_sq: np.ndarray = None
    y_sum: list = None
    loss0: float = 0.0
    dloss_swap: np.ndarray = None
    kl_swap: np.ndarray = None
    dloss_drop: np.ndarray = None
    kl_drop: np.ndarray = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        L = self.n_layers
        for name, n in [
            ("delta", L - 1),
            ("delta_lin", L - 1),
            ("bi_cos", L),
            ("ang1", L),
            ("ang2", L - 1),
            ("resid", L),
            ("y_sq", L),
            ("dloss_swap", L - 1),
            ("kl_swap", L - 1),
            ("dloss_drop", L),
            ("kl_drop", L),
        ]:
            setattr(self, name, np.zeros(n))
        self.y_sum = [0.0] * L


def fit_pass(
    model, layers_paths, batches, n_layers: int, d: int, window: int, ridge: float, device, tick=None
) -> LinearFit:
    """A_i for every layer from the fit split.

    A model that streams its blocks (one with ``layer_pairs``: :class:`lmsurgeon.swap.streamed.StreamedSwapModel`)
    runs the split layer-major: every batch through block i, then layer i's sums are solved and freed. One
    layer's normal-equation sums (2 d × d float64: 256 MiB at width 4,096) are alive instead of all L layers'
    (11.5 GiB at 46), and each block is read once per pass instead of once per batch. Any other model: one
    captured forward per batch, every layer's sums kept. The sums add the same batches in the same order either
    way, so the A_i are the same."""
    if hasattr(model, "layer_pairs"):
        solved, A = [], DiskTensors()  # the A_i wait on disk: the eval pass reads them a pair at a time
        for _, pairs in model.layer_pairs([b.inputs() for b in batches]):
            one = new_sums(1, d, device)
            for (h_i, h_next), b in zip(pairs, batches, strict=True):
                accumulate(one, [h_i, h_next], b.sel, window)
            solved.append(solve(one, ridge, window))
            A.append(solved[-1].A[0])
            solved[-1].A = []
            del one, pairs
        for _ in batches if tick else ():
            tick()
        return LinearFit(
            A=A,
            r2_fit=[f.r2_fit[0] for f in solved],
            n_fit=solved[0].n_fit if solved else 0,
            ridge=ridge,
            window=window,
        )
    sums = new_sums(n_layers, d, device)
    for b in batches:
        cap = capture(model, layers_paths, **b.inputs())
        accumulate(sums, cap.h, b.sel, window)
        if tick:
            tick()
    return solve(sums, ridge, window)


def eval_pass(
    model, layers, layers_paths, batches, fit: LinearFit, head: Head | None, window: int, device, tick=None
) -> EvalSums:
    """All eval-split statistics, batch by batch."""
    L = len(layers)
    S = EvalSums(L)
    # held A_i go to the device once; A_i on disk (a streamed model's) are read a pair at a time per batch
    maps = fit.A if isinstance(fit.A, DiskTensors) else [torch.from_numpy(a).to(device) for a in fit.A]
    for b in batches:
        cap = capture(model, layers_paths, **b.inputs())
        _layer_stats(S, cap, b, maps, window, device)
        _pair_stats(S, layers, cap, b, head)
        if tick:
            tick()
    return S


def _layer_stats(S: EvalSums, cap: Capture, b: Batch, maps, window: int, device) -> None:
    """Per-layer sums of one batch; the A_i (``maps``, possibly on disk) are taken a pair at a time."""
    sel, last, rows = b.sel, b.last, torch.arange(b.input_ids.shape[0], device=b.input_ids.device)
    S.n_tok += int(sel.sum())
    S.n_rows += int(rows.numel())
    L = S.n_layers
    A_next = torch.as_tensor(maps[0], device=device)
    for i in range(L):
        A_i, A_next = A_next, torch.as_tensor(maps[i + 1], device=device) if i < L - 1 else None
        Xhat, Y = pair_inputs(cap.h[i], cap.h[i + 1], sel, window)
        XA = Xhat @ A_i
        R = XA - Y
        S.resid[i] += float((R * R).sum())
        S.y_sq[i] += float((Y * Y).sum())
        S.y_sum[i] = S.y_sum[i] + Y.sum(0).cpu().numpy()
        if i < L - 1:
            S.delta_lin[i] += float(delta_linear_per_token(Xhat, A_i, A_next, XA).sum())  # eq. 16
        S.bi_cos[i] += float(cosine_per_token(cap.h[i][sel], cap.h[i + 1][sel]).sum())
        S.ang1[i] += float(angle_per_row(cap.h[i][rows, last], cap.h[i + 1][rows, last]).sum())
        if i < L - 1:
            S.ang2[i] += float(angle_per_row(cap.h[i][rows, last], cap.h[i + 2][rows, last]).sum())


def _pair_stats(S: EvalSums, layers, cap: Capture, b: Batch, head: Head | None) -> None:
    sel = b.sel
    L = S.n_layers
    if head is not None:
        lsel, tgt = b.loss_sel, b.targets
        ref = reference_logp(head, cap.h[L], lsel)
        ce0, _ = token_losses(head, cap.h[L], tgt, lsel)
        S.loss0 += float(ce0.sum())
        S.n_loss += int(ce0.numel())

        def score(x_final):
            ce, kl = token_losses(head, x_final, tgt, lsel, ref)
            return float((ce - ce0).sum()), float(kl.sum())

    # Layer-major: at step j blocks j−1 and j are used, pair (j−1, j) is measured, and every stream started at an
    # earlier step (the rest of the model after an exchanged pair or a dropped layer) advances through block j, so
    # a streamed model reads each block about once per batch (methods.md §S15). Same block calls as pair by pair.
    streams: list[tuple[str, int, torch.Tensor]] = []  # (kind, pair i, state after position j)
    for j in range(1, L):
        i = j - 1
        advanced = [(kind, p, call_block(layers, j, x, cap)) for kind, p, x in streams]
        inner = call_block(layers, i + 1, cap.h[i], cap)  # L_{i+1}(h_i)
        swapped = swapped_output(layers, i, cap, inner)  # L_i(L_{i+1}(h_i))
        S.delta[i] += float(token_delta(cap.h[i], cap.h[i + 2], swapped)[sel].sum())
        streams = advanced
        if head is not None:
            streams += [("swap", i, swapped), ("drop", i, inner)]  # layer i dropped: L_{i+1}(h_i)
        del inner, swapped
    if head is not None:
        for kind, i, x in streams:
            d_, k_ = score(x)
            if kind == "swap":
                S.dloss_swap[i] += d_
                S.kl_swap[i] += k_
            else:
                S.dloss_drop[i] += d_
                S.kl_drop[i] += k_
        d_, k_ = score(cap.h[L - 1])  # the last layer dropped
        S.dloss_drop[L - 1] += d_
        S.kl_drop[L - 1] += k_


def finish(S: EvalSums, has_head: bool) -> dict:
    """Means from the sums: per-layer {bi, ang1, r2_eval}, per-pair {delta, delta_linear, angular, dloss...}."""
    nt, nr, nl = max(S.n_tok, 1), max(S.n_rows, 1), max(S.n_loss, 1)
    L = S.n_layers
    out = {
        "bi": list(1.0 - S.bi_cos / nt),
        "ang1": list(S.ang1 / nr),
        "ang2": list(S.ang2 / nr),
        "delta": list(S.delta / nt),
        "delta_linear": list(S.delta_lin / nt),
        "r2_eval": [r_squared(S.resid[i], S.y_sq[i], np.asarray(S.y_sum[i]), S.n_tok) for i in range(L)],
        "n_tokens": S.n_tok,
        "n_rows": S.n_rows,
        "n_loss_tokens": S.n_loss,
    }
    if has_head:
        out["loss"] = S.loss0 / nl
        out["dloss_swap"] = list(S.dloss_swap / nl)
        out["kl_swap"] = list(S.kl_swap / nl)
        out["dloss_drop"] = list(S.dloss_drop / nl)
        out["kl_drop"] = list(S.kl_drop / nl)
    return out
