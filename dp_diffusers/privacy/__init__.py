"""Differential privacy for LoRA fine-tuning: accounting, the opacus wiring, noise multiplicity."""

from .accounting import (
    ACCOUNTANTS,
    PrivacyBudget,
    PrivacyBudgetError,
    calibrate_noise_multiplier,
    check_delta,
    epsilon_for,
    max_steps_within_budget,
)
from .clipping import per_example_gradient_norms, suggest_max_grad_norm
from .engine import (
    GRAD_SAMPLE_MODES,
    DistributedPoissonSampler,
    DPTraining,
    PrivateTrainingState,
    make_conv_inputs_contiguous,
    make_private,
    poisson_data_loader,
    private_backward,
    secret_generator,
    train_trainable_layers,
)
from .noise_multiplicity import (
    DistributedDPOptimizerWithNoiseMultiplicity,
    DPOptimizerWithNoiseMultiplicity,
    average_over_copies,
    expand_for_noise_multiplicity,
)
from .report import DP_REPORT_NAME, build_dp_report, write_dp_report

__all__ = [
    "ACCOUNTANTS",
    "DP_REPORT_NAME",
    "DPOptimizerWithNoiseMultiplicity",
    "DPTraining",
    "DistributedDPOptimizerWithNoiseMultiplicity",
    "DistributedPoissonSampler",
    "GRAD_SAMPLE_MODES",
    "PrivacyBudget",
    "PrivacyBudgetError",
    "PrivateTrainingState",
    "average_over_copies",
    "build_dp_report",
    "calibrate_noise_multiplier",
    "check_delta",
    "epsilon_for",
    "expand_for_noise_multiplicity",
    "make_conv_inputs_contiguous",
    "make_private",
    "max_steps_within_budget",
    "per_example_gradient_norms",
    "poisson_data_loader",
    "private_backward",
    "secret_generator",
    "suggest_max_grad_norm",
    "train_trainable_layers",
    "write_dp_report",
]
