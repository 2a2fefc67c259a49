"""Test-wide settings: offline, deterministic, small thread pools (CI has two cores)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

try:  # noqa: SIM105 - a star import cannot live inside contextlib.suppress
    from tests.conftest_zoo import *  # noqa: F403,E402  (session fixture `test_zoo`)
except ModuleNotFoundError:  # the zoo fixtures land with the zoo
    pass

from tests.conftest_merge import *  # noqa: F403,E402  (session fixture `merge_pair`)


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
