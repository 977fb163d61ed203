"""DPLDMPipeline: sampling from a latent diffusion model (class-conditional, unconditional or text-to-image) and its
DP-LoRA adapters."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DiTTransformer2DModel,
    ImagePipelineOutput,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.lora_base import LoraBaseMixin
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.schedulers import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError
from peft.tuners.tuners_utils import BaseTunerLayer

from ..adapter_config import DPLoRAConfig
from ..constants import ADAPTER_CONFIG_NAME
from ..families import BaseFamily, DPLDMFamily, UnsupportedBaseError, base_family
from ..models.class_embedder import ClassEmbedder
from ..models.denoiser import LatentDenoiser
from ..models.dit import DiTClassRows, DiTTransformer2DModelWithLoRA
from ..models.unet_2d import UNet2DModelWithLoRA

# `from_pretrained` / `load_lora_weights` kwargs that locate files on the Hub (they apply to the adapter repo).
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")
_SHOWN = 3  # offending module names quoted in a mismatch error


def _adapter_folder(path_or_repo: str, **hub_kwargs) -> Path | None:
    """The local folder of a DP-LoRA adapter (for a Hub repo: downloaded, adapter files only), or `None` when
    `path_or_repo` holds no `dp_lora_config.json` (a base pipeline, or a plain LoRA)."""
    local = Path(path_or_repo).expanduser()
    if local.exists():  # a local folder, or a weights file
        return local if DPLoRAConfig.is_adapter_folder(local) else None
    hub_kwargs = {key: hub_kwargs[key] for key in _HUB_KWARGS if key in hub_kwargs}
    try:
        config_file = hf_hub_download(path_or_repo, ADAPTER_CONFIG_NAME, **hub_kwargs)
    except (EntryNotFoundError, RepositoryNotFoundError, HFValidationError):
        return None
    config = DPLoRAConfig.from_pretrained(Path(config_file).parent)
    patterns = [ADAPTER_CONFIG_NAME, config.lora_weights]
    for folder in (config.class_embedder, config.class_rows):
        if folder:
            patterns.append(f"{folder}/*")
    return Path(snapshot_download(path_or_repo, allow_patterns=patterns, **hub_kwargs))


def _local_base(base: str, adapter: Path) -> Path | None:
    """The base pipeline folder an adapter records: as written (absolute, or relative to the working directory),
    else relative to the adapter folder or a folder above it (where training ran); `None` if there is none."""
    path = Path(base).expanduser()
    adapter = adapter.resolve()
    for candidate in (path, *(folder / path for folder in (adapter, *adapter.parents))):
        if (candidate / "model_index.json").is_file():
            return candidate
    return None


def _shorten(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > _SHOWN else shown


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """The diffusers scheduler class called ``name``; ``ValueError`` naming the choices if there is none."""
    import diffusers

    found = getattr(diffusers, name, None)
    if isinstance(found, type) and issubclass(found, SchedulerMixin):
        return found
    known = sorted(scheduler.name for scheduler in KarrasDiffusionSchedulers)  # diffusers' interchangeable ones
    raise ValueError(f"{name!r} is not a diffusers scheduler; the DDIM-compatible ones are {', '.join(known)}.")


class DPLDMPipeline(DiffusionPipeline, LoraBaseMixin):
    r"""Latent diffusion sampling for the bases and DP-LoRA adapters of dp-diffusers.

    Components:
        vae ([`AutoencoderKL`] or [`VQModel`]): decodes latents to images.
        unet ([`UNet2DConditionModel`], [`UNet2DModel`] or [`DiTTransformer2DModel`]): the latent denoiser (for a
            DiT base its transformer: one component name, and one LoRA key prefix, for every base family).
        scheduler ([`SchedulerMixin`]): DDIM by default; any diffusers scheduler can be swapped in.
        class_embedder ([`ClassEmbedder`], optional): class id -> cross-attention context.
        id2label (`dict[int, str]`, optional): class names, as in [`DiTPipeline`].
        text_encoder ([`~transformers.CLIPTextModel`], optional) and tokenizer ([`~transformers.CLIPTokenizer`],
            optional): a Stable Diffusion base's frozen text encoder; with them the pipeline is text-to-image, and
            samples through [`text_pipeline`], diffusers' own `StableDiffusionPipeline` over the same modules.

    LoRA adapters go into the UNet only: [`load_lora_weights`] plus diffusers' `set_adapters`, `fuse_lora`,
    `unfuse_lora`, `unload_lora_weights`, `get_active_adapters`, `delete_adapters`, `disable_lora`, ...
    """

    model_cpu_offload_seq = "text_encoder->class_embedder->unet->vae"
    _optional_components = ["class_embedder", "text_encoder", "tokenizer"]
    _lora_loadable_modules = ["unet"]
    unet_name = "unet"

    def __init__(
        self,
        vae: AutoencoderKL | VQModel,
        unet: UNet2DConditionModel | UNet2DModel,
        scheduler: SchedulerMixin,
        class_embedder: ClassEmbedder | None = None,
        id2label: dict | None = None,
        text_encoder=None,
        tokenizer=None,
    ):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, class_embedder=class_embedder,
                              text_encoder=text_encoder, tokenizer=tokenizer)  # fmt: skip
        self._set_id2label(id2label)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # CPU copies of the adapted layers' weights before `fuse_lora`, put back exactly by `unfuse_lora`
        self._unfused_weights: dict[str, dict[str, torch.Tensor]] = {}
        #: a DiT adapter's rows for classes its base lacks (``DiTClassRows``), attached to the transformer
        self.class_rows: DiTClassRows | None = None
        # (class_embedder, id2label) of the base while an adapter's class embedding replaces them
        self._base_class_conditioning: tuple[ClassEmbedder | None, dict | None] | None = None
        #: the base family it was loaded as (dp_diffusers.families); set by from_pretrained
        self.family: type[BaseFamily] = DPLDMFamily

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
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DPLDMPipeline:
        r"""Load a base pipeline, or a DP-LoRA adapter on top of the base it was trained on.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A folder or Hub repo id. If it holds `dp_lora_config.json` (the output folder of
                `train_dp_lora.py`), only the adapter's files are downloaded, the base model named there is loaded
                (a local folder, looked up as written, then relative to the adapter folder and the folders above
                it; a Hub id otherwise) and the adapter is applied with [`load_lora_weights`]. Anything else is a
                base of a supported family (`dp_diffusers.families`: this pipeline's own layout, diffusers'
                `LDMPipeline`, `DiTPipeline` or `StableDiffusionPipeline`), loaded by that family's diffusers
                pipeline class.
            kwargs:
                Passed to [`~DiffusionPipeline.from_pretrained`]. For an adapter, `revision` is the adapter repo's;
                the base is loaded at the revision the adapter records.
        """
        adapter = _adapter_folder(str(pretrained_model_name_or_path), **kwargs)
        if adapter is None:
            return cls._from_base(pretrained_model_name_or_path, **kwargs)
        config = DPLoRAConfig.from_pretrained(adapter)
        base = config.base_model
        local_base = _local_base(base, adapter)
        base_kwargs = {**kwargs, "revision": config.revision}
        try:
            pipe = cls._from_base(local_base or base, **base_kwargs)
        except (OSError, ValueError) as err:
            if local_base is not None or isinstance(err, UnsupportedBaseError):
                raise
            raise OSError(
                f"The adapter {str(pretrained_model_name_or_path)!r} was trained on the base model {base!r}, found "
                "neither as a local folder (as written, or relative to the adapter folder or a folder above it) nor "
                f"on the Hub: {err}"
            ) from err
        pipe.load_lora_weights(adapter)
        return pipe

    @classmethod
    def _from_base(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DPLDMPipeline:
        """A base of any supported family (``dp_diffusers.families``), loaded by its own diffusers pipeline class."""
        family = base_family(pretrained_model_name_or_path, **kwargs)
        components = family.components(pretrained_model_name_or_path, **kwargs)
        if components is None:  # DPLDMPipeline's own layout
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        else:
            pipe = cls(**components)
            pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        pipe.family = family
        return pipe

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor], **kwargs):
        r"""LoRA weights, network alphas (and metadata with `return_lora_metadata=True`) of a folder, Hub repo or
        state dict: see [`~loaders.StableDiffusionLoraLoaderMixin.lora_state_dict`], whose formats this reads."""
        return StableDiffusionLoraLoaderMixin.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        weight_name: str | None = None,
        **kwargs,
    ) -> None:
        r"""Load a LoRA adapter into the UNet, as diffusers' `load_lora_weights` does for the UNet alone.

        A DP-LoRA adapter folder or repo (with `dp_lora_config.json`) that trained a class embedding also replaces
        the pipeline's `class_embedder` and class names (`id2label`); [`unload_lora_weights`] puts the base's back.
        A base [`UNet2DModel`] is given diffusers' PEFT adapter API first ([`UNet2DModelWithLoRA`], same weights).

        Args:
            pretrained_model_name_or_path_or_dict (`str`, `os.PathLike` or `dict`):
                An adapter folder or Hub repo id, or a state dict with `unet.`-prefixed LoRA keys.
            adapter_name (`str`, *optional*):
                Name to refer to the adapter with (`set_adapters`, ...); `default_<i>` if not given.
            weight_name (`str`, *optional*):
                The weights file; by default the one `dp_lora_config.json` names, else diffusers' guess.
            kwargs:
                Hub options (`cache_dir`, `force_download`, `local_files_only`, `token`, `revision`, `subfolder`),
                `low_cpu_mem_usage`, and `metadata`: the `LoraConfig` dict of a state dict (keys prefixed `unet.`,
                as in a weights file's `lora_adapter_metadata`), without which rank and alpha are guessed.

        Raises:
            `ValueError`: naming the adapter and the base model, when the adapter does not fit the base (LoRA
            weights for modules the base lacks or of other shapes, another class embedding size or other classes).
        """
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        metadata = kwargs.pop("metadata", None)
        source = pretrained_model_name_or_path_or_dict
        config, embedder, rows = None, None, None
        if isinstance(source, dict):
            name = "given as a state dict"
        else:
            name = str(source)
            folder = _adapter_folder(name, **kwargs)
            if folder is not None:
                config, source = DPLoRAConfig.from_pretrained(folder), str(folder)
                weight_name = weight_name or config.lora_weights
                if config.class_embedder:
                    embedder = ClassEmbedder.from_pretrained(folder / config.class_embedder)
                if config.class_rows:
                    rows = DiTClassRows.from_pretrained(folder / config.class_rows)
        state_dict, network_alphas, file_metadata = self.lora_state_dict(
            source, weight_name=weight_name, return_lora_metadata=True, **kwargs
        )
        metadata = metadata or file_metadata
        # One naming for every key: files written before lora_state_dict saved peft names mix diffusers' old
        # attention names with peft names, and `load_lora_adapter` (one format, guessed from the first key)
        # would silently skip the part in the other format.
        state_dict = convert_unet_state_dict_to_peft(state_dict)
        id2label = config.id2label if config is not None else None

        problems = self._adapter_mismatches(state_dict, embedder, id2label, rows)
        base = str(self.name_or_path or f"this pipeline's {type(self.unet).__name__}")
        if problems:
            raise ValueError(f"The adapter {name!r} does not fit the base model {base!r}: {'; '.join(problems)}.")
        self.ensure_peft_unet()
        try:
            self.unet.load_lora_adapter(
                state_dict,
                prefix=self.unet_name,
                network_alphas=network_alphas,
                metadata=metadata,
                adapter_name=adapter_name,
                _pipeline=self,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"The adapter {name!r} does not fit the base model {base!r}: {err}") from err

        if embedder is not None or rows is not None or id2label:
            if self._base_class_conditioning is None:
                self._base_class_conditioning = (self.class_embedder, self.config.id2label)
            if embedder is not None:
                self.register_modules(class_embedder=embedder.to(device=self.unet.device, dtype=self.unet.dtype))
            if rows is not None:
                self.class_rows = rows.to(device=self.unet.device, dtype=self.unet.dtype)
                self.class_rows.attach(self.unet)
            self._set_id2label(id2label or self.config.id2label)

    def ensure_peft_unet(self) -> None:
        r"""Give the denoiser diffusers' PEFT adapter API (`add_adapter`, `load_lora_adapter`, ...), as LoRA
        training and [`load_lora_weights`] need: a base [`UNet2DModel`] becomes a [`UNet2DModelWithLoRA`], a
        [`DiTTransformer2DModel`] a [`DiTTransformer2DModelWithLoRA`], same weights.

        diffusers 0.42's `UNet2DModel` and `DiTTransformer2DModel` lack that API. The `...WithLoRA` classes only add
        the mixin (no state), so the
        class is switched in place: weights, device, dtype and hooks stay as they are; registering the UNet again
        records the new class for `save_pretrained`.

        Raises:
            `ValueError`: for a UNet of another class without diffusers' `PeftAdapterMixin`.
        """
        with_lora = {UNet2DModel: UNet2DModelWithLoRA, DiTTransformer2DModel: DiTTransformer2DModelWithLoRA}
        if type(self.unet) in with_lora:
            self.unet.__class__ = with_lora[type(self.unet)]
            self.register_modules(unet=self.unet)
        if not isinstance(self.unet, PeftAdapterMixin):
            raise ValueError(f"LoRA adapters need a UNet with diffusers' PeftAdapterMixin, not {type(self.unet)}.")

    def _adapter_mismatches(
        self,
        state_dict: dict[str, torch.Tensor],
        embedder: ClassEmbedder | None,
        id2label: dict | None,
        rows: DiTClassRows | None = None,
    ) -> list[str]:
        """What keeps an adapter from fitting this pipeline (empty if it fits). peft would skip LoRA weights of
        modules the base lacks with a warning; here they are an error, checked before anything is changed."""
        prefix = f"{self.unet_name}."
        lora = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        if not lora:
            return [f"it holds no LoRA weights for the UNet (keys starting with {prefix!r})"]
        modules = dict(self.unet.named_modules())
        missing, reshaped = set(), {}
        for key, weight in lora.items():
            if not key.endswith((".lora_A.weight", ".lora_B.weight")):
                continue
            module_name, part = key.removesuffix(".weight").rsplit(".lora_", 1)
            module = modules.get(module_name)
            base_weight = getattr(getattr(module, "base_layer", module), "weight", None)
            if base_weight is None:
                missing.add(module_name)
            elif (part == "A" and weight.shape[1] != base_weight.shape[1]) or (
                part == "B" and weight.shape[0] != base_weight.shape[0]
            ):
                reshaped.setdefault(module_name, f"LoRA {part} {tuple(weight.shape)}, base {tuple(base_weight.shape)}")
        problems = []
        if missing:
            problems.append(f"the base has no layer for its LoRA weights of {_shorten(sorted(missing))}")
        if reshaped:
            first = min(reshaped)
            problems.append(
                f"its LoRA weights do not match the shapes of {_shorten(sorted(reshaped))} ({first}: {reshaped[first]})"
            )
        cross_attention_dim = getattr(self.unet.config, "cross_attention_dim", None)
        if embedder is not None and embedder.config.embedding_dim != cross_attention_dim:
            problems.append(
                f"its class embedding has {embedder.config.embedding_dim} dimensions, the base's cross-attention "
                f"takes {cross_attention_dim}"
            )
        if rows is not None:
            null = getattr(self.unet.config, "num_embeds_ada_norm", None)
            table = next((m.embedding_table for m in self.unet.modules() if hasattr(m, "embedding_table")), None)
            if table is None or rows.config.first_id != null + 1 or rows.config.embedding_dim != table.embedding_dim:
                problems.append("its class rows are for a DiT with another label table")
        if id2label and embedder is None and rows is None and id2label != (self.config.id2label or id2label):
            problems.append(f"its classes {id2label} are not the base's {dict(self.config.id2label)}")
        return problems

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        r"""Merge the active LoRA adapters into the UNet's weights (faster sampling), as diffusers does.

        Args:
            components (`list[str]`, *optional*): only `["unet"]` (the default) has adapters.
            lora_scale (`float`, defaults to 1.0): scale of the merged adapters.
            safe_fusing (`bool`, defaults to `False`): check the merged weights for NaNs first.
            adapter_names (`list[str]`, *optional*): the adapters to merge; all active ones by default.

        A CPU copy of the adapted layers' weights is kept, so [`unfuse_lora`] restores them bit for bit (peft
        alone subtracts the merged delta again, which is exact only up to float rounding).
        """
        for name, module in self.unet.named_modules():
            if isinstance(module, BaseTunerLayer) and not module.merged and name not in self._unfused_weights:
                weights = module.get_base_layer().state_dict()
                self._unfused_weights[name] = {key: value.to("cpu", copy=True) for key, value in weights.items()}
        super().fuse_lora(
            components=components or [self.unet_name],
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        r"""Undo [`fuse_lora`]: the UNet's weights are exactly those before fusing; the adapters stay loaded.

        Args:
            components (`list[str]`, *optional*): only `["unet"]` (the default) has adapters.
        """
        super().unfuse_lora(components=components or [self.unet_name], **kwargs)
        modules = dict(self.unet.named_modules())
        for name, weights in self._unfused_weights.items():
            modules[name].get_base_layer().load_state_dict(weights)
        self._unfused_weights = {}

    def unload_lora_weights(self) -> None:
        r"""Remove the LoRA layers from the UNet.

        Fused adapters stay in the weights (diffusers' way to bake an adapter in before [`save_pretrained`]), with
        the class embedding and class names of the adapter. Otherwise the pipeline is the base again, including
        its own class embedding and class names.
        """
        fused = any(isinstance(m, BaseTunerLayer) and m.merged for m in self.unet.modules())
        if isinstance(self.unet, PeftAdapterMixin):
            super().unload_lora_weights()
        if self._base_class_conditioning is not None and not fused:
            class_embedder, id2label = self._base_class_conditioning
            self.register_modules(class_embedder=class_embedder)
            self._set_id2label(id2label)
            if self.class_rows is not None:
                DiTClassRows.detach(self.unet)
                self.class_rows = None
        self._base_class_conditioning = None
        self._unfused_weights = {}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        r"""Save the pipeline as [`~DiffusionPipeline.save_pretrained`] does, refusing a UNet with LoRA layers
        (they would be written into its weights file and not load back): call [`unload_lora_weights`] first,
        after [`fuse_lora`] to keep the adapter in the weights. An adapter itself is its training output folder.
        """
        if any(isinstance(module, BaseTunerLayer) for module in self.unet.modules()):
            raise ValueError(
                "The UNet has LoRA layers: call `fuse_lora()` then `unload_lora_weights()` to save the fine-tuned "
                "model, or `unload_lora_weights()` alone to save the base."
            )
        super().save_pretrained(save_directory, **kwargs)

    @property
    def base_family(self) -> str:
        """The name of the base family (``dp_diffusers.families``) this pipeline was loaded as."""
        return self.family.name

    @property
    def num_classes(self) -> int | None:
        return LatentDenoiser(self.unet, self.class_embedder, self.class_rows).num_classes

    @property
    def is_text_to_image(self) -> bool:
        """Whether the model is conditioned on prompts (a Stable Diffusion base and its adapters)."""
        return self.text_encoder is not None

    def text_pipeline(self) -> StableDiffusionPipeline:
        """diffusers' ``StableDiffusionPipeline`` over this pipeline's own modules (same weights, same loaded LoRA
        adapters, no safety checker): prompts are encoded and sampled exactly as diffusers does it."""
        if not self.is_text_to_image:
            raise ValueError("This model has no text encoder: it is not text-to-image.")
        view = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=self.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)  # fmt: skip
        view.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return view

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], device: torch.device | None = None) -> torch.Tensor:
        """The (B, L, D) text context of ``prompt`` (``""``: the empty prompt, the null of classifier-free
        guidance), as ``StableDiffusionPipeline`` encodes a prompt for sampling: what training conditions on."""
        context, _ = self.text_pipeline().encode_prompt(
            prompt, device or self._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return context

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

    def set_scheduler(self, name: str) -> None:
        """Swap in the diffusers scheduler class ``name`` (e.g. ``"DPMSolverMultistepScheduler"``), built from
        the current one's config: the same trained noise schedule, another sampler (diffusers' ``from_config``
        swap, by name so that command lines can choose it)."""
        self.scheduler = scheduler_class(name).from_config(self.scheduler.config)

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
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
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
            prompt, negative_prompt: for text-to-image models (Stable Diffusion bases), sampled by
                [`text_pipeline`] with the other arguments: the images of diffusers' `StableDiffusionPipeline`.
        """
        if self.is_text_to_image or prompt is not None:
            if not self.is_text_to_image or prompt is None or class_labels is not None:
                kind = "text-to-image: pass prompt" if self.is_text_to_image else "not text-to-image: pass no prompt"
                raise ValueError(f"This model is {kind}.")
            out = self.text_pipeline()(
                prompt=prompt, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta, generator=generator,
                latents=latents, output_type=output_type,
            )  # fmt: skip
            return ImagePipelineOutput(images=out.images) if return_dict else (out.images,)
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        self._check_class_labels(class_labels)
        if class_labels is not None:
            labels = torch.tensor(class_labels, device=self._execution_device).repeat_interleave(num_images_per_prompt)
            n = len(labels)
        else:
            labels = None
            n = (batch_size or 1) * num_images_per_prompt
        denoiser = LatentDenoiser(self.unet, self.class_embedder, self.class_rows, input_dtype=self.unet.dtype)
        # CFG needs a null class (a ClassEmbedder's, DiT's); other bases sample without guidance.
        null_class = denoiser.null_class_id
        use_cfg = guidance_scale > 1.0 and labels is not None and null_class is not None

        shape = (n, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        if use_cfg:
            null = torch.full_like(labels, null_class)
            labels_in = torch.cat([null, labels])
        else:
            labels_in = labels
        step_kwargs = self._scheduler_step_kwargs(eta, generator)
        # the class context does not change across steps: embed it once, as the plain diffusers loop does
        conditioning = denoiser.conditioning(labels_in)

        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if use_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = t.expand(model_input.shape[0]) if torch.is_tensor(t) else torch.full((model_input.shape[0],), t)
            noise_pred = denoiser.denoise(model_input, timesteps.to(model_input.device), conditioning)
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
