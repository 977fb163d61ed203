"""Loading DP-LoRA adapters into ``DPLDMPipeline``: the loader mixin (as diffusers keeps LoRA loading in
``diffusers.loaders``).

An adapter is a ``train_dp_lora.py`` output folder or Hub repo: ``dp_lora_config.json`` (the base it goes onto),
the LoRA weights in the base pipeline's own diffusers format, and a trained class embedding or DiT class rows, if
any. :meth:`DPLoRALoaderMixin.from_pretrained` loads the base the adapter names and applies it;
:meth:`~DPLoRALoaderMixin.load_lora_weights` applies one to a loaded base, refusing one that does not fit.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from diffusers.loaders.lora_base import LoraBaseMixin
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.utils import convert_unet_state_dict_to_peft
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError
from peft.tuners.tuners_utils import BaseTunerLayer

from .adapter_config import DPLoRAConfig
from .constants import ADAPTER_CONFIG_NAME
from .families import ConditionOptions, UnsupportedBaseError
from .models.class_embedder import ClassEmbedder
from .models.dit import DiTClassRows, DiTTransformer2DModelWithLoRA
from .models.unet_2d import UNet2DModelWithLoRA

# `from_pretrained` / `load_lora_weights` kwargs that locate files on the Hub (they apply to the adapter repo).
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")
_SHOWN = 3  # offending module names quoted in a mismatch error


def adapter_folder(path_or_repo: str, **hub_kwargs) -> Path | None:
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


@dataclass
class _Adapter:
    """A LoRA adapter as read, before it is checked against a pipeline: ``name`` (for messages), its weights in
    peft's naming and, for a DP-LoRA adapter, its config, trained class embedding and DiT class rows."""

    name: str
    state_dict: dict[str, torch.Tensor]
    network_alphas: dict | None
    metadata: dict | None
    config: DPLoRAConfig | None
    embedder: ClassEmbedder | None
    rows: DiTClassRows | None

    @property
    def id2label(self) -> dict | None:
        return self.config.id2label if self.config is not None else None


def _shorten(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > _SHOWN else shown


class DPLoRALoaderMixin(LoraBaseMixin):
    """DP-LoRA adapters for ``DPLDMPipeline``: in its denoiser (``unet``, whatever its kind) only, read and checked
    in the base family's own LoRA format; diffusers' ``set_adapters``, ``get_active_adapters``, ``delete_adapters``,
    ``disable_lora`` ... work as for any diffusers pipeline."""

    _lora_loadable_modules = ["unet"]
    unet_name = "unet"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        r"""Load a base pipeline, or a DP-LoRA adapter on top of the base it was trained on.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A folder or Hub repo id. If it holds `dp_lora_config.json` (the output folder of
                `train_dp_lora.py`), only the adapter's files are downloaded, the base model named there is loaded
                (a local folder, looked up as written, then relative to the adapter folder and the folders above
                it; a Hub id otherwise) and the adapter is applied with [`load_lora_weights`]. Anything else is a
                base of a supported family (`dp_diffusers.families`), loaded by that family's diffusers pipeline.
            kwargs:
                Passed to [`~DiffusionPipeline.from_pretrained`]. For an adapter, `revision` is the adapter repo's;
                the base is loaded at the revision the adapter records.
        """
        adapter = adapter_folder(str(pretrained_model_name_or_path), **kwargs)
        if adapter is None:
            return cls._from_base(pretrained_model_name_or_path, **kwargs)
        config = DPLoRAConfig.from_pretrained(adapter)
        base = config.base_model
        local_base = _local_base(base, adapter)
        try:
            pipe = cls._from_base(local_base or base, **{**kwargs, "revision": config.revision})
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

    def lora_state_dict(self, pretrained_model_name_or_path_or_dict, **kwargs):
        r"""(LoRA weights, network alphas or `None`, metadata) of a folder, Hub repo or state dict, read by the base
        family's own diffusers loader (e.g. `StableDiffusionXLPipeline.lora_state_dict`)."""
        loader = self.family.lora_loader()
        if "return_alphas" in inspect.signature(loader.lora_state_dict).parameters:
            kwargs["return_alphas"] = True
        out = loader.lora_state_dict(pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs)
        return (out[0], None, out[1]) if len(out) == 2 else out

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        weight_name: str | None = None,
        **kwargs,
    ) -> None:
        r"""Load a LoRA adapter into the denoiser, as diffusers' `load_lora_weights` does for it alone.

        A DP-LoRA adapter folder or repo (with `dp_lora_config.json`) that trained a class embedding also replaces
        the pipeline's `class_embedder` and class names (`id2label`); [`unload_lora_weights`] puts the base's back.
        A base [`UNet2DModel`] or [`DiTTransformer2DModel`] is given diffusers' PEFT adapter API first (same weights).

        Args:
            pretrained_model_name_or_path_or_dict (`str`, `os.PathLike` or `dict`):
                An adapter folder or Hub repo id, or a state dict with LoRA keys prefixed by the family's denoiser
                name (`unet.`, `transformer.`).
            adapter_name (`str`, *optional*):
                Name to refer to the adapter with (`set_adapters`, ...); `default_<i>` if not given.
            weight_name (`str`, *optional*):
                The weights file; by default the one `dp_lora_config.json` names, else diffusers' guess.
            kwargs:
                Hub options (`cache_dir`, `force_download`, `local_files_only`, `token`, `revision`, `subfolder`),
                `low_cpu_mem_usage`, and `metadata`: the `LoraConfig` dict of a state dict, without which rank and
                alpha are guessed.

        Raises:
            `ValueError`: naming the adapter and the base model, when the adapter does not fit the base (LoRA
            weights for modules the base lacks or of other shapes, another class embedding size or other classes).
        """
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        adapter = self._read_adapter(pretrained_model_name_or_path_or_dict, weight_name, **kwargs)
        problems = self._adapter_mismatches(adapter)
        if problems:
            raise self._misfit(adapter, "; ".join(problems) + ".")
        self.ensure_peft_unet()
        try:
            self.unet.load_lora_adapter(
                adapter.state_dict, prefix=self.family.lora_prefix, network_alphas=adapter.network_alphas,
                metadata=adapter.metadata, adapter_name=adapter_name, _pipeline=self,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )  # fmt: skip
        except (RuntimeError, ValueError) as err:
            raise self._misfit(adapter, str(err)) from err
        self._apply_adapter_conditioning(adapter)

    def _read_adapter(self, source: str | os.PathLike | dict[str, torch.Tensor], weight_name: str | None,
                      metadata: dict | None = None, **kwargs) -> _Adapter:  # fmt: skip
        """Read an adapter folder, Hub repo or state dict (:meth:`load_lora_weights`' arguments) without changing
        the pipeline: its LoRA weights in peft's naming and, for a DP-LoRA adapter, its config, class embedding and
        class rows."""
        name = "given as a state dict" if isinstance(source, dict) else str(source)
        folder = None if isinstance(source, dict) else adapter_folder(name, **kwargs)
        config = embedder = rows = None
        if folder is not None:
            config, source = DPLoRAConfig.from_pretrained(folder), str(folder)
            weight_name = weight_name or config.lora_weights
            embedder = ClassEmbedder.from_pretrained(folder / config.class_embedder) if config.class_embedder else None
            rows = DiTClassRows.from_pretrained(folder / config.class_rows) if config.class_rows else None
        state_dict, network_alphas, file_metadata = self.lora_state_dict(source, weight_name=weight_name, **kwargs)
        # One naming for every key: files written before lora_state_dict saved peft names mix diffusers' old
        # attention names with peft names, and `load_lora_adapter` (one format, guessed from the first key)
        # would silently skip the part in the other format.
        state_dict = convert_unet_state_dict_to_peft(state_dict)
        return _Adapter(name, state_dict, network_alphas, metadata or file_metadata, config, embedder, rows)

    def _misfit(self, adapter: _Adapter, reason: str) -> ValueError:
        base = str(self.name_or_path or f"this pipeline's {type(self.unet).__name__}")
        return ValueError(f"The adapter {adapter.name!r} does not fit the base model {base!r}: {reason}")

    def _apply_adapter_conditioning(self, adapter: _Adapter) -> None:
        """After the LoRA weights: how a DP-LoRA adapter was trained (resolution, T5's length: for sampling alike),
        and its class embedding, class rows and class names, the base's kept for :meth:`unload_lora_weights`."""
        if adapter.config is not None:
            self.condition_options = adapter.config.condition_options()
            self.adapter_config = adapter.config
        if adapter.embedder is None and adapter.rows is None and not adapter.id2label:
            return
        if self._base_class_conditioning is None:
            self._base_class_conditioning = (self.class_embedder, self.config.id2label)
        if adapter.embedder is not None:
            self.register_modules(class_embedder=adapter.embedder.to(device=self.unet.device, dtype=self.unet.dtype))
        if adapter.rows is not None:
            self.class_rows = adapter.rows.to(device=self.unet.device, dtype=self.unet.dtype)
            self.class_rows.attach(self.unet)
        self._set_id2label(adapter.id2label or self.config.id2label)

    def ensure_peft_unet(self) -> None:
        r"""Give the denoiser diffusers' PEFT adapter API (`add_adapter`, `load_lora_adapter`, ...), as LoRA
        training and [`load_lora_weights`] need: a base [`UNet2DModel`] becomes a [`UNet2DModelWithLoRA`], a
        [`DiTTransformer2DModel`] a [`DiTTransformer2DModelWithLoRA`], same weights.

        diffusers 0.42's `UNet2DModel` and `DiTTransformer2DModel` lack that API. The `...WithLoRA` classes only add
        the mixin (no state), so the class is switched in place: weights, device, dtype and hooks stay as they are;
        registering the denoiser again records the new class for `save_pretrained`.

        Raises:
            `ValueError`: for a denoiser of another class without diffusers' `PeftAdapterMixin`.
        """
        with_lora = {UNet2DModel: UNet2DModelWithLoRA, DiTTransformer2DModel: DiTTransformer2DModelWithLoRA}
        if type(self.unet) in with_lora:
            self.unet.__class__ = with_lora[type(self.unet)]
            self.register_modules(unet=self.unet)
        if not isinstance(self.unet, PeftAdapterMixin):
            raise ValueError(f"LoRA adapters need a denoiser with diffusers' PeftAdapterMixin, not {type(self.unet)}.")

    def _adapter_mismatches(self, adapter: _Adapter) -> list[str]:
        """What keeps an adapter from fitting this pipeline (empty if it fits). peft would skip LoRA weights of
        modules the base lacks with a warning; here they are an error, checked before anything is changed."""
        embedder, id2label, rows = adapter.embedder, adapter.id2label, adapter.rows
        prefix = f"{self.family.lora_prefix}."
        lora = {k.removeprefix(prefix): v for k, v in adapter.state_dict.items() if k.startswith(prefix)}
        if not lora:
            return [f"it holds no LoRA weights for the {type(self.unet).__name__} (keys starting with {prefix!r})"]
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
        r"""Merge the active LoRA adapters into the denoiser's weights (faster sampling), as diffusers does.

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
        super().fuse_lora(components=components or [self.unet_name], lora_scale=lora_scale, safe_fusing=safe_fusing,
                          adapter_names=adapter_names, **kwargs)  # fmt: skip

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        r"""Undo [`fuse_lora`]: the denoiser's weights are exactly those before fusing; the adapters stay loaded.

        Args:
            components (`list[str]`, *optional*): only `["unet"]` (the default) has adapters.
        """
        super().unfuse_lora(components=components or [self.unet_name], **kwargs)
        modules = dict(self.unet.named_modules())
        for name, weights in self._unfused_weights.items():
            modules[name].get_base_layer().load_state_dict(weights)
        self._unfused_weights = {}

    def unload_lora_weights(self) -> None:
        r"""Remove the LoRA layers from the denoiser.

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
        if not fused:
            self.condition_options = ConditionOptions()
            self.adapter_config = None

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        r"""Save the pipeline as [`~DiffusionPipeline.save_pretrained`] does, refusing a denoiser with LoRA layers
        (they would be written into its weights file and not load back): call [`unload_lora_weights`] first,
        after [`fuse_lora`] to keep the adapter in the weights. An adapter itself is its training output folder.
        """
        if any(isinstance(module, BaseTunerLayer) for module in self.unet.modules()):
            raise ValueError(
                "The UNet has LoRA layers: call `fuse_lora()` then `unload_lora_weights()` to save the fine-tuned "
                "model, or `unload_lora_weights()` alone to save the base."
            )
        super().save_pretrained(save_directory, **kwargs)
