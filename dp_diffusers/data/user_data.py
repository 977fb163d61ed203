"""User data sets: loading them the way diffusers' training scripts do (an embedded set, a Hub data set or an
``imagefolder``), the columns (images, labels, captions), the ``--max_train_samples`` subset and the
``--validation_split`` part.

Errors name flags, columns and row numbers, never a path, a label or a caption (private data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, load_dataset

from .embedded import EMBEDDED_DATASETS
from .errors import DataError, row_list
from .units import privacy_unit_members

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _check_image_folder(train_data_dir: str) -> None:
    """Errors name the flag, never the folder's path (paths of private data stay out of logs)."""
    path = Path(train_data_dir)
    if not path.is_dir():
        raise DataError("--train_data_dir does not exist or is not a directory.")
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*") if p.is_file()):
        raise DataError(
            "--train_data_dir holds no image files "
            f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}). An imagefolder data set is "
            "DIR/<class name>/<image> for labelled data or DIR/<image> for unlabelled data."
        )


def load_image_dataset(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
) -> Dataset:
    """Load a data set the way diffusers' training scripts do.

    ``dataset_name`` is an embedded set (``public-digits``, ``private-digits``) or a Hub data set
    id / local data set script; ``train_data_dir`` is an ``imagefolder`` directory (its ``split``: ``train`` is the
    folder itself or its ``train/`` subfolder, ``test`` its ``test/`` subfolder, the held-out images the evaluation
    needs). Exactly one of the two must be given.
    """
    if (dataset_name is None) == (train_data_dir is None):
        raise DataError("Give exactly one of --dataset_name and --train_data_dir.")
    if dataset_name in EMBEDDED_DATASETS:
        dataset = EMBEDDED_DATASETS[dataset_name](split)
    elif dataset_name is not None:
        dataset = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
    else:
        _check_image_folder(train_data_dir)
        try:
            dataset = load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split=split)
        except ValueError as err:  # datasets: Unknown split
            raise DataError(
                f"--train_data_dir has no {split!r} split: put held-out images (the evaluation's) in its {split}/ "
                "subfolder and the training images in its train/ subfolder (datasets' imagefolder splits)."
            ) from err
    if len(dataset) == 0:
        source = repr(dataset_name) if dataset_name is not None else "of --train_data_dir"
        raise DataError(f"The data set {source} (split {split!r}) is empty.")
    return dataset


def seeded_subset(dataset: Dataset, max_samples: int | None, seed: int) -> Dataset:
    """The first ``max_samples`` examples of ``dataset`` shuffled with ``seed`` (``dataset`` itself when
    ``None``): ``--max_train_samples``' subset, rebuilt by the evaluation so the audit's members are
    examples the run really trained on."""
    if max_samples is None:
        return dataset
    if max_samples < 1:
        raise DataError(f"max_train_samples must be >= 1, got {max_samples}")
    return dataset.shuffle(seed=seed).select(range(min(max_samples, len(dataset))))


def validation_split(
    dataset: Dataset, fraction: float, seed: int, unit_column: str | None = None
) -> tuple[Dataset, Dataset]:  # fmt: skip
    """(train, validation): ``fraction`` of ``dataset``'s rows (with ``unit_column``: of its privacy units, all of a
    unit's rows on one side) held out by a public rule, a permutation of the row (unit) positions seeded by
    ``seed``: which positions are held out depends on their number only, never on the data. The two are disjoint;
    ``dp-diffusers tune`` scores on the validation part and trains on the rest."""
    if not 0 < fraction < 1:
        raise DataError(f"--validation_split must be in (0, 1), got {fraction}")
    units = privacy_unit_members(dataset, unit_column) if unit_column else [[i] for i in range(len(dataset))]
    held = round(fraction * len(units))
    if held < 1 or held >= len(units):
        raise DataError(f"--validation_split {fraction} of {len(units)} {'units' if unit_column else 'rows'} leaves "
                        "one side empty.")  # fmt: skip
    order = np.random.default_rng(seed).permutation(len(units))

    def rows(positions) -> list[int]:
        return sorted(i for u in positions for i in units[u])

    return dataset.select(rows(order[held:])), dataset.select(rows(order[:held]))


def trained_rows(dataset: Dataset, train_subset: dict, unit_column: str | None = None) -> Dataset:
    """The rows of the train split a run trained on, from its adapter config's ``train_subset``: the
    ``--max_train_samples`` subset (``max_samples``, ``seed``), minus the ``--validation_split`` part."""
    dataset = seeded_subset(dataset, train_subset.get("max_samples"), train_subset.get("seed", 0))
    if train_subset.get("validation_split") is None:
        return dataset
    return validation_split(dataset, train_subset["validation_split"], train_subset["validation_split_seed"],
                            unit_column)[0]  # fmt: skip


def label_names(dataset: Dataset, label_column: str | None) -> list[str] | None:
    """Class names of ``label_column`` (a ``ClassLabel`` gives its names; other columns their sorted
    distinct values as strings); ``None`` for unlabelled data."""
    if label_column is None:
        return None
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return sorted({str(v) for v in dataset[label_column]})


def row_labels(dataset: Dataset, label_column: str) -> list[str]:
    """Each row's label as a class name: a ``ClassLabel``'s name, else the value as text (private data: for
    mapping and checking, never for messages)."""
    feature, raw = dataset.features[label_column], dataset[label_column]
    return [feature.names[v] for v in raw] if isinstance(feature, ClassLabel) else [str(v) for v in raw]



def resolve_columns(
    dataset: Dataset, image_column: str | None = None, label_column: str | None = None
) -> tuple[str, str | None]:
    """Pick the image and label columns, with errors that list the columns that exist.

    ``label_column=None`` takes ``label`` when it exists; pass ``label_column=""`` for unlabelled
    training of a labelled set.
    """
    columns = dataset.column_names
    if image_column is None:
        image_column = "image" if "image" in columns else columns[0]
    if image_column not in columns:
        raise DataError(f"--image_column {image_column!r} is not a column of the data set; columns: {columns}.")
    if label_column is None:
        label_column = "label" if "label" in columns else None
    elif label_column == "":
        label_column = None
    elif label_column not in columns:
        raise DataError(f"--label_column {label_column!r} is not a column of the data set; columns: {columns}.")
    return image_column, label_column


def dataset_labels(
    dataset: Dataset, label_column: str | None, class_names: Sequence[str] | Mapping[str, int] | None = None
) -> torch.Tensor | None:
    """Class ids (N,) of ``label_column`` (``None`` without one). With ``class_names``, labels are mapped by
    *name* onto that list (e.g. the base model's classes), or through that name -> id mapping (a DiT base's
    synonyms); a name missing from it raises ``DataError``."""
    if label_column is None:
        return None
    as_names = row_labels(dataset, label_column)
    if isinstance(class_names, Mapping):
        lookup = dict(class_names)
    else:
        names = class_names if class_names is not None else label_names(dataset, label_column)
        lookup = {name: i for i, name in enumerate(names)}
    unknown = [i for i, name in enumerate(as_names) if name not in lookup]
    if unknown:
        raise DataError(f"{len(unknown)} of {len(as_names)} rows (rows {row_list(unknown)}) have labels that are not "
                        f"among the model's {len(set(lookup.values()))} classes (labels are private data: not shown).")
    return torch.tensor([lookup[n] for n in as_names], dtype=torch.long)



def dataset_captions(
    dataset: Dataset,
    caption_column: str | None = None,
    caption_template: str | None = None,
    label_column: str | None = None,
) -> list[str]:
    """Every example's caption: ``caption_column`` (diffusers' default ``text``, e.g. an imagefolder's
    ``metadata.jsonl``; a list of captions gives its first), else ``caption_template`` filled with the example's
    label name (``"a photo of a {label}"``). Captions are private data: errors name rows, never their text."""
    columns = dataset.column_names
    if caption_column is not None and caption_column not in columns:
        raise DataError(f"--caption_column {caption_column!r} is not a column of the data set; columns: {columns}.")
    if caption_column is None and caption_template is None:
        if "text" not in columns:
            raise DataError(
                f"A text-to-image base needs captions, and the data set has no 'text' column (columns: {columns}). "
                "Pass --caption_column (e.g. the 'text' of an imagefolder's metadata.jsonl) or, for labelled data, "
                "--caption_template 'a photo of a {label}'."
            )
        caption_column = "text"
    if caption_column is not None:
        raw = [c[0] if isinstance(c, (list, tuple)) and c else c for c in dataset[caption_column]]
    else:
        if "{label}" not in caption_template:
            raise DataError(f"--caption_template {caption_template!r} has no '{{label}}' to put the class name in.")
        names = label_names(dataset, label_column)
        if names is None:
            raise DataError("--caption_template needs labelled data (a label column) to fill in '{label}'.")
        labels = dataset_labels(dataset, label_column)
        raw = [caption_template.format(label=names[i]) for i in labels.tolist()]
    bad = [i for i, caption in enumerate(raw) if not isinstance(caption, str) or not caption.strip()]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise DataError(f"Captions of rows {shown} are empty or not text: every private example needs a caption.")
    return raw
