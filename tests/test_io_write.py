"""Writing a checkpoint shard by shard: every tensor comes back bit for bit, and one shard at a time is held."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmsurgeon.io import open_model
from lmsurgeon.io.write import PendingTensor, from_handle, from_memory, plan_shards, write_shards


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(48, 32, generator=g),
        "c.bias": torch.randn(7, generator=g).to(torch.float16),
        "d.steps": torch.arange(5, dtype=torch.int64),
        "e.scale": torch.tensor(0.5),
    }


def test_sharded_write_from_a_handle_is_bit_exact_with_an_index(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    original = _tensors()
    save_file(original, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    handle = open_model(src)
    out = tmp_path / "out"
    out.mkdir()
    files = write_shards(out, [from_handle(handle, n, n.upper()) for n in original], shard_bytes=4096)
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(n.upper() for n in original)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    back = {}
    for f in files:
        back.update(load_file(str(out / f)))
    for name, t in original.items():
        got = back[name.upper()]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)


def test_one_file_when_everything_fits_and_in_memory_tensors_are_written_as_they_are(tmp_path):
    t = torch.randn(3, 4).to(torch.bfloat16)
    assert write_shards(tmp_path, [from_memory("w", t)]) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["w"], t)


def test_a_shard_is_let_go_before_the_next_one_is_read(tmp_path):
    """The point of writing shard by shard: when shard k+1's first tensor is read, none of shard k's is alive."""
    alive: list[weakref.ref] = []
    seen_alive_at_read: list[int] = []

    def pending(name: str) -> PendingTensor:
        def read() -> torch.Tensor:
            gc.collect()
            seen_alive_at_read.append(sum(r() is not None for r in alive))
            t = torch.full((256,), float(len(alive)))
            alive.append(weakref.ref(t))
            return t

        return PendingTensor(name, 1024, read)

    tensors = [pending(f"t{k}") for k in range(6)]
    assert [len(s) for s in plan_shards(tensors, 2048)] == [2, 2, 2]
    write_shards(tmp_path, tensors, shard_bytes=2048)
    assert seen_alive_at_read == [0, 1, 0, 1, 0, 1]


def test_a_tensor_larger_than_a_shard_gets_its_own_and_names_must_be_unique(tmp_path):
    big, small = PendingTensor("big", 10, torch.zeros), PendingTensor("small", 1, torch.zeros)
    assert [[t.name for t in s] for s in plan_shards([small, big, small], 4)] == [["small"], ["big"], ["small"]]
    with pytest.raises(ValueError, match="one name"):
        write_shards(tmp_path, [small, small])
