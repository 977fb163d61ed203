"""DPLDMPipeline: sampling from a public base of any supported family and its DP-LoRA adapters."""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..data import decode_latents
from ..families import BaseFamily, ConditionOptions, DPLDMFamily, base_family
from ..loaders import DPLoRALoaderMixin
from ..models.denoiser import LatentDenoiser
from ..models.dit import DiTClassRows

if TYPE_CHECKING:
    from ..adapter_config import DPLoRAConfig

#: this pipeline's own loop (class-conditional and unconditional models) when a call does not say
DEFAULT_INFERENCE_STEPS, DEFAULT_GUIDANCE_SCALE, DEFAULT_ETA = 50, 3.0, 0.0


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """The diffusers scheduler class called ``name``; ``ValueError`` naming the choices if there is none."""
    import diffusers

    found = getattr(diffusers, name, None)
    if isinstance(found, type) and issubclass(found, SchedulerMixin):
        return found
    known = sorted(scheduler.name for scheduler in KarrasDiffusionSchedulers)  # diffusers' interchangeable ones
    raise ValueError(f"{name!r} is not a diffusers scheduler; the DDIM-compatible ones are {', '.join(known)}.")


class DPLDMPipeline(DPLoRALoaderMixin, DiffusionPipeline):
    r"""Sampling for the public bases and DP-LoRA adapters of dp-diffusers.

    A base of any supported family (``dp_diffusers.families``) loads into these components; the family says how they
    are conditioned and sampled. Class-conditional and unconditional bases sample through this pipeline's own
    loop (for a zero adapter: the images of diffusers' ``LDMPipeline`` / ``DiTPipeline``); text-to-image bases
    through their own diffusers pipeline over the same modules (``StableDiffusionPipeline``,
    ``StableDiffusionXLPipeline``, ...), so ``pipe(prompt=...)`` is diffusers' own sampler with its own defaults.

    Components:
        vae ([`AutoencoderKL`] or [`VQModel`]): decodes latents to images.
        unet ([`UNet2DConditionModel`], [`UNet2DModel`], [`DiTTransformer2DModel`], ...): the denoiser, whatever
            its kind: one component name for every base family (LoRA keys carry the family's own prefix).
        scheduler ([`SchedulerMixin`]): any diffusers scheduler can be swapped in ([`set_scheduler`]).
        class_embedder ([`ClassEmbedder`], optional): class id -> cross-attention context (the project's bases).
        id2label (`dict[int, str]`, optional): class names, as in [`DiTPipeline`].
        text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3 (optional): a text-to-image
            base's frozen public text encoders, as its own pipeline names them.
        base_options (`dict`, optional): the base pipeline's config entries its family samples with (e.g. SDXL's
            ``force_zeros_for_empty_prompt``).

    LoRA adapters go into the denoiser only ([`load_lora_weights`], `set_adapters`, `fuse_lora`, ...).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->class_embedder->unet->vae"
    _optional_components = ["class_embedder", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                            "text_encoder_3", "tokenizer_3"]  # fmt: skip

    def __init__(self, vae, unet, scheduler: SchedulerMixin, class_embedder=None, id2label: dict | None = None,
                 text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                 tokenizer_3=None, base_options: dict | None = None):  # fmt: skip
        super().__init__()
        self.register_modules(
            vae=vae, unet=unet, scheduler=scheduler, class_embedder=class_embedder, text_encoder=text_encoder,
            tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )  # fmt: skip
        self.register_to_config(base_options=base_options or None)
        self._set_id2label(id2label)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # CPU copies of the adapted layers' weights before `fuse_lora`, put back exactly by `unfuse_lora`
        self._unfused_weights: dict[str, dict[str, torch.Tensor]] = {}
        #: a DiT adapter's rows for classes its base lacks (``DiTClassRows``), attached to the transformer
        self.class_rows: DiTClassRows | None = None
        # (class_embedder, id2label) of the base while an adapter's class embedding replaces them
        self._base_class_conditioning = None
        #: the base family it was loaded as (dp_diffusers.families); set by from_pretrained
        self.family: type[BaseFamily] = DPLDMFamily
        #: how prompts are encoded (T5's sequence length): an adapter's training settings, else the family's
        self.condition_options = ConditionOptions()
        #: the loaded DP-LoRA adapter's config (how it was trained: resolution, T5 length); ``None``: no adapter
        self.adapter_config: DPLoRAConfig | None = None

    def _set_id2label(self, id2label: dict | None) -> None:
        """Class names by id; ``labels`` maps each name to its id, ``label_synonyms`` each comma-separated part of
        a name (as ``DiTPipeline`` reads ImageNet's ``"tench, Tinca tinca"``); [`get_label_ids`] takes both."""
        id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        self.register_to_config(id2label=id2label or None)
        self.labels = {name: idx for idx, name in sorted(id2label.items())}
        self.label_synonyms = {
            synonym.strip(): idx for idx, name in sorted(id2label.items()) if "," in name for synonym in name.split(",")
        }

    @classmethod
    def _from_base(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DPLDMPipeline:
        """A base of any supported family, loaded by its own diffusers pipeline class."""
        family = base_family(pretrained_model_name_or_path, **kwargs)
        components = family.components(pretrained_model_name_or_path, **kwargs)
        if components is None:  # DPLDMPipeline's own layout
            pipe = super(DPLoRALoaderMixin, cls).from_pretrained(pretrained_model_name_or_path, **kwargs)
        else:
            pipe = cls(**components)
            pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        pipe.family = family
        return pipe

    @property
    def base_family(self) -> str:
        """The name of the base family (``dp_diffusers.families``) this pipeline was loaded as."""
        return self.family.name

    @property
    def conditioning(self) -> str:
        """``"class"`` (class labels), ``"text"`` (prompts) or ``"none"`` (unconditional)."""
        return self.family.conditioning_of(self)

    @property
    def num_classes(self) -> int | None:
        """Class ids the model takes; ``None`` unless class-conditional."""
        return self.family.num_classes(self)

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map class names (e.g. ``["3", "7"]``; for a DiT base also one of a name's synonyms) to class ids."""
        names = [label] if isinstance(label, str) else list(label)
        lookup = {**self.label_synonyms, **self.labels}
        unknown = [name for name in names if name not in lookup]
        if unknown:
            known = list(self.labels)
            known = known if len(known) <= 20 else [*known[:20], f"... ({len(known)} in all)"]
            raise ValueError(f"Unknown class label(s) {unknown}; this model knows {known}.")
        return [lookup[name] for name in names]

    def set_scheduler(self, name: str) -> None:
        """Swap in the diffusers scheduler class ``name`` (e.g. ``"DPMSolverMultistepScheduler"``), built from the
        current one's config: the same trained noise schedule, another sampler (by name, for command lines).
        ``ValueError`` naming the usable ones for a sampler the base's family cannot use (an epsilon-prediction
        sampler on a flow-matching base: ``family.scheduler_names``)."""
        found = scheduler_class(name)
        self.family.check_scheduler(self.scheduler, name)
        self.scheduler = found.from_config(self.scheduler.config)

    def trained_call_kwargs(self) -> dict[str, Any]:
        """Call arguments that sample as the loaded adapter was trained: ``height`` and ``width`` at its training
        resolution and what its family adds (T5's sequence length: ``family.sampling_kwargs``); empty without an
        adapter. dp-diffusers' own sampling (samples.png, the evaluation, ``dp-diffusers sample`` and ``generate``,
        the Space) passes them; a plain call does not: it takes the base pipeline's defaults, as that pipeline with
        the adapter loaded by ``load_lora_weights`` does."""
        if self.adapter_config is None:
            return {}
        resolution = self.adapter_config.trained_resolution()
        size = {"height": resolution, "width": resolution} if resolution else {}
        return {**size, **self.family.sampling_kwargs(self)}

    def _check_conditions(self, class_labels: list[int] | None, prompt) -> None:
        if (self.conditioning == "text") != (prompt is not None):
            kind = "text-to-image: pass prompt" if self.conditioning == "text" else "not text-to-image: pass no prompt"
            raise ValueError(f"This model is {kind}.")
        num_classes = self.num_classes
        if num_classes is None:
            if class_labels is not None:
                kind = "text-to-image" if self.conditioning == "text" else "unconditional"
                raise ValueError(f"This model is {kind}; call it without class_labels.")
            return
        if class_labels is None:
            raise ValueError(f"This model is class-conditional; pass class_labels (ids 0..{num_classes - 1}).")
        bad = [c for c in class_labels if not 0 <= int(c) < num_classes]
        if bad:
            known = list(self.labels) if self.labels else f"ids 0..{num_classes - 1}"
            raise ValueError(f"Unknown class id(s) {bad}; this model knows {known}.")

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | None = None,
        num_images_per_prompt: int = 1,
        batch_size: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        **kwargs: Any,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Text-to-image models are sampled by the base's own diffusers pipeline (``family.sampling_pipeline``) with
        the arguments given and nothing else: every argument left out (``None``) takes that pipeline's own default
        (its ``__call__`` signature's: e.g. ``guidance_scale`` 7.5 for SD, 5 for SDXL, 7 for SD3, 3.5 for FLUX; SD3's
        ``max_sequence_length`` 256), so a call gives exactly the images of the base pipeline with the adapter loaded
        by ``load_lora_weights``, called the same way. [`trained_call_kwargs`] holds the arguments the adapter was
        trained at (resolution, T5 length), to pass to both.

        Args:
            class_labels: class ids (use [`get_label_ids`] for names); ``None`` for unconditional and text models.
            num_images_per_prompt: images per class label (per prompt).
            batch_size: number of images for unconditional models (default 1).
            num_inference_steps: denoising steps (default: the text pipeline's; 50 in this pipeline's own loop).
            guidance_scale: classifier-free guidance weight; > 1 mixes in the null class (the project's bases are
                trained with label dropout for it) or the empty prompt. 1 disables guidance. Ignored for
                unconditional models. Default: the text pipeline's; 3 in this pipeline's own loop.
            eta: DDIM's eta (default 0: deterministic DDIM); ignored by schedulers and pipelines without it.
            generator: a seeded ``torch.Generator`` makes the output reproducible.
            output_type: ``"pil"``, ``"np"`` or ``"pt"``.
            prompt, negative_prompt: for text-to-image models.
            height, width: the images' size in pixels (default: the denoiser's sample size, or the base pipeline's
                default).
            kwargs: text-to-image models: further arguments of the base pipeline's ``__call__`` (e.g.
                ``max_sequence_length``); ``TypeError`` for one it does not take, or for any on other models.
        """
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        self._check_conditions(class_labels, prompt)
        view = self.family.sampling_pipeline(self)
        if view is not None:
            accepted = inspect.signature(view.__call__).parameters
            unknown = sorted(set(kwargs) - set(accepted))
            if unknown:
                raise TypeError(f"{type(view).__name__} takes no argument {', '.join(unknown)}.")
            given = dict(prompt=prompt, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                         generator=generator, latents=latents, output_type=output_type, height=height, width=width,
                         **kwargs)  # fmt: skip
            # only what was given: the rest takes the base pipeline's own defaults
            images = view(**{k: v for k, v in given.items() if v is not None and k in accepted}).images
            return ImagePipelineOutput(images=images) if return_dict else (images,)
        if kwargs:
            raise TypeError(f"Only text-to-image models take further arguments; got {', '.join(sorted(kwargs))}.")
        num_inference_steps = DEFAULT_INFERENCE_STEPS if num_inference_steps is None else num_inference_steps
        guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        eta = DEFAULT_ETA if eta is None else eta

        device = self._execution_device
        denoiser = LatentDenoiser(self.unet, self.family, self.class_embedder, self.class_rows, self.unet.dtype)
        if class_labels is not None:
            labels = torch.tensor(class_labels, device=device).repeat_interleave(num_images_per_prompt)
            n = len(labels)
        else:
            labels, n = None, (batch_size or 1) * num_images_per_prompt
        # guidance needs a null class (a ClassEmbedder's, DiT's); other bases sample without it
        null_class = self.family.null_class_id(self)
        use_cfg = guidance_scale > 1.0 and labels is not None and null_class is not None
        conditions = {}
        if labels is not None:
            conditions["class_labels"] = torch.cat([torch.full_like(labels, null_class), labels]) if use_cfg else labels

        size = self.unet.config.sample_size
        shape = (n, self.unet.config.in_channels, (height or size * self.vae_scale_factor) // self.vae_scale_factor,
                 (width or size * self.vae_scale_factor) // self.vae_scale_factor)  # fmt: skip
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        step_params = set(inspect.signature(self.scheduler.step).parameters)
        step_kwargs = {k: v for k, v in {"eta": eta, "generator": generator}.items() if k in step_params}

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if use_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = t.expand(model_input.shape[0]) if torch.is_tensor(t) else torch.full((model_input.shape[0],), t)
            noise_pred = denoiser(model_input, timesteps.to(model_input.device), conditions)
            if use_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample

        image = self.image_processor.postprocess(decode_latents(self.vae, latents), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)
