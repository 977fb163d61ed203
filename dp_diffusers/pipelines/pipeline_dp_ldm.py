"""DPLDMPipeline: sampling from a (class-conditional) latent diffusion model and its DP-LoRA adapters."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel, UNet2DModel, VQModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..models.class_embedder import ClassEmbedder
from ..models.denoiser import LatentDenoiser
from ..models.unet_2d import UNet2DModelWithLoRA

ADAPTER_CONFIG_NAME = "dp_lora_config.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _adapter_folder(path_or_repo: str, **hub_kwargs) -> Path | None:
    """The local folder of a DP-LoRA adapter (downloading only its files for a Hub id), or ``None``
    when ``path_or_repo`` is a base pipeline."""
    local = Path(path_or_repo)
    if local.is_dir():
        return local if (local / ADAPTER_CONFIG_NAME).is_file() else None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(
            path_or_repo,
            ADAPTER_CONFIG_NAME,
            revision=hub_kwargs.get("revision"),
            token=hub_kwargs.get("token"),
            cache_dir=hub_kwargs.get("cache_dir"),
        )
    except EntryNotFoundError:
        return None
    return Path(
        snapshot_download(
            path_or_repo,
            revision=hub_kwargs.get("revision"),
            token=hub_kwargs.get("token"),
            cache_dir=hub_kwargs.get("cache_dir"),
            allow_patterns=[ADAPTER_CONFIG_NAME, LORA_WEIGHT_NAME, "class_embedder/*", "*.json"],
        )
    )


class DPLDMPipeline(DiffusionPipeline):
    r"""Latent diffusion sampling for the bases and DP-LoRA adapters of dp-diffusers.

    Components:
        vae ([`AutoencoderKL`] or [`VQModel`]): decodes latents to images.
        unet ([`UNet2DConditionModel`] or [`UNet2DModel`]): the latent denoiser.
        scheduler ([`SchedulerMixin`]): DDIM by default; any diffusers scheduler can be swapped in.
        class_embedder ([`ClassEmbedder`], optional): class id -> cross-attention context.
        id2label (`dict[int, str]`, optional): class names, as in [`DiTPipeline`].
    """

    model_cpu_offload_seq = "class_embedder->unet->vae"
    _optional_components = ["class_embedder"]

    def __init__(
        self,
        vae: AutoencoderKL | VQModel,
        unet: UNet2DConditionModel | UNet2DModel,
        scheduler: SchedulerMixin,
        class_embedder: ClassEmbedder | None = None,
        id2label: dict | None = None,
    ):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, class_embedder=class_embedder)
        id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        self.register_to_config(id2label=id2label or None)
        self.labels = {name: idx for idx, name in sorted(id2label.items())}
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DPLDMPipeline:
        """Load a base pipeline folder / repo, or a DP-LoRA adapter folder / repo: the adapter's
        ``dp_lora_config.json`` names its base, which is loaded first, then the adapter is applied."""
        adapter = _adapter_folder(str(pretrained_model_name_or_path), **kwargs)
        if adapter is None:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        config = json.loads((adapter / ADAPTER_CONFIG_NAME).read_text())
        base = config["base_model"]
        if not Path(base).is_absolute() and (adapter / base).is_dir():
            base = str(adapter / base)
        kwargs.setdefault("revision", config.get("revision"))
        pipe = super().from_pretrained(base, **kwargs)
        pipe.load_lora_weights(adapter)
        return pipe

    def _ensure_peft_unet(self) -> None:
        # diffusers 0.42's UNet2DModel lacks the PEFT adapter API; same weights, with the mixin.
        if type(self.unet) is UNet2DModel:
            unet = UNet2DModelWithLoRA.from_config(self.unet.config)
            unet.load_state_dict(self.unet.state_dict())
            self.register_modules(unet=unet.to(self.unet.device, self.unet.dtype))

    def load_lora_weights(self, adapter: str | os.PathLike, adapter_name: str = "default") -> None:
        """Apply a DP-LoRA adapter folder (LoRA weights, and its class embedding and class names if
        it trained one) to this pipeline's UNet, as diffusers' ``load_lora_weights`` does for the
        UNet alone (the stock Stable Diffusion mixin expects a text encoder)."""
        folder = _adapter_folder(str(adapter)) or Path(adapter)
        config_path = folder / ADAPTER_CONFIG_NAME
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self._ensure_peft_unet()
        base = self.name_or_path or type(self.unet).__name__
        try:
            self.unet.load_lora_adapter(
                str(folder),
                weight_name=config.get("lora_weights", LORA_WEIGHT_NAME),
                prefix="unet",
                adapter_name=adapter_name,
            )
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f"The adapter {str(folder)!r} does not fit the base model {base!r}: {err}") from err
        if not getattr(self.unet, "peft_config", {}).get(adapter_name):
            raise ValueError(f"The adapter {str(folder)!r} matched no module of the base model {base!r}.")
        if config.get("class_embedder"):
            embedder = ClassEmbedder.from_pretrained(folder / config["class_embedder"])
            self.register_modules(class_embedder=embedder.to(self.unet.device))
        if config.get("id2label"):
            id2label = {int(k): str(v) for k, v in config["id2label"].items()}
            self.register_to_config(id2label=id2label)
            self.labels = {name: idx for idx, name in sorted(id2label.items())}

    def set_adapters(self, adapter_names: str | list[str], adapter_weights=None) -> None:
        """Activate adapters with LoRA scales (0 = the public base, 1 = the private fine-tune)."""
        self.unet.set_adapters(adapter_names, adapter_weights)

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        self.unet.fuse_lora(lora_scale=lora_scale)

    def unfuse_lora(self) -> None:
        self.unet.unfuse_lora()

    def unload_lora_weights(self) -> None:
        self.unet.unload_lora()

    @property
    def num_classes(self) -> int | None:
        if self.class_embedder is not None:
            return self.class_embedder.config.num_classes
        return getattr(self.unet.config, "num_class_embeds", None)

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map class names (e.g. ``["3", "7"]``) to class ids."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in names if name not in self.labels]
        if unknown:
            raise ValueError(f"Unknown class label(s) {unknown}; this model knows {list(self.labels)}.")
        return [self.labels[name] for name in names]

    def _check_class_labels(self, class_labels: list[int] | None) -> None:
        num_classes = self.num_classes
        if num_classes is None:
            if class_labels is not None:
                raise ValueError("This model is unconditional; call it without class_labels.")
            return
        if class_labels is None:
            raise ValueError(f"This model is class-conditional; pass class_labels (ids 0..{num_classes - 1}).")
        bad = [c for c in class_labels if not 0 <= int(c) < num_classes]
        if bad:
            known = list(self.labels) if self.labels else f"ids 0..{num_classes - 1}"
            raise ValueError(f"Unknown class id(s) {bad}; this model knows {known}.")

    def _scheduler_step_kwargs(self, eta: float, generator) -> dict:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | None = None,
        num_images_per_prompt: int = 1,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            class_labels: class ids (use [`get_label_ids`] for names); ``None`` for unconditional models.
            num_images_per_prompt: images per class label.
            batch_size: number of images for unconditional models (default 1).
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance weight; > 1 mixes in the null class (bases of
                ``train_ldm.py`` are trained with label dropout for it). 1 disables guidance.
                Ignored for unconditional models.
            eta: DDIM's eta (0 = deterministic DDIM); ignored by schedulers without it.
            generator: a seeded ``torch.Generator`` makes the output reproducible.
            output_type: ``"pil"``, ``"np"`` or ``"pt"``.
        """
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        self._check_class_labels(class_labels)
        if class_labels is not None:
            labels = torch.tensor(class_labels, device=self._execution_device).repeat_interleave(num_images_per_prompt)
            n = len(labels)
        else:
            labels = None
            n = (batch_size or 1) * num_images_per_prompt
        # CFG needs the null class of a ClassEmbedder; other bases sample without guidance.
        use_cfg = guidance_scale > 1.0 and labels is not None and self.class_embedder is not None

        denoiser = LatentDenoiser(self.unet, self.class_embedder)
        shape = (n, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        if use_cfg:
            null = torch.full_like(labels, self.class_embedder.null_class_id)
            labels_in = torch.cat([null, labels])
        else:
            labels_in = labels
        step_kwargs = self._scheduler_step_kwargs(eta, generator)

        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if use_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = t.expand(model_input.shape[0]) if torch.is_tensor(t) else torch.full((model_input.shape[0],), t)
            noise_pred = denoiser(model_input, timesteps.to(model_input.device), labels_in)
            if use_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample

        scaling = getattr(self.vae.config, "scaling_factor", None) or 1.0
        image = self.vae.decode(latents / scaling).sample
        image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
