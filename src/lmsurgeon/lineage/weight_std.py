"""The second public dispute's naive test: per-layer standard deviation of attention weights, Pearson across layers.

The accusation against Pangu Pro MoE (that it was up-cycled from Qwen-2.5 14B) rested on a fingerprint made of the
standard deviation of each layer's W_Q, W_K, W_V and W_O: for each role, the profile of standard deviations over
depth, normalised, and the correlation of two models' profiles. Like the norm-gain cosine of the first dispute
(methods.md §L2) it is reproduced here faithfully so a report can show it beside its correction: the standard
deviation of a trained matrix is set mostly by its shape, its initialisation scale, the optimiser and how far
training moves each layer, all of which are shared by any two models of the same recipe. Independent models trained
the same way score high too (``tests/test_lineage_weight_std.py`` measures it on the test zoo).

Definitions. σ_r[l] is the population standard deviation (ddof 0) of all entries of layer l's matrix of role r.
The score per role is Pearson's r of the two models' σ_r over paired layers (invariant to any affine normalisation
of either profile, so the dispute's normalisation does not change it). The fingerprint score is Pearson's r of the
concatenated, per-role z-scored profiles, which equals the mean of the per-role scores (each z-scored block has
mean 0 and norm √L).

What it survives and what evades it: permuting residual dimensions, heads or MLP units leaves every σ exactly as it
was, and orthogonal maps (a residual rotation, orthogonal per-head maps) nearly so (they keep each matrix's
Frobenius norm; only the mean of its entries moves). But a per-head scaling, s on W_Q and 1/s on W_K (or on W_V and
W_O), sets each layer's σ at will without changing the function, and γ-folding rescales them too: the statistic is
as easy to evade as it is to fool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.lineage import stats

ROLES = ("q", "k", "v", "o")
SAMPLE_ROWS = 1024  # stored rows read per matrix for its σ on large checkpoints (see sampled_std)


def layer_stds(matrices: Sequence) -> np.ndarray:
    """σ[l]: population standard deviation (ddof 0) of all entries of each layer's matrix, float64."""
    return np.array([float(np.std(np.asarray(W, dtype=np.float64))) for W in matrices])


def sampled_std(layout, role: str, layer: int, max_rows: int = SAMPLE_ROWS, seed: int = 0) -> float:
    """σ of one layer's ``role`` matrix from at most ``max_rows`` of its stored rows (all of them when it has
    fewer, or when the tensor is fused with other roles and must be split first).

    Why a sample: the statistic is one number per matrix, and on a 100B-class checkpoint reading every q/k/v/o
    whole would cost about 5 % of the checkpoint for the naive section alone (methods.md §L2.1). ``max_rows``
    rows of width d give max_rows·d entries, so the relative standard error of σ is about 1/√(2·max_rows·d)
    (below 0.02 % at the default on any width ≥ 1024), far below the layer-to-layer differences the
    profile correlates."""
    name = layout.require(role, layer)
    n_rows = layout.handle.info(name).shape[0]
    if layout.family.spec(role).split is not None or n_rows <= max_rows:
        return float(np.std(layout.read(role, layer, dtype=np.float32).astype(np.float64)))
    idx = np.sort(np.random.default_rng([seed, layer, n_rows]).choice(n_rows, max_rows, replace=False))
    return float(np.std(layout.handle.rows(name, idx, np.float32).astype(np.float64)))


def zscore(profile) -> np.ndarray:
    """(x − mean) / std (ddof 0) of one profile; nan everywhere for a constant profile."""
    x = np.asarray(profile, dtype=np.float64)
    s = x.std()
    return (x - x.mean()) / s if s > 0 else np.full_like(x, np.nan)


@dataclass(frozen=True)
class WeightStdComparison:
    """Both models' σ profiles, the per-role Pearson r over the layer pairs, and the fingerprint score."""

    stds_a: dict[str, np.ndarray]  # role → σ per layer of model A
    stds_b: dict[str, np.ndarray]
    pairs: list[tuple[int, int]]
    per_role: dict[str, float]  # role → Pearson r of the paired profiles
    fingerprint: float  # Pearson r of the concatenated z-scored profiles (= mean of per_role)


def compare_weight_std(
    weights_a: Mapping[str, Sequence],
    weights_b: Mapping[str, Sequence],
    pairs: Sequence[tuple[int, int]] | None = None,
    roles: Sequence[str] = ROLES,
) -> WeightStdComparison:
    """The dispute's statistic for two models given per-role lists of per-layer matrices (any orientation).

    ``pairs`` (A layer, B layer) defaults to the identity for models of equal depth; pass a depth map otherwise.
    A role missing from either model is an error (the fingerprint would silently change meaning without it).
    """
    for name, weights in (("A", weights_a), ("B", weights_b)):
        missing = [r for r in roles if r not in weights or len(weights[r]) == 0]
        if missing:
            raise LmsurgeonError(f"model {name} has no weights for role(s) {', '.join(missing)}")
    stds_a = {r: layer_stds(weights_a[r]) for r in roles}
    stds_b = {r: layer_stds(weights_b[r]) for r in roles}
    return compare_std_profiles(stds_a, stds_b, pairs, roles)


def compare_std_profiles(
    stds_a: Mapping[str, np.ndarray],
    stds_b: Mapping[str, np.ndarray],
    pairs: Sequence[tuple[int, int]] | None = None,
    roles: Sequence[str] = ROLES,
) -> WeightStdComparison:
    """:func:`compare_weight_std` on σ profiles already measured (role → σ per layer), e.g. by
    :func:`sampled_std` on checkpoints too large to read whole."""
    stds_a = {r: np.asarray(stds_a[r], dtype=np.float64) for r in roles}
    stds_b = {r: np.asarray(stds_b[r], dtype=np.float64) for r in roles}
    n_a, n_b = len(stds_a[roles[0]]), len(stds_b[roles[0]])
    if pairs is None:
        if n_a != n_b:
            raise LmsurgeonError(f"models of {n_a} and {n_b} layers need an explicit layer map")
        pairs = [(i, i) for i in range(n_a)]
    pairs = [(int(i), int(j)) for i, j in pairs]
    if len(pairs) < 3:
        raise LmsurgeonError(f"a correlation across layers needs at least 3 layer pairs, got {len(pairs)}")
    ia = np.array([i for i, _ in pairs])
    ib = np.array([j for _, j in pairs])
    per_role = {r: stats.pearson(stds_a[r][ia], stds_b[r][ib]) for r in roles}
    fingerprint = stats.pearson(
        np.concatenate([zscore(stds_a[r][ia]) for r in roles]), np.concatenate([zscore(stds_b[r][ib]) for r in roles])
    )
    return WeightStdComparison(stds_a, stds_b, pairs, per_role, fingerprint)
