"""Per-sample gradients: the ``fused`` engine (one file per layer kind, as opacus' ``grad_sample/``)
and the choice between it and opacus' own modes."""

from .fused_grad_sample_module import FusedGradSampleModule
from .utils import GRAD_SAMPLE_MODES, make_conv_inputs_contiguous, prepare_module, train_trainable_layers

__all__ = [
    "FusedGradSampleModule",
    "GRAD_SAMPLE_MODES",
    "make_conv_inputs_contiguous",
    "prepare_module",
    "train_trainable_layers",
]
