"""Public base families: one small class per layout of base pipeline, owning its whole contract (see base.py)."""

from .base import (
    FAMILIES,
    BaseFamily,
    ConditionOptions,
    ObjectiveOptions,
    PrivateExamples,
    UnsupportedBaseError,
    base_family,
    family_named,
    register_family,
)
from .class_conditional import ClassFamily, UnconditionalFamily
from .compvis_ldm import CompVisLDMFamily
from .dit import DiTFamily
from .dp_ldm import DPLDMFamily
from .flux import FluxFamily
from .stable_diffusion import StableDiffusionFamily
from .stable_diffusion_3 import StableDiffusion3Family
from .stable_diffusion_xl import StableDiffusionXLFamily
from .text import TextFamily, private_text

__all__ = [
    "FAMILIES",
    "BaseFamily",
    "ClassFamily",
    "CompVisLDMFamily",
    "ConditionOptions",
    "DPLDMFamily",
    "DiTFamily",
    "FluxFamily",
    "ObjectiveOptions",
    "PrivateExamples",
    "StableDiffusion3Family",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "TextFamily",
    "UnconditionalFamily",
    "UnsupportedBaseError",
    "base_family",
    "family_named",
    "private_text",
    "register_family",
]
