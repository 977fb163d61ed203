"""Noise multiplicity (DPDM, Dockhorn et al. 2022): k diffusion draws per private example, one clip; and its
generalisation to privacy units (unit-level DP): all rows of one unit (its examples' k copies), one clip.

Each example of a logical batch is repeated k times, each copy with its own timestep and noise.
The example's gradient is the **average of its k copies' gradients, clipped once** to
``max_grad_norm``. Guarantee: the per-example sensitivity stays exactly ``max_grad_norm`` for any
k, so the accountant's numbers hold unchanged. (Clipping each copy separately, as stock opacus does
on a repeated batch, lets one example move the update by up to ``k * max_grad_norm`` while the
noise is sized for ``max_grad_norm``: the stated epsilon is then wrong.)

Unit-level DP (``--privacy_unit_column``): every sampled privacy unit (a person) contributes the **average of
all its rows' gradients** (up to ``max_examples_per_unit`` of its examples, k copies each), **clipped once**:
the sensitivity of adding or removing one unit, whatever its number of examples, is exactly ``max_grad_norm``
(the mean of vectors is a convex combination: one unit moves the sum by at most C), so the accountant counts
units at the units' sample rate. The rows' units are ``row_groups``.

opacus has no notion of copies or units: the optimizers here fold the rows of each example (each unit) into their
mean before opacus' own clipping runs (for opacus' per-row modes; ``grad_sample_mode="fused"`` folds them in the
backward, ``grad_sample/``, and says so with ``copies_folded_in_backward``).
"""

from __future__ import annotations

import torch
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

from .row_randomness import RowRandomness


def expand_for_noise_multiplicity(tensor: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """Repeat each row k times, copies adjacent: rows ``[x0, x0, .., x1, x1, ..]`` (example-major)."""
    if tensor is None or k == 1:
        return tensor
    return tensor.repeat_interleave(k, dim=0)


def average_over_groups(grad_sample: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(rows, ...) per-row gradients -> (G, ...) mean over each group's rows (``groups``: (rows,) ids 0..G-1)."""
    groups = groups.to(grad_sample.device)
    if len(groups) != grad_sample.shape[0]:
        raise ValueError(f"{grad_sample.shape[0]} per-sample gradients but {len(groups)} row groups.")
    counts = torch.bincount(groups).to(grad_sample.dtype)
    sums = grad_sample.new_zeros(len(counts), *grad_sample.shape[1:]).index_add_(0, groups, grad_sample)
    return sums / counts.view(-1, *[1] * (grad_sample.dim() - 1))


def average_over_copies(grad_sample: torch.Tensor, k: int) -> torch.Tensor:
    """(B*k, ...) per-row gradients in example-major order -> (B, ...) per-example mean."""
    if k == 1:
        return grad_sample
    if grad_sample.shape[0] % k:
        raise ValueError(f"{grad_sample.shape[0]} per-sample gradients are not a multiple of noise_multiplicity={k}.")
    return grad_sample.reshape(grad_sample.shape[0] // k, k, *grad_sample.shape[1:]).mean(dim=1)


class NoiseMultiplicityMixin:
    """Mixin for opacus DP optimizers: averages each example's k copies before clipping.

    With ``loss_reduction="mean"`` over the B*k rows, opacus' per-row gradient is the gradient of
    that row's own loss, so the mean over the copies is exactly the gradient of the example's
    k-draw average loss; opacus then clips it once and divides the noised sum by the expected
    number of *examples* per logical batch.
    """

    #: k, the copies per example.
    noise_multiplicity: int
    #: True when the per-sample gradients arrive already averaged over the k copies, (B, ...) per
    #: example (``grad_sample_mode="fused"`` does it inside the backward); then nothing is folded here.
    copies_folded_in_backward: bool
    #: (rows,) privacy unit of each row for the current logical batch's physical batch (unit-level DP; set by
    #: ``private_backward``); ``None``: k rows per example
    row_groups: torch.Tensor | None
    #: the run's keyed per-row randomness (``make_private`` sets it; ``private_backward`` draws the rows' generators)
    row_randomness: RowRandomness | None

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplicity: int = 1,
        copies_folded_in_backward: bool = False,
        **kwargs,
    ):
        super().__init__(optimizer, **kwargs)
        if noise_multiplicity < 1:
            raise ValueError(f"noise_multiplicity must be >= 1, got {noise_multiplicity}")
        self.noise_multiplicity = int(noise_multiplicity)
        self.copies_folded_in_backward = bool(copies_folded_in_backward)
        self.row_groups = None
        self.row_randomness = None

    def clip_and_accumulate(self) -> None:
        k, groups = self.noise_multiplicity, self.row_groups
        if (k > 1 or groups is not None) and not self.copies_folded_in_backward:

            def fold(g: torch.Tensor) -> torch.Tensor:
                if len(g) == 0:  # an empty Poisson batch
                    return g
                return average_over_copies(g, k) if groups is None else average_over_groups(g, groups)

            for p in self.params:
                if isinstance(p.grad_sample, list):
                    p.grad_sample = [fold(g) for g in p.grad_sample]
                elif p.grad_sample is not None:
                    p.grad_sample = fold(p.grad_sample)
        super().clip_and_accumulate()

    def scale_grad(self) -> None:
        """opacus' ``scale_grad`` (``p.grad /= expected_batch_size * accumulated_iterations``) with the divisor
        computed once: opacus re-derives ``accumulated_iterations`` from every parameter for every parameter, a
        quadratic loop that cost ~0.7 s per 180 steps of 64 LoRA tensors."""
        if self.loss_reduction == "mean":
            divisor = self.expected_batch_size * self.accumulated_iterations
            for p in self.params:
                p.grad /= divisor


class DPOptimizerWithNoiseMultiplicity(NoiseMultiplicityMixin, DPOptimizer):
    """``opacus.optimizers.DPOptimizer`` that clips the average of each example's k copies."""


class DistributedDPOptimizerWithNoiseMultiplicity(NoiseMultiplicityMixin, DistributedDPOptimizer):
    """``opacus.optimizers.DistributedDPOptimizer`` (noise once, on rank 0, then all-reduce) that
    clips the average of each example's k copies."""
