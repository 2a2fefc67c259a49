"""Property-based hostile files: whatever bytes a stranger ships, lmsurgeon ends in one clear error or a result.

Each generated checkpoint goes through the same path a command takes (index → header → tensor reads → layout →
CLI). Allowed outcomes: success, or an ``LmsurgeonError`` naming the file — never another exception, a hang
(hypothesis' deadline) or a large allocation (peak RSS checked after the run).
"""

from __future__ import annotations

import json
import resource
import struct
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmsurgeon.arch import Layout
from lmsurgeon.cli import main
from lmsurgeon.errors import LmsurgeonError
from lmsurgeon.io import open_model
from lmsurgeon.io.header import DTYPE_SIZES

FAST = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
CONFIG = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 4, "num_attention_heads": 1, "vocab_size": 8}
GIB = 2**30

dtypes = st.sampled_from([*DTYPE_SIZES, "F99", "", "f32", "I4"])
dims = st.one_of(st.integers(0, 6), st.integers(-3, 2**62), st.just(2**31))
offsets = st.one_of(st.integers(0, 64), st.integers(-10, 2**63 - 1))
entry = st.fixed_dictionaries(
    {"dtype": dtypes, "shape": st.lists(dims, max_size=3), "data_offsets": st.lists(offsets, min_size=0, max_size=3)}
)
names = st.sampled_from(
    ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight", "x", "__metadata__"]
)
headers = st.dictionaries(names, st.one_of(entry, st.integers(), st.text(max_size=4)), max_size=4)


def exercise(folder: Path) -> None:
    """Everything a command does with a checkpoint, tolerating only LmsurgeonError."""
    try:
        handle = open_model(folder)
        for name in handle.names():
            info = handle.info(name)
            if info.dtype in ("F64", "F32", "F16", "BF16") and info.nbytes <= 1 << 20:
                handle.tensor(name, np.float64)
                if info.shape:
                    handle.rows(name, [0])
        layout = Layout(handle)
        insane_sizes = {k: v for k, v in layout.dims.items() if type(v) is not int or v < 0}
        assert insane_sizes == {}, "config.json let a size through that is not a non-negative integer"
        for role, layer in layout.norms_present():
            layout.norm(role, layer)
    except LmsurgeonError as e:
        assert e.path, f"error names no file: {e}"
        assert "\n" not in str(e), "the CLI prints an error as one line"


def write_safetensors(folder: Path, header_bytes: bytes, data: bytes, length: int | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n = len(header_bytes) if length is None else length
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", n % 2**64) + header_bytes + data)
    (folder / "config.json").write_text(json.dumps(CONFIG))


@FAST
@given(header=headers, data=st.binary(max_size=96))
def test_structured_header_mutations_end_in_a_clear_error_or_a_result(header, data):
    with tempfile.TemporaryDirectory() as tmp:
        write_safetensors(Path(tmp), json.dumps(header).encode(), data)
        exercise(Path(tmp))


@FAST
@given(raw=st.binary(max_size=64), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)), data=st.binary(max_size=32))
def test_arbitrary_header_bytes_and_lengths_end_in_a_clear_error(raw, length, data):
    with tempfile.TemporaryDirectory() as tmp:
        write_safetensors(Path(tmp), raw, data, length)
        exercise(Path(tmp))


shard_names = st.one_of(
    st.sampled_from(
        [
            "../x.safetensors",
            "/etc/passwd",
            "a/b.safetensors",
            "..",
            ".",
            "model.safetensors",
            "missing.safetensors",
            "",
            "\x00",
            "C:\\evil.safetensors",
        ]
    ),
    st.text(max_size=12),
    st.integers(),
)


@FAST
@given(
    weight_map=st.one_of(
        st.dictionaries(st.text(max_size=8), shard_names, max_size=3),
        st.integers(),
        st.lists(st.text(max_size=3), max_size=2),
    ),
    extra=st.sampled_from([{}, {"metadata": None}, {"weight_map": None}]),
)
def test_hostile_index_files_never_escape_the_folder_or_crash(weight_map, extra):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m"
        write_safetensors(folder, b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4)
        index = {"weight_map": weight_map, **extra}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        exercise(folder)


config_values = st.one_of(
    st.integers(-5, 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)


@FAST
@given(
    config=st.dictionaries(
        st.sampled_from(
            [
                "model_type",
                "num_hidden_layers",
                "hidden_size",
                "architectures",
                "num_attention_heads",
                "head_dim",
                "intermediate_size",
                "num_key_value_heads",
                "tie_word_embeddings",
                "auto_map",
            ]
        ),
        config_values,
        max_size=6,
    ),
    model_type=st.sampled_from(["llama", "gpt2", "bert", "glm4_moe", "gemma2", "mamba", None]),
)
def test_absurd_configs_end_in_a_clear_error_or_a_result(config, model_type):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        header = {
            "model.embed_tokens.weight": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 128]},
            "model.layers.0.input_layernorm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [128, 144]},
        }
        write_safetensors(folder, json.dumps(header).encode(), b"\0" * 144)
        if model_type is not None:
            config.setdefault("model_type", model_type)
        (folder / "config.json").write_text(json.dumps(config))
        exercise(folder)


@settings(max_examples=120, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(header=headers, data=st.binary(max_size=64))
def test_the_cli_answers_hostile_files_with_exit_1_and_no_partial_output(header, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "m", Path(tmp) / "out"
        write_safetensors(folder, json.dumps(header).encode(), data)
        code = main(["inspect", str(folder), "--out", str(out)])
        assert code in (0, 1)
        if code == 1:
            assert not out.exists()
            assert [p.name for p in Path(tmp).iterdir()] == ["m"], "a failed run left files beside the model"


def test_hostile_cases_never_allocated_gigabytes():
    """Runs last in this module: the peak RSS of the whole process so far stays far below a gigabyte-scale
    allocation that a trusted shape × dtype would have caused."""
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < 3 * GIB
