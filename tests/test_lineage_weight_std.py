"""The per-layer weight-standard-deviation fingerprint (the Pangu Pro MoE dispute): formula, evasion, and the zoo.

The formula is checked on hand-computed profiles and against a direct float64 computation; what it survives and
what evades it with function-preserving transforms; and on the test zoo, that independently initialised and
trained models score high on it too.
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.lineage.weight_std import ROLES, compare_weight_std, layer_stds
from lmsurgeon.zoo import launder
from lmsurgeon.zoo.transforms import logit_discrepancy, permute_model

INDEPENDENT = ("lin-base", "lin-indep-1", "lin-indep-2", "lin-indep-3")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second thread costs more than it saves on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def attention_by_role(model) -> dict[str, list[np.ndarray]]:
    """Each layer's W_Q, W_K, W_V, W_O in [out, in] orientation, as the architecture layer hands them out."""
    out: dict[str, list[np.ndarray]] = {r: [] for r in ROLES}
    for layer in range(launder.n_layers(model)):
        aw = launder.read_attention(model, layer)
        for role, W in zip(ROLES, (aw.W_q, aw.W_k, aw.W_v, aw.W_o), strict=True):
            out[role].append(W.T.numpy())
    return out


def scaled(profile) -> list[np.ndarray]:
    """One 2-entry matrix per layer whose population std is the profile value: [[s, −s]]."""
    return [np.array([[s, -s]], dtype=np.float64) for s in profile]


def test_layer_std_is_the_population_std_of_all_entries():
    np.testing.assert_allclose(
        layer_stds([np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[5.0, 5.0]])]), [math.sqrt(1.25), 0.0]
    )


def test_scores_on_hand_computed_profiles():
    a = {"q": scaled([1, 2, 3]), "k": scaled([1, 2, 3]), "v": scaled([1, 2, 3]), "o": scaled([1, 2, 3])}
    b = {"q": scaled([2, 4, 7]), "k": scaled([5, 6, 7]), "v": scaled([3, 2, 1]), "o": scaled([1, 3, 2])}
    result = compare_weight_std(a, b)
    # q: centred (−1, 0, 1)·(−7/3, −1/3, 8/3) = 5 over √2·√114/3 → 15/√228; o: 1/(√2·√2) = 0.5
    assert result.per_role["q"] == pytest.approx(15 / math.sqrt(228), abs=1e-12)
    assert result.per_role["k"] == pytest.approx(1.0, abs=1e-12)
    assert result.per_role["v"] == pytest.approx(-1.0, abs=1e-12)
    assert result.per_role["o"] == pytest.approx(0.5, abs=1e-12)
    assert result.fingerprint == pytest.approx((15 / math.sqrt(228) + 1 - 1 + 0.5) / 4, abs=1e-12)
    np.testing.assert_allclose(result.stds_b["q"], [2, 4, 7])


def test_fingerprint_is_the_pearson_of_concatenated_zscored_profiles():
    rng = np.random.default_rng(0)
    a = {r: [rng.normal(scale=rng.uniform(0.5, 2), size=(6, 5)) for _ in range(8)] for r in ROLES}
    b = {r: [rng.normal(scale=rng.uniform(0.5, 2), size=(4, 7)) for _ in range(8)] for r in ROLES}
    result = compare_weight_std(a, b)

    def fingerprint(weights):
        blocks = []
        for r in ROLES:
            s = np.array([np.std(W) for W in weights[r]])
            blocks.append((s - s.mean()) / s.std())
        return np.concatenate(blocks)

    expected = scipy_stats.pearsonr(fingerprint(a), fingerprint(b)).statistic
    assert result.fingerprint == pytest.approx(expected, abs=1e-12)
    assert result.fingerprint == pytest.approx(np.mean(list(result.per_role.values())), abs=1e-12)


def test_a_layer_map_pairs_layers_of_different_depths():
    a = {r: scaled([1, 2, 3, 4]) for r in ROLES}
    b = {r: scaled([1, 3, 9]) for r in ROLES}
    with pytest.raises(LmsurgeonError, match="explicit layer map"):
        compare_weight_std(a, b)
    result = compare_weight_std(a, b, pairs=[(0, 0), (1, 1), (3, 2)])
    assert result.per_role["q"] == pytest.approx(scipy_stats.pearsonr([1, 2, 4], [1, 3, 9]).statistic, abs=1e-12)


def test_missing_roles_and_too_few_layers_are_refused():
    full = {r: scaled([1, 2, 3]) for r in ROLES}
    with pytest.raises(LmsurgeonError, match="model B has no weights for role"):
        compare_weight_std(full, {r: full[r] for r in ("q", "k", "v")})
    with pytest.raises(LmsurgeonError, match="at least 3 layer pairs"):
        compare_weight_std({r: scaled([1, 2]) for r in ROLES}, {r: scaled([1, 2]) for r in ROLES})


# ------------------------------------------------------------------------------------------ transforms


@pytest.fixture(scope="module")
def deep_llama():
    """A 6-layer random Llama with grouped-query attention, per-layer weight scales varying with depth."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def test_permutations_of_residual_heads_and_units_leave_every_profile_unchanged(deep_llama):
    permuted, _ = permute_model(deep_llama, seed=1)
    permuted, _ = launder.permute_heads(permuted, seed=2)
    before, after = attention_by_role(deep_llama), attention_by_role(permuted)
    for role in ROLES:
        np.testing.assert_allclose(layer_stds(after[role]), layer_stds(before[role]), rtol=1e-6)
    assert not np.allclose(before["q"][0], after["q"][0]), "the weights must actually move"
    assert compare_weight_std(before, after).fingerprint == pytest.approx(1.0, abs=1e-9)


def test_a_residual_rotation_keeps_every_profile_nearly_unchanged(deep_llama):
    """Orthogonal maps keep each matrix's Frobenius norm; only the mean of its entries moves, so σ barely does."""
    folded, _ = launder.fold_norm_gains(deep_llama)
    rotated, _ = launder.rotate_residual(folded, seed=4)
    before, after = attention_by_role(folded), attention_by_role(rotated)
    for role in ROLES:
        np.testing.assert_allclose(layer_stds(after[role]), layer_stds(before[role]), rtol=1e-2)
    assert not np.allclose(before["q"][0], after["q"][0], atol=1e-3), "the weights must actually move"


def test_a_per_head_scaling_reverses_the_profile_without_changing_the_function(deep_llama):
    """s on W_Q and 1/s on W_K is a function-preserving per-head map (M = s·I commutes with rotary embedding);
    choosing s per layer mirrors the σ_Q profile, so the derived copy scores r = −1 on q."""
    evaded = copy.deepcopy(deep_llama)
    sigma = layer_stds(attention_by_role(deep_llama)["q"])
    mirrored = sigma.max() + sigma.min() - sigma
    with torch.no_grad():
        for layer, block in enumerate(evaded.model.layers):
            s = float(mirrored[layer] / sigma[layer])
            block.self_attn.q_proj.weight.mul_(s)
            block.self_attn.k_proj.weight.div_(s)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    assert logit_discrepancy(deep_llama, evaded, ids) <= 1e-4
    result = compare_weight_std(attention_by_role(deep_llama), attention_by_role(evaded))
    assert result.per_role["q"] == pytest.approx(-1.0, abs=1e-5)


# ------------------------------------------------------------------------------------------ the zoo


def test_independent_zoo_models_score_high_on_the_weight_std_fingerprint(test_zoo):
    """The dispute's statistic cannot tell independent models of one recipe apart from relatives: measured on the
    test zoo (4 layers), every pair of independently initialised and trained models correlates strongly."""
    from transformers import AutoModelForCausalLM

    zoo_dir, manifest = test_zoo
    weights = {
        name: attention_by_role(
            AutoModelForCausalLM.from_pretrained(Path(zoo_dir) / manifest["models"][name]["path"]).eval()
        )
        for name in INDEPENDENT
    }
    scores = {
        (a, b): compare_weight_std(weights[a], weights[b]).fingerprint
        for a, b in itertools.combinations(INDEPENDENT, 2)
    }
    for pair, score in scores.items():
        assert manifest["models"][pair[1]]["parent"] is None, "the pairs must be independent by construction"
        assert score > 0.5, f"{pair}: fingerprint {score:.3f}"


def test_sampled_std_reads_only_its_rows_and_matches_the_full_matrix(tmp_path):
    """σ from 1024 sampled rows of a larger matrix: within 2 % of the full σ (float64 numpy reference), and the
    bytes read are those rows' bytes, not the matrix's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmsurgeon.arch import Layout
    from lmsurgeon.io import open_model
    from lmsurgeon.lineage.weight_std import SAMPLE_ROWS, sampled_std

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=64,
        num_key_value_heads=64,
        head_dim=32,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    layout = Layout(open_model(str(tmp_path)))
    q = layout.read("q", 0)  # [2048, 64] stored as [out, in]: 2048 rows
    assert q.shape[0] > SAMPLE_ROWS
    before = layout.handle.bytes_read
    sigma = sampled_std(layout, "q", 0)
    assert layout.handle.bytes_read - before == SAMPLE_ROWS * 64 * 4
    assert abs(sigma / float(np.std(q.astype(np.float64))) - 1) < 0.02
    assert sampled_std(layout, "k", 0, max_rows=4096) == pytest.approx(float(np.std(layout.read("k", 0))), rel=1e-6)
