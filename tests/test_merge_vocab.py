"""Canonical keys make the same text match across byte-level BPE, SentencePiece and WordPiece."""

import pytest

from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.merge.vocab import (
    BYTE_LEVEL,
    SENTENCEPIECE,
    WORDPIECE,
    canonical_key,
    canonical_vocab,
    detect_family,
    shared_vocab,
)


@pytest.mark.parametrize(
    "byte_level,sp,wp,key",
    [
        ("Ġhello", "▁hello", "hello", (True, b"hello")),
        ("ing", "ing", "##ing", (False, b"ing")),
        ("Ċ", "<0x0A>", None, (False, b"\n")),
        ("ĠcafÃ©", "▁café", "café", (True, "café".encode())),
    ],
)
def test_known_pairs_canonicalise_alike(byte_level, sp, wp, key):
    assert canonical_key(byte_level, BYTE_LEVEL) == key
    assert canonical_key(sp, SENTENCEPIECE) == key
    if wp is not None:
        assert canonical_key(wp, WORDPIECE) == key


def test_wordpiece_punctuation_is_not_word_initial():
    assert canonical_key(",", WORDPIECE) == (False, b",")


def _bpe_json(vocab, pre="ByteLevel", **model):
    return {
        "model": {"type": "BPE", "vocab": vocab, "merges": [], **model},
        "pre_tokenizer": {"type": pre},
        "added_tokens": [{"id": 0, "content": "<|endoftext|>"}],
    }


def test_shared_vocab_excludes_specials_prefers_regular_pieces_and_caps_by_id():
    base = _bpe_json({"<|endoftext|>": 0, "Ġhello": 1, "ing": 2, "Ċ": 3, "x": 4})
    donor = {
        "model": {
            "type": "BPE",
            "vocab": {"<unk>": 0, "<s>": 1, "<0x0A>": 2, "▁hello": 3, "ing": 4, "\n": 5, "y": 6},
            "merges": [],
            "byte_fallback": True,
            "unk_token": "<unk>",
        },
        "pre_tokenizer": {"type": "Metaspace"},
        "added_tokens": [{"id": 1, "content": "<s>"}],
    }
    cb, cd = canonical_vocab(base), canonical_vocab(donor)
    assert cd.keys[(False, b"\n")] == 5  # regular "\n" beats byte fallback <0x0A>
    assert cd.collisions == 1
    sv = shared_vocab(cb, cd, max_shared=0)
    assert sorted(zip(sv.base_ids, sv.donor_ids, strict=True)) == [(1, 3), (2, 4), (3, 5)]
    assert sv.overlap["shared"] == 3
    assert sv.overlap["raw_string_shared"] == 1  # only "ing" as raw strings
    capped = shared_vocab(cb, cd, max_shared=2)
    assert list(zip(capped.base_ids, capped.donor_ids, strict=True)) == [(1, 3), (2, 4)]


def test_no_shared_tokens_and_unknown_families_are_errors():
    a = canonical_vocab(_bpe_json({"<|endoftext|>": 0, "Ġa": 1}))
    b = canonical_vocab(_bpe_json({"<|endoftext|>": 0, "Ġb": 1}))
    with pytest.raises(LmsurgeonError, match="no shared tokens"):
        shared_vocab(a, b)
    with pytest.raises(LmsurgeonError, match="unknown tokenizer family"):
        detect_family({"model": {"type": "BPE", "vocab": {"a</w>": 0}}, "pre_tokenizer": {"type": "Whitespace"}})


def test_trained_tokenizers_are_detected_and_overlap(merge_pair):
    import json

    g = json.loads((merge_pair["gpt2"] / "tokenizer.json").read_text())
    s = json.loads((merge_pair["llama"] / "tokenizer.json").read_text())
    assert detect_family(g) == BYTE_LEVEL
    assert detect_family(s) == SENTENCEPIECE
    sv = shared_vocab(canonical_vocab(g), canonical_vocab(s))
    assert sv.overlap["shared"] > sv.overlap["raw_string_shared"]  # canonical keys find more than raw strings
