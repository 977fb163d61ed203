"""What a public base family is: how a layout of base pipeline folder loads into ``DPLDMPipeline``.

A family is chosen from the base's ``model_index.json`` (``_class_name``), never guessed from its
weights. Loading goes through the family's own diffusers pipeline class, so a base loads exactly as
diffusers loads it; the family only names which of its components are the autoencoder, the denoiser
and the scheduler.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from diffusers import DiffusionPipeline


class UnsupportedBaseError(ValueError):
    """The base model is not a latent diffusion pipeline of a supported family."""


class BaseFamily:
    """One layout of public base. Subclasses set the class attributes and, unless the layout is
    ``DPLDMPipeline``'s own, :meth:`components`."""

    #: the family's name, recorded in the adapter config
    name: ClassVar[str]
    #: ``_class_name`` of the base's ``model_index.json``
    pipeline_class_name: ClassVar[str]
    #: how the denoiser is conditioned: "class" (labels), "text" (captions) or "none"
    conditioning: ClassVar[str]
    #: a line for error messages and the README's table
    description: ClassVar[str]
    #: ``--lora_target_modules`` presets: name -> module-name suffixes (peft's ``target_modules``)
    lora_target_presets: ClassVar[dict[str, list[str]]]

    @classmethod
    def components(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> dict[str, Any] | None:
        """``DPLDMPipeline`` keyword arguments (vae, unet, scheduler, class_embedder, id2label) from the base,
        loaded by the family's diffusers pipeline with ``kwargs``; ``None``: the layout is DPLDMPipeline's own."""
        return None


#: every supported family, by the pipeline class of its model_index.json
FAMILIES: dict[str, type[BaseFamily]] = {}


def family_named(name: str) -> type[BaseFamily]:
    """The family recorded as ``name`` in an adapter config."""
    for family in FAMILIES.values():
        if family.name == name:
            return family
    raise UnsupportedBaseError(f"Unknown base family {name!r}; known: {sorted(f.name for f in FAMILIES.values())}.")


def register_family(family: type[BaseFamily]) -> type[BaseFamily]:
    FAMILIES[family.pipeline_class_name] = family
    return family


def hub_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``from_pretrained`` options that locate a file on the Hub (for ``load_config``)."""
    names = ("cache_dir", "force_download", "local_files_only", "token", "revision")
    return {k: kwargs[k] for k in names if k in kwargs}


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
        absent = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]
                  and not (folder / k).is_dir()]  # fmt: skip
        if absent:
            raise FileNotFoundError(
                f"{name!r} lists the components {absent} in model_index.json but has no such folders: the base is "
                "incomplete (an interrupted download or copy?)."
            )
    return FAMILIES[found]
