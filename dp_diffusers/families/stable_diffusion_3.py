"""Stable Diffusion 3 / 3.5 bases (``stabilityai/stable-diffusion-3.5-medium``): ``StableDiffusion3Pipeline``.

Components ``vae`` (AutoencoderKL: latents ``(z - shift_factor) * scaling_factor``), ``text_encoder`` (CLIP-L) and
``text_encoder_2`` (CLIP-G), both ``CLIPTextModelWithProjection``, with ``tokenizer`` / ``tokenizer_2``, optionally
``text_encoder_3`` (T5) with ``tokenizer_3`` (a base may leave it out: diffusers allows ``text_encoder_3=None``,
then the T5 part of each context is zeros), ``transformer`` (SD3Transformer2DModel, joint attention; SD3.5's
dual-attention blocks add ``attn2``), ``scheduler`` (FlowMatchEulerDiscreteScheduler). Each example's condition,
by ``StableDiffusion3Pipeline.encode_prompt``: ``encoder_hidden_states``, the CLIP contexts (padded to T5's width)
followed by T5's ``--max_sequence_length`` tokens, and ``pooled_projections``, both CLIPs' pooled embeddings. The
null condition is the empty prompt's (the pipeline's own negative). Objective: diffusers' SD3 script's defaults
(logit-normal timesteps, preconditioned outputs against x0).
"""

from __future__ import annotations

from ..data import DataError, vae_scale_factor
from .base import ObjectiveOptions, register_family
from .flow_matching import FlowMatchingFamily

#: the joint attention of every block (diffusers' SD3 LoRA script's default targets) and SD3.5's second attention
_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v",
              "attn2.to_out.0"]  # fmt: skip
_FEED_FORWARD = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


@register_family
class StableDiffusion3Family(FlowMatchingFamily):
    name = "stable-diffusion-3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    text_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    optional_text_components = ("text_encoder_3", "tokenizer_3")
    t5_tokenizer = "tokenizer_3"
    description = "Stable Diffusion 3 / 3.5: AutoencoderKL + CLIP-L, CLIP-G (and T5) + SD3Transformer2DModel"
    lora_target_presets = {"attention": _ATTENTION, "attention+ff": _ATTENTION + _FEED_FORWARD}
    default_max_sequence_length = 77  # diffusers' train_dreambooth_lora_sd3.py
    objective_defaults = ObjectiveOptions(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0,
                                          mode_scale=1.29, precondition_outputs=True)  # fmt: skip
    # a flow-matching sampler that StableDiffusion3Pipeline also runs (diffusers declares only the Euler one)
    extra_schedulers = ("FlowMatchHeunDiscreteScheduler",)

    @classmethod
    def check_resolution(cls, pipe, resolution):
        """The transformer cuts the latents into patch x patch tokens: the resolution must be a multiple of the
        autoencoder's factor times the patch size (16 for SD3 / SD3.5), as ``StableDiffusion3Pipeline`` requires."""
        factor, patch = vae_scale_factor(pipe.vae), pipe.unet.config.patch_size
        multiple = factor * patch
        if resolution % multiple:
            raise DataError(f"--resolution {resolution}: SD3 cuts the latents ({factor}x smaller) into {patch}x{patch} "
                            f"patches, so it takes multiples of {multiple}; use e.g. "
                            f"{max(multiple, resolution - resolution % multiple)}.")  # fmt: skip

    @classmethod
    def encode_prompts(cls, pipe, prompts, options=None):
        view = cls.sampling_pipeline(pipe)
        context, _, pooled, _ = view.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=view._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=cls.max_sequence_length(options),
        )  # fmt: skip
        return {"encoder_hidden_states": context, "pooled_projections": pooled}

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditions):
        return cls.transformer(denoiser, hidden_states=noisy_latents, timestep=timesteps,
                               encoder_hidden_states=conditions["encoder_hidden_states"],
                               pooled_projections=conditions["pooled_projections"])  # fmt: skip
