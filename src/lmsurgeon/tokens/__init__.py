"""Token correspondence and Procrustes alignment: the foundations lineage and merge share.

``vocab``: one canonical key per token across byte-level BPE, SentencePiece and WordPiece, and the shared set of
two vocabularies. ``procrustes``: the orthogonal map (and Umeyama scale) between two sets of paired rows. This
package knows no capability; lineage, merge and the zoo call it, so they agree on which tokens two models share.
"""

from lmsurgeon.tokens.procrustes import SimilarityMap, fit_similarity, orthogonal_map, umeyama_scale
from lmsurgeon.tokens.vocab import (
    BYTE_LEVEL,
    SENTENCEPIECE,
    WORDLEVEL,
    WORDPIECE,
    CanonicalVocab,
    Key,
    SharedTokens,
    UnknownTokenizer,
    canonical_key,
    canonical_vocab,
    detect_family,
    match_tokens,
)

__all__ = [
    "BYTE_LEVEL",
    "SENTENCEPIECE",
    "WORDPIECE",
    "WORDLEVEL",
    "CanonicalVocab",
    "Key",
    "SharedTokens",
    "SimilarityMap",
    "UnknownTokenizer",
    "canonical_key",
    "canonical_vocab",
    "detect_family",
    "fit_similarity",
    "match_tokens",
    "orthogonal_map",
    "umeyama_scale",
]
