"""The zoo's three tokenizer families, trained with ``tokenizers`` on the corpus train split.

Three families because a cross-tokenizer merge has to cope with all three ways of marking word starts and
unknown bytes: byte-level BPE (GPT-2, ``Ġ``), SentencePiece-style BPE (Llama, ``▁`` plus ``<0xNN>`` byte
fallback) and WordPiece (BERT, ``##`` continuations). The vocabulary sizes differ so the vocabularies overlap
only partly. Each is saved as a folder ``AutoTokenizer.from_pretrained`` loads (tokenizer.json +
tokenizer_config.json).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
CONTINUATION_BASE = 0xF0000  # Unicode plane-15 private use: stand-ins for "##" characters while training


@dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer to train: its zoo name, family, total vocabulary size and the special tokens it declares."""

    name: str
    kind: str  # "bytelevel_bpe" | "sentencepiece_bpe" | "wordpiece"
    vocab_size: int
    special: dict[str, str]  # transformers role (bos_token, eos_token, ...) -> token text


def bytelevel_spec(name: str, vocab_size: int) -> TokenizerSpec:
    """GPT-2 style: one ``<|endoftext|>`` that is bos, eos, unk and pad at once."""
    eot = "<|endoftext|>"
    return TokenizerSpec(
        name, "bytelevel_bpe", vocab_size, {"bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot}
    )


def sentencepiece_spec(name: str, vocab_size: int) -> TokenizerSpec:
    """Llama style: ``<unk>``, ``<s>``, ``</s>`` at ids 0-2, then the 256 byte-fallback tokens."""
    return TokenizerSpec(
        name,
        "sentencepiece_bpe",
        vocab_size,
        {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"},
    )


def wordpiece_spec(name: str, vocab_size: int) -> TokenizerSpec:
    """BERT style, lowercasing, with the five bracketed special tokens."""
    return TokenizerSpec(
        name,
        "wordpiece",
        vocab_size,
        {
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        },
    )


def _ordered_specials(spec: TokenizerSpec) -> list[str]:
    """Distinct special tokens in declaration order; they take the lowest ids."""
    return list(dict.fromkeys(spec.special.values()))


def train_bytelevel(spec: TokenizerSpec, texts: list[str]) -> Tokenizer:
    """Byte-level BPE: every byte is in the alphabet, so nothing is ever unknown."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=_ordered_specials(spec),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_sentencepiece(spec: TokenizerSpec, texts: list[str]) -> Tokenizer:
    """SentencePiece-style BPE with ``▁`` word starts and ``<0xNN>`` byte fallback, laid out like Llama's.

    The trainer cannot reserve plain (non-special) vocabulary entries, so we train ``vocab_size - 256``
    entries and then splice the byte tokens in at ids 3..258 by rewriting the serialised model.
    """
    specials = _ordered_specials(spec)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - len(BYTE_TOKENS), special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    data = json.loads(tok.to_str())
    trained = sorted(data["model"]["vocab"].items(), key=lambda item: item[1])
    pieces = specials + BYTE_TOKENS + [piece for piece, _ in trained if piece not in specials]
    data["model"]["vocab"] = {piece: i for i, piece in enumerate(pieces)}
    for added in data["added_tokens"]:
        added["id"] = data["model"]["vocab"][added["content"]]
    tok = Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def train_wordpiece(spec: TokenizerSpec, texts: list[str]) -> Tokenizer:
    """BERT-style uncased WordPiece with ``[CLS] ... [SEP]`` added around every encoding.

    ``WordPieceTrainer`` (and the BPE trainer with a ``continuing_subword_prefix``) numbers the ``##``
    alphabet in hash-map order, so ties between merges, and with them the vocabulary, change from run to
    run. Plain BPE training is deterministic, so we train it on words whose non-initial characters are
    swapped for private-use stand-ins, then read every stand-in token back as a ``##`` continuation.
    """
    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    docs = [[word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))] for text in texts]
    inner = sorted({char for words in docs for word in words for char in word[1:]})
    to_marked = {char: chr(CONTINUATION_BASE + i) for i, char in enumerate(inner)}
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=_ordered_specials(spec), show_progress=False
    )
    bpe.train_from_iterator(
        (" ".join(w[0] + w[1:].translate(str.maketrans(to_marked)) for w in words) for words in docs), trainer=trainer
    )
    from_marked = {marked: char for char, marked in to_marked.items()}
    vocab = {_unmark(token, from_marked): i for token, i in bpe.get_vocab().items()}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece()
    tok.add_special_tokens(_ordered_specials(spec))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tok


def _unmark(token: str, from_marked: dict[str, str]) -> str:
    """A trained token back in WordPiece spelling: all stand-ins means a ``##`` continuation piece."""
    if token[0] in from_marked:
        return "##" + "".join(from_marked[c] for c in token)
    return token[0] + "".join(from_marked.get(c, c) for c in token[1:])


TRAINERS: dict[str, Callable[[TokenizerSpec, list[str]], Tokenizer]] = {
    "bytelevel_bpe": train_bytelevel,
    "sentencepiece_bpe": train_sentencepiece,
    "wordpiece": train_wordpiece,
}


def train_tokenizer(spec: TokenizerSpec, texts: list[str]) -> Tokenizer:
    """Train the family named by ``spec.kind``; deterministic for the same texts."""
    return TRAINERS[spec.kind](spec, texts)


def save_tokenizer(tok: Tokenizer, spec: TokenizerSpec, folder: Path, model_max_length: int) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) for ``AutoTokenizer``."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **spec.special)
    wrapped.save_pretrained(str(folder))


def load_tokenizer(folder: Path) -> Tokenizer:
    """The raw ``tokenizers`` object of a saved folder (fast batch encoding for training)."""
    return Tokenizer.from_file(str(folder / "tokenizer.json"))
