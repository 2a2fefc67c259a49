"""The offline corpus is deterministic, its splits are disjoint, and ``load_texts`` reads every --data form."""

from __future__ import annotations

import json

import pytest

from lmsurgeon.data import SPLIT_NAMES, load_corpus, load_texts
from lmsurgeon.data.corpus import MIN_CHARS, build_corpus, corpus_cache_path, split_of
from lmsurgeon.errors import LmsurgeonError, SourceNotFound


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_corpus_build_is_deterministic(corpus):
    assert build_corpus().stats() == corpus.stats()


def test_splits_are_disjoint_and_sized_by_their_shares(corpus):
    seen: dict[str, str] = {}
    for name in SPLIT_NAMES:
        for doc in corpus.split(name):
            assert seen.setdefault(doc, name) == name, f"document in both {seen[doc]} and {name}"
    stats = corpus.stats()["splits"]
    assert stats["train"]["docs"] > stats["train_b"]["docs"] > stats["validation"]["docs"] > 50
    assert stats["train"]["chars"] > 500_000


def test_documents_are_long_normalised_unique_and_in_their_hash_split(corpus):
    for name in SPLIT_NAMES:
        docs = corpus.split(name)
        assert docs == sorted(docs)
        assert len(set(docs)) == len(docs)
        for doc in docs[:200]:
            assert len(doc) >= MIN_CHARS
            assert doc == " ".join(doc.split())
            assert split_of(doc) == name


def test_stats_record_docs_chars_and_sha256_per_split(corpus):
    stats = corpus.stats()
    assert set(stats["splits"]) == set(SPLIT_NAMES)
    for name, split in stats["splits"].items():
        assert split["docs"] == len(corpus.split(name))
        assert split["chars"] == sum(map(len, corpus.split(name)))
        assert len(split["sha256"]) == 64
    assert corpus.sha256 == stats["sha256"]


def test_unknown_split_is_an_error(corpus):
    with pytest.raises(LmsurgeonError, match="unknown corpus split"):
        corpus.split("dev")


def test_corpus_cache_is_written_reused_and_rebuilt_when_corrupt(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("LMSURGEON_CACHE", str(tmp_path))
    first = load_corpus()
    path = corpus_cache_path()
    assert path.is_relative_to(tmp_path)
    assert path.is_file()
    assert load_corpus().stats() == first.stats() == corpus.stats()
    data = json.loads(path.read_text())
    data["splits"]["train"][0] = "tampered " * 40
    path.write_text(json.dumps(data))
    assert load_corpus().stats() == corpus.stats()


def test_load_texts_without_a_file_gives_a_corpus_split(corpus):
    assert load_texts(None) == corpus.split("train")
    assert load_texts(None, split="validation") == corpus.split("validation")


def test_load_texts_plain_file_splits_at_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First document\nstill first.\n\n  \nSecond one.\n\n\n", encoding="utf-8")
    assert load_texts(path) == ["First document\nstill first.", "Second one."]


def test_load_texts_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "alpha", "id": 1}\n\n{"text": "beta\\n\\ngamma"}\n', encoding="utf-8")
    assert load_texts(str(path)) == ["alpha", "beta\n\ngamma"]


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "line 2 is not JSON"),
        ("bad.jsonl", '{"body": "no text field"}\n', "line 1 has no string field 'text'"),
        ("empty.txt", "\n \n", "holds no text"),
        ("blank.jsonl", '{"text": "  "}\n', "holds no text"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ],
)
def test_load_texts_bad_file_names_the_file_and_problem(tmp_path, name, content, problem):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(LmsurgeonError, match=problem) as info:
        load_texts(path)
    assert str(path) in str(info.value)


def test_split_stats_identify_any_text_list(corpus):
    from lmsurgeon.data import split_stats

    stats = split_stats(["ab", "cd"])
    assert stats["docs"] == 2
    assert stats["chars"] == 4
    assert stats["sha256"] != split_stats(["abc", "d"])["sha256"]  # document boundaries count
    assert split_stats(corpus.split("test")) == corpus.stats()["splits"]["test"]


def test_load_texts_missing_file_or_folder(tmp_path):
    with pytest.raises(SourceNotFound, match="no such data file"):
        load_texts(tmp_path / "absent.txt")
    with pytest.raises(LmsurgeonError, match="not a folder"):
        load_texts(tmp_path)
