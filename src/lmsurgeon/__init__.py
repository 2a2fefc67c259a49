"""lmsurgeon: weight-space forensics and surgery on transformer language models."""

from lmsurgeon.errors import LmsurgeonError

__version__ = "0.1.0"

__all__ = ["LmsurgeonError", "__version__", "open_model"]


def open_model(source, **kwargs):
    """Open a model source (local folder, hub id, or ``minilm``); see :func:`lmsurgeon.io.open_model`."""
    from lmsurgeon.io import open_model as _open_model

    return _open_model(source, **kwargs)
