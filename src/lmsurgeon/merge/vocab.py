"""Merge's shared vocabulary S (methods.md §M2.1, §M8.1): the pairs it fits and blends on, and the overlap it reports.

Tokens are matched by ``lmsurgeon.tokens`` (the same matching lineage uses); this module applies merge's cap
(the pairs with the lowest max(i_B, i_D) are kept) and shapes the ``overlap`` block of results.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.tokens.vocab import (
    BYTE_LEVEL,
    SENTENCEPIECE,
    WORDPIECE,
    CanonicalVocab,
    Key,
    canonical_key,
    canonical_vocab,
    detect_family,
    match_tokens,
)

__all__ = [
    "BYTE_LEVEL",
    "SENTENCEPIECE",
    "WORDPIECE",
    "CanonicalVocab",
    "Key",
    "SharedVocab",
    "canonical_key",
    "canonical_vocab",
    "detect_family",
    "shared_vocab",
]


@dataclass
class SharedVocab:
    """Shared pairs S = (i_B, i_D), sorted by max id (low id ≈ frequent), and the overlap statistics."""

    base_ids: list[int]
    donor_ids: list[int]
    overlap: dict[str, Any]


def shared_vocab(base: CanonicalVocab, donor: CanonicalVocab, max_shared: int | None = 50_000) -> SharedVocab:
    """Match canonical keys; keep the `max_shared` pairs with the lowest max(i_B, i_D) (0 = all)."""
    S = match_tokens(base, donor, limit=max_shared or None, selection="lowest_ids")
    if not S.n_shared:
        raise LmsurgeonError("no shared tokens between base and donor vocabularies", None)
    overlap = {
        "family_base": base.family,
        "family_donor": donor.family,
        "vocab_base": base.size,
        "vocab_donor": donor.size,
        "shared": S.n_shared,
        "shared_used": S.n_used,
        "frac_base": S.n_shared / max(base.size, 1),
        "frac_donor": S.n_shared / max(donor.size, 1),
        "jaccard": S.jaccard,
        "collisions": {"base": base.collisions, "donor": donor.collisions},
        "undecodable": {"base": base.undecodable, "donor": donor.undecodable},
        "by_class": {"space": S.n_word_start, "no_space": S.n_continuation, "single_byte": S.n_single_byte},
        "raw_string_shared": S.raw_string_shared,
    }
    return SharedVocab(S.ids_a.tolist(), S.ids_b.tolist(), overlap)
