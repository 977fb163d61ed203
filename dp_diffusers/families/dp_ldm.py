"""The project's own layout: ``DPLDMPipeline`` folders that ``train_ldm.py`` writes."""

from __future__ import annotations

from .base import BaseFamily, register_family


@register_family
class DPLDMFamily(BaseFamily):
    name = "dp-ldm"
    pipeline_class_name = "DPLDMPipeline"
    conditioning = "class"
    description = "train_ldm.py's bases: AutoencoderKL / VQModel, UNet2DConditionModel + ClassEmbedder"
