"""Public base families: one small class per layout of base pipeline (see base.py)."""

from .base import FAMILIES, BaseFamily, UnsupportedBaseError, base_family, register_family
from .compvis_ldm import CompVisLDMFamily
from .dp_ldm import DPLDMFamily

__all__ = [
    "FAMILIES",
    "BaseFamily",
    "CompVisLDMFamily",
    "DPLDMFamily",
    "UnsupportedBaseError",
    "base_family",
    "register_family",
]
