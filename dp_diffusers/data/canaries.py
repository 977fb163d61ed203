"""Audit canaries: random images (and captions) that a run trains on or never sees, rebuilt from their seed, so
that the membership audit and the one-run audit measure what the model memorised of individual examples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
