"""FLUX.1 bases (``black-forest-labs/FLUX.1-dev``, ``-schnell``): diffusers' ``FluxPipeline``.

Components ``vae`` (AutoencoderKL: latents ``(z - shift_factor) * scaling_factor``), ``text_encoder`` (CLIP) with
``tokenizer``, ``text_encoder_2`` (T5) with ``tokenizer_2``, ``transformer`` (FluxTransformer2DModel: double blocks
of joint attention, then single blocks), ``scheduler`` (FlowMatchEulerDiscreteScheduler). The transformer takes
2x2-packed latents with image ids, the text ids, the timestep over 1000 and, for guidance-distilled bases (dev:
``guidance_embeds``), a guidance value, all as ``FluxPipeline`` builds them. Each example's condition, by
``FluxPipeline.encode_prompt``: ``encoder_hidden_states``, T5's ``--max_sequence_length`` tokens, and
``pooled_projections``, CLIP's pooled embedding; on a guidance-distilled base also ``guidance``, the training
``--guidance_scale`` (default 1: diffusers#11181 and black-forest-labs/flux#79 advise 1 for training, diffusers'
script uses 3.5). The null condition is the empty prompt's encoding. Objective: diffusers' FLUX script's defaults
(uniform timesteps, target noise - x0, no weighting).
"""

from __future__ import annotations

import torch

from ..data import DataError
from ..lora import resolve_target_modules
from .base import ObjectiveOptions, register_family
from .flow_matching import FlowMatchingFamily

#: the double blocks' joint attention (matching the single blocks' attn.to_q/k/v too: diffusers' FLUX script's)
_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out"]  # fmt: skip
_FEED_FORWARD = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
#: the preset that adds the single blocks' MLP projections (only inside single_transformer_blocks: the
#: top-level proj_out is the transformer's output layer)
SINGLE = "attention+ff+single"

#: the training guidance of guidance-distilled bases when --guidance_scale is not given
DEFAULT_GUIDANCE_SCALE = 1.0


@register_family
class FluxFamily(FlowMatchingFamily):
    name = "flux"
    pipeline_class_name = "FluxPipeline"
    text_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    t5_tokenizer = "tokenizer_2"
    description = "FLUX.1 dev / schnell: AutoencoderKL + CLIP + T5 + FluxTransformer2DModel"
    lora_target_presets = {"attention": _ATTENTION, "attention+ff": _ATTENTION + _FEED_FORWARD,
                           SINGLE: _ATTENTION + _FEED_FORWARD}  # fmt: skip
    default_max_sequence_length = 512  # diffusers' train_dreambooth_lora_flux.py
    objective_defaults = ObjectiveOptions(weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                          precondition_outputs=False)  # fmt: skip

    @classmethod
    def lora_targets(cls, targets, denoiser):
        resolved = resolve_target_modules(targets, cls.lora_target_presets)
        if targets == SINGLE:
            blocks = len(getattr(denoiser, "single_transformer_blocks", []))
            resolved += [f"single_transformer_blocks.{i}.{name}" for i in range(blocks) for name in ("proj_mlp",
                                                                                                    "proj_out")]
        return resolved

    @classmethod
    def check_resolution(cls, pipe, resolution):
        """Latents are packed 2x2: the resolution must be a multiple of twice the autoencoder's factor."""
        factor = 2 * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if resolution % factor:
            raise DataError(f"--resolution {resolution}: FLUX packs 2x2 latents, so it takes multiples of {factor}; "
                            f"use e.g. {max(factor, resolution - resolution % factor)}.")  # fmt: skip

    @classmethod
    def guidance_scale(cls, options) -> float:
        return DEFAULT_GUIDANCE_SCALE if options.guidance_scale is None else options.guidance_scale

    @classmethod
    def encode_prompts(cls, pipe, prompts, options=None):
        view = cls.sampling_pipeline(pipe)
        context, pooled, _ = view.encode_prompt(prompt=prompts, prompt_2=None, device=view._execution_device,
                                                num_images_per_prompt=1,
                                                max_sequence_length=cls.max_sequence_length(options))  # fmt: skip
        return {"encoder_hidden_states": context, "pooled_projections": pooled}

    @classmethod
    def encode_conditions(cls, pipe, examples, cache_dir=None, dtype=torch.float32):
        conditions = super().encode_conditions(pipe, examples, cache_dir, dtype)
        if pipe.unet.config.guidance_embeds:  # a guidance-distilled base: the training guidance, every example
            conditions["guidance"] = torch.full((len(examples),), cls.guidance_scale(examples.options))
        return conditions

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditions):
        from diffusers import FluxPipeline

        rows, channels, height, width = noisy_latents.shape
        packed = FluxPipeline._pack_latents(noisy_latents, rows, channels, height, width)
        dtype = denoiser.input_dtype or noisy_latents.dtype
        image_ids = FluxPipeline._prepare_latent_image_ids(rows, height // 2, width // 2, noisy_latents.device, dtype)
        context = conditions["encoder_hidden_states"]
        text_ids = torch.zeros(context.shape[1], 3, device=context.device, dtype=dtype)
        guidance = conditions.get("guidance")
        prediction = cls.transformer(
            denoiser, hidden_states=packed, timestep=timesteps / 1000, encoder_hidden_states=context,
            pooled_projections=conditions["pooled_projections"], txt_ids=text_ids, img_ids=image_ids,
            guidance=None if guidance is None else guidance.float(),
        )  # fmt: skip
        return FluxPipeline._unpack_latents(prediction, height, width, 1)
