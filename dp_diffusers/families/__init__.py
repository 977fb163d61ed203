"""Public base families: one small class per layout of base pipeline (see base.py)."""

from .base import FAMILIES, BaseFamily, UnsupportedBaseError, base_family, family_named, register_family
from .compvis_ldm import CompVisLDMFamily
from .dit import DiTFamily
from .dp_ldm import DPLDMFamily
from .stable_diffusion import StableDiffusionFamily

__all__ = [
    "FAMILIES",
    "BaseFamily",
    "CompVisLDMFamily",
    "DPLDMFamily",
    "DiTFamily",
    "StableDiffusionFamily",
    "UnsupportedBaseError",
    "base_family",
    "family_named",
    "register_family",
]
