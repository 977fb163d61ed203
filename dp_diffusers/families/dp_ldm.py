"""The project's own layout: ``DPLDMPipeline`` folders that ``train_ldm.py`` writes."""

from __future__ import annotations

from ..lora import LORA_TARGET_PRESETS
from .base import BaseFamily, register_family


@register_family
class DPLDMFamily(BaseFamily):
    name = "dp-ldm"
    pipeline_class_name = "DPLDMPipeline"
    conditioning = "class"
    description = "train_ldm.py's bases: AutoencoderKL / VQModel, UNet2DConditionModel + ClassEmbedder"
    lora_target_presets = LORA_TARGET_PRESETS
