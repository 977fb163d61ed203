"""Families conditioned on class labels, and unconditional ones: their examples, conditions and denoiser calls.

A class family's condition is one class id per example (``class_labels``), mapped from the private data's label
names onto a public label set: the base's classes (a DiT base's synonyms too) or ``--class_names``, whose names the
base lacks get new rows with ``--train_class_embedding``; the label set is published with the adapter, so it comes
from the private data only with ``--class_names_from_data`` (outside epsilon). Errors give counts and row numbers,
never a private label. Its null condition is the base's null class (label dropout, classifier-free
guidance), when it has one. They sample through ``DPLDMPipeline``'s own loop (which gives the images of diffusers'
``LDMPipeline`` / ``DiTPipeline`` for a zero adapter: tested).
"""

from __future__ import annotations

import logging

import torch

from ..data import DataError, dataset_labels, label_names, row_labels, row_list
from .base import BaseFamily, ConditionOptions, PrivateExamples

logger = logging.getLogger(__name__)


def _unconditional_examples(family, dataset, image_column, label_column, resolution, options) -> PrivateExamples:
    """The examples of an unconditional base: an explicit ``--label_column`` is an error, found labels are logged."""
    if options.label_column:
        raise DataError(
            f"--label_column {options.label_column!r} was given, but the base ({family.name}) is unconditional: it "
            "cannot use labels. Leave --label_column out (or pass --label_column '')."
        )
    names = label_names(dataset, label_column)
    if names:  # counts only: the names are private data
        logger.warning(f"The base ({family.name}) is unconditional: the data's labels (column {label_column!r}, "
                       f"{len(names)} classes) are not used.")  # fmt: skip
    return PrivateExamples(dataset, image_column, resolution)


#: how to make the label set public, for the errors that refuse a row's label
_LABEL_SET_HELP = (
    "The label set is published with the adapter (its id2label, the classes it samples), so it must be public: pass "
    "--class_names with the public list of class names (and --train_class_embedding for names the base lacks), or "
    "--class_names_from_data to take the names from the private data (released outside epsilon; the model card "
    "says so). Labels are private data: not shown."
)


def _classes_text(base_id2label: dict[int, str]) -> str:
    """``"its classes: ['0', '1', ...]"``: the base's (public) class names, at most 20."""
    names = [base_id2label[k] for k in sorted(base_id2label)]
    return f"its classes: {names if len(names) <= 20 else [*names[:20], f'... ({len(names)} in all)']}"


def _label_set_text(base_id2label: dict[int, str], options: ConditionOptions) -> str:
    """The public label set, in words, for an error message (public names only)."""
    if options.class_names is not None:
        shown = options.class_names if len(options.class_names) <= 20 else [*options.class_names[:20], "..."]
        return f"the public class names {shown}"
    return f"the base model's classes ({_classes_text(base_id2label)})"


def _public_label_set(base_id2label: dict[int, str], data_names: list[str], options: ConditionOptions) -> list[str]:
    """The label set the adapter publishes: ``options.class_names`` (public), the data's names (only with
    ``options.class_names_from_data``), else the base's class names in id order."""
    if options.class_names is not None and options.class_names_from_data:
        raise DataError("Give --class_names (a public list) or --class_names_from_data, not both.")
    if options.class_names is not None:
        names = [str(name) for name in options.class_names]
        if not names or any(not name.strip() for name in names) or len(set(names)) != len(names):
            raise DataError(f"--class_names must be distinct, non-empty names; got {names}.")
        return names
    if options.class_names_from_data:
        return list(data_names)
    return [base_id2label[k] for k in sorted(base_id2label)]


class UnconditionalFamily(BaseFamily):
    """An unconditional base: no condition; the data's labels, if any, are not used."""

    conditioning = "none"

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
    def prepare_examples(cls, pipe, dataset, image_column, label_column, resolution, options):
        """Private labels mapped by name onto a **public** label set, which the adapter publishes (``id2label``, the
        classes of the DP central images and of the samples): the base's classes; ``options.class_names`` (a public
        list: ``--class_names``, an embedded data set's names), whose names the base lacks get new rows (with
        ``--train_class_embedding``); or, only with ``options.class_names_from_data``, the data's own names (released
        outside epsilon). A row whose label is outside the set is a ``DataError`` giving counts and row numbers, never
        a label."""
        if cls.num_classes(pipe) is None:  # an unconditional base of a class family (own UNet2DModel bases)
            return _unconditional_examples(cls, dataset, image_column, label_column, resolution, options)
        data_names = label_names(dataset, label_column)
        if data_names is None:
            raise DataError("The base model is class-conditional; the private data needs a label column.")
        base_id2label = {int(k): v for k, v in (pipe.config.id2label or {}).items()}
        known = {**pipe.label_synonyms, **pipe.labels}
        names = _public_label_set(base_id2label, data_names, options)
        known_ids = {known[name] for name in names if name in known}
        listed_known = [name for name in names if name in known]
        if options.class_names is not None and len(known_ids) < len(listed_known):  # a DiT class and its synonym
            raise DataError(f"--class_names names one class of the base twice (by name and synonym): {names}.")
        new = [name for name in names if name not in known]
        allowed = set(new) | {name for name, i in known.items() if i in known_ids}  # names and their synonyms
        outside = [i for i, name in enumerate(row_labels(dataset, label_column)) if name not in allowed]
        if outside:
            raise DataError(f"{len(outside)} of {len(dataset)} rows (rows {row_list(outside)}) have labels outside "
                            f"{_label_set_text(base_id2label, options)}. {_LABEL_SET_HELP}")  # fmt: skip
        if new and not options.train_class_embedding:
            shown = f"{len(new)} of the data's class names" if options.class_names_from_data else repr(new)
            raise DataError(f"{shown} are unknown to the base model ({_classes_text(base_id2label)}). Pass "
                            "--train_class_embedding to learn embeddings for them under DP.")  # fmt: skip
        first = cls.add_classes(pipe, len(new)) if new else 0
        new_ids = {name: first + i for i, name in enumerate(new)}
        class_ids = {name: i for name, i in known.items() if i in known_ids} | new_ids
        return PrivateExamples(
            dataset, image_column, resolution, names=names,
            id2label={**base_id2label, **{i: name for name, i in new_ids.items()}}, class_ids=class_ids,
            labels=dataset_labels(dataset, label_column, class_ids), names_from_data=options.class_names_from_data,
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
