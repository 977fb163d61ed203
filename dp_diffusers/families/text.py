"""Text-to-image families: captions (private data) through the base pipeline's own ``encode_prompt``, sampling
through the base pipeline itself.

Each example's condition is what the base's frozen public text encoders make of its caption, computed once by the
pipeline's own ``encode_prompt`` (so training conditions on exactly what sampling does) and cached; its null
condition is the empty prompt's encoding (or zeros, where the pipeline uses zeros for the empty prompt). The adapter
is the pipeline's standard LoRA (its own ``save_lora_weights`` / ``load_lora_weights``).

Captions are private: libraries echo the text they truncate (diffusers' "The following part of your input was
truncated ..." warning, on every pipeline's ``encode_prompt``). :func:`private_text` silences every log record and
warning while captions are tokenized and encoded, and :func:`truncation_counts` says how many were truncated, never
which or what.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from ..data import DataError, dataset_captions, rows_to_arrays
from .base import BaseFamily, ConditionOptions, UnsupportedBaseError, hub_options, listed_components

logger = logging.getLogger(__name__)

#: captions encoded per batch
ENCODE_BATCH_SIZE = 64


def scratch_dir() -> str:
    """A private temporary folder for this process's encoded captions, removed when the process exits."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = tempfile.mkdtemp(prefix="dp-diffusers-")
        atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
    return _SCRATCH


_SCRATCH: str | None = None


@contextlib.contextmanager
def private_text() -> Iterator[None]:
    """While private text is tokenized or encoded: no log record of any logger at any level, no warning. (Records
    are dropped at their source, ``logging.disable``, so no handler of any library sees them.)"""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def truncation_counts(tokenizers: dict[str, Any], max_lengths: dict[str, int],
                      captions: Sequence[str]) -> dict[str, int]:  # fmt: skip
    """How many ``captions`` each tokenizer cuts at its maximum length (special tokens included): counts only."""
    counts = {}
    with private_text():
        for name, tokenizer in tokenizers.items():
            lengths = (len(ids) for ids in tokenizer(list(captions), truncation=False)["input_ids"])
            counts[name] = sum(length > max_lengths[name] for length in lengths)
    return counts


class TextFamily(BaseFamily):
    """A text-to-image base: subclasses name the pipeline's text components and implement :meth:`encode_prompts`
    (through the pipeline's own ``encode_prompt``) and :meth:`predict`."""

    conditioning = "text"
    #: the per-class mean images (DP central images) need classes: a text base has none
    supports_central_images: ClassVar[bool] = False
    dropout_flag: ClassVar[str] = "caption_dropout"
    #: the frozen public text encoders and tokenizers the base needs besides vae, denoiser and scheduler
    text_components: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")
    #: those it may lack (SD3's T5: diffusers allows ``text_encoder_3=None``)
    optional_text_components: ClassVar[tuple[str, ...]] = ()
    #: keyword arguments of the base pipeline's ``from_pretrained`` and constructor (e.g. no safety checker)
    pipeline_kwargs: ClassVar[dict[str, Any]] = {}
    #: config entries of the base pipeline kept for its sampling view (e.g. SDXL's force_zeros_for_empty_prompt)
    pipeline_options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def components(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        index = DiffusionPipeline.load_config(str(pretrained_model_name_or_path), **hub_options(kwargs))
        missing = [name for name in cls.text_components if name not in listed_components(index)]
        if missing:
            raise UnsupportedBaseError(
                f"{str(pretrained_model_name_or_path)!r} is a {cls.pipeline_class_name} without {missing}: a "
                "text-to-image base needs its text encoders and tokenizers to encode the captions."
            )
        # an optional component the base lacks is passed as None, as diffusers documents for SD3 without T5
        absent = {name: None for name in cls.optional_text_components if name not in listed_components(index)}
        base = cls.pipeline_class().from_pretrained(pretrained_model_name_or_path, **cls.pipeline_kwargs, **absent,
                                                    **kwargs)  # fmt: skip
        options = {name: base.config[name] for name in cls.pipeline_options if name in base.config}
        text = {name: getattr(base, name) for name in cls.all_text_components()}
        return {"vae": base.vae, "unet": getattr(base, cls.lora_prefix), "scheduler": base.scheduler, **text,
                "base_options": options}  # fmt: skip

    @classmethod
    def all_text_components(cls) -> tuple[str, ...]:
        return cls.text_components + cls.optional_text_components

    @classmethod
    def sampling_pipeline(cls, pipe) -> DiffusionPipeline:
        """The base's own pipeline class over ``pipe``'s modules: prompts are encoded and sampled exactly as
        diffusers does it (same weights, same loaded LoRA adapters)."""
        view = cls.pipeline_class()(
            vae=pipe.vae, scheduler=pipe.scheduler, **{cls.lora_prefix: pipe.unet},
            **{name: getattr(pipe, name) for name in cls.all_text_components()}, **cls.pipeline_kwargs,
            **(pipe.config.base_options or {}),
        )  # fmt: skip
        view.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        return view

    @classmethod
    def lora_loader(cls) -> type:
        return cls.pipeline_class()

    @classmethod
    def check_training(cls, pipe, options, objective=None):
        super().check_training(pipe, options, objective)
        if options.train_class_embedding:
            raise DataError("--train_class_embedding: a text-to-image base has no class embedding to train.")

    @classmethod
    def prepare_examples(cls, pipe, dataset, image_column, label_column, resolution, options):
        from .base import PrivateExamples

        captions = dataset_captions(dataset, options.caption_column, options.caption_template, label_column)
        return PrivateExamples(dataset, image_column, resolution, captions=captions, options=options)

    @classmethod
    def add_canaries(cls, examples, pixels, labels, captions):
        super().add_canaries(examples, pixels, labels, captions)
        examples.captions = examples.captions + list(captions)

    @classmethod
    def sampling_conditions(cls, pipe, names, options):
        if not (options.caption_template and names):
            return None
        return {"prompt": [options.caption_template.format(label=name) for name in names]}

    # ---- captions -> conditions ----

    @classmethod
    def max_lengths(cls, pipe, options: ConditionOptions) -> dict[str, int]:
        """Tokens each of the base's tokenizers keeps (CLIP's ``model_max_length``, 77)."""
        return {name: getattr(pipe, name).model_max_length for name in cls.all_text_components()
                if "tokenizer" in name and getattr(pipe, name) is not None}  # fmt: skip

    @classmethod
    def encode_prompts(cls, pipe, prompts: list[str], options: ConditionOptions | None = None) -> dict[str, Tensor]:
        """The named conditions of ``prompts`` by the pipeline's own ``encode_prompt`` (no guidance half), with the
        run's ``options`` (T5's length). Called inside :func:`private_text`."""
        raise NotImplementedError

    @classmethod
    def image_conditions(cls, pipe, examples) -> dict[str, torch.Tensor]:
        """Conditions that come from each example's image rather than its caption (SDXL's time ids)."""
        return {}

    @classmethod
    def _cache_key(cls, pipe, captions: Sequence[str], options: ConditionOptions, dtype: torch.dtype) -> str:
        """The captions, the family, the tokenizers' vocabularies and lengths, the storage dtype, the text encoders'
        weights."""
        lengths = cls.max_lengths(pipe, options)
        digest = hashlib.sha256(json.dumps([cls.name, list(captions), lengths, str(dtype)]).encode())
        for name in cls.all_text_components():
            component = getattr(pipe, name)
            if component is None:
                continue
            if "tokenizer" in name:
                digest.update(json.dumps(component.get_vocab(), sort_keys=True).encode())
            else:
                for tensor in component.state_dict().values():
                    digest.update(tensor.detach().cpu().float().numpy().tobytes())
        return digest.hexdigest()[:16]

    @classmethod
    @torch.no_grad()
    def encode_captions(cls, pipe, captions: Sequence[str], cache_dir: str | None = None,
                        options: ConditionOptions | None = None, batch_size: int = ENCODE_BATCH_SIZE,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:  # fmt: skip
        """The named (N, ...) conditions of ``captions`` (stored in ``dtype``: fp32, or fp16 for a half-precision
        base, which takes them in half precision anyway), ``batch_size`` at a time, silently
        (:func:`private_text`), as memory-mapped ``latents-text-<key>-<name>.npy`` files in ``cache_dir`` (a
        temporary folder, removed at exit, without one): never all in memory (a FLUX context is 512 x 4096 values
        per caption). Private data in encoded form: the Hub upload excludes them. Logs how many captions each
        tokenizer truncated."""
        options = options or ConditionOptions()
        lengths = cls.max_lengths(pipe, options)
        counts = truncation_counts({name: getattr(pipe, name) for name in lengths}, lengths, captions)
        for name, count in counts.items():
            if count:
                logger.warning(f"{count} of {len(captions)} captions are longer than the {lengths[name]} tokens "
                               f"{name} keeps: their ends are cut (the texts are not logged).")  # fmt: skip
        key = cls._cache_key(pipe, captions, options, dtype)
        prefix = Path(cache_dir or scratch_dir()) / f"latents-text-{key}"

        def batches():
            for start in range(0, len(captions), batch_size):
                with private_text():
                    encoded = cls.encode_prompts(pipe, list(captions[start : start + batch_size]), options)
                yield {name: value.to(dtype).cpu().numpy() for name, value in encoded.items()}

        return rows_to_arrays(batches(), len(captions), prefix)

    @classmethod
    def encode_conditions(cls, pipe, examples, cache_dir=None, dtype=torch.float32):
        captions = cls.encode_captions(pipe, examples.captions, cache_dir, examples.options, dtype=dtype)
        return {**captions, **cls.image_conditions(pipe, examples)}

    @classmethod
    @torch.no_grad()
    def null_condition(cls, pipe, options=None):
        """The empty prompt's encoding, as the pipeline's unconditional half of guidance (and caption dropout)."""
        with private_text():
            encoded = cls.encode_prompts(pipe, [""], options or ConditionOptions())
        return {name: value.float().cpu() for name, value in encoded.items()}
