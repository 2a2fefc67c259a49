"""Symmetric top-K KL and bits per byte against exact float64 references; KL positions and token classes."""

import numpy as np
import pytest
import torch

from lmsurgeon.merge.monitors import TOKEN_CLASSES, PromptEvaluator, kl_positions, sym_kl_topk, token_class


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


def _reference_bpb(model, tok, texts):
    """float64 NLL of every token after the first, over the UTF-8 bytes after the first token's text."""
    nll, n_bytes = 0.0, 0
    for text in texts:
        ids = tok.encode(text).ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        nll -= float(sum(logp[j, ids[j + 1]] for j in range(len(ids) - 1)))
        n_bytes += len(text.encode("utf-8")) - len(tok.decode(ids[:1]).encode("utf-8"))
    return nll / np.log(2) / n_bytes


def test_bits_per_byte_matches_a_float64_reference_for_both_tokenizer_families(merge_pair):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    texts = merge_pair["texts"][:6] + ["naïve café: 42 €", "def f(x):\n    return x  # é", "Version 3.11"]
    for name in ("gpt2", "llama"):
        model = AutoModelForCausalLM.from_pretrained(merge_pair[name]).eval()
        tok = Tokenizer.from_file(str(merge_pair[name] / "tokenizer.json"))
        ev = PromptEvaluator(tok, texts, batch_size=3).evaluate(model)
        assert ev.bpb == pytest.approx(_reference_bpb(model, tok, texts), rel=1e-5), name


def test_token_classes_partition_the_bytes_and_the_nll(merge_pair):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    texts = ["Version 3.11 adds 42 things; see §2 — ok?", "Indented\n\tline 7:    naïve"]
    model = AutoModelForCausalLM.from_pretrained(merge_pair["llama"]).eval()
    tok = Tokenizer.from_file(str(merge_pair["llama"] / "tokenizer.json"))
    evaluator = PromptEvaluator(tok, texts)
    ev = evaluator.evaluate(model)
    assert [tok.encode(t).tokens[0] for t in texts] == ["▁", "▁"]  # a prepended word marker: spells nothing
    assert ev.n_bytes == sum(len(t.encode("utf-8")) for t in texts)
    assert int(ev.class_bytes.sum()) == ev.n_bytes
    assert float(ev.class_nll.sum()) == pytest.approx(ev.nll_sum, rel=1e-6)  # no special token was added
    by_class = ev.bpb_by_class()
    assert set(by_class) == set(TOKEN_CLASSES)
    assert by_class["digits"] is not None
    assert by_class["multibyte"] is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 42", "digits"),
        ("7", "digits"),
        ("    ", "whitespace"),
        ("\n", "whitespace"),
        (" (", "punctuation"),
        ("):", "punctuation"),
        (" é", "multibyte"),
        ("€", "multibyte"),
        (" word", "words"),
        ("x1", "words"),
    ],
)
def test_token_class_of_spelled_text(text, expected):
    assert token_class(text) == expected
