"""Per-layer linear approximation A_i (methods.md §S5.1), accumulated over batches in float64.

Only the normal-equation sums are kept (G = X̂ᵀX̂, C = X̂ᵀY, ‖Y‖², ΣY, n per layer), so the fit split streams
through in batches and is then discarded; R² on the fit split follows from the same sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmsurgeon.swap.metrics import context_mix_batch, fit_A, fit_residual, r_squared


@dataclass
class NormalSums:
    """Running sums for one layer's least-squares fit X̂_i A ≈ Y_i = X_{i+1} − X_i."""

    G: torch.Tensor  # [d, d] float64
    C: torch.Tensor  # [d, d] float64
    y_sq: float = 0.0
    y_sum: torch.Tensor | None = None
    n: int = 0


@dataclass
class LinearFit:
    """The fitted A_i of every layer with its fit-split R².

    The normal-equation sums are not kept: two d × d float64 matrices per layer (256 MiB per layer at width
    4096, 11.5 GiB at 46 layers) that nothing reads after the solve would stay alive through the eval pass.
    ``A`` is a list, or for a streamed model ``streaming.spill.DiskTensors``, read a layer at a time."""

    A: Sequence[np.ndarray]
    r2_fit: list[float]
    n_fit: int
    ridge: float
    window: int


def new_sums(n_layers: int, d: int, device) -> list[NormalSums]:
    return [
        NormalSums(
            G=torch.zeros(d, d, dtype=torch.float64, device=device),
            C=torch.zeros(d, d, dtype=torch.float64, device=device),
            y_sum=torch.zeros(d, dtype=torch.float64, device=device),
        )
        for _ in range(n_layers)
    ]


def pair_inputs(h_i: torch.Tensor, h_next: torch.Tensor, sel: torch.Tensor, window: int):
    """(X̂_i, Y_i) at the selected tokens, float64: X̂ mixes each token with up to window−1 tokens before it."""
    X = h_i.double()
    Xhat = context_mix_batch(X, window)[sel]
    Y = (h_next.double() - X)[sel]
    return Xhat, Y


def accumulate(sums: list[NormalSums], h: list[torch.Tensor], sel: torch.Tensor, window: int) -> None:
    """Add one batch's tokens to every layer's sums (h: captured states, h[i] input of layer i)."""
    for i, s in enumerate(sums):
        Xhat, Y = pair_inputs(h[i], h[i + 1], sel, window)
        s.G += Xhat.T @ Xhat
        s.C += Xhat.T @ Y
        s.y_sq += float((Y * Y).sum())
        s.y_sum += Y.sum(0)
        s.n += int(Y.shape[0])


def solve(sums: list[NormalSums], ridge: float, window: int) -> LinearFit:
    """A_i = (G + λ·tr(G)/d·I)⁻¹ C for every layer (float64), and R² on the fit split."""
    A, r2 = [], []
    for s in sums:
        G, C = s.G.cpu().numpy(), s.C.cpu().numpy()
        A_i = fit_A(G, C, ridge)
        A.append(A_i)
        r2.append(r_squared(fit_residual(A_i, G, C, s.y_sq), s.y_sq, s.y_sum.cpu().numpy(), s.n))
    return LinearFit(A=A, r2_fit=r2, n_fit=sums[0].n if sums else 0, ridge=ridge, window=window)
