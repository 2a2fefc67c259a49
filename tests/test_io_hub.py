"""Hub sources read by HTTP Range requests, against a loopback server that implements the hub's resolve route."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lmsurgeon.errors import RemoteError, SourceNotFound
from lmsurgeon.io import open_model
from tests.hubserver import COMMIT, Faults, HubServer
from tests.tiny_checkpoints import write_tiny

NAME = "model.layers.2.post_attention_layernorm.weight"


@pytest.fixture(autouse=True)
def _online_to_loopback(monkeypatch):
    """The suite runs with HF_HUB_OFFLINE=1; these tests talk to 127.0.0.1 only, so allow HTTP for them."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {
        "org/single": write_tiny(root / "single", "llama"),
        "org/sharded": write_tiny(root / "sharded", "llama", shard_size="20KB"),
    }


def open_remote(server, repo, cache, **kw):
    return open_model(repo, endpoint=server.endpoint, cache_dir=cache, **kw)


@pytest.mark.parametrize("repo", ["org/single", "org/sharded"])
def test_remote_reads_equal_local_reads_and_fetch_only_needed_ranges(folders, tmp_path, repo):
    local = open_model(folders[repo])
    with HubServer(folders) as server:
        remote = open_remote(server, repo, tmp_path / "cache")
        assert sorted(remote.names()) == sorted(local.names())
        np.testing.assert_array_equal(remote.tensor(NAME), local.tensor(NAME))
        np.testing.assert_array_equal(
            remote.rows("model.embed_tokens.weight", [5, 1, 90]), local.rows("model.embed_tokens.weight", [5, 1, 90])
        )
        total = sum((folders[repo] / f).stat().st_size for f in set(local.weight_map.values()))
        assert remote.network_bytes < total / 4
        assert all(
            rng is not None
            for method, path, rng in server.gets()
            if "safetensors" in path and not path.endswith(".json")
        )


def test_second_run_is_served_from_the_range_cache(folders, tmp_path):
    with HubServer(folders) as server:
        first = open_remote(server, "org/sharded", tmp_path / "cache")
        first.tensor(NAME)
        assert first.network_bytes > 0
        n_gets = len(server.gets())
        again = open_remote(server, "org/sharded", tmp_path / "cache")
        np.testing.assert_array_equal(again.tensor(NAME), first.tensor(NAME))
        assert again.network_bytes == 0
        assert len(server.gets()) == n_gets


def test_revision_is_resolved_to_a_commit_and_recorded(folders, tmp_path):
    with HubServer(folders) as server:
        handle = open_remote(server, f"org/single@{COMMIT}", tmp_path / "cache")
        assert handle.revision == COMMIT
        handle.tensor(NAME)
        assert any(i.get("commit") == COMMIT for i in handle.inputs())
        with pytest.raises(SourceNotFound):
            open_remote(server, "org/single@no-such-branch", tmp_path / "cache")
        with pytest.raises(SourceNotFound):
            open_remote(server, "org/absent", tmp_path / "cache")


def test_server_ignoring_range_still_gives_the_right_bytes(folders, tmp_path):
    with HubServer(folders, faults=Faults(ignore_range=True)) as server:
        remote = open_remote(server, "org/single", tmp_path / "cache")
        np.testing.assert_array_equal(remote.tensor(NAME), open_model(folders["org/single"]).tensor(NAME))


def test_rate_limits_are_retried_then_succeed(folders, tmp_path):
    with HubServer(folders, faults=Faults(status_first=429, fail_count=2)) as server:
        remote = open_remote(server, "org/single", tmp_path / "cache")
        np.testing.assert_array_equal(remote.tensor(NAME), open_model(folders["org/single"]).tensor(NAME))


def test_persistent_server_errors_end_in_one_clear_error_quickly(folders, tmp_path):
    with HubServer(folders) as server:
        remote = open_remote(server, "org/single", tmp_path / "cache")
        remote.names()
        server.faults.status_first, server.faults.fail_count = 503, 10**6
        start = time.monotonic()
        with pytest.raises(RemoteError, match="org/single"):
            remote.tensor(NAME)
        assert time.monotonic() - start < 30


def test_truncated_bodies_are_an_error_not_garbage(folders, tmp_path):
    with HubServer(folders) as server:
        remote = open_remote(server, "org/single", tmp_path / "cache")
        remote.names()
        server.faults.truncate = True
        with pytest.raises(RemoteError):
            remote.tensor(NAME)


def test_changed_etag_invalidates_cached_ranges(folders, tmp_path):
    with HubServer(folders) as server:
        open_remote(server, "org/single", tmp_path / "cache").tensor(NAME)
        server.faults.etag_suffix = "-v2"
        again = open_remote(server, "org/single", tmp_path / "cache")
        again.tensor(NAME)
        assert again.network_bytes > 0  # nothing served from ranges cached under the old ETag


def test_a_stalled_server_times_out_into_a_clear_error(folders, tmp_path):
    from lmsurgeon.io.model import ModelHandle
    from lmsurgeon.io.stores import HubStore

    with HubServer(folders) as server:
        store = HubStore(
            "org/single", endpoint=server.endpoint, cache_dir=tmp_path / "cache", timeout=0.5, max_retries=1
        )
        handle = ModelHandle(store)
        handle.names()
        server.faults.stall_s = 3.0
        start = time.monotonic()
        with pytest.raises(RemoteError, match="org/single"):
            handle.tensor(NAME)
        assert time.monotonic() - start < 10
