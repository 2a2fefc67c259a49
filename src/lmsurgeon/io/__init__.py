"""Model access: one handle over local, sharded, hub and bundled sources, reading only the tensors asked for."""

from lmsurgeon.io.header import TensorInfo
from lmsurgeon.io.model import ModelHandle, minilm_path, open_model
from lmsurgeon.io.stores import HubStore, LocalStore, cache_root

__all__ = ["HubStore", "LocalStore", "ModelHandle", "TensorInfo", "cache_root", "minilm_path", "open_model"]
