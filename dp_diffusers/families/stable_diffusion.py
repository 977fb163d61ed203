"""Stable Diffusion bases (SD 1.x / 2.x, e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``): diffusers'
``StableDiffusionPipeline``.

Components ``vae`` (``AutoencoderKL``, with its own ``scaling_factor``), ``text_encoder`` (``CLIPTextModel``) and
``tokenizer`` (``CLIPTokenizer``): the frozen public text encoder, ``unet`` (``UNet2DConditionModel``: the text
context through cross-attention), ``scheduler`` (epsilon or v-prediction, SD 2.x). The safety checker is not
loaded (as in diffusers' training scripts): samples go through the standard ``StableDiffusionPipeline`` view of
the same modules, without a filter.
"""

from __future__ import annotations

import os
from typing import Any

from diffusers import DiffusionPipeline

from ..lora import LORA_TARGET_PRESETS
from .base import BaseFamily, UnsupportedBaseError, hub_options, register_family

#: what a text-to-image base must have besides the autoencoder, the UNet and the scheduler
_TEXT_COMPONENTS = ("text_encoder", "tokenizer")


@register_family
class StableDiffusionFamily(BaseFamily):
    name = "stable-diffusion"
    pipeline_class_name = "StableDiffusionPipeline"
    conditioning = "text"
    description = "Stable Diffusion 1.x / 2.x: AutoencoderKL + CLIP text encoder + UNet2DConditionModel"
    # the self- (attn1) and cross-attention (attn2) projections of every transformer block: the seed's choice
    lora_target_presets = {name: LORA_TARGET_PRESETS[name] for name in ("attention", "attention+proj")}

    @classmethod
    def components(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        from diffusers import StableDiffusionPipeline

        index = DiffusionPipeline.load_config(str(pretrained_model_name_or_path), **hub_options(kwargs))
        missing = [name for name in _TEXT_COMPONENTS if not (index.get(name) or [None])[0]]
        if missing:
            raise UnsupportedBaseError(
                f"{str(pretrained_model_name_or_path)!r} is a StableDiffusionPipeline without {missing}: a "
                "text-to-image base needs its text encoder and tokenizer to encode the captions."
            )
        sd = StableDiffusionPipeline.from_pretrained(
            pretrained_model_name_or_path, safety_checker=None, requires_safety_checker=False, **kwargs
        )
        return {"vae": sd.vae, "unet": sd.unet, "scheduler": sd.scheduler, "text_encoder": sd.text_encoder,
                "tokenizer": sd.tokenizer}  # fmt: skip
