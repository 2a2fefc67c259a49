"""Session fixture ``test_zoo``: the ``test``-profile zoo, built once (about a minute) or reused from the cache.

It honours ``LMSURGEON_CACHE``, so CI can keep the zoo between runs; the build is locked, so pytest-xdist
workers wait for one build instead of racing.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def test_zoo():
    """``(zoo_dir, manifest)`` of the test-profile zoo."""
    import torch

    from lmsurgeon.zoo import ensure_zoo

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return ensure_zoo("test")
