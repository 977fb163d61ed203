"""Latent encoding: images to the latents a denoiser works on, by the frozen public autoencoder, with each base's
normalisation; a data set's latents streamed batch by batch and cached on disk.

The autoencoder is public and frozen: encoding is a deterministic per-example pre-processing, no privacy cost. The
cache holds private data in encoded form: keep it with the private data (the Hub upload excludes it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from .cache import rows_to_array
from .errors import DataError
from .images import pixel_batches


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
    return rows_to_array(encoded, len(dataset), path)
