"""Frechet Inception Distance through clean-fid (``mode="clean"``), from a local Inception file.

clean-fid downloads its Inception weights to a fixed path on first use. Here the TorchScript file
is always given explicitly (argument or ``DP_DIFFUSERS_FID_INCEPTION``): nothing is downloaded and
nothing is written next to clean-fid. Images go through clean-fid's own pipeline (PIL bicubic
resize to 299x299 without quantisation, the same normalisation as its ``InceptionV3W`` wrapper,
``fid_from_feats``), so scores are comparable to clean-fid's published ``mode="clean"`` numbers.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from glob import glob
from pathlib import Path

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.utils import EXTENSIONS
from PIL import Image

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILENAME}"
INCEPTION_PATH_ENV = "DP_DIFFUSERS_FID_INCEPTION"
FEATURE_DIM = 2048
CLEAN_FID_EXTRACTOR = "inception-v3 (clean-fid, mode=clean)"

ImageSet = str | os.PathLike | np.ndarray | Sequence[np.ndarray | Image.Image]


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The Inception TorchScript file FID needs is not available locally."""


class CleanFIDInception(torch.nn.Module):
    """clean-fid's ``InceptionV3W.forward`` for ``mode="clean"`` around a loaded TorchScript file.

    Input: ``(N, 3, 299, 299)`` float images with values in [0, 255] (clean-fid resizes outside
    the network in clean mode). Output: ``(N, 2048)`` pool features.
    """

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        self.base = scripted.eval()
        self.layers = self.base.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (3, 299, 299):
            raise ValueError(f"expected images of shape (N, 3, 299, 299), got {tuple(x.shape)}")
        return self.layers.forward((x - 128) / 128).view(x.shape[0], FEATURE_DIM)


def _resolve_inception_path(path: str | os.PathLike | None) -> Path:
    how = (
        f"Download {INCEPTION_FILENAME} (the Inception-v3 TorchScript file clean-fid and StyleGAN2 use) "
        f"from {INCEPTION_URL} and pass its path with --fid_inception_path or the environment "
        f"variable {INCEPTION_PATH_ENV}."
    )
    path = path if path is not None else os.environ.get(INCEPTION_PATH_ENV)
    if not path:
        raise InceptionWeightsNotFoundError(f"FID needs the Inception weights file {INCEPTION_FILENAME}. {how}")
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise InceptionWeightsNotFoundError(f"Inception weights file not found: {resolved}. {how}")
    return resolved


def load_inception_feature_extractor(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> CleanFIDInception:
    """Load the Inception TorchScript file as a clean-fid ``custom_feat_extractor`` (no download).

    ``path`` defaults to ``$DP_DIFFUSERS_FID_INCEPTION``. The file must be clean-fid's
    ``inception-2015-12-05.pt`` or a TorchScript module with the same interface (a ``layers``
    submodule mapping images normalised to [-1, 1] to 2048 features). Raises
    :class:`InceptionWeightsNotFoundError` (a ``FileNotFoundError``) saying where to get the file.
    """
    resolved = _resolve_inception_path(path)
    with warnings.catch_warnings():
        # The weights only exist as TorchScript (clean-fid loads them the same way).
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
        scripted = torch.jit.load(str(resolved), map_location=device)
    if not hasattr(scripted, "layers"):
        raise ValueError(
            f"{resolved} is not a clean-fid Inception TorchScript file (no `layers` submodule); use {INCEPTION_URL}"
        )
    return CleanFIDInception(scripted).to(device)


def _list_image_files(folder: Path) -> list[str]:
    # Same file discovery as cleanfid.fid.get_folder_features (recursive, clean-fid's extensions).
    return sorted(file for ext in EXTENSIONS for file in glob(os.path.join(folder, f"**/*.{ext}"), recursive=True))


def _to_rgb_uint8(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"array images must be uint8 in [0, 255], got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"array images must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    return Image.fromarray(array).convert("RGB")


def _features(
    images: ImageSet,
    name: str,
    extractor: CleanFIDInception,
    batch_size: int,
    device: torch.device,
    num_workers: int,
) -> np.ndarray:
    def extract(files: list[str]) -> np.ndarray:
        return cleanfid_fid.get_files_features(
            files,
            extractor,
            num_workers=num_workers,
            batch_size=batch_size,
            device=device,
            mode="clean",
            verbose=False,
        )

    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        if not folder.is_dir():
            raise ValueError(f"{name} images: {folder} is not a folder")
        files = _list_image_files(folder)
        if not files:
            raise ValueError(f"{name} images: no image files ({', '.join(sorted(EXTENSIONS))}) in {folder}")
        return extract(files)

    if len(images) == 0:
        raise ValueError(f"{name} images: the image set is empty")
    # Lossless PNGs, so arrays take exactly the path a folder of images takes inside clean-fid.
    with tempfile.TemporaryDirectory(prefix=f"dp_diffusers_fid_{name}_") as tmp:
        files = []
        for i, image in enumerate(images):
            files.append(os.path.join(tmp, f"{i:06d}.png"))
            _to_rgb_uint8(image).save(files[-1])
        return extract(files)


def compute_fid(
    generated: ImageSet,
    reference: ImageSet,
    inception_path: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> dict:
    """FID between two image sets with clean-fid (``mode="clean"``); lower is better.

    Each set is a folder of images (searched recursively) or a sequence/array of images: uint8
    ``HxW``, ``HxWx1``, ``HxWx3`` arrays, an ``(N, H, W[, C])`` uint8 array, or PIL images.
    Grayscale is converted to RGB. Warns when a set has fewer than 2048 images: the 2048x2048
    feature covariance is then singular and FID is biased upwards (report the sample sizes).

    Returns ``{"fid", "num_generated", "num_reference", "feature_extractor", "mode"}``.
    """
    device = torch.device(device)
    resolved = _resolve_inception_path(inception_path)
    extractor = load_inception_feature_extractor(resolved, device)
    feats_gen = _features(generated, "generated", extractor, batch_size, device, num_workers)
    feats_ref = _features(reference, "reference", extractor, batch_size, device, num_workers)
    for name, feats in (("generated", feats_gen), ("reference", feats_ref)):
        if len(feats) < 2:
            raise ValueError(f"{name} images: FID needs at least 2 images, got {len(feats)}")
        if len(feats) < FEATURE_DIM:
            warnings.warn(
                f"{name} set has {len(feats)} < {FEATURE_DIM} images: the feature covariance is "
                "singular and FID is biased upwards; compare only FIDs computed with equal sample sizes",
                stacklevel=2,
            )
    extractor_name = CLEAN_FID_EXTRACTOR if resolved.name == INCEPTION_FILENAME else resolved.name
    return {
        "fid": float(cleanfid_fid.fid_from_feats(feats_gen, feats_ref)),
        "num_generated": len(feats_gen),
        "num_reference": len(feats_ref),
        "feature_extractor": extractor_name,
        "mode": "clean",
    }
