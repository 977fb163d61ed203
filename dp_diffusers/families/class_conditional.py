"""Families conditioned on class labels, and unconditional ones: their examples, conditions and denoiser calls.

A class family's condition is one class id per example (``class_labels``), mapped from the private data's label
names onto the base's classes (a DiT base's synonyms too); classes the base lacks get new rows with
``--train_class_embedding``. Its null condition is the base's null class (label dropout, classifier-free
guidance), when it has one. They sample through ``DPLDMPipeline``'s own loop (which gives the images of diffusers'
``LDMPipeline`` / ``DiTPipeline`` for a zero adapter: tested).
"""

from __future__ import annotations

import logging

import torch

from ..data import DataError, dataset_labels, label_names
from .base import BaseFamily, ConditionOptions, PrivateExamples

logger = logging.getLogger(__name__)


def _refuse_captions(family: type[BaseFamily], options: ConditionOptions) -> None:
    if options.caption_column is not None or options.caption_template is not None or options.validation_prompts:
        raise DataError(f"--caption_column / --caption_template / --validation_prompt are for text-to-image bases, not "
                        f"{family.name}.")  # fmt: skip


def _unconditional_examples(family, dataset, image_column, label_column, resolution, options) -> PrivateExamples:
    """The examples of an unconditional base: an explicit ``--label_column`` is an error, found labels are logged."""
    if options.label_column:
        raise DataError(
            f"--label_column {options.label_column!r} was given, but the base ({family.name}) is unconditional: it "
            "cannot use labels. Leave --label_column out (or pass --label_column '')."
        )
    names = label_names(dataset, label_column)
    if names:
        logger.warning(f"The base ({family.name}) is unconditional: the data's labels {names} are not used.")
    return PrivateExamples(dataset, image_column, resolution)


class UnconditionalFamily(BaseFamily):
    """An unconditional base: no condition; the data's labels, if any, are not used."""

    conditioning = "none"

    @classmethod
    def check_training(cls, pipe, options, objective=None):
        super().check_training(pipe, options, objective)
        _refuse_captions(cls, options)

    @classmethod
    def prepare_examples(cls, pipe, dataset, image_column, label_column, resolution, options):
        return _unconditional_examples(cls, dataset, image_column, label_column, resolution, options)

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditions):
        return denoiser.backbone(noisy_latents, timesteps)


class ClassFamily(BaseFamily):
    """A class-conditional base. Subclasses say how many classes a model has (:meth:`num_classes`), which id is the
    null class (:meth:`null_class_id`; none: no label dropout, no guidance), how new classes get rows
    (:meth:`add_classes`) and how labels enter the backbone (:meth:`predict`)."""

    conditioning = "class"

    @classmethod
    def add_classes(cls, pipe, count: int) -> int:
        """Give ``pipe`` trainable rows for ``count`` new classes; returns the first new id."""
        raise NotImplementedError

    @classmethod
    def conditioning_of(cls, pipe) -> str:
        return "none" if cls.num_classes(pipe) is None else "class"

    @classmethod
    def check_training(cls, pipe, options, objective=None):
        super().check_training(pipe, options, objective)
        _refuse_captions(cls, options)

    @classmethod
    def prepare_examples(cls, pipe, dataset, image_column, label_column, resolution, options):
        """Private labels mapped by name onto the base's classes; new classes need ``--train_class_embedding``."""
        if cls.num_classes(pipe) is None:  # an unconditional base of a class family (own UNet2DModel bases)
            return _unconditional_examples(cls, dataset, image_column, label_column, resolution, options)
        names = label_names(dataset, label_column)
        if names is None:
            raise DataError("The base model is class-conditional; the private data needs a label column.")
        base_id2label = {int(k): v for k, v in (pipe.config.id2label or {}).items()}
        known = {**pipe.label_synonyms, **pipe.labels}
        new = [name for name in names if name not in known]
        if new and not options.train_class_embedding:
            base_names = [base_id2label[k] for k in sorted(base_id2label)]
            shown = base_names if len(base_names) <= 20 else [*base_names[:20], "..."]
            raise DataError(
                f"Private labels {new} are unknown to the base model (its classes: {shown}). "
                "Pass --train_class_embedding to learn embeddings for them under DP."
            )
        first = cls.add_classes(pipe, len(new)) if new else 0
        new_ids = {name: first + i for i, name in enumerate(new)}
        class_ids = {**known, **new_ids}
        return PrivateExamples(
            dataset, image_column, resolution, names=names,
            id2label={**base_id2label, **{i: name for name, i in new_ids.items()}}, class_ids=class_ids,
            labels=dataset_labels(dataset, label_column, class_ids),
        )  # fmt: skip

    @classmethod
    def add_canaries(cls, examples, pixels, labels, captions):
        super().add_canaries(examples, pixels, labels, captions)
        if examples.labels is not None:
            examples.labels = torch.cat([examples.labels, labels])

    @classmethod
    def sampling_conditions(cls, pipe, names, options):
        return None if cls.num_classes(pipe) is None else {"class_labels": pipe.get_label_ids(names)}

    @classmethod
    def encode_conditions(cls, pipe, examples, cache_dir=None, dtype=torch.float32):
        return {} if examples.labels is None else {"class_labels": examples.labels}

    @classmethod
    def null_condition(cls, pipe, options=None):
        null = cls.null_class_id(pipe)
        return {} if null is None else {"class_labels": torch.tensor([null])}
