"""The domain gate (methods.md §M10): per-token base losses, which rows it blends, at which rate, and the
general-text constraint of `--objective domain`."""

import math

import numpy as np
import pytest
import torch

from lmsurgeon.merge import MergeSession
from lmsurgeon.merge.config import MergeConfig
from lmsurgeon.merge.search import DOMAIN_SPACE, general_constraint, load_space


@pytest.fixture(scope="module")
def domain_session(merge_pair):
    texts = merge_pair["texts"]
    cfg = MergeConfig(objective="domain", batch_size=4, max_length=64)
    return MergeSession(str(merge_pair["llama"]), str(merge_pair["gpt2"]), texts[:10], cfg, general_texts=texts[10:14])


def _reference_difficulty(session) -> dict[str, np.ndarray]:
    """Mean loss in bits per token id from a plain forward, one prompt at a time, in float64 numpy."""
    V = session.model.get_input_embeddings().weight.shape[0]
    sums = {k: np.zeros(V) for k in ("emb", "head")}
    counts = {k: np.zeros(V) for k in ("emb", "head")}
    for seq in session.evaluator.seqs:
        with torch.no_grad():
            logits = session.model(input_ids=torch.tensor([seq])).logits[0].double().numpy()
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        logp -= logits.max(-1, keepdims=True)
        for t in range(len(seq) - 1):
            bits = -logp[t, seq[t + 1]] / math.log(2)
            for key, token in (("head", seq[t + 1]), ("emb", seq[t])):
                sums[key][token] += bits
                counts[key][token] += 1
    with np.errstate(invalid="ignore"):
        return {k: sums[k] / counts[k] for k in sums}


def test_per_token_difficulty_matches_a_plain_forward(domain_session):
    ref = _reference_difficulty(domain_session)
    for key in ("emb", "head"):
        got = domain_session.difficulty[key]
        assert np.array_equal(np.isnan(got), np.isnan(ref[key]))
        seen = ~np.isnan(ref[key])
        assert seen.sum() > 50
        np.testing.assert_allclose(got[seen], ref[key][seen], rtol=1e-5)


def test_gate_blends_exactly_the_hard_rows_at_one_rate(domain_session):
    s = domain_session
    V = s.model.get_input_embeddings().weight.shape[0]
    f, alpha = 0.7, 0.4
    threshold = f * math.log2(V)
    emb = s.model.get_input_embeddings().weight
    before = emb.detach().clone()
    stats = s.trial({"gate_frac": f, "alpha_emb": alpha, "alpha_head": 0.0, "use_soft_clip": False}, keep=True)
    after = emb.detach().clone()
    s.restore()
    assert torch.equal(emb, before)
    pool = s.stage_a.idx.numpy()
    hard = np.array([not np.isnan(s.difficulty["emb"][i]) and s.difficulty["emb"][i] > threshold for i in pool])
    assert 0 < hard.sum() < hard.size
    moved = (after != before).any(1).numpy()
    assert set(np.flatnonzero(moved)) == set(pool[hard].tolist())
    assert stats["stage_a"]["rows"] == int(hard.sum()) and stats["stage_b"]["rows"] == 0
    rows = np.flatnonzero(hard)
    Y, E = s.stage_a.Y_rows(rows).astype(np.float64), s.stage_a.E_rows(False, rows).astype(np.float64)
    np.testing.assert_allclose(after[pool[hard]].numpy(), (1 - alpha) * Y + alpha * E, rtol=1e-5, atol=1e-6)


def test_zero_rates_leave_the_base_and_its_general_numbers(domain_session):
    s = domain_session
    stats = s.trial({"gate_frac": 0.5, "alpha_emb": 0.0, "alpha_head": 0.0})
    assert stats["r"] == 1.0 and stats["n_evals"] == 0
    assert stats["general_bpb"] == s.base_general.bpb
    assert general_constraint(stats, s.base_general.bpb, s.config.tolerance) < 0


def test_a_merge_that_loses_on_the_search_text_is_infeasible_without_a_general_evaluation(domain_session):
    s = domain_session
    stats = s.trial({"gate_frac": 0.0, "alpha_emb": 1.0, "alpha_head": 1.0})
    assert stats["bpb"] > s.base_eval.bpb
    assert stats["general_bpb"] is None
    assert general_constraint(stats, s.base_general.bpb, s.config.tolerance) > 0


def test_a_head_only_merge_reuses_the_general_texts_body_outputs(merge_pair):
    """General-text bits per byte of a merge of the head alone, from the kept body outputs, equal a full
    forward's, and cost no body evaluation."""
    texts = merge_pair["texts"]
    s = MergeSession(
        str(merge_pair["llama"]),
        str(merge_pair["gpt2"]),
        texts[:10],
        MergeConfig(batch_size=4, max_length=64),
        general_texts=texts[10:14],
    )
    assert s.head_only
    stats = s.trial({"target_emb_frac": 0.0, "min_tau_head": -1.0, "alpha_cap_head": 0.5}, keep=True)
    full = s.general.evaluate(s.model).bpb
    s.restore()
    assert stats["stage_a"]["rows"] == 0 and stats["stage_b"]["rows"] > 0
    assert stats["n_evals"] == 0
    np.testing.assert_allclose(stats["general_bpb"], full, rtol=1e-6)
    assert stats["general_bpb"] != s.base_general.bpb


def test_domain_objective_searches_the_gate():
    assert load_space(None, "domain") == DOMAIN_SPACE
    assert "gate_frac" not in load_space(None, "seed")


def test_batches_without_a_moved_token_reuse_the_base_body_outputs_exactly(domain_session):
    """evaluate_incremental equals a full evaluation when one batch holds a moved embedding row and the others not."""
    s = domain_session
    ids_per_batch = [set(b["ids"][b["mask"].bool()].tolist()) for b in s.evaluator.batches]
    assert len(ids_per_batch) > 1
    only_first = sorted(ids_per_batch[0] - set().union(*ids_per_batch[1:]))
    assert only_first
    emb = s.model.get_input_embeddings().weight
    before = emb.detach().clone()
    with torch.no_grad():
        emb[only_first[:3]] *= 1.5
    full = s.evaluator.evaluate(s.model, keep_head_inputs=True)
    part = s.evaluator.evaluate_incremental(s.model, s.head_logits, s.base_eval, changed_ids=only_first[:3])
    with torch.no_grad():
        emb.copy_(before)
    assert full.nll_sum != s.base_eval.nll_sum
    np.testing.assert_allclose(part.nll_sum, full.nll_sum, rtol=1e-6)
    np.testing.assert_allclose(part.logprobs.numpy(), full.logprobs.numpy(), atol=1e-5)
    np.testing.assert_allclose(part.bpb, full.bpb, rtol=1e-6)
    assert len(part.head_inputs) == len(full.head_inputs) == len(ids_per_batch)
    for got, want in zip(part.head_inputs, full.head_inputs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
