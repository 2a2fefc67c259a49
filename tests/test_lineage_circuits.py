"""Attention circuits A_QK = Σ_h W_Q^h W_K^hᵀ and A_VO = Σ_h W_V^h W_O^h: the formula, and what they are invariant to.

The formula is checked against a per-head float64 loop and a hand-built head; the invariances (per-head maps, head
order, gain folding, the rotation rule QᵀAQ) against the launderer's function-preserving transforms on tiny GPT-2
and Llama-GQA models.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.lineage import circuits as C
from lmsurgeon.zoo import launder
from lmsurgeon.zoo.transforms import permute_model
from tests.test_zoo_launder import make_model

EXACT = 1e-9  # float64 formula against float64 reference
STORED = 1e-5  # circuits of float32 weights after a float64 transform (relative)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second thread costs more than it saves on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def layer_weights(model, layer: int) -> dict:
    """The [out, in] attention weights the architecture layer would hand out."""
    aw = launder.read_attention(model, layer)
    return {
        "W_q": aw.W_q.T.numpy(),
        "W_k": aw.W_k.T.numpy(),
        "W_v": aw.W_v.T.numpy(),
        "W_o": aw.W_o.T.numpy(),
        "n_heads": aw.n_heads,
        "n_kv_heads": aw.n_kv,
    }


def model_circuits(model, centred: bool = False) -> list[C.Circuits]:
    return [C.attention_circuits(**layer_weights(model, i), centred=centred) for i in range(launder.n_layers(model))]


def assert_same_circuits(a: list[C.Circuits], b: list[C.Circuits], rtol: float = STORED) -> None:
    for layer, (x, y) in enumerate(zip(a, b, strict=True)):
        for name in ("qk", "ov"):
            X, Y = getattr(x, name), getattr(y, name)
            error = np.abs(X - Y).max() / np.abs(X).max()
            assert error <= rtol, f"layer {layer} {name}: relative difference {error:.2e}"


@pytest.fixture(scope="module")
def models() -> dict:
    return {kind: make_model(kind) for kind in ("gpt2", "llama_gqa", "llama_biased")}


# ------------------------------------------------------------------------------------------ the formula


def test_circuits_equal_a_per_head_float64_loop_under_grouped_query_attention():
    rng = np.random.default_rng(0)
    d, d_h, n_heads, n_kv = 12, 5, 6, 2
    W_q, W_k = rng.normal(size=(n_heads * d_h, d)), rng.normal(size=(n_kv * d_h, d))
    W_v, W_o = rng.normal(size=(n_kv * d_h, d)), rng.normal(size=(d, n_heads * d_h))
    qk, ov = np.zeros((d, d)), np.zeros((d, d))
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        WQ = W_q[h * d_h : (h + 1) * d_h].T  # [d, d_h] reader, row convention
        WK = W_k[g * d_h : (g + 1) * d_h].T
        WV = W_v[g * d_h : (g + 1) * d_h].T
        WO = W_o[:, h * d_h : (h + 1) * d_h].T  # [d_h, d] writer
        qk += WQ @ WK.T
        ov += WV @ WO
    got = C.attention_circuits(W_q, W_k, W_v, W_o, n_heads, n_kv)
    np.testing.assert_allclose(got.qk, qk, rtol=EXACT, atol=EXACT)
    np.testing.assert_allclose(got.ov, ov, rtol=EXACT, atol=EXACT)


def test_circuits_of_a_hand_built_single_head():
    # one head of size 1 in a 2-wide stream: q = x·(1, 2), k = x·(3, 4), v = x·(1, 0), o writes (0, 5)
    got = C.attention_circuits(W_q=[[1, 2]], W_k=[[3, 4]], W_v=[[1, 0]], W_o=[[0], [5]], n_heads=1, n_kv_heads=1)
    np.testing.assert_array_equal(got.qk, [[3, 4], [6, 8]])
    np.testing.assert_array_equal(got.ov, [[0, 5], [0, 0]])


def test_gain_gives_the_circuits_of_the_normalised_stream():
    rng = np.random.default_rng(1)
    W = {
        "W_q": rng.normal(size=(8, 6)),
        "W_k": rng.normal(size=(8, 6)),
        "W_v": rng.normal(size=(8, 6)),
        "W_o": rng.normal(size=(6, 8)),
    }
    gamma = rng.uniform(0.5, 1.5, size=6)
    plain = C.attention_circuits(**W, n_heads=2, n_kv_heads=2)
    with_gain = C.attention_circuits(**W, n_heads=2, n_kv_heads=2, gain=gamma)
    np.testing.assert_allclose(with_gain.qk, np.diag(gamma) @ plain.qk @ np.diag(gamma), rtol=EXACT)
    np.testing.assert_allclose(with_gain.ov, np.diag(gamma) @ plain.ov, rtol=EXACT)


def test_centred_circuits_remove_the_all_ones_direction_on_both_sides():
    rng = np.random.default_rng(2)
    W = {
        "W_q": rng.normal(size=(8, 6)),
        "W_k": rng.normal(size=(8, 6)),
        "W_v": rng.normal(size=(8, 6)),
        "W_o": rng.normal(size=(6, 8)),
    }
    got = C.attention_circuits(**W, n_heads=2, n_kv_heads=2, centred=True)
    P = np.eye(6) - np.ones((6, 6)) / 6
    plain = C.attention_circuits(**W, n_heads=2, n_kv_heads=2)
    np.testing.assert_allclose(got.qk, P @ plain.qk @ P, atol=EXACT)
    np.testing.assert_allclose(got.ov, P @ plain.ov @ P, atol=EXACT)


def test_inconsistent_shapes_are_refused_with_the_expected_shape():
    with pytest.raises(LmsurgeonError, match=r"W_k has shape \[8, 6\], expected \[4, 6\]"):
        C.attention_circuits(np.ones((8, 6)), np.ones((8, 6)), np.ones((4, 6)), np.ones((6, 8)), 2, 1)
    with pytest.raises(LmsurgeonError, match="evenly"):
        C.attention_circuits(np.ones((9, 6)), np.ones((6, 6)), np.ones((6, 6)), np.ones((6, 9)), 3, 2)


def test_permutation_map_moves_a_dimension_to_its_place_with_its_sign():
    R = C.permutation_map([2, 0], [1.0, -1.0], d_a=3)
    x_a = np.array([10.0, 20.0, 30.0])
    np.testing.assert_array_equal(x_a @ R, [30.0, -10.0])
    with pytest.raises(LmsurgeonError, match="distinct"):
        C.permutation_map([0, 0], [1.0, 1.0], d_a=3)


# ------------------------------------------------------------------------------------------ invariances


@pytest.mark.parametrize("kind", ("gpt2", "llama_gqa", "llama_biased"))
@pytest.mark.parametrize("transform", ("map_query_key", "map_value_output", "permute_heads"))
def test_per_head_maps_and_head_order_leave_the_circuits_unchanged(models, kind, transform):
    model = models[kind]
    out, _ = getattr(launder, transform)(model, seed=21)
    moved = {"map_query_key": "W_q", "map_value_output": "W_v", "permute_heads": "W_o"}[transform]
    assert not np.allclose(layer_weights(model, 0)[moved], layer_weights(out, 0)[moved]), "the heads must change"
    assert_same_circuits(model_circuits(model), model_circuits(out))


@pytest.mark.parametrize("transform", ("permute_vocabulary", "permute_mlp_units", "scale_mlp_units"))
def test_vocabulary_and_mlp_transforms_leave_the_circuits_exactly_unchanged(models, transform):
    model = models["llama_gqa"]
    out, _ = getattr(launder, transform)(model, seed=20)
    assert_same_circuits(model_circuits(model), model_circuits(out), rtol=0.0)


@pytest.mark.parametrize("kind", ("gpt2", "llama_gqa"))
def test_folding_the_norm_gains_leaves_the_circuits_of_the_normalised_stream_unchanged(models, kind):
    model, _ = launder.untie_head(models[kind])
    folded, step = launder.fold_norm_gains(model)
    gains = step.truth["gains"].numpy()  # per layer: attention norm, MLP norm; then the final norm
    before = [C.attention_circuits(**layer_weights(model, i), gain=gains[2 * i]) for i in range(2)]
    assert_same_circuits(before, model_circuits(folded))
    assert not np.allclose(before[0].qk, model_circuits(model)[0].qk), "the gains must matter without folding"


@pytest.mark.parametrize("kind", ("gpt2", "llama_gqa"))
def test_a_residual_rotation_transforms_the_circuits_as_QtAQ(models, kind):
    model, _ = launder.fold_norm_gains(launder.untie_head(models[kind])[0])
    rotated, step = launder.rotate_residual(model, seed=22)
    Q = step.truth["Q"].numpy()
    expected = [C.Circuits(Q.T @ c.qk @ Q, Q.T @ c.ov @ Q) for c in model_circuits(model)]
    assert_same_circuits(expected, model_circuits(rotated))


def test_aligned_comparison_recovers_a_rotated_copy_and_the_unaligned_one_does_not(models):
    model, _ = launder.fold_norm_gains(launder.untie_head(models["llama_gqa"])[0])
    rotated, step = launder.rotate_residual(model, seed=23)
    a, b = model_circuits(model), model_circuits(rotated)
    aligned = C.compare_circuits(a, b, step.truth["Q"].numpy())
    unaligned = C.compare_circuits(a, b, np.eye(64))
    assert aligned.pairs == [(0, 0), (1, 1)]
    assert aligned.qk_pairs.min() > 1 - 1e-6
    assert aligned.ov_pairs.min() > 1 - 1e-6
    assert np.abs(unaligned.qk_pairs).max() < 0.5
    assert np.abs(unaligned.ov_pairs).max() < 0.5
    assert aligned.qk.shape == (2, 2)


def test_aligned_comparison_recovers_a_permuted_copy_through_the_permutation_map(models):
    model = models["llama_gqa"]
    permuted, (perm_d, _) = permute_model(model, seed=24)
    R = C.permutation_map(perm_d.numpy(), np.ones(64), d_a=64)
    result = C.compare_circuits(model_circuits(model), model_circuits(permuted), R)
    assert result.qk_pairs.min() > 1 - 1e-6
    assert result.ov_pairs.min() > 1 - 1e-6


def test_laundered_and_centred_gpt2_circuits_match_after_alignment(models):
    """The whole launder (fold, rotate, per-head maps, head order) on LayerNorm attention: aligned cosine 1."""
    model, _ = launder.untie_head(models["gpt2"])
    folded, fold = launder.fold_norm_gains(model)
    out, _, steps = launder.launder(models["gpt2"], seed=25)
    Q = next(s for s in steps if s.name == "rotate_residual").truth["Q"].numpy()
    result = C.compare_circuits(model_circuits(folded, centred=True), model_circuits(out, centred=True), Q)
    assert result.qk_pairs.min() > 1 - 1e-6
    assert result.ov_pairs.min() > 1 - 1e-6


def test_centred_gpt2_circuits_ignore_what_layernorm_cannot_see(models):
    """Adding 1·v to a reader is invisible behind LayerNorm's centring; centred circuits ignore it, raw ones don't."""
    weights = layer_weights(models["gpt2"], 0)
    shifted = dict(weights)
    shifted["W_q"] = weights["W_q"] + np.random.default_rng(3).normal(size=(weights["W_q"].shape[0], 1))
    raw = C.attention_circuits(**weights), C.attention_circuits(**shifted)
    centred = C.attention_circuits(**weights, centred=True), C.attention_circuits(**shifted, centred=True)
    np.testing.assert_allclose(centred[1].qk, centred[0].qk, atol=1e-12)
    assert np.abs(raw[1].qk - raw[0].qk).max() > 0.1


def test_independent_models_have_nearly_orthogonal_circuits():
    a, b = make_model("llama_gqa"), make_model("llama_gqa")
    torch.manual_seed(99)
    with torch.no_grad():
        for p in b.parameters():
            p.copy_(0.15 * torch.randn_like(p))
    result = C.compare_circuits(model_circuits(a), model_circuits(b), np.eye(64))
    assert np.abs(result.qk).max() < 0.1
    assert np.abs(result.ov).max() < 0.1


def test_compare_circuits_needs_a_layer_map_for_different_depths(models):
    a = model_circuits(models["llama_gqa"])
    with pytest.raises(LmsurgeonError, match="explicit layer map"):
        C.compare_circuits(a, a[:1], np.eye(64))
    result = C.compare_circuits(a, a[:1], np.eye(64), pairs=[(1, 0)])
    assert result.qk.shape == (2, 1)
    assert result.qk_pairs[0] == pytest.approx(result.qk[1, 0])
