"""The activation taps phi_match reads are the gate and up projections themselves, for every registry family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmsurgeon.arch import Layout
from lmsurgeon.io import open_model
from lmsurgeon.lineage.activations import mlp_taps
from tests.tiny_checkpoints import write_tiny

GATED = ["llama", "mistral", "qwen2", "qwen3", "phi3", "glm4", "gemma", "gemma2", "gemma3_text"]
UNGATED_OR_MOE = ["gpt2", "bert", "mixtral", "qwen3_moe", "phimoe"]


@pytest.mark.parametrize("model_type", GATED)
def test_taps_return_exactly_the_gate_and_up_outputs(tmp_path, model_type):
    """Hooked output slice == (module input) @ W_roleᵀ, with W_role read through the registry (fused split)."""
    folder = write_tiny(tmp_path / model_type, model_type)
    layout = Layout(open_model(folder))
    model = open_model(folder).load_model("base", dtype=torch.float64)
    taps = mlp_taps(layout, model)
    assert taps is not None
    assert len(taps) == layout.n_layers
    seen: dict = {}
    hooks = []
    for li, tap in enumerate(taps):
        for role in ("gate", "up"):
            module, cols = tap[role]
            hooks.append(
                module.register_forward_hook(
                    lambda m, args, out, key=(li, role), cols=cols: seen.__setitem__(key, (args[0], out[..., cols]))
                )
            )
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 5, 7, 11, 13]]))
    finally:
        for h in hooks:
            h.remove()
    for (li, role), (x, out) in seen.items():
        W = layout.read(role, layout.layers[li])
        np.testing.assert_allclose(out[0].numpy(), x[0].numpy() @ W.T, rtol=1e-10, atol=1e-12)
    assert len(seen) == 2 * layout.n_layers


@pytest.mark.parametrize("model_type", UNGATED_OR_MOE)
def test_models_without_a_dense_gated_mlp_in_every_layer_have_no_taps(tmp_path, model_type):
    folder = write_tiny(tmp_path / model_type, model_type)
    layout = Layout(open_model(folder))
    assert mlp_taps(layout, open_model(folder).load_model("base")) is None
