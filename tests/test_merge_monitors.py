"""Symmetric top-K KL against an exact float64 reference, and the KL position sets."""

import numpy as np
import torch

from lmsurgeon.merge.monitors import kl_positions, sym_kl_topk


def _reference(logP, logQ, k):
    """Independent numpy coarse-graining: U = topK(P) ∪ topK(Q) plus a rest bucket."""
    out = []
    for lp, lq in zip(logP, logQ, strict=True):
        P, Q = np.exp(lp), np.exp(lq)
        U = sorted(set(np.argsort(-P)[:k]) | set(np.argsort(-Q)[:k]))
        p = np.append(P[U], max(1 - P[U].sum(), 1e-12))
        q = np.append(Q[U], max(1 - Q[U].sum(), 1e-12))
        out.append(0.5 * (np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p))))
    return np.array(out)


def test_topk_symmetric_kl_matches_reference_and_never_exceeds_exact():
    g = torch.Generator().manual_seed(0)
    logP = torch.log_softmax(torch.randn(6, 300, generator=g, dtype=torch.float64) * 2, -1)
    logQ = torch.log_softmax(logP + 0.3 * torch.randn(6, 300, generator=g, dtype=torch.float64), -1)
    for k in (5, 50):
        got = sym_kl_topk(logP, logQ, k).numpy()
        np.testing.assert_allclose(got, _reference(logP.numpy(), logQ.numpy(), k), rtol=1e-9)
    exact = sym_kl_topk(logP, logQ, 300).numpy()
    P, Q = logP.exp().numpy(), logQ.exp().numpy()
    np.testing.assert_allclose(exact, 0.5 * ((P - Q) * (np.log(P) - np.log(Q))).sum(-1), rtol=1e-9)
    assert float((sym_kl_topk(logP, logQ, 5).numpy() - exact).max()) <= 1e-12
    assert float(sym_kl_topk(logP, logP, 5).abs().max()) < 1e-12


def test_kl_positions_tail_and_all():
    assert kl_positions(20, "tail:8") == list(range(12, 20))
    assert kl_positions(3, "tail:8") == [0, 1, 2]
    assert kl_positions(4, "all") == [0, 1, 2, 3]
