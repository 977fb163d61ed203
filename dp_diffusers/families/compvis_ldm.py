"""CompVis latent diffusion bases (``CompVis/ldm-celebahq-256``): diffusers' ``LDMPipeline``.

Components ``vqvae`` (``VQModel``), ``unet`` (``UNet2DModel``, unconditional), ``scheduler``. diffusers
gives ``UNet2DModel`` no LoRA loading; ``DPLDMPipeline.ensure_peft_unet`` adds it (same weights).
"""

from __future__ import annotations

import os
from typing import Any

from ..lora import LORA_TARGET_PRESETS
from .base import register_family
from .class_conditional import UnconditionalFamily


@register_family
class CompVisLDMFamily(UnconditionalFamily):
    name = "compvis-ldm"
    pipeline_class_name = "LDMPipeline"
    description = "CompVis LDMs: VQModel + unconditional UNet2DModel"
    # UNet2DModel's attention blocks have no proj_in / proj_out
    lora_target_presets = {name: LORA_TARGET_PRESETS[name] for name in ("attention", "attention+resnets")}

    @classmethod
    def components(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        ldm = cls.pipeline_class().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return {"vae": ldm.vqvae, "unet": ldm.unet, "scheduler": ldm.scheduler}
