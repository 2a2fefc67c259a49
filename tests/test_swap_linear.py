"""Hand-built layers with known algebra (methods.md §S13): disjoint blocks commute exactly, identical layers commute
with r > 0, a zero update is redundant; the fit, δ, δ', Dep and r must say so."""

import numpy as np
import torch

from lmsurgeon.swap.engine import Batch, eval_pass, finish, fit_pass
from lmsurgeon.swap.metrics import dep, r_metric, trans
from tests.swap_models import ToyModel

D = 6


def _block(lo: int, hi: int, seed: int) -> torch.Tensor:
    """A matrix that reads and writes only coordinates lo…hi−1."""
    M = torch.zeros(D, D, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    M[lo:hi, lo:hi] = 0.5 * torch.randn(hi - lo, hi - lo, generator=g, dtype=torch.float64)
    return M


def _batches(n: int = 3) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 50, (3, 20), generator=g)
        mask = torch.ones(3, 20, dtype=torch.long)
        mask[2, 13:] = 0
        out.append(Batch(ids, mask))
    return out


def _run(Ms, nonlinear=False):
    model = ToyModel(Ms, nonlinear=nonlinear)
    fit = fit_pass(model, ["layers"], _batches(), len(Ms), D, window=4, ridge=0.0, device="cpu")
    ev = finish(eval_pass(model, model.layers, ["layers"], _batches(2), fit, None, 4, "cpu"), False)
    return fit, ev


def test_layers_on_disjoint_subspaces_give_zero_delta_and_zero_dep():
    Mi, Mj = _block(0, 3, 0), _block(3, 6, 1)
    fit, ev = _run([Mi, Mj])
    assert np.allclose(fit.A[0], Mi.numpy(), atol=1e-8)
    assert np.allclose(fit.A[1], Mj.numpy(), atol=1e-8)
    assert min(fit.r2_fit) > 1 - 1e-10
    assert min(ev["r2_eval"]) > 1 - 1e-10
    assert ev["delta"][0] < 1e-6
    assert ev["delta_linear"][0] < 1e-6
    assert dep(fit.A[0], fit.A[1]) < 1e-6
    assert dep(fit.A[1], fit.A[0]) < 1e-6
    assert r_metric(fit.A[0], fit.A[1]) < 1e-6


def test_nonlinear_blocks_on_disjoint_subspaces_still_commute():
    _, ev = _run([_block(0, 3, 2), _block(3, 6, 3)], nonlinear=True)
    assert ev["delta"][0] < 1e-12


def test_overlapping_blocks_do_not_commute():
    fit, ev = _run([_block(0, 4, 4), _block(2, 6, 5)])
    assert ev["delta"][0] > 1e-3
    assert ev["delta_linear"][0] > 1e-3
    assert r_metric(fit.A[0], fit.A[1]) > 1e-3


def test_zero_update_layer_is_redundant():
    fit, ev = _run([torch.zeros(D, D, dtype=torch.float64), _block(0, 6, 6)])
    assert np.abs(fit.A[0]).max() < 1e-12
    assert trans(fit.A[0]) < 1e-12
    assert r_metric(fit.A[0], fit.A[1]) < 1e-12
    assert ev["delta"][0] < 1e-12
    assert ev["bi"][0] < 1e-12


def test_identical_layers_commute_although_r_is_positive():
    M = _block(0, 6, 7)
    fit, ev = _run([M, M.clone()])
    assert ev["delta"][0] < 1e-12
    assert ev["delta_linear"][0] < 1e-9
    assert r_metric(fit.A[0], fit.A[1]) > 0.1  # r is a predictor, not a proof (methods.md §S4.2 note)
