"""``load_texts``: the one reader behind every capability's ``--data FILE`` option.

No file means the built-in corpus; ``.jsonl`` means one JSON object per line with a ``text`` field; anything
else is plain UTF-8 text with documents separated by blank lines.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmsurgeon.data.corpus import load_corpus
from lmsurgeon.errors import LmsurgeonError, SourceNotFound

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


def load_texts(path: str | Path | None, split: str = "train") -> list[str]:
    """Documents from ``path``, or the corpus split ``split`` when ``path`` is None; never an empty list."""
    if path is None:
        return load_corpus().split(split)
    file = Path(path).expanduser()
    if not file.exists():
        raise SourceNotFound("no such data file", file)
    if not file.is_file():
        raise LmsurgeonError("data must be a file (.jsonl or plain text), not a folder", file)
    texts = _read_jsonl(file) if file.suffix.lower() == ".jsonl" else _read_plain(file)
    if not texts:
        raise LmsurgeonError("the data file holds no text", file)
    return texts


def _read_text(file: Path) -> str:
    """The whole file as UTF-8, with a decoding problem reported against the file."""
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LmsurgeonError(f"not UTF-8 text (byte {err.start})", file) from None
    except OSError as err:
        raise LmsurgeonError(f"cannot read the data file ({err.strerror})", file) from None


def _read_plain(file: Path) -> list[str]:
    """Blank-line separated documents, stripped; empty ones dropped."""
    return [doc.strip() for doc in _PARAGRAPH_BREAK.split(_read_text(file)) if doc.strip()]


def _read_jsonl(file: Path) -> list[str]:
    """The non-blank ``text`` field of every non-blank line; a line that is not such an object is an error."""
    texts = []
    for number, line in enumerate(_read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LmsurgeonError(f"line {number} is not JSON ({err.msg})", file) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LmsurgeonError(f"line {number} has no string field 'text'", file)
        if record["text"].strip():
            texts.append(record["text"])
    return texts
