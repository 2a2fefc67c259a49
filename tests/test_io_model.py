"""Model access: local single-file and sharded folders, the bundled MiniLM, row reads, dtypes and byte counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lmsurgeon.errors import CorruptCheckpoint, MissingTensor, SourceNotFound, UnsafeInput
from lmsurgeon.io import open_model
from tests.tiny_checkpoints import write_tiny


def header_bytes(path) -> int:
    """Bytes of a safetensors file's header (its u64 length prefix included): what a handle reads to list it."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def write_plain(folder, tensors: dict[str, torch.Tensor], config: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return folder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_tensor_reads_decode_every_float_dtype_exactly(tmp_path, dtype):
    t = torch.randn(7, 5, dtype=torch.float64).to(dtype)
    handle = open_model(write_plain(tmp_path / "m", {"w": t}))
    for np_dtype in (np.float32, np.float64):
        got = handle.tensor("w", np_dtype)
        assert got.dtype == np_dtype
        np.testing.assert_array_equal(got, t.to(torch.float64).numpy().astype(np_dtype))


def test_row_reads_return_requested_rows_in_order_and_count_only_their_bytes(tmp_path):
    t = torch.arange(100 * 4, dtype=torch.float32).reshape(100, 4)
    handle = open_model(write_plain(tmp_path / "m", {"emb": t}))
    idx = [97, 3, 4, 5, 3, 50]
    np.testing.assert_array_equal(handle.rows("emb", idx), t.numpy()[idx])
    rows_bytes = len(set(idx)) * 4 * 4  # unique rows only, 16 bytes each
    assert handle.bytes_read == header_bytes(tmp_path / "m" / "model.safetensors") + rows_bytes
    with pytest.raises(Exception, match="out of range"):
        handle.rows("emb", [100])


def test_header_lists_dtype_shape_and_size_without_reading_tensors(tmp_path):
    handle = open_model(
        write_plain(
            tmp_path / "m", {"a": torch.zeros(3, 2, dtype=torch.bfloat16), "b": torch.zeros(5, dtype=torch.float64)}
        )
    )
    header = handle.header()
    assert (header["a"].dtype, header["a"].shape, header["a"].nbytes) == ("BF16", (3, 2), 12)
    assert (header["b"].dtype, header["b"].shape, header["b"].nbytes) == ("F64", (5,), 40)
    assert handle.bytes_read == header_bytes(tmp_path / "m" / "model.safetensors")  # the header, no tensor data


def test_sharded_checkpoint_reads_one_tensor_from_its_shard_only(tmp_path):
    folder = write_tiny(tmp_path / "m", "llama", shard_size="20KB")
    handle = open_model(folder)
    shards = set(handle.weight_map.values())
    assert len(shards) > 2
    name = "model.layers.1.input_layernorm.weight"
    assert name in handle.names()
    assert handle.has(name)
    gain = handle.tensor(name, np.float64)
    assert gain.shape == (32,)
    assert handle.bytes_read == header_bytes(folder / handle.weight_map[name]) + 32 * 4
    assert set(handle._headers) == {handle.weight_map[name]}  # only that shard's header was parsed


def test_sharded_and_single_file_checkpoints_give_identical_tensors(tmp_path):
    single = open_model(write_tiny(tmp_path / "one", "llama"))
    sharded = open_model(write_tiny(tmp_path / "many", "llama", shard_size="20KB"))
    assert sorted(single.names()) == sorted(sharded.names())
    for name in single.names():
        np.testing.assert_array_equal(single.tensor(name), sharded.tensor(name))


def test_minilm_alias_opens_the_bundled_real_model():
    handle = open_model("minilm")
    assert handle.config["model_type"] == "bert"
    emb = handle.rows("embeddings.word_embeddings.weight", [101, 102])  # [CLS], [SEP]
    assert emb.shape == (2, 384)
    assert np.isfinite(emb).all()
    assert np.abs(emb).sum() > 0
    assert handle.tokenizer is not None
    assert handle.tokenizer.token_to_id("[CLS]") == 101


def test_index_naming_a_shard_outside_the_folder_is_refused(tmp_path):
    folder = write_tiny(tmp_path / "m", "llama", shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    for evil in ("../outside.safetensors", "/etc/passwd", "sub/dir.safetensors"):
        index["weight_map"][first] = evil
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(UnsafeInput, match="not a plain file name"):
            open_model(folder).names()


def test_symlinked_shard_leaving_the_folder_is_refused(tmp_path):
    outside = write_plain(tmp_path / "elsewhere", {"w": torch.zeros(2)})
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(UnsafeInput, match="outside the model folder"):
        open_model(folder).names()


def test_pickle_only_checkpoint_is_refused_with_advice(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeInput, match="pickle") as refused:
        open_model(folder).names()
    assert "convert them to safetensors" in str(refused.value)


def test_missing_sources_and_tensors_name_what_is_missing(tmp_path):
    with pytest.raises(SourceNotFound, match="no such model folder"):
        open_model(tmp_path / "nope")
    handle = open_model(write_plain(tmp_path / "m", {"w": torch.zeros(2)}))
    with pytest.raises(MissingTensor, match="'v'"):
        handle.tensor("v")
    (tmp_path / "m" / "config.json").write_text("[1, 2]")
    with pytest.raises(CorruptCheckpoint, match="config.json"):
        _ = open_model(tmp_path / "m").config


def test_load_model_refuses_remote_code_unless_asked(tmp_path):
    folder = write_tiny(tmp_path / "m", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "evil_custom"
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsafeInput, match="remote code"):
        open_model(folder).load_model()


def test_load_model_gives_the_saved_weights(tmp_path):
    folder = write_tiny(tmp_path / "m", "gpt2")
    handle = open_model(folder)
    model = handle.load_model("causal-lm", dtype=torch.float32)
    live = model.state_dict()["transformer.h.0.ln_1.weight"].numpy()
    np.testing.assert_array_equal(live, handle.tensor("transformer.h.0.ln_1.weight"))
    assert not model.training


def test_inputs_record_hashes_of_what_was_read(tmp_path):
    import hashlib

    folder = write_plain(tmp_path / "m", {"w": torch.ones(3)})
    handle = open_model(folder)
    handle.tensor("w")
    inputs = {i["file"]: i for i in handle.inputs()}
    assert set(inputs) == {"config.json", "model.safetensors"}
    for fname, ident in inputs.items():
        assert ident["sha256"] == hashlib.sha256((folder / fname).read_bytes()).hexdigest()
