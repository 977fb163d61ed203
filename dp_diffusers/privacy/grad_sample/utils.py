"""Choosing and attaching a per-sample gradient engine (opacus' ``prepare_module`` plus ``fused``).

Guarantee: whatever the mode, only the modules that own trainable parameters get per-sample
gradients, and all of them are in training mode (opacus' hooks skip modules in eval mode).
"""

from __future__ import annotations

import warnings

from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.grad_sample.utils import prepare_module as opacus_prepare_module
from torch import nn

from .conv import make_conv_inputs_contiguous
from .fused_grad_sample_module import FusedGradSampleModule

GRAD_SAMPLE_MODES = ("fused", "hooks", "functorch", "ew")

# opacus registers full backward hooks on the adapted layers; their inputs (frozen activations)
# need no gradient, which torch reports on every backward. Harmless here: opacus reads the output
# gradients only.
warnings.filterwarnings(
    "ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs"
)


def train_trainable_layers(model: nn.Module) -> int:
    """Training mode for every module that owns trainable parameters (not recursive: the frozen
    rest keeps its mode). Returns the number of such modules.

    opacus' hooks compute per-sample gradients only for modules in training mode: a trainable
    layer left in eval mode (the class embedding, loaded by ``from_pretrained``, which calls
    ``eval()``) got none and the backward failed ("No activations detected"). All modes then see
    the same trainable layers in the same mode.
    """
    count = 0
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.training = True
            count += 1
    return count


def prepare_module(model: nn.Module, grad_sample_mode: str, *, noise_multiplicity: int = 1) -> AbstractGradSampleModule:
    """``model`` wrapped for per-sample gradients with ``loss_reduction="mean"`` and gradient
    accumulation forbidden. ``fused`` folds the k copies in the backward (``(B, ...)`` per example);
    opacus' modes give ``(B*k, ...)`` per row, folded by the optimizer."""
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
    train_trainable_layers(model)
    if grad_sample_mode == "fused":
        return FusedGradSampleModule(model, noise_multiplicity=noise_multiplicity)
    make_conv_inputs_contiguous(model)
    gsm = opacus_prepare_module(model, grad_sample_mode, batch_first=True, loss_reduction="mean")
    gsm.forbid_grad_accumulation()
    return gsm
