"""The offline demo: zoo, lineage, swap and merge in one command (``lmsurgeon demo``)."""

from lmsurgeon.demo.run import run_demo

__all__ = ["run_demo"]
