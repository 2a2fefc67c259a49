"""Token correspondence across tokenizer families (spec §2.1, §8.1).

Every token of a vocabulary becomes a canonical key (space, body): `space` says the token starts a new word,
`body` is the bytes it stands for. Byte-level BPE "Ġ", SentencePiece "▁" with `<0xNN>` byte fallback and
WordPiece "##" all meet on these keys, so "Ġhello", "▁hello" and the word-initial WordPiece "hello" match.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field

from lmsurgeon.errors import LmsurgeonError

Key = tuple[bool, bytes]

BYTE_LEVEL, SENTENCEPIECE, WORDPIECE = "byte-level", "sentencepiece", "wordpiece"
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (the same one `tokenizers` ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def detect_family(tokenizer_json: dict) -> str:
    """Family from a parsed tokenizer.json; an unknown layout is an error, never a guess."""
    model = tokenizer_json.get("model") or {}
    kind = model.get("type")
    text = json.dumps({k: tokenizer_json.get(k) for k in ("pre_tokenizer", "decoder", "normalizer")})
    if kind == "WordPiece":
        return WORDPIECE
    if kind in ("BPE", "Unigram"):
        if "ByteLevel" in text:
            return BYTE_LEVEL
        if model.get("byte_fallback") or "Metaspace" in text or "▁" in text or kind == "Unigram":
            return SENTENCEPIECE
    raise LmsurgeonError(f"unknown tokenizer family (model type {kind!r})", None)


def canonical_key(token: str, family: str) -> Key | None:
    """(space, body) of one vocabulary string; None when it does not stand for bytes (undecodable)."""
    if family == BYTE_LEVEL:
        try:
            body = bytes(_UNICODE_TO_BYTE[c] for c in token)
        except KeyError:
            return None
        space = body.startswith(b" ")
        return (space, body[1:] if space else body)
    if family == SENTENCEPIECE:
        m = _BYTE_FALLBACK.match(token)
        if m:
            return (False, bytes([int(m.group(1), 16)]))
        text = token.replace("▁", " ")
        space = text.startswith(" ")
        return (space, (text[1:] if space else text).encode("utf-8"))
    if family == WORDPIECE:
        if token.startswith("##") and len(token) > 2:
            return (False, token[2:].encode("utf-8"))
        is_punct = all(unicodedata.category(c).startswith("P") for c in token)
        return (not is_punct, token.encode("utf-8"))
    raise LmsurgeonError(f"unknown tokenizer family {family!r}", None)


def _special_ids(tokenizer_json: dict, family: str) -> set[int]:
    """Added tokens, control/unknown pieces and padding are never matched (spec §2.1)."""
    ids = {int(t["id"]) for t in tokenizer_json.get("added_tokens") or []}
    model = tokenizer_json.get("model") or {}
    if model.get("type") == "Unigram" and model.get("unk_id") is not None:
        ids.add(int(model["unk_id"]))
    unk = model.get("unk_token")
    vocab = _vocab(tokenizer_json)
    if unk in vocab:
        ids.add(vocab[unk])
    for tok, i in vocab.items():
        if tok.startswith("<") and tok.endswith(">") and not _BYTE_FALLBACK.match(tok) and family != BYTE_LEVEL:
            ids.add(i)  # SentencePiece control pieces such as <s>, </s>, <pad>
        if family == WORDPIECE and tok.startswith("[") and tok.endswith("]"):
            ids.add(i)
    return ids


def _vocab(tokenizer_json: dict) -> dict[str, int]:
    model = tokenizer_json.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        return {piece: i for i, (piece, _score) in enumerate(vocab)}
    return dict(vocab or {})


@dataclass
class CanonicalVocab:
    """Key → token id of one tokenizer, with the duplicates that lost the tie (spec §2.1)."""

    family: str
    size: int
    keys: dict[Key, int]
    raw: dict[str, int]
    collisions: int = 0
    undecodable: int = 0
    by_class: dict[str, int] = field(default_factory=dict)


def canonical_vocab(tokenizer_json: dict | str, size: int | None = None) -> CanonicalVocab:
    """Canonicalise a whole vocabulary. Duplicate keys: regular piece before byte fallback, then lowest id."""
    tj = json.loads(tokenizer_json) if isinstance(tokenizer_json, str) else tokenizer_json
    family = detect_family(tj)
    vocab = _vocab(tj)
    special = _special_ids(tj, family)
    size = size if size is not None else max(list(vocab.values()) + [-1]) + 1
    best: dict[Key, tuple[int, int]] = {}  # key → (is_fallback, id)
    collisions = undecodable = 0
    raw: dict[str, int] = {}
    for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if i in special or i >= size:
            continue
        raw[tok] = i
        key = canonical_key(tok, family)
        if key is None or not key[1] and not key[0]:
            undecodable += 1
            continue
        rank = (int(bool(_BYTE_FALLBACK.match(tok))), i)
        if key in best:
            collisions += 1
            best[key] = min(best[key], rank)
        else:
            best[key] = rank
    keys = {k: i for k, (_fb, i) in best.items()}
    return CanonicalVocab(family, size, keys, raw, collisions, undecodable)


@dataclass
class SharedVocab:
    """Shared pairs S = (i_B, i_D), sorted by max id (low id ≈ frequent), and the overlap statistics."""

    base_ids: list[int]
    donor_ids: list[int]
    overlap: dict


def shared_vocab(base: CanonicalVocab, donor: CanonicalVocab, max_shared: int = 50_000) -> SharedVocab:
    """Match canonical keys; keep the `max_shared` pairs with the lowest max(i_B, i_D) (0 = all)."""
    common = base.keys.keys() & donor.keys.keys()
    pairs = sorted(((base.keys[k], donor.keys[k], k) for k in common), key=lambda p: (max(p[0], p[1]), p[0]))
    if not pairs:
        raise LmsurgeonError("no shared tokens between base and donor vocabularies", None)
    used = pairs if max_shared in (0, None) else pairs[:max_shared]
    by_class = {"space": sum(1 for *_, k in pairs if k[0]), "no_space": sum(1 for *_, k in pairs if not k[0]),
                "single_byte": sum(1 for *_, k in pairs if len(k[1]) == 1)}
    union = len(base.keys.keys() | donor.keys.keys())
    overlap = {
        "family_base": base.family, "family_donor": donor.family,
        "vocab_base": base.size, "vocab_donor": donor.size,
        "shared": len(pairs), "shared_used": len(used),
        "frac_base": len(pairs) / max(base.size, 1), "frac_donor": len(pairs) / max(donor.size, 1),
        "jaccard": len(pairs) / max(union, 1),
        "collisions": {"base": base.collisions, "donor": donor.collisions},
        "undecodable": {"base": base.undecodable, "donor": donor.undecodable},
        "by_class": by_class,
        "raw_string_shared": len(base.raw.keys() & donor.raw.keys()),
    }
    return SharedVocab([p[0] for p in used], [p[1] for p in used], overlap)
