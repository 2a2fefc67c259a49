"""A deterministic offline text corpus built from what every CPython install already carries.

Documents are the standard library's docstrings plus the language-reference help topics (``pydoc_data``),
whitespace-normalised, at least ``MIN_CHARS`` long and de-duplicated. Each document lands in a split chosen by
a hash of its own text, so the splits are disjoint, stable when a Python upgrade adds or drops a few documents,
and identical across runs on the same Python. The result is cached as JSON with a sha256 per split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lmsurgeon.data.cache import cache_dir, write_atomic
from lmsurgeon.errors import LmsurgeonError

log = logging.getLogger(__name__)

CORPUS_VERSION = 1  # bump when harvesting, filtering or splitting changes
MIN_CHARS = 200
TOPIC_CHUNK_CHARS = 1000  # help topics are long pages; cut them at paragraph breaks into documents this size
# (split name, share in percent). "train_b" is a second training split disjoint from "train", for fine-tunes.
SPLITS: tuple[tuple[str, int], ...] = (("train", 75), ("train_b", 15), ("validation", 5), ("test", 5))
SPLIT_NAMES = tuple(name for name, _ in SPLITS)
_HARVEST_SCRIPT = Path(__file__).with_name("_harvest.py")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Corpus:
    """The split documents; ``stats()`` gives chars, docs and sha256 per split plus the corpus sha256."""

    splits: dict[str, list[str]]
    python: str

    def split(self, name: str) -> list[str]:
        """A copy of one split's documents, in their fixed order."""
        if name not in self.splits:
            raise LmsurgeonError(f"unknown corpus split {name!r}; choose one of {', '.join(self.splits)}")
        return list(self.splits[name])

    def stats(self) -> dict:
        """Size and checksum of every split, and ``sha256`` over all of them (the corpus identity)."""
        per_split = {name: split_stats(docs) for name, docs in self.splits.items()}
        whole = hashlib.sha256("".join(s["sha256"] for s in per_split.values()).encode()).hexdigest()
        return {"version": CORPUS_VERSION, "python": self.python, "sha256": whole, "splits": per_split}

    @property
    def sha256(self) -> str:
        """Changes whenever any document of any split changes."""
        return self.stats()["sha256"]


def split_stats(docs: list[str]) -> dict:
    """Docs, chars and the sha256 of the list's canonical JSON encoding: the identity of a corpus split or of
    any ``load_texts`` result, for a capability's results.json."""
    digest = hashlib.sha256(json.dumps(docs, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"docs": len(docs), "chars": sum(len(d) for d in docs), "sha256": digest}


def normalise(text: str) -> str:
    """Collapse every run of whitespace (indentation, newlines) into one space."""
    return " ".join(text.split())


def chunk_topic(text: str, target: int = TOPIC_CHUNK_CHARS) -> list[str]:
    """Cut a long help page into documents of about ``target`` chars at paragraph breaks."""
    chunks, current = [], ""
    for paragraph in _PARAGRAPH_BREAK.split(text):
        current = f"{current} {normalise(paragraph)}".strip()
        if len(current) >= target:
            chunks.append(current)
            current = ""
    if current:
        chunks.append(current)
    return chunks


def split_of(doc: str) -> str:
    """The split a document belongs to, from the first 8 hex digits of its sha256."""
    bucket = int(hashlib.sha256(doc.encode("utf-8")).hexdigest()[:8], 16) % 100
    for name, share in SPLITS:
        if bucket < share:
            return name
        bucket -= share
    raise AssertionError("SPLITS shares must add up to 100")


def harvest_raw() -> dict[str, list[str]]:
    """Run the harvester in an isolated child interpreter and return its raw texts."""
    result = subprocess.run(
        [sys.executable, "-I", str(_HARVEST_SCRIPT)], capture_output=True, text=True, encoding="utf-8", check=False
    )
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise LmsurgeonError(f"the docstring harvester failed: {tail[0]}", _HARVEST_SCRIPT)
    return json.loads(result.stdout)


def build_corpus() -> Corpus:
    """Harvest, normalise, filter, de-duplicate, sort and split; deterministic for a given Python."""
    raw = harvest_raw()
    docs = {normalise(d) for d in raw["docstrings"]}
    docs.update(chunk for topic in raw["topics"] for chunk in chunk_topic(topic))
    splits: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for doc in sorted(d for d in docs if len(d) >= MIN_CHARS):
        splits[split_of(doc)].append(doc)
    return Corpus(splits=splits, python=python_id())


def python_id() -> str:
    """The interpreter the corpus came from: its documents are only reproducible on the same one."""
    return f"{platform.python_implementation().lower()}-{platform.python_version()}"


def corpus_cache_path() -> Path:
    """One cache file per Python version and corpus version."""
    return cache_dir("corpus") / f"corpus-{python_id()}-v{CORPUS_VERSION}.json"


def _read_cache(path: Path) -> Corpus | None:
    """The cached corpus, or None when the file is missing, unreadable or fails its checksums."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        corpus = Corpus(splits={name: data["splits"][name] for name in SPLIT_NAMES}, python=data["python"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if corpus.stats() != data.get("stats"):
        log.warning("%s: corpus cache fails its checksums; rebuilding it", path)
        return None
    return corpus


def load_corpus(*, refresh: bool = False) -> Corpus:
    """The corpus, from the cache when it is there and intact, else built (about a second) and cached."""
    path = corpus_cache_path()
    corpus = None if refresh else _read_cache(path)
    if corpus is None:
        corpus = build_corpus()
        payload = {"python": corpus.python, "stats": corpus.stats(), "splits": corpus.splits}
        write_atomic(path, json.dumps(payload, ensure_ascii=False))
        log.info("%s: built corpus %s", path, corpus.sha256[:12])
    return corpus
