"""Bits per byte: the text-quality unit that is fair across tokenizers.

Perplexity is per token, so two models with different tokenizers (or one model before and after its vocabulary
changed) are not comparable by it: a tokenizer that cuts text into more, easier tokens lowers perplexity without
predicting the text any better. Total negative log-likelihood divided by the UTF-8 bytes of the text it
predicts does not depend on how the text was cut. Swap plans and merges both report it, from this one function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def utf8_bytes(texts: Iterable[str]) -> int:
    """Number of UTF-8 bytes in ``texts`` (the denominator of bits per byte)."""
    return sum(len(t.encode("utf-8")) for t in texts)


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """BPB = Σ −ln p(token) / ln 2 / bytes; the NLL must cover exactly the tokens that spell those bytes."""
    if n_bytes <= 0:
        raise ValueError("bits per byte needs a positive byte count")
    return float(total_nll_nats) / math.log(2.0) / n_bytes
