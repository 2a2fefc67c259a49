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
