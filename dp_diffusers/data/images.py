"""Images to pixels: decoding and transforming a data set's images into tensors in [-1, 1], batch by batch, and
random affine copies of public or DP-released images.

An unreadable image is a ``DataError`` with its row number, never the reader's message (it names the file).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from datasets import Dataset
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from .errors import DataError
from .user_data import dataset_labels


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
