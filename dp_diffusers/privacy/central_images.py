"""DP central images (the "easy" stage of DP-FETA, Li et al. 2025): per-class mean images of the private set,
released once by the Gaussian mechanism, for a warm-up before DP-SGD.

The query: each private image ``x`` (pixels in [-1, 1], mapped to ``u = (x + 1) / 2`` in [0, 1] so that a black
background adds nothing) is clipped to L2 norm ``max_image_norm`` (C) and added to its class's sum; the class's
count is added as ``C`` per image. Adding or removing one example changes one class's sum by at most C and its
scaled count by exactly C, so the whole released vector (every class's sum and count) moves by at most

    sensitivity = sqrt(2) * C                                       (L2, add/remove one example)

With privacy units (a person's images), each of a unit's m images enters with weight 1/m: the unit's part of the
vector is the mean of m vectors of norm at most sqrt(2) * C, so the same bound holds per unit.

Guarantee: Gaussian noise of std ``noise_multiplier * sensitivity`` is added once to every coordinate, so the
release is one Gaussian mechanism with that noise multiplier over the whole data set (sample rate 1). The
accountant charges it as ``(noise_multiplier, 1.0, 1)`` next to the DP-SGD steps (``PrivacyBudget(releases=...)``,
heterogeneous composition). Everything computed from the release afterwards (the means, their augmentations, a
warm-up trained on them) is post-processing and costs nothing more.

Written here rather than taken from a library: opacus has no Gaussian mechanism outside DP-SGD.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["CentralImages", "central_image_query", "central_image_sensitivity", "release_central_images"]


def central_image_sensitivity(max_image_norm: float) -> float:
    """L2 sensitivity of the query (sums and scaled counts) to adding or removing one example: sqrt(2) * C."""
    return math.sqrt(2.0) * max_image_norm


@dataclass
class CentralImages:
    """The release: noisy per-class sums of the clipped [0, 1] images (``sums``, (K, C, H, W)) and noisy class sizes
    (``counts``, (K,)), and what is computed from them, the means (``images``, (K, C, H, W) in [-1, 1])."""

    images: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor
    noise_multiplier: float
    max_image_norm: float

    @property
    def sensitivity(self) -> float:
        return central_image_sensitivity(self.max_image_norm)


def central_image_query(
    batches: Iterable[tuple[torch.Tensor, ...]], num_classes: int, max_image_norm: float,
    unit_sizes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The noiseless query over ``(images, labels)`` batches (images (B, C, H, W) in [-1, 1], labels (B,) in
    ``[0, num_classes)``): per-class sums of the clipped [0, 1] images, (K, C, H, W) float64, and the counts times
    ``max_image_norm``, (K,). One example moves the pair by at most ``sqrt(2) * max_image_norm`` in L2.

    Unit-level (``unit_sizes``: (U,) images of each privacy unit; batches ``(images, labels, units)``, units (B,)
    in ``[0, U)``): each image enters with weight ``1 / unit_sizes[unit]``, so a unit's images together are one
    vector, a convex combination of per-image ones: one unit moves the pair by at most ``sqrt(2) *
    max_image_norm``, however many images it has."""
    if max_image_norm <= 0:
        raise ValueError(f"max_image_norm must be positive, got {max_image_norm}")
    if unit_sizes is not None and (unit_sizes < 1).any():
        raise ValueError("every privacy unit has at least one image")
    sums = counts = None
    for images, labels, *units in batches:
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (len(images),) or labels.is_floating_point():
            raise ValueError(f"labels must be integer class ids of shape ({len(images)},), got {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must be in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
        if (unit_sizes is None) != (not units):
            raise ValueError("give each image's unit exactly when the units' sizes are given")
        weights = torch.ones(len(images), dtype=torch.float64) if not units else 1.0 / unit_sizes[units[0]].double()
        unit = ((images.double().flatten(1) + 1) / 2).clamp(0, 1)
        clipped = unit * (max_image_norm / unit.norm(dim=1, keepdim=True).clamp(min=max_image_norm))
        clipped = clipped * weights[:, None]
        if sums is None:
            sums = torch.zeros(num_classes, *images.shape[1:], dtype=torch.float64)
            counts = torch.zeros(num_classes, dtype=torch.float64)
        elif images.shape[1:] != sums.shape[1:]:
            raise ValueError(f"every batch must have the same image size, got {tuple(images.shape[1:])} and "
                             f"{tuple(sums.shape[1:])}")  # fmt: skip
        sums.index_add_(0, labels, clipped.reshape(images.shape))
        counts += torch.bincount(labels, weights=weights, minlength=num_classes).double() * max_image_norm
    if sums is None:
        raise ValueError("the central images' query got no image")
    return sums, counts


def release_central_images(
    batches: Iterable[tuple[torch.Tensor, ...]],
    num_classes: int,
    *,
    noise_multiplier: float,
    max_image_norm: float,
    generator: torch.Generator,
    unit_sizes: torch.Tensor | None = None,
) -> CentralImages:
    """Release the per-class mean images with the Gaussian mechanism (the module docstring's guarantee).

    ``batches`` of ``(images, labels)``: images (B, C, H, W) in [-1, 1] at the release resolution, labels (B,) in
    ``[0, num_classes)`` (one class for unlabelled data); streamed, so the data set's pixels are never held at once.
    Unit-level: ``(images, labels, units)`` batches and ``unit_sizes`` (``central_image_query``): the same
    sensitivity per unit, so the same guarantee per unit.
    ``generator`` must be secret (``privacy.secret_generator()``): a known seed voids the guarantee. Returns the
    means ``noisy sum / max(noisy count, 1)`` clamped to the pixel range.
    """
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be positive (0 adds no noise: no privacy), got {noise_multiplier}")
    sums, counts = central_image_query(batches, num_classes, max_image_norm, unit_sizes)
    std = noise_multiplier * central_image_sensitivity(max_image_norm)
    noisy_sums = sums + std * torch.randn(sums.shape, generator=generator, dtype=torch.float64)
    noisy_counts = (counts + std * torch.randn(counts.shape, generator=generator, dtype=torch.float64)) / max_image_norm
    means = (noisy_sums / noisy_counts.clamp(min=1.0).reshape(-1, 1, 1, 1)).clamp(0, 1)
    return CentralImages(
        images=(means * 2 - 1).float(),
        sums=noisy_sums,
        counts=noisy_counts,
        noise_multiplier=noise_multiplier,
        max_image_norm=max_image_norm,
    )
