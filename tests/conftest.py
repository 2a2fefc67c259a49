"""Test-wide settings: offline, deterministic, small thread pools (CI has two cores)."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

# Session fixtures that several test modules share, each in its own plugin module.
pytest_plugins = [
    "tests.conftest_zoo",  # `test_zoo`: the test-profile zoo, built once or reused from the cache
    "tests.conftest_merge",  # `merge_pair`: two tiny models of different families for merge tests
]


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> Iterator[None]:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
