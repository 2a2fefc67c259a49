"""Architecture registry: families described as data (roles → tensor names), bound to checkpoints."""

from lmsurgeon.arch.layout import Layout, Norm, find_module
from lmsurgeon.arch.registry import Family, detect_family, families

__all__ = ["Family", "Layout", "Norm", "detect_family", "families", "find_module"]
