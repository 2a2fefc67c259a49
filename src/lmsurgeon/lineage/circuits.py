"""Attention circuits: per layer, the QK and OV maps of all heads together, in the residual basis (methods.md §A6).

A weight test that compares q or k matrices head by head can be evaded for free: a launderer may reorder heads and
apply any invertible per-head map M inside q·k (W_Q^h M, W_K^h M⁻ᵀ) or N between value and output (W_V^h N,
N⁻¹ W_O^h) without changing the function (methods.md §A3). What those maps cannot change are the products
(row-vector convention, x a residual row, W_Q^h [d, d_h], W_O^h [d_h, d]):

    A_QK = Σ_h W_Q^h W_K^hᵀ      [d, d]   score of query row x_t on key row x_s: x_t A_QK x_sᵀ (per head, summed)
    A_VO = Σ_h W_V^h W_O^h       [d, d]   what a fully attended row x_s writes back: x_s A_VO (summed over heads)

Each term is unchanged by its head's M or N (M M⁻¹ = I), and the sum by the order of the heads. Under grouped-query
attention query head h pairs with its key/value head ``h // (n_heads / n_kv)``, whose M or N the group shares.

A rotation of the residual stream x' = x Q (Q orthogonal, methods.md §A2) turns readers into QᵀW and writers into
W_o Q, so both circuits transform as A' = Qᵀ A Q: compared after a residual alignment R [d_A, d_B] (a permutation
with signs, or an orthogonal map), model A's circuits in B's basis are Rᵀ A R (:func:`align_circuits`).

Rotary attention. The score of query position t on key position s is q_t R_t (k_s R_s)ᵀ = x_t W_Q^h R_{t−s} W_K^hᵀ
x_sᵀ, with R_δ block-diagonal 2×2 rotations, one plane per frequency. A_QK is the head sum of these forms at offset
δ = 0. A per-head map that preserves the function must commute with every R_δ (per plane a scaled rotation), and
then W_Q^h M R_δ M⁻¹ W_K^hᵀ = W_Q^h R_δ W_K^hᵀ at every offset, so A_QK is invariant to it. At offset 0 the
product is M M⁻¹ = I for any M, so A_QK is equally blind to maps that do not commute with the rotary planes, which
change the function: the circuit cannot tell such a model from the original. What A_QK is not invariant to: a
rotation or permutation of the residual stream (hence the alignment), norm-gain folding unless the gain is passed
(``gain``: the circuit of the normalised stream, diag(γ) A_QK diag(γ) and diag(γ) A_VO), the query/key biases and
everything that depends on the offset (the forms at δ ≠ 0 and the frequencies) or on a single head (heads are
summed); a global rescaling of the scores changes A but not the cosine :func:`compare_circuits` reports.

LayerNorm (``centred=True``): LayerNorm subtracts each row's mean, so every reader sees the residual stream only
in the subspace orthogonal to the all-ones vector 1, and a launderer may add 1·v to any reader for free. Centred
circuits P A P with P = I − 11ᵀ/d discard that component; a rotation that LayerNorm allows fixes 1, so it
commutes with P and the QᵀAQ rule still holds. RMSNorm models have no such null direction: leave ``centred``
False.

All functions are pure and float64 on numpy arrays (torch CPU tensors are accepted); weights come in the
``[out, in]`` orientation the architecture layer hands out: W_q [n_heads·d_h, d], W_k and W_v [n_kv·d_h, d],
W_o [d, n_heads·d_h].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmsurgeon.errors import LmsurgeonError


@dataclass(frozen=True)
class Circuits:
    """One layer's attention circuits in the residual basis (row-vector convention)."""

    qk: np.ndarray  # [d, d]  A_QK = Σ_h W_Q^h W_K^hᵀ
    ov: np.ndarray  # [d, d]  A_VO = Σ_h W_V^h W_O^h


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def attention_circuits(W_q, W_k, W_v, W_o, n_heads: int, n_kv_heads: int, gain=None, centred: bool = False) -> Circuits:
    """A_QK and A_VO of one layer from its ``[out, in]`` attention weights.

    ``gain`` (the pre-attention norm's effective gain, [d]) gives the circuits of the normalised stream, so a model
    and its gain-folded copy have the same circuits; ``centred`` projects out the all-ones direction (LayerNorm,
    see the module docstring). Query head h uses key/value head ``h // (n_heads // n_kv_heads)``.
    """
    W_q, W_k, W_v, W_o = _f64(W_q), _f64(W_k), _f64(W_v), _f64(W_o)
    d = W_q.shape[1]
    if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
        raise LmsurgeonError(f"{n_heads} query heads cannot share {n_kv_heads} key/value heads evenly")
    if W_q.shape[0] % n_heads:
        raise LmsurgeonError(f"W_q has {W_q.shape[0]} rows, not a multiple of {n_heads} heads")
    d_h = W_q.shape[0] // n_heads
    expected = {
        "W_q": (n_heads * d_h, d),
        "W_k": (n_kv_heads * d_h, d),
        "W_v": (n_kv_heads * d_h, d),
        "W_o": (d, n_heads * d_h),
    }
    for name, W in (("W_q", W_q), ("W_k", W_k), ("W_v", W_v), ("W_o", W_o)):
        if W.shape != expected[name]:
            raise LmsurgeonError(
                f"{name} has shape {list(W.shape)}, expected {list(expected[name])} "
                f"({n_heads} heads, {n_kv_heads} key/value heads, head size {d_h}, width {d})"
            )
    group = n_heads // n_kv_heads
    # Σ over a group's query heads first: Σ_{h∈g} W_Q^h W_K^gᵀ = (Σ_{h∈g} W_Q^h) W_K^gᵀ
    q_by_group = W_q.reshape(n_kv_heads, group, d_h, d).sum(axis=1)  # [n_kv, d_h, d]
    o_by_group = W_o.reshape(d, n_kv_heads, group, d_h).sum(axis=2)  # [d, n_kv, d_h]
    k = W_k.reshape(n_kv_heads, d_h, d)
    v = W_v.reshape(n_kv_heads, d_h, d)
    qk = np.einsum("gei,gej->ij", q_by_group, k)  # Σ_h W_Q^h W_K^hᵀ
    ov = np.einsum("gei,jge->ij", v, o_by_group)  # Σ_h W_V^h W_O^h
    if gain is not None:
        gamma = _f64(gain)
        if gamma.shape != (d,):
            raise LmsurgeonError(f"the norm gain has shape {list(gamma.shape)}, expected [{d}]")
        qk = gamma[:, None] * qk * gamma[None, :]
        ov = gamma[:, None] * ov
    if centred:
        qk, ov = _centre(qk), _centre(ov)
    return Circuits(qk, ov)


def _centre(A: np.ndarray) -> np.ndarray:
    """P A P with P = I − 11ᵀ/d: rows and columns with their means removed."""
    A = A - A.mean(axis=0, keepdims=True)
    return A - A.mean(axis=1, keepdims=True)


def permutation_map(perm, sign, d_a: int) -> np.ndarray:
    """The residual map R [d_A, d_B] of a signed permutation: B's dim l is sign[l] · A's dim perm[l].

    That is x_B = x_A R, the convention of :func:`align_circuits` (and of the lineage alignment's ``perm``/``sign``).
    """
    perm = np.asarray(perm, dtype=np.int64)
    sign = np.asarray(sign, dtype=np.float64)
    if perm.shape != sign.shape or perm.ndim != 1:
        raise LmsurgeonError(f"a permutation of {perm.shape} entries needs as many signs, got {sign.shape}")
    if perm.size and (perm.min() < 0 or perm.max() >= d_a or len(set(perm.tolist())) != perm.size):
        raise LmsurgeonError(f"perm must name {perm.size} distinct dimensions of the {d_a}-wide model A")
    R = np.zeros((d_a, perm.size))
    R[perm, np.arange(perm.size)] = sign
    return R


def align_circuits(circuits: Circuits, R) -> Circuits:
    """Model A's circuits in model B's residual basis, x_B = x_A R: Rᵀ A R for both (R [d_A, d_B])."""
    R = _f64(R)
    d = circuits.qk.shape[0]
    if R.ndim != 2 or R.shape[0] != d:
        raise LmsurgeonError(f"a residual map for a {d}-wide model must have {d} rows, got shape {list(R.shape)}")
    return Circuits(R.T @ circuits.qk @ R, R.T @ circuits.ov @ R)


def matrix_cosine(A, B) -> float:
    """Frobenius cosine ⟨A, B⟩ / (‖A‖ ‖B‖); nan when either matrix is zero or the shapes differ."""
    A, B = _f64(A), _f64(B)
    if A.shape != B.shape:
        return float("nan")
    den = np.linalg.norm(A) * np.linalg.norm(B)
    return float(np.sum(A * B) / den) if den > 0 else float("nan")


@dataclass(frozen=True)
class CircuitComparison:
    """Cosines of aligned circuits: every layer pair, and the pairs of a layer map.

    ``qk[i, j]`` and ``ov[i, j]`` compare A's layer i (aligned into B's basis) with B's layer j; ``pairs`` is the
    layer map and ``qk_pairs``/``ov_pairs`` the cosines along it. Independent models give cosines near 0 (about
    1/d for random circuits); a model and its function-preserving rewrite, aligned with the true map, give 1.
    """

    qk: np.ndarray  # [L_A, L_B]
    ov: np.ndarray  # [L_A, L_B]
    pairs: list[tuple[int, int]]
    qk_pairs: np.ndarray  # [len(pairs)]
    ov_pairs: np.ndarray  # [len(pairs)]


def compare_circuits(
    circuits_a: Sequence[Circuits], circuits_b: Sequence[Circuits], R, pairs: Sequence[tuple[int, int]] | None = None
) -> CircuitComparison:
    """Per layer pair, the cosine of A's circuits aligned by R (x_B = x_A R) with B's.

    ``pairs`` (A layer, B layer) defaults to the identity when both models have the same depth; for different
    depths the caller chooses the map (e.g. from the layer-by-layer matrices returned here).
    """
    if pairs is None:
        if len(circuits_a) != len(circuits_b):
            raise LmsurgeonError(f"models of {len(circuits_a)} and {len(circuits_b)} layers need an explicit layer map")
        pairs = [(i, i) for i in range(len(circuits_a))]
    aligned = [align_circuits(c, R) for c in circuits_a]
    qk = np.array([[matrix_cosine(a.qk, b.qk) for b in circuits_b] for a in aligned]).reshape(len(aligned), -1)
    ov = np.array([[matrix_cosine(a.ov, b.ov) for b in circuits_b] for a in aligned]).reshape(len(aligned), -1)
    pairs = [(int(i), int(j)) for i, j in pairs]
    for i, j in pairs:
        if not (0 <= i < len(circuits_a) and 0 <= j < len(circuits_b)):
            raise LmsurgeonError(
                f"layer pair ({i}, {j}) is outside models of {len(circuits_a)} and {len(circuits_b)} layers"
            )
    qk_pairs = np.array([qk[i, j] for i, j in pairs])
    ov_pairs = np.array([ov[i, j] for i, j in pairs])
    return CircuitComparison(qk, ov, pairs, qk_pairs, ov_pairs)


# -- the lineage test (methods.md §L7.8) ----------------------------------------------------------------------
MIN_CIRCUIT_LAYERS = 3


def sampled_layers(layers: Sequence[int], k: int) -> list[int]:
    """``k`` layers spread evenly over ``layers`` (all of them when there are no more than ``k``)."""
    layers = list(layers)
    if k <= 0 or len(layers) <= k:
        return layers
    return sorted({layers[int(round(x))] for x in np.linspace(0, len(layers) - 1, k)})


def layout_circuits(layout, layers: Sequence[int]) -> list[Circuits]:
    """Circuits of the given layers of a model read through its layout: the circuits of the normalised stream
    (pre-norm gain applied, so folding it changes nothing), centred when the norm is a LayerNorm."""
    dims = layout.dims
    out = []
    for i in layers:
        gain, centred = None, False
        if layout.has("attn_norm", i):
            norm = layout.norm("attn_norm", i)
            centred = norm.kind == "layer"
            gain = norm.gain if norm.placement == "pre" else None
        out.append(
            attention_circuits(
                layout.read("q", i),
                layout.read("k", i),
                layout.read("v", i),
                layout.read("o", i),
                dims["n_heads"],
                dims["n_kv_heads"],
                gain=gain,
                centred=centred,
            )
        )
    return out


def _double_centred(M: np.ndarray) -> np.ndarray:
    """M with its row and column means removed: what is left is what a particular layer pair shares beyond what
    each layer shares with every layer of the other model (a strong diagonal, a common scale)."""
    M = np.nan_to_num(M, nan=0.0)
    return M - M.mean(axis=1, keepdims=True) - M.mean(axis=0, keepdims=True) + M.mean()


def cross_fitted_scores(qk: np.ndarray, ov: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Matched and wrong-layer values of the double-centred cosine matrices, the layer map chosen on one circuit
    and scored on the other.

    Row i (a sampled layer of A) is matched with the B layer where the QK cosine is largest, and that pair's OV
    cosine is the matched value; likewise with the roles exchanged. Choosing on one circuit and scoring on the
    other keeps the maximum over B's layers from biasing the matched values upwards when nothing matches: under
    the null the choice is unrelated to the value scored. Every other entry of the row is a wrong-layer value.
    Returns (matched, wrong, layer map by QK).
    """
    QK, OV = _double_centred(qk), _double_centred(ov)
    matched, wrong, pairs = [], [], []
    for i in range(QK.shape[0]):
        for choose, score in ((QK, OV), (OV, QK)):
            j = int(np.argmax(choose[i]))
            matched.append(score[i, j])
            wrong.extend(np.delete(score[i], j).tolist())
        pairs.append((i, int(np.argmax(QK[i]))))
    return np.array(matched), np.array(wrong), pairs


def circuits_test(wide, narrow, R, n_layers: int = 8):
    """The circuits test of one pair (``wide`` first, R [d_wide, d_narrow] the residual map x_narrow = x_wide R).

    ``n_layers`` layers of the wide model, spread evenly, are compared with every layer of the narrow one. The
    statistic is the mean matched cosine (:func:`cross_fitted_scores`); its null is the pair's own wrong-layer
    values: under independence a matched value is one more draw of them, so the statistic's null mean is theirs
    and its standard deviation σ_wrong·√(1/K + 1/n_wrong), K the compared layers of the wide model (the two
    matched values of a layer share its row, so K, not 2K, counts as independent). Needs at least three layers on
    each side.
    """
    from lmsurgeon.lineage.results import Null, TestResult

    layers_a = sampled_layers(wide.layers, n_layers)
    layers_b = list(narrow.layers)
    if min(len(layers_a), len(layers_b)) < MIN_CIRCUIT_LAYERS:
        return TestResult.not_applicable(
            "circuits",
            f"needs ≥ {MIN_CIRCUIT_LAYERS} layers in both models for a wrong-layer null "
            f"(got {len(wide.layers)} and {len(layers_b)})",
        )
    comparison = compare_circuits(layout_circuits(wide, layers_a), layout_circuits(narrow, layers_b), R, pairs=[(0, 0)])
    matched, wrong, pairs = cross_fitted_scores(comparison.qk, comparison.ov)
    s, mu, sd = float(matched.mean()), float(wrong.mean()), float(wrong.std(ddof=1))
    # the two matched values of a row share that row of both matrices: count rows, not values, as independent
    null = Null(
        f"{wrong.size} wrong-layer circuit pairs of the same models",
        mu,
        sd * float(np.sqrt(1.0 / len(layers_a) + 1.0 / wrong.size)),
        int(wrong.size),
    )
    t = TestResult(
        "circuits",
        applies=True,
        statistic=s,
        layer_map=[(layers_a[i], layers_b[j]) for i, j in pairs],
        matrix=(comparison.qk + comparison.ov) / 2,
    )
    t.measure(s, null)
    return t
