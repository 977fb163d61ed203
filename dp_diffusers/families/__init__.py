"""Public base families: one small class per layout of base pipeline (see base.py)."""

from .base import FAMILIES, BaseFamily, UnsupportedBaseError, base_family, family_named, register_family
from .compvis_ldm import CompVisLDMFamily
from .dit import DiTFamily
from .dp_ldm import DPLDMFamily

__all__ = [
    "FAMILIES",
    "BaseFamily",
    "CompVisLDMFamily",
    "DPLDMFamily",
    "DiTFamily",
    "UnsupportedBaseError",
    "base_family",
    "family_named",
    "register_family",
]
