"""Exact byte-range reads: pread of local shards equals safetensors' own load, hub row samples go out as ranges
through the loopback server, and ``tensor_bytes`` counts exactly the bytes the header's offsets give."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmsurgeon.io import open_model
from tests.hubserver import HubServer
from tests.tiny_checkpoints import write_tiny

EMBED = "model.embed_tokens.weight"


def header_offsets(path) -> dict[str, tuple[int, int]]:
    """name → (begin, end) data offsets, parsed here from the raw header (independent of lmsurgeon.io)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: tuple(v["data_offsets"]) for k, v in header.items()}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("pread") / "m", "llama", shard_size="20KB")


def test_pread_reads_equal_safetensors_load_for_every_tensor(sharded):
    handle = open_model(sharded)
    for shard in sorted(set(handle.weight_map.values())):
        for name, ref in load_file(sharded / shard).items():
            got = handle.tensor(name, np.float64)
            np.testing.assert_array_equal(got, ref.to(torch.float64).numpy())
            raw = handle._read_rows(handle.info(name), 0, ref.shape[0]) if ref.ndim else None
            if raw is not None:
                assert raw.dtype == ref.dtype and torch.equal(raw, ref)


def test_tensor_bytes_per_label_equal_the_header_offsets(sharded):
    handle = open_model(sharded)
    offsets = {}
    for shard in set(handle.weight_map.values()):
        offsets.update(header_offsets(sharded / shard))
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    rows = [3, 4, 5, 40, 41, 90, 3]
    with handle.counting("awm"):
        handle.tensor(q)
        handle.tensor(k)
        with handle.counting("alignment"):
            handle.rows(EMBED, rows)
    handle.tensor("model.norm.weight")
    row_bytes = (offsets[EMBED][1] - offsets[EMBED][0]) // handle.info(EMBED).shape[0]
    assert handle.tensor_bytes == {
        "awm": (offsets[q][1] - offsets[q][0]) + (offsets[k][1] - offsets[k][0]),
        "alignment": len(set(rows)) * row_bytes,
        "other": offsets["model.norm.weight"][1] - offsets["model.norm.weight"][0],
    }


@pytest.fixture
def _online_to_loopback(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


@pytest.mark.usefixtures("_online_to_loopback")
def test_hub_row_samples_are_range_requests_of_the_sampled_rows_only(sharded, tmp_path):
    local = open_model(sharded)
    rows = np.random.default_rng(0).choice(local.info(EMBED).shape[0], 20, replace=False)
    with HubServer({"org/m": sharded}) as server:
        remote = open_model("org/m", endpoint=server.endpoint, cache_dir=tmp_path / "cache")
        remote.store.merge_gap = 0  # tiny rows: the default gap would join them all
        remote.info(EMBED)  # the shard header first: its read is not part of the sample
        n_before = len(server.gets())
        with remote.counting("alignment"):
            got = remote.rows(EMBED, rows)
        np.testing.assert_array_equal(got, local.rows(EMBED, rows))
        info = remote.info(EMBED)
        ranges = [r for _, p, r in server.gets()[n_before:] if p.endswith(info.file)]
        spans = [tuple(int(x) for x in r.removeprefix("bytes=").split("-")) for r in ranges]
        assert all(info.begin <= a and b < info.end for a, b in spans)  # inside the embedding only
        runs = np.flatnonzero(np.diff(np.sort(rows)) != 1).size + 1
        assert len(spans) == runs  # one request per run of consecutive rows
        assert sum(b + 1 - a for a, b in spans) == remote.tensor_bytes["alignment"]
        assert remote.tensor_bytes["alignment"] < info.nbytes / 2  # a sample, not the table
