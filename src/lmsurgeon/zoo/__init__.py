"""The model zoo: small, real, offline-trained transformers models with known lineage, for tests and demos.

``build_zoo(dir, profile)`` trains it, ``ensure_zoo(profile)`` builds or reuses it in the cache (keyed by the
recipe's content hash), ``read_manifest``/``load_model``/``recompute_perplexity`` read it back. The surgery used
to make lineage cases lives in :mod:`lmsurgeon.zoo.transforms` and works on other models too.

Build time from nothing (empty ``LMSURGEON_CACHE``, corpus included, 2 CPU threads, torch 2.13, measured
2026-11-24 on the project's 2-core machine):

* ``full`` (what ``lmsurgeon demo`` uses): 329 s wall. Validation perplexity from ~4000 (untrained) to
  gpt2-bpe 298, llama-sp 246, deep-llama (16 layers) 445, lin-base 335.
* ``test`` (the ``test_zoo`` fixture): 54 s wall; perplexities 700-900 (short runs, but clearly trained).
  The adversarial family (``adv-*``, added 2026-12-03) costs 21 s of CPU time more on one thread, half of it
  ``adv-llama-indep`` (trained from scratch like ``llama-sp``); the other 13 cases train 20 steps each.

A complete zoo is reused in well under a second; an interrupted build resumes at the first unfinished model.
On a shared, busy CPU expect up to about twice these times.
"""

from lmsurgeon.zoo.build import build_zoo, default_zoo_dir, ensure_zoo
from lmsurgeon.zoo.manifest import load_model, model_dir, read_manifest, recompute_perplexity
from lmsurgeon.zoo.recipe import PROFILES, build_recipe

__all__ = [
    "PROFILES",
    "build_recipe",
    "build_zoo",
    "default_zoo_dir",
    "ensure_zoo",
    "load_model",
    "model_dir",
    "read_manifest",
    "recompute_perplexity",
]
