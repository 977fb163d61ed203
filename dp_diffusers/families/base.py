"""What a public base family is: one small class per layout of base pipeline folder, owning its whole contract.

A family is chosen from the base's ``model_index.json`` (``_class_name``), never guessed from its weights, and owns:

* **loading** (:meth:`BaseFamily.components`): the base's own diffusers pipeline class loads it, so a base loads
  exactly as diffusers loads it; the family names which components are the autoencoder, the denoiser (``unet``,
  whatever its kind), the scheduler and the frozen public encoders;
* **each example's condition** (:meth:`~BaseFamily.prepare_examples`, :meth:`~BaseFamily.encode_conditions`):
  what the frozen public encoders make of its label or caption, named tensors (a class id; a caption's context,
  pooled embeddings, time ids, ...), and the "no condition" of label or caption
  dropout (:meth:`~BaseFamily.null_condition`);
* **the training objective** (:meth:`~BaseFamily.objective`), from the base's scheduler config
  (``dp_diffusers.models.objectives``, one module all families share);
* **the denoiser call** (:meth:`~BaseFamily.predict`): how the conditions enter the backbone;
* **sampling** (:meth:`~BaseFamily.sampling_pipeline`): the base's own diffusers pipeline over the same modules
  (text-to-image families), or ``DPLDMPipeline``'s own loop (class-conditional and unconditional ones);
* **its LoRA**: target presets, the key prefix of the adapter file, and saving through the base pipeline's own
  ``save_lora_weights``, so the adapter is that pipeline's standard LoRA.

Families of one conditioning share a base class (``ClassFamily``, ``UnconditionalFamily``: ``class_conditional.py``;
``TextFamily``: ``text.py``); a new family is one such class, registered with :func:`register_family`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from ..constants import LORA_WEIGHT_NAME

if TYPE_CHECKING:
    from datasets import Dataset

    from ..models.denoiser import LatentDenoiser
    from ..models.objectives import Objective


class UnsupportedBaseError(ValueError):
    """The base model is not a latent diffusion pipeline of a supported family."""


@dataclass
class ConditionOptions:
    """Where each example's condition comes from (the data flags of ``train_dp_lora.py``)."""

    #: as given; ``None``: ``label`` when the data has it; ``""``: unlabelled
    label_column: str | None = None
    #: text families: the captions' column (``None``: ``text``, unless a template is given)
    caption_column: str | None = None
    #: text families: captions made from labels, e.g. ``"a photo of a {label}"``
    caption_template: str | None = None
    #: text families: public prompts for samples and the model card (never training captions)
    validation_prompts: list[str] | None = None
    #: class families: learn rows for classes the base lacks (a class embedding, DiT class rows)
    train_class_embedding: bool = False
    #: T5 families (SD3, FLUX): the T5 tokens each caption is encoded to (``None``: the family's default)
    max_sequence_length: int | None = None
    #: guidance-distilled FLUX bases: the guidance value the transformer is given in training (``None``: default)
    guidance_scale: float | None = None
    #: class families: the public label set (``--class_names``, or an embedded data set's fixed names); ``None``:
    #: the base's classes. It is published with the adapter, so it never comes from the private rows unless ...
    class_names: list[str] | None = None
    #: ... ``--class_names_from_data`` takes it from them: released outside epsilon (the model card says so)
    class_names_from_data: bool = False


@dataclass
class ObjectiveOptions:
    """Flow-matching settings (diffusers' SD3 / FLUX script flags); ``None``: the family's default."""

    weighting_scheme: str | None = None
    logit_mean: float | None = None
    logit_std: float | None = None
    mode_scale: float | None = None
    precondition_outputs: bool | None = None


@dataclass
class PrivateExamples:
    """Examples as a family sees them before encoding: a data set's images at ``resolution`` (center-cropped) and,
    validated, their labels (model class ids) or captions; audit canaries (``num_canaries`` square images at
    ``resolution``) come after the data set's rows. Captions are private data: never logged, never written."""

    dataset: Dataset
    image_column: str
    resolution: int
    #: the public label set (class families): the base's classes, ``--class_names``, or with
    #: ``--class_names_from_data`` the data's names (then ``names_from_data``); and the model's class names by id
    names: list[str] | None = None
    id2label: dict[int, str] | None = None
    #: whether ``names`` (so ``id2label``'s new names and which classes occur) came from the private data: a release
    #: outside epsilon
    names_from_data: bool = False
    #: data class name (or a DiT synonym) -> model class id
    class_ids: dict[str, int] | None = None
    #: (N,) model class ids, canaries' included (class families)
    labels: torch.Tensor | None = None
    #: N captions, canaries' included (text families)
    captions: list[str] | None = field(default=None, repr=False)
    #: (num_canaries, C, resolution, resolution) audit canaries in [-1, 1], trained after the data set's rows
    canary_pixels: torch.Tensor | None = field(default=None, repr=False)
    #: where the conditions come from and how they are encoded
    options: ConditionOptions = field(default_factory=ConditionOptions)
    #: unit-level DP: the example indices of each privacy unit (canary units included); ``None``: example-level
    units: list[list[int]] | None = field(default=None, repr=False)

    @property
    def num_units(self) -> int:
        """Privacy units: people with a unit column, examples otherwise."""
        return len(self) if self.units is None else len(self.units)

    @property
    def num_canaries(self) -> int:
        return 0 if self.canary_pixels is None else len(self.canary_pixels)

    def __len__(self) -> int:
        return len(self.dataset) + self.num_canaries


class BaseFamily:
    """One layout of public base. Subclasses set the class attributes; the conditioning base classes
    (``ClassFamily``, ``UnconditionalFamily``, ``TextFamily``) implement the rest."""

    #: the family's name, recorded in the adapter config
    name: ClassVar[str]
    #: ``_class_name`` of the base's ``model_index.json``: the diffusers pipeline class that loads and samples it
    pipeline_class_name: ClassVar[str]
    #: how the denoiser is conditioned: "class" (labels), "text" (captions) or "none"
    conditioning: ClassVar[str]
    #: a line for error messages and the README's table
    description: ClassVar[str]
    #: ``--lora_target_modules`` presets: name -> module-name suffixes (peft's ``target_modules``)
    lora_target_presets: ClassVar[dict[str, list[str]]]
    #: the denoiser's component name in the base pipeline, and the key prefix of its LoRA weights
    lora_prefix: ClassVar[str] = "unet"
    #: whether the DP central images (per-class means, or one mean unconditionally) can warm this family up
    supports_central_images: ClassVar[bool] = True
    #: the ``train_dp_lora.py`` flag with the probability of dropping a row's condition to the null condition
    dropout_flag: ClassVar[str] = "label_dropout"
    #: diffusers samplers the family's pipeline also samples correctly with, besides those diffusers declares
    #: compatible with the base's scheduler config (``scheduler.compatibles``)
    extra_schedulers: ClassVar[tuple[str, ...]] = ()
    #: the guidance scale of synthetic data sets (``dp-diffusers generate``, the evaluation's downstream samples);
    #: ``None``: the sampling pipeline's own default, which is chosen for pictures
    synthetic_data_guidance_scale: ClassVar[float | None] = None

    @classmethod
    def pipeline_class(cls) -> type[DiffusionPipeline]:
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    # ---- loading ----

    @classmethod
    def components(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> dict[str, Any] | None:
        """``DPLDMPipeline`` keyword arguments from the base, loaded by the family's diffusers pipeline with
        ``kwargs``; ``None``: the layout is DPLDMPipeline's own."""
        return None

    @classmethod
    def conditioning_of(cls, pipe) -> str:
        """How a loaded pipeline of this family is conditioned (a family may hold conditional and unconditional
        bases)."""
        return cls.conditioning

    @classmethod
    def num_classes(cls, modules) -> int | None:
        """Class ids the model takes (``modules``: a pipeline or a ``LatentDenoiser``); ``None``: not
        class-conditional."""
        return None

    @classmethod
    def null_class_id(cls, modules) -> int | None:
        """The id of "no class" of a class-conditional model; ``None`` if it has none."""
        return None

    @classmethod
    def lora_targets(cls, targets: str, denoiser) -> list[str]:
        """peft ``target_modules`` of ``--lora_target_modules`` (a preset of the family's, or comma-separated
        module names) for this denoiser."""
        from ..lora import resolve_target_modules

        return resolve_target_modules(targets, cls.lora_target_presets)

    @classmethod
    def check_training(cls, pipe, options: ConditionOptions, objective: ObjectiveOptions | None = None) -> None:
        """Raise ``DataError`` for training flags this family cannot use (before anything is written): by default
        the flow-matching and T5 flags of the SD3 / FLUX families, and the caption flags unless it is text-to-image."""
        from ..data import DataError

        flags = {"--max_sequence_length": options.max_sequence_length, "--guidance_scale": options.guidance_scale}
        given = [flag for flag, value in flags.items() if value is not None]
        given += [f"--{name}" for name, value in asdict(objective or ObjectiveOptions()).items() if value is not None]
        if given:
            raise DataError(f"{', '.join(given)}: flags of the flow-matching bases (SD3, FLUX), not of {cls.name}.")
        captions = (options.caption_column, options.caption_template, options.validation_prompts or None)
        if cls.conditioning != "text" and any(flag is not None for flag in captions):
            raise DataError(f"--caption_column / --caption_template / --validation_prompt are for text-to-image bases, "
                            f"not {cls.name}.")  # fmt: skip

    @classmethod
    def scheduler_names(cls, scheduler) -> list[str]:
        """The diffusers samplers (class names, sorted) this family's base can sample with, given its
        ``scheduler``: the ones diffusers declares compatible with that scheduler's config (its ``compatibles``: the
        noise-prediction samplers for a DDPM-style schedule, only flow-matching ones for a flow schedule) and the
        family's ``extra_schedulers``."""
        names = {type(scheduler).__name__, *(compatible.__name__ for compatible in scheduler.compatibles)}
        return sorted(names | set(cls.extra_schedulers))

    @classmethod
    def check_scheduler(cls, scheduler, name: str) -> None:
        """Raise ``ValueError`` naming the usable ones if the sampler ``name`` cannot sample this family's base of
        ``scheduler`` (e.g. an epsilon-prediction sampler on a flow-matching base, which samples noise silently)."""
        usable = cls.scheduler_names(scheduler)
        if name not in usable:
            raise ValueError(f"{name} cannot sample a {cls.name} base (its scheduler is "
                             f"{type(scheduler).__name__}); the samplers it can use: {', '.join(usable)}.")  # fmt: skip

    @classmethod
    def check_resolution(cls, pipe, resolution: int) -> None:
        """Raise ``DataError`` for a training resolution the base cannot take: by default one its autoencoder
        cannot downsample evenly."""
        from ..data import check_resolution

        check_resolution(resolution, pipe.vae)

    # ---- each example's condition ----

    @classmethod
    def prepare_examples(cls, pipe, dataset: Dataset, image_column: str, label_column: str | None,
                         resolution: int, options: ConditionOptions) -> PrivateExamples:  # fmt: skip
        """The examples with their conditions' sources validated (``DataError`` naming the fix otherwise). A class
        family may give the pipeline rows for new classes here (``--train_class_embedding``)."""
        raise NotImplementedError

    @classmethod
    def add_canaries(cls, examples: PrivateExamples, pixels: torch.Tensor, labels: torch.Tensor,
                     captions: list[str]) -> None:  # fmt: skip
        """Append audit canaries: their images and what the family conditions on, their random labels
        (``dp_diffusers.data.make_canaries``) or random-word captions (``canary_captions``)."""
        examples.canary_pixels = pixels

    @classmethod
    def sampling_conditions(cls, pipe, names: list[str], options: ConditionOptions) -> dict[str, list] | None:
        """The pipeline call argument that draws images of each of the data's classes ``names`` (class ids, or
        prompts from the caption template), for the downstream classifier; ``None`` when the model cannot."""
        return None

    @classmethod
    def encode_conditions(cls, pipe, examples: PrivateExamples, cache_dir: str | None = None,
                          dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:  # fmt: skip
        """Named (N, ...) tensors, in the order the encoded data set holds them: what the frozen public encoders
        make of each example's label or caption (a deterministic per-example pre-processing by public models: no
        privacy cost); floating-point ones stored in ``dtype`` (fp16 for a half-precision base)."""
        return {}

    @classmethod
    def null_condition(cls, pipe, options: ConditionOptions | None = None) -> dict[str, torch.Tensor]:
        """The "no condition" of condition dropout and of classifier-free guidance: one (1, ...) row per dropped
        name (names left out are kept, e.g. SDXL's time ids); empty when the family has none."""
        return {}

    # ---- training ----

    @classmethod
    def objective(cls, scheduler, options: ObjectiveOptions | None = None) -> Objective:
        """The training objective of the base's noise schedule (``scheduler``: the base's, or any scheduler built
        from its config): DDPM noising with its betas, the target its ``prediction_type`` names."""
        from diffusers import DDPMScheduler

        from ..models.objectives import NoisePrediction

        return NoisePrediction(DDPMScheduler.from_config(scheduler.config))

    @classmethod
    def predict(cls, denoiser: LatentDenoiser, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditions: dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """The denoiser's prediction (the objective's target, latents' shape) under ``conditions``."""
        raise NotImplementedError

    # ---- sampling and the adapter ----

    @classmethod
    def sampling_pipeline(cls, pipe) -> DiffusionPipeline | None:
        """The base's own diffusers pipeline over ``pipe``'s modules (same weights, same loaded adapters);
        ``None``: ``DPLDMPipeline``'s own loop samples this family."""
        return None

    @classmethod
    def sampling_kwargs(cls, pipe) -> dict[str, Any]:
        """Arguments of the sampling pipeline's call that follow from how the loaded adapter was trained
        (``pipe.condition_options``: e.g. T5's sequence length). dp-diffusers' own sampling (samples.png, the
        evaluation, ``dp-diffusers sample`` / ``generate``) passes them through
        ``DPLDMPipeline.trained_call_kwargs``; a plain pipeline call does not (it takes the base pipeline's
        defaults, as the base pipeline with the adapter loaded would)."""
        return {}

    @classmethod
    def trained_max_sequence_length(cls, options: ConditionOptions) -> int | None:
        """The T5 tokens each caption was encoded to in a run with ``options`` (the flag, or the family's default),
        recorded in the adapter config; ``None`` for a family without T5."""
        return None

    @classmethod
    def lora_loader(cls) -> type:
        """The diffusers LoRA loader mixin whose file format the adapter has (``lora_state_dict``,
        ``save_lora_weights``): the base pipeline's own, else Stable Diffusion's."""
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        return StableDiffusionLoraLoaderMixin

    @classmethod
    def save_lora_weights(cls, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                          metadata: dict[str, Any]) -> Path:  # fmt: skip
        """Write ``pytorch_lora_weights.safetensors`` through the loader's own ``save_lora_weights`` (keys
        ``<lora_prefix>.<module>.lora_A.weight``, the ``LoraConfig`` in the file's metadata)."""
        cls.lora_loader().save_lora_weights(
            folder, weight_name=LORA_WEIGHT_NAME,
            **{f"{cls.lora_prefix}_lora_layers": state_dict, f"{cls.lora_prefix}_lora_adapter_metadata": metadata},
        )  # fmt: skip
        return Path(folder) / LORA_WEIGHT_NAME


#: every supported family, by the pipeline class of its model_index.json
FAMILIES: dict[str, type[BaseFamily]] = {}


def family_named(name: str) -> type[BaseFamily]:
    """The family recorded as ``name`` in an adapter config."""
    for family in FAMILIES.values():
        if family.name == name:
            return family
    raise UnsupportedBaseError(f"Unknown base family {name!r}; known: {sorted(f.name for f in FAMILIES.values())}.")


def register_family(family: type[BaseFamily]) -> type[BaseFamily]:
    """Make ``family`` the one for bases whose ``model_index.json`` names its ``pipeline_class_name``."""
    FAMILIES[family.pipeline_class_name] = family
    return family


def hub_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``from_pretrained`` options that locate a file on the Hub (for ``load_config``)."""
    names = ("cache_dir", "force_download", "local_files_only", "token", "revision")
    return {k: kwargs[k] for k in names if k in kwargs}


def listed_components(index: dict[str, Any]) -> list[str]:
    """The components a ``model_index.json`` lists with a class (``[library, class]``, not ``[null, null]``)."""
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]]


def _supported() -> str:
    return "; ".join(f"{name} ({family.description})" for name, family in sorted(FAMILIES.items()))


def base_family(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> type[BaseFamily]:
    """The family of a base folder or Hub repo, read from its ``model_index.json`` (``kwargs``: Hub options such
    as ``revision``). Raises :class:`UnsupportedBaseError` naming what was found and what is supported,
    ``FileNotFoundError`` for a local folder without a component it lists, and diffusers' ``OSError`` for a base
    that cannot be found (no such folder, not on the Hub or offline)."""
    name = str(pretrained_model_name_or_path)
    folder = Path(name).expanduser()
    if not folder.exists() and (name.startswith(("/", ".", "~")) or name.count("/") > 1):  # a path, not a Hub id
        raise FileNotFoundError(f"{name!r}: no such base folder.")
    if folder.is_dir() and not (folder / "model_index.json").is_file():
        raise UnsupportedBaseError(
            f"{name!r} has no model_index.json: not a diffusers pipeline folder. Supported bases: {_supported()}."
        )
    index = DiffusionPipeline.load_config(name, **hub_options(kwargs))
    found = index.get("_class_name")
    if found not in FAMILIES:
        components = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list))
        raise UnsupportedBaseError(
            f"{name!r} is a {found} with components {components}: not a latent diffusion base dp-diffusers "
            f"supports. Supported bases: {_supported()}."
        )
    if folder.is_dir():  # a local copy: every component model_index.json lists must be there
        absent = [k for k in listed_components(index) if not (folder / k).is_dir()]
        if absent:
            raise FileNotFoundError(
                f"{name!r} lists the components {absent} in model_index.json but has no such folders: the base is "
                "incomplete (an interrupted download or copy?)."
            )
    return FAMILIES[found]
