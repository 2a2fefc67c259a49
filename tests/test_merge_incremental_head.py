"""A trial's evaluation redoes only what the merge changed (methods.md §M8.3): checked against float64 numpy on the
kept head inputs and against the straightforward evaluation of the merged model."""

import numpy as np
import pytest
import torch

from lmsurgeon.merge import MergeConfig, MergeSession
from lmsurgeon.merge.monitors import CANCELLATION, HeadDelta


@pytest.fixture(scope="module")
def session(merge_pair):
    texts = merge_pair["texts"]
    cfg = MergeConfig(objective="domain", batch_size=4, max_length=64)
    s = MergeSession(str(merge_pair["llama"]), str(merge_pair["gpt2"]), texts[:10], cfg, general_texts=texts[10:14])
    assert s.head_only and s.base_eval.head_cache is not None
    return s


def _reference(evaluator, head_inputs, weight: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """float64 NLL sum and per-batch target log-probs of the head `weight` on `head_inputs`."""
    nll, targets = 0.0, []
    for b, h in zip(evaluator.batches, head_inputs, strict=True):
        z = h.double().numpy() @ weight.T
        m = z.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
        y = b["ids"][:, 1:].numpy()
        t = np.take_along_axis(z[:, :-1], y[..., None], -1)[..., 0] - lse[:, :-1]
        nll -= float(t[b["valid"].numpy()].sum())
        targets.append(t)
    return nll, targets


def _move_rows(s, ids: torch.Tensor, rows: torch.Tensor) -> HeadDelta:
    head = s.model.get_output_embeddings()
    old = head.weight.detach().index_select(0, ids).clone()
    with torch.no_grad():
        head.weight.index_copy_(0, ids, rows)
    return HeadDelta(ids, old, head.weight, head.bias)


def _check(s, evaluator, base, delta: HeadDelta) -> None:
    head = s.model.get_output_embeddings()
    fast = evaluator.evaluate_incremental(s.model, s.head_logits, base, delta=delta)
    nll, targets = _reference(evaluator, base.head_inputs, head.weight.detach().double().numpy())
    assert fast.nll_sum == pytest.approx(nll, rel=1e-9)
    for got, want, b in zip(fast.targets, targets, evaluator.batches, strict=True):
        valid = b["valid"].numpy()
        np.testing.assert_allclose(got.double().numpy()[valid], want[valid], rtol=1e-9, atol=1e-9)
    plain = evaluator.evaluate_head(s.head_logits, base.head_inputs)
    assert fast.nll_sum == pytest.approx(plain.nll_sum, rel=1e-6)
    assert fast.bpb == pytest.approx(plain.bpb, rel=1e-6)
    assert torch.equal(fast.logprobs, plain.logprobs)  # the KL positions take the full head


def test_moved_head_rows_update_the_log_normaliser_exactly(session):
    s = session
    head = s.model.get_output_embeddings()
    before = head.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    V = before.shape[0]
    ids = torch.randperm(V, generator=g)[: V // 10]
    targets = torch.cat([b["ids"][:, 1:].flatten() for b in s.evaluator.batches]).unique()
    ids = torch.cat([ids[~torch.isin(ids, targets)], targets[:5]])  # some moved rows are targets
    try:
        rows = before[ids] + 0.5 * torch.randn(ids.numel(), before.shape[1], generator=g)
        delta = _move_rows(s, ids, rows)
        for evaluator, base in ((s.evaluator, s.base_eval), (s.general, s.base_general)):
            _check(s, evaluator, base, delta)
    finally:
        with torch.no_grad():
            head.weight.copy_(before)


def test_positions_whose_moved_rows_held_nearly_all_mass_take_the_full_head(session):
    """A row that takes almost all of some positions' mass in the base, then moves back: the update would
    cancel there, so those positions are recomputed; the numbers still match float64 to 1e-9."""
    s = session
    head = s.model.get_output_embeddings()
    before = head.weight.detach().clone()
    h = torch.cat([x.reshape(-1, x.shape[-1]) for x in s.base_eval.head_inputs])
    direction = h.mean(0) / h.mean(0).norm()
    r = int(s.evaluator.batches[0]["ids"][0, 3])  # a target, so its own log-prob moves too
    try:
        with torch.no_grad():
            head.weight[r] = 60.0 * direction
        base = s.evaluator.evaluate(s.model, keep_head_inputs=True)
        s.evaluator.keep_head_cache(base, head.weight, head.bias)
        z = h.double() @ head.weight.detach().double().T
        share = torch.softmax(z, -1)[:, r]
        assert (1.0 - share < CANCELLATION).float().mean() > 0.2  # many positions fall back
        assert (1.0 - share >= CANCELLATION).any()  # and some do not
        delta = _move_rows(s, torch.tensor([r]), before[r : r + 1])
        _check(s, s.evaluator, base, delta)
    finally:
        with torch.no_grad():
            head.weight.copy_(before)


def test_untouched_batches_give_the_base_numbers(session):
    s = session
    same = s.evaluator.evaluate_incremental(s.model, s.head_logits, s.base_eval)
    assert same.nll_sum == s.base_eval.nll_sum
    assert torch.equal(same.logprobs, s.base_eval.logprobs)


@pytest.mark.parametrize(
    "params",
    [{"gate_frac": 0.0, "alpha_emb": 0.3, "alpha_head": 0.4}, {"gate_frac": 0.0, "alpha_emb": 0.0, "alpha_head": 0.4}],
)
def test_trial_equals_the_straightforward_evaluation(session, params, monkeypatch):
    """Everything a trial reports is what a full evaluation of the merged model gives (search and general text;
    the seed objective measures general text for every trial)."""
    s = session
    monkeypatch.setattr(s, "config", s.config.with_overrides(objective="seed"))
    stats = s.trial(params, keep=True)
    try:
        assert stats["stage_b"]["rows"] > 0
        assert stats["general_bpb"] is not None
        full = s.evaluator.evaluate(s.model)
        assert stats["bpb"] == pytest.approx(full.bpb, rel=1e-6)
        assert stats["r"] == pytest.approx(full.ppl / s.base_eval.ppl, rel=1e-6)
        from lmsurgeon.merge.monitors import sym_kl

        assert stats["sym_kl"] == pytest.approx(sym_kl(full, s.base_eval, s.kl_topk), rel=1e-4, abs=1e-7)
        assert stats["general_bpb"] == pytest.approx(s.general.evaluate(s.model).bpb, rel=1e-6)
    finally:
        s.restore()


def test_stage_b_updates_the_normalisers_of_re_run_positions(session):
    """Positions whose body Stage A re-ran take Stage B's moved head rows as an update of the normaliser Stage A's
    float32 log-softmax gave them, the full head where the moved rows held more than 90 % of the mass (here a
    head row made to take most positions' mass, then moved back): equal to a full evaluation of the model."""
    from lmsurgeon.merge.monitors import CANCELLATION_FLOAT32

    s = session
    head, emb = s.model.get_output_embeddings(), s.model.get_input_embeddings()
    head_before, emb_before = head.weight.detach().clone(), emb.weight.detach().clone()
    h = torch.cat([x.reshape(-1, x.shape[-1]) for x in s.base_eval.head_inputs])
    r = int(s.evaluator.batches[0]["ids"][0, 3])
    first = s.evaluator.batches[0]
    n = int(first["mask"][0].sum())
    late = first["ids"][0, n // 2 : n // 2 + 2].tolist()  # moved embedding rows: positions before them are kept
    try:
        with torch.no_grad():
            head.weight[r] = 8.0 * h.mean(0) / h.mean(0).norm()
        base = s.evaluator.evaluate(s.model, keep_head_inputs=True)
        s.evaluator.keep_head_cache(base, head.weight, head.bias)
        with torch.no_grad():
            emb.weight[late] *= 1.5
        stage_a = s.evaluator.evaluate_incremental(s.model, s.head_logits, base, changed_ids=late)
        assert stage_a.fresh_cache is not None
        fresh = torch.cat(
            [(m & b["mask"].bool()).flatten() for m, b in zip(stage_a.fresh, s.evaluator.batches, strict=True)]
        )
        assert 0 < int(fresh.sum()) < fresh.numel()  # some positions re-ran, some kept the base's inputs
        h_a = torch.cat([x.reshape(-1, x.shape[-1]) for x in stage_a.head_inputs])[fresh]
        share = torch.softmax(s.head_logits(h_a).double(), -1)[:, r]
        assert (1.0 - share < CANCELLATION_FLOAT32).any() and (1.0 - share >= CANCELLATION_FLOAT32).any()
        delta = _move_rows(s, torch.tensor([r]), head_before[r : r + 1])
        fast = s.evaluator.evaluate_incremental(s.model, s.head_logits, base, before=stage_a, delta=delta)
        full = s.evaluator.evaluate(s.model)
        assert fast.nll_sum == pytest.approx(full.nll_sum, rel=1e-6)
        assert fast.bpb == pytest.approx(full.bpb, rel=1e-6)
        np.testing.assert_allclose(fast.logprobs.numpy(), full.logprobs.numpy(), atol=1e-5)
        _, targets = _reference(s.evaluator, fast.head_inputs, head.weight.detach().double().numpy())
        for got, want, b in zip(fast.targets, targets, s.evaluator.batches, strict=True):
            valid = b["valid"].numpy()
            np.testing.assert_allclose(got.double().numpy()[valid], want[valid], rtol=1e-5, atol=1e-5)
    finally:
        with torch.no_grad():
            head.weight.copy_(head_before)
            emb.weight.copy_(emb_before)


def test_head_scored_a_prompt_at_a_time_equals_the_whole_batch_and_float64(session, monkeypatch):
    """A streamed model's head is scored a few prompts at a time (``LOGIT_CHUNK_BYTES``): one prompt per chunk
    gives the whole batch's numbers, the KL positions included, and the float64 reference's NLL."""
    from lmsurgeon.merge import monitors

    s, evaluator, base = session, session.evaluator, session.base_eval
    monkeypatch.setattr(monitors, "LOGIT_CHUNK_BYTES", 1)  # one prompt per chunk
    chunked = evaluator.evaluate_head(s.head_logits, base.head_inputs)
    whole = evaluator._score(s.head_logits(h) for h in base.head_inputs)
    assert len(evaluator.batches[0]["ids"]) > 1
    assert chunked.nll_sum == pytest.approx(whole.nll_sum, rel=1e-6)
    assert chunked.logprobs.shape == whole.logprobs.shape
    torch.testing.assert_close(chunked.logprobs, whole.logprobs, rtol=1e-5, atol=1e-5)
    for a, b in zip(chunked.targets, whole.targets, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    head = s.model.get_output_embeddings().weight.detach().double().numpy()
    nll, _ = _reference(evaluator, base.head_inputs, head)
    assert chunked.nll_sum == pytest.approx(nll, rel=1e-6)


def test_a_trial_scored_a_position_at_a_time_gives_the_same_guard_numbers(session, monkeypatch):
    """The fresh positions of a trial (those after a moved embedding row) are scored in chunks of
    ``LOGIT_CHUNK_BYTES``: one position per chunk gives the numbers of one chunk for all (targets, KL picks,
    Stage B's share of the moved head rows)."""
    from lmsurgeon.merge import monitors

    params = {"target_emb_frac": 1.0, "min_tau_emb": -1.0, "alpha_cap_emb": 0.9, "min_tau_head": -1.0}
    whole = session.trial(params)
    monkeypatch.setattr(monitors, "LOGIT_CHUNK_BYTES", 1)
    chunked = session.trial(params)
    assert whole["stage_a"]["rows"] > 0
    numbers = [k for k, v in whole.items() if isinstance(v, float) and k != "seconds"]
    assert {"r", "sym_kl", "bpb"} <= set(numbers)
    for key in numbers:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-9), key
