"""Cached δ and Δloss (methods.md §S8, §S9) must equal those of a physically swapped ModuleList, for every family."""

import numpy as np
import pytest
import torch

from lmsurgeon.arch import detect_family, find_module
from lmsurgeon.swap import capture, delta_from_cache
from lmsurgeon.swap.e2e import find_head
from lmsurgeon.swap.engine import Batch, eval_pass, finish
from lmsurgeon.swap.linear import LinearFit
from tests.swap_models import qwen2_mixed
from tests.tiny_checkpoints import TINY, tiny_model

DECODERS = [t for t in TINY if t != "bert"]


def _batch(vocab: int) -> Batch:
    """Two right-padded rows (12 and 9 real tokens)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return Batch(ids, mask)


def _family(model):
    return detect_family(model.config.to_dict())


def _physically_swapped(model, layers, i):
    """Exchange layers i, i+1 in the ModuleList (and their layer_types entries, so each keeps its mask type)."""
    layers[i], layers[i + 1] = layers[i + 1], layers[i]
    types = getattr(model.config, "layer_types", None)
    if types is not None:
        types[i], types[i + 1] = types[i + 1], types[i]


def _ce(logits: torch.Tensor, b: Batch) -> torch.Tensor:
    sel = b.loss_sel
    logp = torch.log_softmax(logits.double()[sel], dim=-1)
    return -logp.gather(1, b.targets[sel][:, None])[:, 0]


def _reference(model, paths, b: Batch, i: int):
    """δ(i, i+1) and Δloss from a whole forward of the physically swapped model (float64 arithmetic)."""
    layers = find_module(model, paths)
    cap0 = capture(model, paths, **b.inputs())
    _physically_swapped(model, layers, i)
    try:
        cap1 = capture(model, paths, **b.inputs())
    finally:
        _physically_swapped(model, layers, i)
    sel = b.sel
    h_i, normal, swapped = (t.double()[sel] for t in (cap0.h[i], cap0.h[i + 2], cap1.h[i + 2]))
    delta = float(((normal - swapped).norm(dim=-1) / h_i.norm(dim=-1)).mean())
    if not hasattr(cap0.output, "logits"):
        return delta, None
    dloss = float((_ce(cap1.output.logits, b) - _ce(cap0.output.logits, b)).mean())
    return delta, dloss


def _cached(model, paths, b: Batch):
    layers = find_module(model, paths)
    L, d = len(layers), model.config.get_text_config().hidden_size
    fit = LinearFit(A=[np.zeros((d, d))] * L, r2_fit=[0.0] * L, n_fit=0, ridge=0.0, window=4)
    head = find_head(model, _family(model))
    return finish(eval_pass(model, layers, paths, [b], fit, head, 4, "cpu"), head is not None)


def _check(model, vocab):
    paths = _family(model).modules["layers"]
    b = _batch(vocab)
    ev = _cached(model, paths, b)
    for i in range(len(find_module(model, paths)) - 1):
        delta, dloss = _reference(model, paths, b, i)
        assert delta > 0
        assert abs(ev["delta"][i] - delta) <= 1e-5 * delta
        if dloss is not None:
            # float32 logits: Δloss is a difference of two losses of size ev["loss"], equal to 1e-5 of that
            assert abs(ev["dloss_swap"][i] - dloss) <= 1e-5 * ev["loss"]


@pytest.mark.parametrize("model_type", DECODERS)
def test_delta_from_cache_equals_physical_swap(model_type):
    _check(tiny_model(model_type), TINY[model_type][1].get("vocab_size", 97))


def test_delta_from_cache_equals_physical_swap_with_mixed_layer_types():
    model = qwen2_mixed()
    paths = _family(model).modules["layers"]
    b = _batch(97)
    # the layer types matter here: the same swap with the types left in place gives a different δ
    delta_kept, _ = _reference(model, paths, b, 0)
    layers = find_module(model, paths)
    layers[0], layers[1] = layers[1], layers[0]
    cap = capture(model, paths, **b.inputs())
    layers[0], layers[1] = layers[1], layers[0]
    cap0 = capture(model, paths, **b.inputs())
    naive = float(((cap0.h[2] - cap.h[2]).double().norm(dim=-1) / cap0.h[0].double().norm(dim=-1))[b.sel].mean())
    assert abs(naive - delta_kept) > 1e-3 * delta_kept
    _check(model, 97)


def test_delta_from_cache_equals_physical_swap_for_bert_encoder():
    model = tiny_model("bert")
    _check(model, 97)
    assert find_head(model, _family(model)) is None


def test_head_of_last_hidden_state_equals_model_logits():
    model = tiny_model("gemma2")  # final norm with offset and logit soft-capping
    fam = _family(model)
    b = _batch(97)
    cap = capture(model, fam.modules["layers"], **b.inputs())
    head = find_head(model, fam)
    assert torch.allclose(head.logits(cap.h[-1]), cap.output.logits.float(), atol=1e-5)


def test_delta_from_cache_helper_matches_engine():
    model = tiny_model("llama")
    paths = _family(model).modules["layers"]
    b = _batch(97)
    cap = capture(model, paths, **b.inputs())
    quick = delta_from_cache(find_module(model, paths), cap, b.sel)
    assert np.allclose(quick, _cached(model, paths, b)["delta"], rtol=1e-6)
