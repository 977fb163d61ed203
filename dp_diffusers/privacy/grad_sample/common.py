"""What the fused per-example gradient Functions share.

Contract of every Function in this package (``grad_sample_mode="fused"``): the backward returns the
input gradient (the frozen network needs it) and, instead of letting autograd sum the weight
gradient into ``p.grad``, writes the per-*group* gradient to ``p.grad_sample``, shape ``(G, *p.shape)``.
A group is one example's k adjacent rows (the noise-multiplicity copies of ``expand_for_noise_multiplicity``),
or, for unit-level DP, one privacy unit's rows (its examples' copies, adjacent: ``FusedState.row_groups``). The rows
are contracted inside the layer, so the per-row gradient tensor never exists. With ``loss_reduction="mean"`` over
the R rows, row r's gradient is R times its share of the mean loss's gradient, so the mean over a group's n_g rows
is R / n_g times their sum: the numbers of opacus' hooks mode followed by ``average_over_copies`` (or
``average_over_groups``).
"""

from __future__ import annotations

import torch
from torch import nn


class FusedState:
    """Shared by a model's patched layers: noise multiplicity ``k``, the rows' groups, the forward generation (one
    per forward of the wrapped model, to tell a layer used twice in one forward from gradient accumulation across
    forwards) and whether the fused path is on."""

    def __init__(self, noise_multiplicity: int):
        self.k = int(noise_multiplicity)
        self.generation = 0
        self.enabled = True
        #: (rows,) group of each row, 0..G-1, a group's rows adjacent (unit-level DP: each privacy unit's rows);
        #: ``None``: k adjacent rows per example
        self.row_groups: torch.Tensor | None = None


def grouped_rows(t: torch.Tensor, state: FusedState) -> torch.Tensor:
    """``(rows, *rest)`` -> ``(G, n, *rest)``: each group's rows side by side, a group with fewer than ``n`` rows
    padded with zero rows (which add nothing to any sum over rows)."""
    if state.row_groups is None:
        examples = rows_to_examples(t.shape[0], state.k)
        return t.reshape(examples, state.k, *t.shape[1:])
    groups = state.row_groups.to(t.device)
    if len(groups) != t.shape[0]:
        raise ValueError(f"{t.shape[0]} rows but {len(groups)} row groups: set them for this batch.")
    counts = torch.bincount(groups)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(groups), device=t.device) - starts[groups]
    n = int(counts.max())
    out = t.new_zeros(len(counts) * n, *t.shape[1:])
    out[groups * n + slot] = t
    return out.reshape(len(counts), n, *t.shape[1:])


def group_scale(rows: int, state: FusedState, device) -> torch.Tensor | int:
    """R / n_g for each group (the mean of a group's rows from the mean loss's gradient): the number of examples B
    for k rows per example."""
    if state.row_groups is None:
        return rows_to_examples(rows, state.k)
    return rows / torch.bincount(state.row_groups.to(device)).to(torch.float32)


def scaled(gs: torch.Tensor, scale: torch.Tensor | int) -> torch.Tensor:
    """``gs`` (G, ...) times each group's scale."""
    if isinstance(scale, int):
        return gs.mul_(scale)
    return gs.mul_(scale.to(gs.dtype).view(-1, *[1] * (gs.dim() - 1)))


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
