"""What the fused per-example gradient Functions share.

Contract of every Function in this package (``grad_sample_mode="fused"``): the backward returns the
input gradient (the frozen network needs it) and, instead of letting autograd sum the weight
gradient into ``p.grad``, writes the per-*example* gradient to ``p.grad_sample``, shape
``(B, *p.shape)``. The rows arrive example-major, k adjacent rows per example (the noise-multiplicity
copies of ``expand_for_noise_multiplicity``); they are contracted inside the layer, so the
``(B*k, ...)`` per-row tensor never exists. With ``loss_reduction="mean"`` over the ``B*k`` rows, row
r's gradient is ``B*k`` times its share of the mean loss's gradient, so the mean over an example's k
rows is ``B`` times their sum: the numbers of opacus' hooks mode followed by ``average_over_copies``.
"""

from __future__ import annotations

import torch
from torch import nn


class FusedState:
    """Shared by a model's patched layers: noise multiplicity ``k``, the forward generation (one per
    forward of the wrapped model, to tell a layer used twice in one forward from gradient
    accumulation across forwards) and whether the fused path is on."""

    def __init__(self, noise_multiplicity: int):
        self.k = int(noise_multiplicity)
        self.generation = 0
        self.enabled = True


def rows_to_examples(rows: int, k: int) -> int:
    """Number of examples behind ``rows`` example-major rows; a ragged row count is an error."""
    if rows % k:
        raise ValueError(f"{rows} rows are not a multiple of noise_multiplicity={k}: expand the batch with "
                         "expand_for_noise_multiplicity (private_backward does).")  # fmt: skip
    return rows // k


def store_grad_sample(state: FusedState, generation: int, param: nn.Parameter, grad_sample: torch.Tensor) -> None:
    """Set ``param.grad_sample``, or add to it for a layer used twice in one forward. A second backward
    without an optimizer step in between is an error (as in opacus' ``forbid_grad_accumulation``):
    Poisson sampling's accounting assumes one clipped step per logical batch."""
    grad_sample = grad_sample.to(param.dtype)
    current = getattr(param, "grad_sample", None)
    if current is not None and getattr(param, "_fused_generation", None) == generation:
        param.grad_sample = current + grad_sample
        return
    if current is not None:
        raise ValueError(
            "Poisson sampling is not compatible with grad accumulation. You need to call optimizer.step() after "
            "every forward/backward pass or consider using BatchMemoryManager"
        )
    param.grad_sample = grad_sample
    param._fused_generation = generation
