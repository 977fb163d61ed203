"""Choosing the clipping norm C from public data.

DP-SGD's noise std is ``noise_multiplier * C / batch_size`` whatever the gradients are, so a C far
above the per-example gradient norms buries the signal: nothing is clipped and the noise is
calibrated to a bound the gradients never reach. With an adaptive optimiser (Adam) the scale of
the update does not depend on C, so the useful regime is C *below* most per-example norms: every
example is clipped to norm C (normalised DP-SGD, De et al. 2022, arXiv 2204.13650), and the
update follows the average direction.

These norms must not be measured on the private data: that would be a data-dependent choice
outside the accountant. :func:`per_example_gradient_norms` is meant for **public** data
(the base's pre-training set or a public stand-in for the private one), with the same adapter
and loss as the private run. No privacy guarantee is involved here; nothing private is read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def per_example_gradient_norms(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    *conditions: torch.Tensor | None,
) -> torch.Tensor:
    """L2 norm of each example's gradient over the trainable parameters, shape (N,).

    ``loss_fn(model, latents, *conditions)`` returns the per-example loss (B,) (the same function the
    private run clips; ``conditions``: each example's condition tensors, as the private run's data set holds
    them). One example at a time through autograd: exact, and cheap for the few hundred public examples a choice
    of C needs.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters (add the LoRA adapter first).")
    norms = []
    for i in range(len(latents)):
        rows = [column[i : i + 1] if column is not None else None for column in conditions]
        loss = loss_fn(model, latents[i : i + 1], *rows).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)))
    return torch.stack(norms).detach()


def suggest_max_grad_norm(norms: torch.Tensor, quantile: float = 0.1) -> float:
    """A clipping norm below ``quantile`` of the public per-example norms (default: their 10th
    percentile), so that about ``1 - quantile`` of the examples are clipped."""
    if norms.numel() == 0:
        raise ValueError("No gradient norms to choose from.")
    return float(torch.quantile(norms.float(), quantile))
