"""The activation tests run through layer streaming (methods.md §L7.4.1): block by block gives the plain path's
numbers, the plain path gives what the whole ``transformers`` model computes, and a memory budget smaller than the
model's weights still runs, holding one block at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmsurgeon import streaming
from lmsurgeon.arch import Layout, find_module
from lmsurgeon.data import load_texts
from lmsurgeon.io import open_model
from lmsurgeon.lineage import act_capture
from lmsurgeon.lineage.activations import activation_tests, encode, shared_items
from lmsurgeon.streaming import weight_bytes

TOL = 1e-5


@pytest.fixture(scope="module")
def texts():
    return load_texts(None, split="validation")[:16]


def _items(layout, texts):
    enc = encode(layout.handle.tokenizer, texts)
    return enc, shared_items(enc, enc)


def _close(x: np.ndarray, y: np.ndarray) -> None:
    np.testing.assert_allclose(x, y, rtol=0, atol=TOL * max(1.0, float(np.abs(y).max())))


@pytest.mark.parametrize("name", ["gpt2-bpe", "lin-base"])
def test_streamed_capture_equals_the_plain_path_and_the_whole_model(test_zoo, texts, name):
    layout = Layout(open_model(Path(test_zoo[0]) / name))
    enc, keep = _items(layout, texts)
    plain = act_capture.capture(layout, enc, keep, mode="plain", batch_size=3)
    streamed = act_capture.capture(layout, enc, keep, mode="stream", batch_size=3)
    assert len(plain.hidden) == len(streamed.hidden) == layout.n_layers
    for p, s in zip(plain.mlp, streamed.mlp, strict=True):
        assert p.kind == s.kind == "dense"
        _close(s.act, p.act)
        _close(s.readout, p.readout)
    for p, s in zip(plain.hidden, streamed.hidden, strict=True):
        _close(s, p)

    # the whole model, one text at a time (no padding): hidden states after each block and the down input
    model = layout.handle.load_model("base", dtype=torch.float32)
    blocks = find_module(model, layout.family.modules["layers"])
    downs: list[torch.Tensor] = []
    hooks = [
        blocks[i]
        .get_submodule(layout.role_module("down", i)[0])
        .register_forward_pre_hook(lambda _m, args: downs.append(args[0][0]))
        for i in layout.layers
    ]
    hidden: list[list[torch.Tensor]] = [[] for _ in layout.layers]
    acts: list[list[torch.Tensor]] = [[] for _ in layout.layers]
    blocks_out: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for e, ends in zip(enc, keep, strict=True):
                if not ends:
                    continue
                rows = [e["ends"][c] for c in ends]
                downs.clear()
                blocks_out.clear()
                handles = [b.register_forward_hook(lambda _m, _a, out: blocks_out.append(out)) for b in blocks]
                model(input_ids=torch.tensor([e["ids"]]))
                for h in handles:
                    h.remove()
                for i in layout.layers:
                    out = blocks_out[i][0] if isinstance(blocks_out[i], tuple) else blocks_out[i]
                    hidden[i].append(out[0, rows])
                    acts[i].append(downs[i][rows])
    finally:
        for h in hooks:
            h.remove()
    for i in layout.layers:
        _close(plain.hidden[i], torch.cat(hidden[i]).double().numpy())
        _close(plain.mlp[i].act, torch.cat(acts[i]).double().numpy())


def test_a_model_larger_than_its_memory_budget_runs_the_activation_tests_one_block_at_a_time(
    test_zoo, texts, monkeypatch
):
    folder = Path(test_zoo[0]) / "lin-base"
    weights = sum(weight_bytes(open_model(folder), torch.float32).values())
    budget = weights // 3
    made: list[streaming.StreamedModel] = []
    resident: list[int] = []

    class Spy(streaming.StreamedModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def apply_block(self, index, block, residual):
            resident.append(self.resident_bytes())
            return super().apply_block(index, block, residual)

    monkeypatch.setattr(streaming, "StreamedModel", Spy)
    layout = Layout(open_model(folder))
    streamed = activation_tests(layout, layout, texts, max_memory=budget)
    assert len(made) == 2 and all(m.streaming for m in made)
    assert len(resident) == 2 * layout.n_layers
    assert max(resident) < budget
    monkeypatch.undo()
    plain = activation_tests(layout, layout, texts, mode="plain")
    for s, p in zip(streamed, plain, strict=True):
        assert s.applies and p.applies, (s.reason, p.reason)
        assert s.z == pytest.approx(p.z, abs=1e-6), s.name
        assert s.statistic == pytest.approx(p.statistic, abs=1e-6), s.name


def test_lineage_max_memory_option_streams_the_activation_tests_with_the_same_z(test_zoo, tmp_path):
    """``lmsurgeon lineage --max-memory`` reaches the activation tests: a budget of a few kilobytes (far below
    one block) streams both models and gives the z of the default (in-memory) run."""
    from lmsurgeon.cli import main
    from lmsurgeon.zoo import model_dir

    zoo_dir, manifest = test_zoo
    sources = [str(model_dir(zoo_dir, n, manifest)) for n in ("lin-base", "lin-finetune")]
    z = {}
    for label, extra in (("plain", []), ("streamed", ["--max-memory", "4KB"])):
        out = tmp_path / label
        assert main(["lineage", *sources, "--tests", "phi_match", "--out", str(out), *extra]) == 0
        body = json.loads((out / "results.json").read_text())
        assert body["config"]["max_memory"] == (None if label == "plain" else "4KB")
        z[label] = body["pairs"][0]["tests"][0]["z"]
    assert z["streamed"] == pytest.approx(z["plain"], abs=1e-6) and z["plain"] > 12


def test_act_layers_rule_and_its_errors():
    from lmsurgeon.errors import LmsurgeonError
    from lmsurgeon.lineage import LineageConfig
    from lmsurgeon.lineage.activations import STREAMED_ACT_LAYERS, act_blocks

    assert act_blocks("auto", (16, 12), (False, False)) == 16  # both in memory: every block
    assert act_blocks("auto", (16, 12), (False, True)) == STREAMED_ACT_LAYERS  # one streams: the leading blocks
    assert act_blocks("auto", (3, 2), (True, True)) == 3  # never more than the deeper model has
    assert act_blocks("all", (16, 12), (True, True)) == 16
    assert act_blocks(5, (16, 12), (True, True)) == act_blocks("5", (16, 12), (False, False)) == 5
    for bad in ("0", "-1", "half", "2.5"):
        with pytest.raises(LmsurgeonError, match="--act-layers"):
            LineageConfig(act_layers=bad)
    assert LineageConfig(act_layers=3).act_layers == "3"


def test_a_streamed_model_runs_only_the_leading_blocks_with_the_numbers_of_those_blocks(test_zoo, texts, monkeypatch):
    """Under a memory budget the default ``auto`` runs the first STREAMED_ACT_LAYERS blocks of a 16-block model:
    only those blocks are read, each capture equals the first blocks of the whole model's, and the tests give
    the numbers of ``--act-layers 4`` on the plain path."""
    from lmsurgeon.lineage.activations import STREAMED_ACT_LAYERS

    folder = Path(test_zoo[0]) / "deep-llama"
    layout = Layout(open_model(folder))
    assert layout.n_layers > STREAMED_ACT_LAYERS
    enc, keep = _items(layout, texts)
    whole = act_capture.capture(layout, enc, keep, mode="plain")
    first = act_capture.capture(layout, enc, keep, mode="stream", blocks=STREAMED_ACT_LAYERS)
    assert len(first.hidden) == STREAMED_ACT_LAYERS
    for w, f in zip(whole.hidden, first.hidden, strict=False):
        _close(f, w)

    loaded: list[int | str] = []

    class Spy(streaming.StreamedModel):
        def load(self, stages):
            loaded.extend(stages)
            return super().load(stages)

    monkeypatch.setattr(streaming, "StreamedModel", Spy)
    budget = sum(weight_bytes(layout.handle, torch.float32).values()) // 3
    streamed = activation_tests(layout, layout, texts, max_memory=budget)
    monkeypatch.undo()
    assert sorted({s for s in loaded if isinstance(s, int)}) == list(range(STREAMED_ACT_LAYERS))
    plain = activation_tests(layout, layout, texts, mode="plain", act_layers=STREAMED_ACT_LAYERS)
    for s, p in zip(streamed, plain, strict=True):
        assert s.applies and p.applies, (s.reason, p.reason)
        assert s.run == {
            "blocks": [STREAMED_ACT_LAYERS] * 2,
            "of": [layout.n_layers] * 2,
            "streamed": [True, True],
            "dtype": ["float32", "float32"],
            "act_layers": "auto",
        }
        assert p.run["streamed"] == [False, False] and p.run["blocks"] == [STREAMED_ACT_LAYERS] * 2
        assert s.z == pytest.approx(p.z, abs=1e-6), s.name
    assert all(max(a, b) < STREAMED_ACT_LAYERS for a, b in streamed[0].layer_map)
    from lmsurgeon.lineage.report import _blocks_note

    n = STREAMED_ACT_LAYERS
    assert _blocks_note(streamed[0]) == f"first {n}/16 and {n}/16 blocks (float32 streamed, float32 streamed)"
    assert _blocks_note(activation_tests(layout, layout, texts, mode="plain")[0]) == ""


def test_a_block_too_large_for_the_budget_in_float32_is_computed_in_the_checkpoint_dtype(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmsurgeon.streaming import compute_dtype, stored_float_dtype

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=256)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    handle = open_model(tmp_path)
    assert stored_float_dtype(handle) == torch.bfloat16
    plan = streaming.plan_memory(handle, torch.float32, "1GB")
    assert compute_dtype(handle, "1GB") == torch.float32
    tight = int(plan.largest_block * 0.9)  # the float32 stage does not fit with its reserve; bf16 (half) does
    assert compute_dtype(handle, tight) == torch.bfloat16
