"""One spelling per token across tokenizer families, and the tokens two vocabularies share (methods.md §M8.1).

Every vocabulary entry becomes a :class:`Key` ``(space, body)``: ``space`` says the token starts a new word,
``body`` is the bytes it stands for. Byte-level BPE (GPT-2, Qwen, Llama 3: the whole byte-to-unicode table is
inverted, so ``Ġ`` = 0x20, ``Ċ`` = 0x0A, ``Ã©`` = C3 A9), SentencePiece (``▁`` word starts, ``<0xNN>`` byte
fallback), WordPiece (``##`` continuations) and WordLevel (whole words) all meet on these keys, so ``Ġhello``,
``▁hello`` and the word-initial WordPiece ``hello`` match, and so do ``Ċ`` and ``<0x0A>``. Added tokens, control
and unknown pieces and padding never match anything (methods.md §M2.1, §L7.1).

Lineage and merge both call :func:`match_tokens`, so for one pair of tokenizers they see the same shared set;
they differ only in how they cut it down to a limit (merge keeps the lowest ids, lineage a seeded sample).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from lmsurgeon.errors import LmsurgeonError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

BYTE_LEVEL, SENTENCEPIECE, WORDPIECE, WORDLEVEL = "byte-level", "sentencepiece", "wordpiece", "wordlevel"
FAMILIES = (BYTE_LEVEL, SENTENCEPIECE, WORDPIECE, WORDLEVEL)
BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
WORD_START = "▁"


class Key(NamedTuple):
    """A token's meaning independent of its tokenizer: does it start a word, and which bytes it stands for."""

    space: bool
    body: bytes

    @property
    def text(self) -> str:
        """A readable spelling: ``▁`` for a word start, then the body (undecodable bytes escaped)."""
        return (WORD_START if self.space else "") + self.body.decode("utf-8", errors="backslashreplace")


class UnknownTokenizer(LmsurgeonError):
    """A tokenizer.json whose family (byte-level BPE, SentencePiece, WordPiece, WordLevel) cannot be told."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (the one ``tokenizers``' ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def tokenizer_json(source: Tokenizer | str | Mapping[str, Any]) -> dict[str, Any]:
    """The parsed tokenizer.json of a ``tokenizers.Tokenizer``, of its JSON text, or the mapping itself."""
    if isinstance(source, Mapping):
        return dict(source)
    text = source if isinstance(source, str) else source.to_str()
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def detect_family(tj: Mapping[str, Any], where: str | None = None) -> str:
    """Family of a parsed tokenizer.json; an unknown layout is an error, never a guess."""
    model = tj.get("model") or {}
    kind = model.get("type")
    text = json.dumps({k: tj.get(k) for k in ("pre_tokenizer", "decoder", "normalizer")})
    if kind == "WordPiece":
        return WORDPIECE
    if kind == "WordLevel":
        return WORDLEVEL
    if kind in ("BPE", "Unigram"):
        if "ByteLevel" in text:
            return BYTE_LEVEL
        if model.get("byte_fallback") or "Metaspace" in text or WORD_START in text or kind == "Unigram":
            return SENTENCEPIECE
    raise UnknownTokenizer(f"unknown tokenizer family (model type {kind!r}): shared tokens cannot be matched", where)


def canonical_key(token: str, family: str) -> Key | None:
    """The key of one vocabulary string; None when it stands for no bytes (a character outside the byte table).

    WordPiece marks continuations rather than word starts, so its plain pieces are word-initial, except
    punctuation-only ones, which BERT splits off without a space. A WordLevel vocabulary holds whole words:
    all word-initial, punctuation again excepted.
    """
    if family == BYTE_LEVEL:
        try:
            body = bytes(UNICODE_TO_BYTE[c] for c in token)
        except KeyError:
            return None
        space = body.startswith(b" ")
        return Key(space, body[1:] if space else body)
    if family == SENTENCEPIECE:
        m = BYTE_FALLBACK.match(token)
        if m:
            return Key(False, bytes([int(m.group(1), 16)]))
        text = token.replace(WORD_START, " ")
        space = text.startswith(" ")
        return Key(space, (text[1:] if space else text).encode("utf-8"))
    if family in (WORDPIECE, WORDLEVEL):
        if family == WORDPIECE and token.startswith("##") and len(token) > 2:
            return Key(False, token[2:].encode("utf-8"))
        is_punct = all(unicodedata.category(c).startswith("P") for c in token)
        return Key(not is_punct, token.encode("utf-8"))
    raise UnknownTokenizer(f"unknown tokenizer family {family!r}")


def is_control_piece(token: str, family: str) -> bool:
    """A piece that names a role rather than text: ``<s>``, ``<pad>`` (not byte fallback), WordPiece's ``[CLS]``.

    Byte-level vocabularies have no such convention (``<div>`` is text there); their specials are added tokens.
    """
    if family != BYTE_LEVEL and token.startswith("<") and token.endswith(">") and not BYTE_FALLBACK.match(token):
        return True
    return family in (WORDPIECE, WORDLEVEL) and token.startswith("[") and token.endswith("]")


def _model_vocab(tj: Mapping[str, Any]) -> dict[str, int]:
    model = tj.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        return {piece: i for i, (piece, _score) in enumerate(vocab)}
    return {str(tok): int(i) for tok, i in (vocab or {}).items()}


def _special_ids(tj: Mapping[str, Any], vocab: Mapping[str, int], family: str) -> set[int]:
    """Added tokens, control and unknown pieces, padding: rows that carry no text to match."""
    ids = {int(t["id"]) for t in tj.get("added_tokens") or []}
    model = tj.get("model") or {}
    if model.get("type") == "Unigram" and model.get("unk_id") is not None:
        ids.add(int(model["unk_id"]))
    unk = model.get("unk_token")
    if isinstance(unk, str) and unk in vocab:
        ids.add(vocab[unk])
    ids.update(i for tok, i in vocab.items() if is_control_piece(tok, family))
    return ids


@dataclass(frozen=True)
class CanonicalVocab:
    """Key → token id of one tokenizer (the winner where several ids share a key), and what was left out."""

    family: str
    size: int
    keys: dict[Key, int]
    raw: dict[str, int]  # non-special vocabulary strings → id, for the raw-string overlap shown beside S
    collisions: int = 0  # ids that lost a tie for a key
    undecodable: int = 0  # non-special ids with no key
    special: int = 0  # ids excluded as added, control, unknown or padding tokens


def canonical_vocab(
    source: Tokenizer | str | Mapping[str, Any], size: int | None = None, where: str | None = None
) -> CanonicalVocab:
    """Canonicalise a whole vocabulary (ids ≥ ``size`` are dropped). Several ids with one key: a regular piece
    wins over a byte-fallback piece, then the lowest id (low id ≈ frequent)."""
    tj = tokenizer_json(source)
    family = detect_family(tj, where)
    vocab = _model_vocab(tj)
    special = _special_ids(tj, vocab, family)
    size = size if size is not None else max([*vocab.values(), -1]) + 1
    best: dict[Key, tuple[int, int]] = {}  # key → (is byte fallback, id)
    collisions = undecodable = n_special = 0
    raw: dict[str, int] = {}
    for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if i >= size:
            continue
        if i in special:
            n_special += 1
            continue
        raw[tok] = i
        key = canonical_key(tok, family)
        if key is None or (not key.body and not key.space):
            undecodable += 1
            continue
        rank = (int(bool(BYTE_FALLBACK.match(tok))), i)
        if key in best:
            collisions += 1
            best[key] = min(best[key], rank)
        else:
            best[key] = rank
    keys = {k: i for k, (_fallback, i) in best.items()}
    return CanonicalVocab(family, size, keys, raw, collisions, undecodable, n_special)


Selection = Literal["lowest_ids", "seeded"]


@dataclass(frozen=True)
class SharedTokens:
    """The shared set S of two vocabularies: pair j is token ``ids_a[j]`` of A and ``ids_b[j]`` of B, both
    spelling ``keys[j]``. Pairs come in increasing max(id_a, id_b), ties by id_a, whichever selection cut them.

    ``n_shared`` and the class counts are over all of S; ``n_used`` is what the limit kept."""

    a: CanonicalVocab
    b: CanonicalVocab
    ids_a: np.ndarray  # [n_used] int64
    ids_b: np.ndarray  # [n_used] int64
    keys: tuple[Key, ...]
    n_shared: int
    n_word_start: int
    n_continuation: int
    n_single_byte: int

    @property
    def n_used(self) -> int:
        return int(self.ids_a.size)

    @property
    def jaccard(self) -> float:
        """|S| / |keys of A ∪ keys of B|."""
        return self.n_shared / max(len(self.a.keys.keys() | self.b.keys.keys()), 1)

    @property
    def raw_string_shared(self) -> int:
        """How many non-special strings the vocabularies share as written: what matching without keys finds."""
        return len(self.a.raw.keys() & self.b.raw.keys())


def match_tokens(
    a: CanonicalVocab, b: CanonicalVocab, limit: int | None = None, selection: Selection = "lowest_ids", seed: int = 0
) -> SharedTokens:
    """Pair the ids of A and B that have the same key; at most ``limit`` pairs (None or 0: all).

    ``selection`` says which pairs a limit keeps: ``lowest_ids`` the pairs with the lowest max(id_a, id_b)
    (low ids are frequent tokens in BPE vocabularies), ``seeded`` a uniform sample drawn with ``seed``. Both
    are deterministic. An empty S is a valid answer here; callers decide whether it is an error.
    """
    common = a.keys.keys() & b.keys.keys()
    pairs = sorted(((a.keys[k], b.keys[k], k) for k in common), key=lambda p: (max(p[0], p[1]), p[0]))
    n = len(pairs)
    if limit and n > limit:
        if selection == "lowest_ids":
            pairs = pairs[:limit]
        elif selection == "seeded":
            keep = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
            pairs = [pairs[j] for j in keep]
        else:
            raise LmsurgeonError(f"unknown shared-token selection {selection!r} (lowest_ids or seeded)")
    word_start = sum(1 for k in common if k.space)
    return SharedTokens(
        a,
        b,
        np.array([p[0] for p in pairs], dtype=np.int64),
        np.array([p[1] for p in pairs], dtype=np.int64),
        tuple(p[2] for p in pairs),
        n,
        n_word_start=word_start,
        n_continuation=n - word_start,
        n_single_byte=sum(1 for k in common if len(k.body) == 1),
    )
