"""Swap with layer streaming: blocks read from the checkpoint on demand give the in-memory numbers, and a model
larger than its memory limit still runs with only a few blocks resident."""

import math

import pytest
import torch

from lmsurgeon.io import open_model
from lmsurgeon.streaming import weight_bytes
from lmsurgeon.swap import analyze
from lmsurgeon.swap.engine import Batch
from lmsurgeon.swap.streamed import StreamedSwapModel
from tests.swap_models import llama, save_with_tokenizer, tokenizer

SETTINGS = {"tokens": 500, "seq_len": 32, "bootstrap": 20}
PLANS = {"plan_drop": "2", "plan_reorder": True, "plan_tokens": 300}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    tok = tokenizer()
    return save_with_tokenizer(llama(len(tok), layers=4), tok, tmp_path_factory.mktemp("m") / "llama")


def _numbers(res: dict) -> list[float]:
    """Every measured figure of a run: per layer, per pair, every plan's scores, the reorder steps."""
    out = [res["loss"]]
    for row in res["layers"] + res["pairs"]:
        out += [v for k, v in sorted(row.items()) if isinstance(v, float)]
    for row in res["plans"]:
        out += [row["heldout_loss"], row["heldout_bpb"], row["validation_loss"] or 0.0]
    out += [s["heldout_loss"] for s in res["reorder"]["steps"]]
    return out


def test_streamed_swap_analysis_and_plans_equal_the_in_memory_run(tiny_llama, tmp_path):
    plain = analyze(tiny_llama, streaming="plain", out=tmp_path / "plain", **SETTINGS, **PLANS)
    streamed = analyze(tiny_llama, streaming="stream", out=tmp_path / "stream", **SETTINGS, **PLANS)
    assert not plain["model"]["streaming"]["streamed"]
    assert streamed["model"]["streaming"]["streamed"]
    assert streamed["model"]["streaming"]["block_loads"] > 0
    a, b = _numbers(plain), _numbers(streamed)
    assert len(a) == len(b) > 80
    for x, y in zip(a, b, strict=True):
        assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9), (x, y)
    assert [r["layers"] for r in plain["plans"]] == [r["layers"] for r in streamed["plans"]]
    assert plain["recommended"] == streamed["recommended"]


def test_a_model_larger_than_its_memory_limit_runs_with_few_blocks_resident(tiny_llama, tmp_path):
    handle = open_model(tiny_llama)
    weights = sum(weight_bytes(handle, torch.float32).values())
    res = analyze(tiny_llama, max_memory=str(weights // 2), out=tmp_path / "run", **SETTINGS)
    assert res["model"]["streaming"]["streamed"]  # auto chose streaming under the limit

    model = StreamedSwapModel(handle, "causal-lm", torch.float32, "cpu", max_memory=weights // 2, mode="stream")
    layers = model.layers
    assert 2 <= layers.capacity < len(layers)
    assert model.sm.resident == {"embed"}  # the head waits for the first Δloss: the fit pass never reads it
    model.load_head()
    assert model.sm.resident == {"embed", "final_norm", "lm_head"}
    resident = []
    for j in range(len(layers)):  # every block call records how many blocks are loaded at that moment
        model.sm.layers[j].register_forward_pre_hook(
            lambda *_: resident.append(sum(isinstance(s, int) for s in model.sm.resident))
        )
    ids = torch.randint(3, 250, (2, 20), generator=torch.Generator().manual_seed(0))
    cap = model.capture(**Batch(ids, torch.ones_like(ids)).inputs())
    assert len(cap.h) == len(layers) + 1
    assert resident and max(resident) <= layers.capacity


def test_the_streamed_fit_pass_reads_each_block_once_for_all_batches_and_fits_the_same_maps(tiny_llama):
    """The fit pass of a streamed model runs layer-major (every batch through block i, then layer i's sums
    solved and freed): the A_i equal the batch-by-batch fit of the model in memory, with one load per block."""
    from lmsurgeon.arch import Layout
    from lmsurgeon.streaming.spill import DiskTensors
    from lmsurgeon.swap.engine import fit_pass

    handle = open_model(tiny_llama)
    layout = Layout(handle)
    paths, d = layout.family.modules["layers"], layout.hidden_size
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, 250, (2, 16), generator=g) for _ in range(4)]
    batches = [Batch(x, torch.ones_like(x)) for x in ids]
    plain = handle.load_model("causal-lm", dtype=torch.float32, device="cpu")
    want = fit_pass(plain, paths, batches, 4, d, 4, 1e-3, "cpu")
    weights = sum(weight_bytes(handle, torch.float32).values())
    model = StreamedSwapModel(handle, "causal-lm", torch.float32, "cpu", max_memory=weights // 2, mode="stream")
    got = fit_pass(model, paths, batches, 4, d, 4, 1e-3, "cpu")
    assert model.layers.loads == 4  # batch by batch it would be 4 batches × 4 blocks
    assert got.n_fit == want.n_fit > 0
    assert isinstance(got.A, DiskTensors) and len(got.A) == 4  # read back a layer at a time, not held
    folder = got.A.folder
    assert sorted(p.name for p in folder.iterdir()) == [f"{i}.safetensors" for i in range(4)]
    for a, b in zip(got.A, want.A, strict=True):
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), rtol=1e-9, atol=1e-9)
    assert got.r2_fit == pytest.approx(want.r2_fit, rel=1e-9)
    del got
    assert not folder.exists()  # the temporary folder goes with the fit


def test_streamed_apply_drop_and_plan_are_checked_streamed_with_the_in_memory_losses(tiny_llama, tmp_path, monkeypatch):
    """--apply, --drop and --apply-plan on a streamed model: the written models are read back streamed (never
    loaded whole by transformers) and give the in-memory run's losses; the generation check says it did not run."""
    from lmsurgeon.io.model import ModelHandle

    options = {**SETTINGS, **PLANS, "apply": 1, "drop": 2, "apply_plan": "drop:0;swap:2"}
    plain = analyze(tiny_llama, streaming="plain", out=tmp_path / "plain", **options)

    def refuse(*args, **kwargs):
        raise AssertionError("a streamed run loaded a whole model")

    monkeypatch.setattr(ModelHandle, "load_model", refuse)
    streamed = analyze(tiny_llama, streaming="stream", out=tmp_path / "stream", **options)
    a, b = plain["apply"], streamed["apply"]
    assert [r["path"] for r in a["results"]] == [r["path"] for r in b["results"]] == ["swap_1_2", "drop_2"]
    assert math.isclose(a["loss_before"], b["loss_before"], rel_tol=1e-6)
    for x, y in zip(a["results"], b["results"], strict=True):
        assert math.isclose(x["loss_after"], y["loss_after"], rel_tol=1e-6), (x, y)
    p, s = plain["applied_plan"], streamed["applied_plan"]
    for key in ("heldout_loss", "heldout_bpb", "heldout_loss_from_cache", "heldout_loss_before"):
        assert math.isclose(p[key], s[key], rel_tol=1e-6), key
    assert p["generation"]["cached_equals_uncached"] is True
    assert s["generation"]["cached_equals_uncached"] is None and "streams" in s["generation"]["not_run"]


def test_healing_a_streamed_model_is_refused_before_anything_runs(tiny_llama, tmp_path):
    from lmsurgeon.errors import LmsurgeonError

    with pytest.raises(LmsurgeonError, match="heal-steps"):
        analyze(
            tiny_llama, streaming="stream", out=tmp_path / "r", **SETTINGS, **PLANS, apply_plan="drop:1", heal_steps=2
        )
