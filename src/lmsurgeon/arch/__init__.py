"""Architecture registry: families described as data (roles → tensor names), bound to checkpoints."""

from lmsurgeon.arch.layout import ArraySource, Layout, Norm, TensorSite, TensorSource, find_module
from lmsurgeon.arch.registry import detect_family, families
from lmsurgeon.arch.schema import Family, InvalidFamilyFile, RoleSpec, load_family

__all__ = [
    "ArraySource",
    "Family",
    "InvalidFamilyFile",
    "Layout",
    "Norm",
    "RoleSpec",
    "TensorSite",
    "TensorSource",
    "detect_family",
    "families",
    "find_module",
    "load_family",
]
