"""The DP central images warm-up (DP-FETA's "easy" stage) of ``train_dp_lora.py``: the private examples' per-class
mean images released once (``privacy.release_central_images``: a Gaussian mechanism charged to the run's budget
before its first step), then non-private steps on augmented copies of them (post-processing: no privacy cost)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from .data import augmented_copies, encode_latents, pixel_batches
from .families import PrivateExamples
from .privacy import CentralImages, central_image_sensitivity, release_central_images, secret_generator
from .training_utils import fit


@dataclass
class CentralImageSettings:
    """The release's settings: noise multiplier, side of the means and the L2 clipping norm of each image."""

    noise_multiplier: float
    resolution: int
    max_image_norm: float

    @classmethod
    def defaults(cls, noise_multiplier: float, training_resolution: int, channels: int, resolution: int | None = None,
                 max_image_norm: float | None = None) -> CentralImageSettings:  # fmt: skip
        """Half the training resolution and half of sqrt(pixels) unless given (data-independent defaults: choosing
        them from the private images would leak)."""
        size = resolution or max(1, training_resolution // 2)
        return cls(noise_multiplier, size, max_image_norm or 0.5 * math.sqrt(channels * size * size))

    def record(self, epsilon_alone: float, **warm_up) -> dict:
        """The release's entry in ``dp_report.json``'s ``other_releases``."""
        return {
            "mechanism": "DP central images (per-class mean images by the Gaussian mechanism; DP-FETA's warm-up)",
            "noise_multiplier": self.noise_multiplier, "sample_rate": 1.0, "max_image_norm": self.max_image_norm,
            "sensitivity": central_image_sensitivity(self.max_image_norm), "resolution": self.resolution,
            "epsilon_alone": epsilon_alone, **warm_up,
        }  # fmt: skip


def release_private_central_images(examples: PrivateExamples, channels: int, release_ids: list[int],
                                   settings: CentralImageSettings) -> CentralImages:  # fmt: skip
    """The mean image of each class in ``release_ids`` (model class ids; unlabelled data: one), over the private
    images and canaries, with secret noise. An example of another class (a canary's random label) takes no part.
    Unit-level (``examples.units``): each person's images weigh 1 / their number, one bounded contribution per
    person (``privacy.central_image_query``)."""
    size = settings.resolution
    positions = {class_id: i for i, class_id in enumerate(release_ids)}
    labels = examples.labels if examples.labels is not None else torch.zeros(len(examples), dtype=torch.long)
    rows = torch.tensor([positions.get(int(label), -1) for label in labels])
    unit_of, unit_sizes = None, None
    if examples.units is not None:
        unit_of = torch.empty(len(examples), dtype=torch.long)
        for unit, members in enumerate(examples.units):
            unit_of[members] = unit
        unit_sizes = torch.tensor([len(members) for members in examples.units])
    parts = [pixel_batches(examples.dataset, size, channels, examples.image_column, batch_size=256)]
    if examples.canary_pixels is not None:
        parts.append([torch.nn.functional.interpolate(examples.canary_pixels, size=(size, size), mode="area")])

    def batches():
        start = 0
        for pixels in itertools.chain(*parts):
            part = rows[start : start + len(pixels)]
            units = [] if unit_of is None else [unit_of[start : start + len(pixels)][part >= 0]]
            start += len(pixels)
            yield pixels[part >= 0], part[part >= 0], *units

    return release_central_images(batches(), len(release_ids), noise_multiplier=settings.noise_multiplier,
                                  max_image_norm=settings.max_image_norm, generator=secret_generator(),
                                  unit_sizes=unit_sizes)  # fmt: skip


def warm_up(model, loss_fn, central: CentralImages, release_ids: list[int], vae, resolution: int, *, copies: int,
            steps: int, batch_size: int, learning_rate: float, weight_decay: float, seed: int,
            mirrored: bool) -> None:  # fmt: skip
    """``steps`` non-private steps on ``copies`` augmented copies of each released mean, with the DP run's loss."""
    pixels = augmented_copies(central.images, copies, resolution, seed=seed)
    columns = [encode_latents(vae, pixels, mirrored=mirrored)]
    if loss_fn.condition_names:  # a class-conditional base: each copy's class id
        columns.append(torch.tensor(release_ids).repeat_interleave(copies))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay)
    loader = DataLoader(TensorDataset(*columns), batch_size=min(batch_size, len(pixels)), shuffle=True, drop_last=True)
    fit(model, optimizer, loader, loss_fn, steps, 1, lambda loss: loss.backward())
