"""Drop and reorder plans: scored from cached layer inputs exactly as a physically rewired model scores; the
greedy searches and the recommendation follow their definitions; a written plan loads, generates with a KV
cache, and its loss is the cached estimate."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmsurgeon.arch import Layout, detect_family, find_module
from lmsurgeon.data.bits import bits_per_byte
from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.io import open_model
from lmsurgeon.swap.apply import generation_check, nll_total, plan_folder, resolve_plan, write_rewired
from lmsurgeon.swap.e2e import find_head
from lmsurgeon.swap.engine import Batch, eval_pass, finish
from lmsurgeon.swap.linear import LinearFit
from lmsurgeon.swap.plan import (
    ORACLE,
    PlanEvaluator,
    Score,
    first_change,
    greedy,
    parse_plan_drop,
    plan_drops,
    plan_order,
    predicted_bytes,
)
from tests.swap_models import llama, qwen2_mixed, save_with_tokenizer, tokenizer


def _batches(vocab: int, n: int = 2) -> list[Batch]:
    """Right-padded batches of 3 rows (16, 11 and 7 real tokens)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (3, 16), generator=g)
        mask = (torch.arange(16)[None, :] < torch.tensor([16, 11, 7])[:, None]).long()
        out.append(Batch(ids, mask))
    return out


def _evaluator(model, batches, n_bytes: int = 1000, budget: int = 2 << 30) -> PlanEvaluator:
    family = detect_family(model.config.to_dict())
    paths = family.modules["layers"]
    return PlanEvaluator(
        model, find_module(model, paths), paths, find_head(model, family), batches, n_bytes, budget=budget
    )


def _physical_nll(model, order: list[int], batches: list[Batch]) -> tuple[float, int]:
    """Whole forwards of the model with its ModuleList (and layer_types) rewired to ``order`` in memory."""
    layers = model.model.layers
    original, types = list(layers), getattr(model.config, "layer_types", None)
    n_original = model.config.num_hidden_layers
    try:
        model.model.layers = torch.nn.ModuleList([original[j] for j in order])
        model.config.num_hidden_layers = len(order)
        if types is not None:
            model.config.layer_types = [types[j] for j in order]
        return nll_total(model, batches)
    finally:
        model.model.layers = torch.nn.ModuleList(original)
        model.config.num_hidden_layers = n_original
        if types is not None:
            model.config.layer_types = types


def test_plan_order_exchanges_pairs_then_removes_original_layers():
    assert plan_order(6, drops=[2, 4]) == [0, 1, 3, 5]
    assert plan_order(6, swaps=[1, 3]) == [0, 2, 1, 4, 3, 5]
    assert plan_order(6, drops=[1], swaps=[1]) == [0, 2, 3, 4, 5]  # layer 1 moved to position 2, then removed
    assert plan_order(6, drops=[5]) == [0, 1, 2, 3, 4]
    assert first_change([0, 1, 3, 5]) == 2
    assert first_change([0, 1, 2]) == 3  # only the last layers removed: the cached h_3 is the output


def test_parse_plan_drop_takes_a_count_or_a_percentage_of_the_depth():
    assert parse_plan_drop("3", 16) == 3
    assert parse_plan_drop("25%", 16) == 4
    assert parse_plan_drop("10%", 12) == 1
    for bad in ("0", "16", "100%", "four", "0%"):
        with pytest.raises(LmsurgeonError, match="--plan-drop"):
            parse_plan_drop(bad, 16)


@pytest.mark.parametrize("orders", [[[0, 2, 3], [0, 1, 2], [1, 2, 3], [0, 3]], [[0, 2, 1, 3], [1, 0, 3], [2, 3]]])
def test_plan_loss_from_cached_inputs_equals_the_physically_rewired_model(orders):
    model = qwen2_mixed(layers=4)  # sliding and full attention layers: each block keeps its own mask type
    batches = _batches(97)
    scores = _evaluator(model, batches).scores(orders)
    for order, score in zip(orders, scores, strict=True):
        total, n = _physical_nll(model, order, batches)
        assert abs(score.loss - total / n) <= 1e-5 * (total / n), order
        assert abs(score.bpb - bits_per_byte(total, 1000)) <= 1e-5 * score.bpb


def test_orders_sharing_a_prefix_share_its_block_calls_and_get_the_same_states():
    from lmsurgeon.swap.capture import call_block, capture
    from lmsurgeon.swap.plan import shared_prefix_outputs

    model = llama(97, layers=6)
    layers = model.model.layers
    b = _batches(97, n=1)[0]
    cap = capture(model, ["model.layers"], **b.inputs())
    orders = sorted({tuple(plan_order(6, drops=(1, j))) for j in range(6) if j != 1} | {(0, 1, 2, 4, 5)})
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k=k: calls.append(k)) for k, layer in enumerate(layers)]
    try:
        shared = dict(shared_prefix_outputs(layers, orders, cap))
    finally:
        for h in hooks:
            h.remove()
    for order in orders:
        p = first_change(order)
        x = cap.h[p]
        for j in order[p:]:
            x = call_block(layers, j, x, cap)
        assert torch.equal(shared[order], x), order
    distinct = {order[:q] for order in orders for q in range(first_change(order) + 1, len(order) + 1)}
    assert len(calls) == len(distinct)
    assert len(calls) < sum(len(o) - first_change(o) for o in orders)


def test_plan_scores_are_the_same_with_captures_kept_or_recomputed():
    model = llama(97, layers=4)
    orders = [[0, 2, 3], [1, 3]]
    kept = _evaluator(model, _batches(97), budget=2 << 30)
    again = _evaluator(model, _batches(97), budget=0)
    first = kept.scores(orders)
    assert kept.scores(orders) == first  # second call served from the kept captures
    assert again.scores(orders) == first


def test_angular_distance_over_one_and_two_layer_blocks_equals_the_analysis_ang1_and_ang2():
    model = llama(97, layers=4)
    batches = _batches(97)
    family = detect_family(model.config.to_dict())
    layers = find_module(model, family.modules["layers"])
    A = [torch.zeros(32, 32, dtype=torch.float64).numpy()] * 4
    fit = LinearFit(A=A, r2_fit=[0.0] * 4, n_fit=0, ridge=0.0, window=4)
    ev = finish(eval_pass(model, layers, family.modules["layers"], batches, fit, None, 4, "cpu"), False)
    ang = _evaluator(model, batches).angular_by_block(3)
    assert torch.allclose(torch.tensor(ang[1]), torch.tensor(ev["ang1"]), rtol=1e-12, atol=0)
    assert torch.allclose(torch.tensor(ang[2, :3]), torch.tensor(ev["ang2"]), rtol=1e-12, atol=0)
    assert torch.isnan(torch.tensor(ang[3, 2:])).all()  # ℓ + 3 > 4: no such block


class AdditiveCosts:
    """A stand-in evaluator: dropping layer j costs cost[j] nats (additively); bpb = loss."""

    def __init__(self, cost: list[float]):
        self.cost, self.n_bytes, self.plans_scored = cost, 1, 0

    def scores(self, orders):
        L = len(self.cost)
        self.plans_scored += len(orders)
        return [
            Score(
                loss=sum(self.cost[j] for j in range(L) if j not in o),
                bpb=sum(self.cost[j] for j in range(L) if j not in o),
            )
            for o in orders
        ]

    def angular_by_block(self, max_n):
        import numpy as np

        ang = np.full((max_n + 1, len(self.cost)), np.nan)
        for n in range(1, max_n + 1):
            ang[n, : len(self.cost) - n + 1] = 0.5
            ang[n, 0] = 0.1  # the first block always looks closest
        return ang


def test_greedy_drops_the_cheapest_layer_each_step():
    steps = greedy(AdditiveCosts([5.0, 1.0, 4.0, 0.5, 3.0]), 5, 3)
    assert [layers for layers, _ in steps] == [(3,), (1, 3), (1, 3, 4)]
    assert [score.loss for _, score in steps] == [0.5, 1.5, 4.5]


def test_recommendation_follows_validation_loss_and_never_the_oracle():
    table = [
        {"i": i, "trans": t, "bi": b, "dloss_drop": None}
        for i, (t, b) in enumerate([(0.1, 0.9), (0.9, 0.1), (0.5, 0.5), (0.7, 0.7)])
    ]
    validation = AdditiveCosts([1.0, 9.0, 9.0, 9.0])  # on validation text, layer 0 is the cheap one
    heldout = AdditiveCosts([9.0, 1.0, 9.0, 9.0])  # on held-out text, layer 1 is
    res = plan_drops(validation, heldout, table, 1)
    rec = res["recommended"][0]
    assert rec["layers"] == [0]
    assert rec["strategy"] in ("trans", "angular", "greedy_validation")
    oracle = [r for r in res["plans"] if r["strategy"] == ORACLE]
    assert oracle[0]["layers"] == [1]
    assert res["plan_summary"]["at_k_max"]["best_non_oracle_on_heldout"] == "bi"
    assert res["plan_summary"]["at_k_max"]["gap_to_oracle"] == pytest.approx(9.0 / 1.0 - 1.0)
    assert res["plan_summary"]["at_k_max"]["within_5_percent_of_oracle"] is False
    assert {r["strategy"] for r in res["plans"]} == {"trans", "bi", "angular", "greedy_validation", ORACLE}


def test_predicted_bytes_are_the_text_after_each_rows_first_token():
    tok = tokenizer()
    texts = ["the quick brown fox jumps over the lazy dog", "naïve café — déjà vu"]
    rows = [tok(t)["input_ids"] for t in texts]
    first = [tok.decode(r[:1]) for r in rows]
    assert predicted_bytes(tok, rows) == sum(
        len(t.encode()) - len(f.encode()) for t, f in zip(texts, first, strict=True)
    )


@pytest.fixture(scope="module")
def mixed_checkpoint(tmp_path_factory):
    return save_with_tokenizer(qwen2_mixed(layers=5), tokenizer(97), tmp_path_factory.mktemp("plan") / "src")


def test_written_plan_loads_renumbered_and_its_loss_is_the_cached_estimate(mixed_checkpoint, tmp_path):
    handle = open_model(mixed_checkpoint)
    layout = Layout(handle)
    order = plan_order(5, drops=[1], swaps=[3])
    assert order == [0, 2, 4, 3]
    dest = write_rewired(handle, layout, tmp_path / plan_folder([1], [3]), order)
    assert dest.name == "plan_drop_1_swap_3"
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    types = json.loads((mixed_checkpoint / "config.json").read_text())["layer_types"]
    assert cfg["layer_types"] == [types[j] for j in order]
    loaded = AutoModelForCausalLM.from_pretrained(dest).eval()
    assert [layer.self_attn.layer_idx for layer in loaded.model.layers] == [0, 1, 2, 3]
    batches = _batches(97)
    total, n = nll_total(loaded, batches)
    cached = _evaluator(handle.load_model("causal-lm", dtype=torch.float32), batches).scores([order])[0]
    assert abs(cached.loss - total / n) <= 1e-5 * cached.loss


def test_greedy_generation_of_a_written_plan_with_kv_cache_equals_uncached_decoding(mixed_checkpoint, tmp_path):
    handle = open_model(mixed_checkpoint)
    dest = write_rewired(handle, Layout(handle), tmp_path / "p", plan_order(5, drops=[0, 2], swaps=[3]))
    loaded = AutoModelForCausalLM.from_pretrained(dest).eval()
    check = generation_check(loaded, _batches(97)[0], prompt_len=12, new_tokens=10)
    assert check["new_tokens"] == 10
    assert check["cached_equals_uncached"] is True


def test_apply_plan_spec_is_parsed_and_bad_ones_are_refused():
    body = {
        "plans": [{"strategy": ORACLE, "k": 2, "layers": [3, 4]}],
        "plan_summary": {"k_max": 2},
        "recommended": [{"k": 1, "strategy": "bi", "layers": [4]}, {"k": 2, "strategy": "bi", "layers": [1, 4]}],
    }
    assert resolve_plan("drop:3,1;swap:0", body, 6)[:2] == ([1, 3], [0])
    assert resolve_plan("swap:2", body, 6)[:2] == ([], [2])
    assert resolve_plan("recommended", body, 6)[:2] == ([1, 4], [])
    assert resolve_plan("oracle", body, 6)[:2] == ([3, 4], [])
    for bad, message in [
        ("drop:6", "outside"),
        ("swap:5", "outside"),
        ("drop:1,1", "twice"),
        ("drop:0,1,2,3,4,5", "every layer"),
        ("cut:1", "expected"),
        ("drop:x", "expected"),
        ("reorder", "--plan-reorder"),
    ]:
        with pytest.raises(LmsurgeonError, match=message):
            resolve_plan(bad, body, 6)
    with pytest.raises(LmsurgeonError, match="--plan-drop"):
        resolve_plan("recommended", {}, 6)


def test_analyze_plans_drops_and_reorders_recommends_without_the_oracle_and_writes_a_working_model(tmp_path):
    from lmsurgeon.swap import analyze

    tok = tokenizer()
    src = save_with_tokenizer(llama(len(tok), layers=5), tok, tmp_path / "m")
    out = tmp_path / "run"
    res = analyze(
        src,
        tokens=1200,
        seq_len=64,
        bootstrap=50,
        plan_drop="40%",
        plan_reorder=True,
        reorder_tolerance=0.05,
        apply_plan="recommended",
        heal_steps=2,
        out=out,
    )
    assert res["settings"]["data"]["heldout"] == "built-in corpus: test"
    plans = res["plans"]
    assert {(r["strategy"], r["k"]) for r in plans} == {
        (s, k) for s in ("trans", "bi", "angular", "dloss", "greedy_validation", ORACLE) for k in (1, 2)
    }
    for r in plans:
        assert {"strategy", "k", "layers", "heldout_bpb", "heldout_loss"} <= set(r)
        assert len(r["layers"]) == r["k"]
    at = {(r["strategy"], r["k"]): r for r in plans}
    # one drop: the oracle picks the best single layer on the held-out text, exactly; the Δloss predictor drops
    # the layer whose measured single drop costs least (the greedy search uses its own half of the eval rows)
    assert at[(ORACLE, 1)]["heldout_loss"] == min(r["heldout_loss"] for r in plans if r["k"] == 1)
    cheapest = min(res["layers"], key=lambda row: (row["dloss_drop"], row["i"]))["i"]
    assert at[("dloss", 1)]["layers"] == [cheapest]
    for rec in res["recommended"]:
        pool = [r for r in plans if r["k"] == rec["k"] and r["strategy"] != ORACLE]
        assert rec["strategy"] != ORACLE
        assert rec["validation_loss"] == min(r["validation_loss"] for r in pool)
    applied = res["applied_plan"]
    assert applied["drops"] == res["recommended"][-1]["layers"]
    assert abs(applied["heldout_loss"] - applied["heldout_loss_from_cache"]) <= 1e-5 * applied["heldout_loss"]
    assert applied["generation"]["cached_equals_uncached"] is True
    loaded = AutoModelForCausalLM.from_pretrained(out / applied["path"])
    assert loaded.config.num_hidden_layers == 3
    healed = applied["heal"]
    assert healed["steps"] == 2
    assert (out / healed["path"] / "config.json").exists()
    for step in res["reorder"]["steps"]:
        assert step["validation_dloss"] <= 0.05
    assert "Drop plans" in (out / "report.html").read_text()
    assert (out / "figures" / "plans_heldout_bpb.png").exists()


def test_healing_trains_exactly_the_layers_next_to_each_cut():
    from lmsurgeon.swap.apply import cut_neighbours

    assert cut_neighbours([0, 1, 3, 4], 5) == {1, 2}  # layer 2 removed: new positions 1 and 2 meet at the cut
    assert cut_neighbours([0, 1, 2], 4) == {2, 3}  # last layer removed (position 3 no longer exists)
    assert cut_neighbours([1, 2, 3], 4) == {-1, 0}  # first layer removed
    assert cut_neighbours([0, 2, 1, 3], 4) == {0, 1, 2, 3}  # a swap breaks the joints 0|1, 1|2 and 2|3
    assert cut_neighbours([0, 1, 2, 3], 4) == set()
