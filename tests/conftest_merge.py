"""Session fixture: a tiny GPT-2 (byte BPE, tied, d=32) and Llama (SentencePiece-style, untied, d=48) pair."""

import pytest

from tests.merge_models import byte_bpe_tokenizer, corpus, gpt2, llama, sentencepiece_tokenizer


@pytest.fixture(scope="session")
def merge_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_pair")
    texts = corpus()
    g = gpt2(byte_bpe_tokenizer(texts), root / "gpt2")
    ll = llama(sentencepiece_tokenizer(texts), root / "llama")
    prompts = root / "prompts.txt"
    prompts.write_text("\n\n".join(texts[:24]))
    return {"gpt2": g, "llama": ll, "prompts": prompts, "texts": texts}
