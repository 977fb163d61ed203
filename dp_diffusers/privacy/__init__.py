"""Differential privacy for LoRA fine-tuning (the part a DP reviewer audits; it imports nothing else
of dp_diffusers).

accounting.py           noise calibration, the budget guard, (epsilon, delta) checks, other releases
central_images.py       DP per-class mean images (DP-FETA's warm-up data): one Gaussian mechanism
data_loader.py          Poisson sampling of examples or privacy units over one or several processes, secret generators
grad_sample/            per-example gradients: the fused engine (one file per layer) and the mode choice
noise_multiplicity.py   k diffusion draws per example (a unit's rows), averaged before the one clip (the optimizers)
row_randomness.py       each row's draws inside the loss keyed by (secret key, step, example, copy): batch-independent
engine.py               make_private / private_backward / PrivateTrainingState: wiring only
clipping.py             choosing the clipping norm on public data
report.py               dp_report.json, the DP report type
"""

from .accounting import (
    ACCOUNTANTS,
    PrivacyBudget,
    PrivacyBudgetError,
    Release,
    calibrate_noise_multiplier,
    check_delta,
    epsilon_for,
    group_privacy_epsilon,
    max_steps_within_budget,
)
from .central_images import CentralImages, central_image_query, central_image_sensitivity, release_central_images
from .clipping import per_example_gradient_norms, suggest_max_grad_norm
from .data_loader import (
    DistributedPoissonSampler,
    PrivacyUnits,
    poisson_data_loader,
    secret_generator,
    unit_poisson_data_loader,
)
from .engine import DPTraining, PrivateTrainingState, make_private, private_backward
from .grad_sample import (
    GRAD_SAMPLE_MODES,
    FusedGradSampleModule,
    make_conv_inputs_contiguous,
    prepare_module,
    train_trainable_layers,
)
from .noise_multiplicity import (
    DistributedDPOptimizerWithNoiseMultiplicity,
    DPOptimizerWithNoiseMultiplicity,
    average_over_copies,
    average_over_groups,
    expand_for_noise_multiplicity,
)
from .report import DP_REPORT_NAME, DPReport, build_dp_report
from .row_randomness import RowRandomness

__all__ = [
    "ACCOUNTANTS",
    "CentralImages",
    "DP_REPORT_NAME",
    "DPReport",
    "DPOptimizerWithNoiseMultiplicity",
    "DPTraining",
    "DistributedDPOptimizerWithNoiseMultiplicity",
    "DistributedPoissonSampler",
    "FusedGradSampleModule",
    "GRAD_SAMPLE_MODES",
    "PrivacyBudget",
    "PrivacyBudgetError",
    "PrivacyUnits",
    "PrivateTrainingState",
    "Release",
    "RowRandomness",
    "average_over_copies",
    "average_over_groups",
    "build_dp_report",
    "calibrate_noise_multiplier",
    "central_image_query",
    "central_image_sensitivity",
    "check_delta",
    "epsilon_for",
    "expand_for_noise_multiplicity",
    "group_privacy_epsilon",
    "make_conv_inputs_contiguous",
    "make_private",
    "max_steps_within_budget",
    "per_example_gradient_norms",
    "poisson_data_loader",
    "prepare_module",
    "private_backward",
    "release_central_images",
    "secret_generator",
    "unit_poisson_data_loader",
    "suggest_max_grad_norm",
    "train_trainable_layers",
]
