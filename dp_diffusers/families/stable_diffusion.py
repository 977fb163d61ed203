"""Stable Diffusion bases (SD 1.x / 2.x, e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``): diffusers'
``StableDiffusionPipeline``.

Components ``vae`` (``AutoencoderKL``, with its own ``scaling_factor``), ``text_encoder`` (``CLIPTextModel``) and
``tokenizer`` (``CLIPTokenizer``): the frozen public text encoder, ``unet`` (``UNet2DConditionModel``: the caption's
context through cross-attention), ``scheduler`` (epsilon or v-prediction, SD 2.x). The safety checker is not
loaded (as in diffusers' training scripts): samples go through a ``StableDiffusionPipeline`` of the same modules,
without a filter.
"""

from __future__ import annotations

from ..lora import LORA_TARGET_PRESETS
from .base import register_family
from .text import TextFamily


@register_family
class StableDiffusionFamily(TextFamily):
    name = "stable-diffusion"
    pipeline_class_name = "StableDiffusionPipeline"
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    description = "Stable Diffusion 1.x / 2.x: AutoencoderKL + CLIP text encoder + UNet2DConditionModel"
    # the self- (attn1) and cross-attention (attn2) projections of every transformer block: the seed's choice
    lora_target_presets = {name: LORA_TARGET_PRESETS[name] for name in ("attention", "attention+proj")}

    @classmethod
    def encode_prompts(cls, pipe, prompts, options=None):
        view = cls.sampling_pipeline(pipe)
        context, _ = view.encode_prompt(prompts, view._execution_device, num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)  # fmt: skip
        return {"encoder_hidden_states": context}

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditions):
        context = denoiser.cast(conditions["encoder_hidden_states"])
        return denoiser.backbone(noisy_latents, timesteps, encoder_hidden_states=context)
