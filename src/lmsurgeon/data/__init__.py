"""Text data: the deterministic offline corpus and the ``--data FILE`` reader every capability shares."""

from lmsurgeon.data.cache import cache_dir, cache_root
from lmsurgeon.data.corpus import SPLIT_NAMES, Corpus, load_corpus, split_stats
from lmsurgeon.data.texts import load_texts

__all__ = ["SPLIT_NAMES", "Corpus", "cache_dir", "cache_root", "load_corpus", "load_texts", "split_stats"]
