"""Frechet Inception Distance and Kernel Inception Distance through clean-fid (``mode="clean"``).

The Inception weights: the file given (argument or ``DP_DIFFUSERS_FID_INCEPTION``), else clean-fid's own
(``inception-2015-12-05.pt`` in its cache folder, downloaded there by clean-fid's ``check_download_inception`` on
first use, as clean-fid users expect). Offline (``HF_HUB_OFFLINE``, the tests' setting) nothing is downloaded: without
a local file the evaluation records "not computed" and says how to fix it. Images go through clean-fid's own
pipeline (PIL bicubic resize to 299x299 without quantisation, the same normalisation as its ``InceptionV3W``
wrapper, ``fid_from_feats``, ``kernel_distance``), so scores are comparable to clean-fid's ``mode="clean"`` numbers.
KID is reported next to FID because FID is biased at the few hundred samples small private sets allow.
"""

from __future__ import annotations

import os
import platform
import socket
import tempfile
import urllib.error
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
DOWNLOAD_TIMEOUT_S = 60
#: where clean-fid's ``feature_extractor`` keeps (and downloads) its Inception file
CLEAN_FID_CACHE = Path("./" if platform.system() == "Windows" else "/tmp")
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


def offline() -> bool:
    """Whether downloads are off (``HF_HUB_OFFLINE``, as for every Hub download of the project)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _resolve_inception_path(path: str | os.PathLike | None, download: bool = True) -> Path:
    """The Inception file: ``path``, ``$DP_DIFFUSERS_FID_INCEPTION``, or clean-fid's own (downloaded by clean-fid
    into its cache folder when missing, unless offline or ``download`` is False)."""
    how = (
        f"run once online (clean-fid downloads {INCEPTION_FILENAME} to {CLEAN_FID_CACHE}), or download it from "
        f"{INCEPTION_URL} and pass its path with --fid_inception_path or the environment variable "
        f"{INCEPTION_PATH_ENV}."
    )
    path = path if path is not None else os.environ.get(INCEPTION_PATH_ENV)
    if path:
        resolved = Path(path).expanduser()
        if not resolved.is_file():
            raise InceptionWeightsNotFoundError(f"Inception weights file not found: {resolved}. To fix: {how}")
        return resolved
    cached = CLEAN_FID_CACHE / INCEPTION_FILENAME
    if cached.is_file():
        return cached
    if offline() or not download:
        raise InceptionWeightsNotFoundError(f"no Inception weights (offline). To fix: {how}")
    from cleanfid import downloads_helper

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # clean-fid's urlopen has no timeout: a dead network would hang
    try:
        return Path(downloads_helper.check_download_inception(fpath=str(CLEAN_FID_CACHE)))
    except (urllib.error.URLError, OSError) as error:
        (CLEAN_FID_CACHE / INCEPTION_FILENAME).unlink(missing_ok=True)  # never leave a partial file as the cache
        message = f"no Inception weights (clean-fid's download failed: {error}). To fix: {how}"
        raise InceptionWeightsNotFoundError(message) from error
    finally:
        socket.setdefaulttimeout(previous)


def load_inception_feature_extractor(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> CleanFIDInception:
    """Load the Inception TorchScript file as a clean-fid ``custom_feat_extractor``.

    ``path`` defaults to ``$DP_DIFFUSERS_FID_INCEPTION``, then clean-fid's own file (downloaded unless offline).
    The file must be clean-fid's ``inception-2015-12-05.pt`` or a TorchScript module with the same interface (a
    ``layers`` submodule mapping images normalised to [-1, 1] to 2048 features). Raises
    :class:`InceptionWeightsNotFoundError` (a ``FileNotFoundError``) saying where to get the file.
    """
    resolved = _resolve_inception_path(path)
    with warnings.catch_warnings():
        # The weights only exist as TorchScript (clean-fid loads them the same way).
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
        try:
            scripted = torch.jit.load(str(resolved), map_location=device)
        except RuntimeError as error:  # e.g. a truncated download
            raise InceptionWeightsNotFoundError(f"{resolved} is not a readable TorchScript file ({error}); delete it "
                                                f"and download it again from {INCEPTION_URL}") from error  # fmt: skip
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
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict:
    """FID and KID between two image sets with clean-fid (``mode="clean"``); lower is better for both.

    Each set is a folder of images (searched recursively) or a sequence/array of images: uint8
    ``HxW``, ``HxWx1``, ``HxWx3`` arrays, an ``(N, H, W[, C])`` uint8 array, or PIL images.
    Grayscale is converted to RGB. Warns when a set has fewer than 2048 images: the 2048x2048
    feature covariance is then singular and FID is biased upwards (report the sample sizes); KID
    (clean-fid's ``kernel_distance``: ``kid_subsets`` subsets of up to 1,000 of each set, drawn from ``seed``) is
    unbiased, which is why it is reported next to FID for small sets.

    Returns ``{"fid", "kid", "kid_subsets", "kid_subset_size", "num_generated", "num_reference",
    "feature_extractor", "mode"}``. Raises :class:`InceptionWeightsNotFoundError` without Inception weights.
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
    state = np.random.get_state()  # clean-fid's kernel_distance draws its subsets from numpy's global generator
    np.random.seed(seed)
    try:
        kid = float(cleanfid_fid.kernel_distance(feats_gen, feats_ref, num_subsets=kid_subsets))
    finally:
        np.random.set_state(state)
    extractor_name = CLEAN_FID_EXTRACTOR if resolved.name == INCEPTION_FILENAME else resolved.name
    return {
        "fid": float(cleanfid_fid.fid_from_feats(feats_gen, feats_ref)),
        "kid": kid,
        "kid_subsets": kid_subsets,
        "kid_subset_size": min(len(feats_gen), len(feats_ref), 1000),
        "num_generated": len(feats_gen),
        "num_reference": len(feats_ref),
        "feature_extractor": extractor_name,
        "mode": "clean",
    }
