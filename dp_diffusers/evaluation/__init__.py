"""Evaluation of DP fine-tuned diffusion models: FID, downstream accuracy, membership inference."""

from .downstream import SmallCNN, accuracy, downstream_accuracy, train_classifier
from .fid import (
    INCEPTION_PATH_ENV,
    INCEPTION_URL,
    CleanFIDInception,
    InceptionWeightsNotFoundError,
    compute_fid,
    load_inception_feature_extractor,
)
from .membership import audit, denoising_loss_scores, membership_auc

__all__ = [
    "INCEPTION_PATH_ENV",
    "INCEPTION_URL",
    "CleanFIDInception",
    "InceptionWeightsNotFoundError",
    "SmallCNN",
    "accuracy",
    "audit",
    "compute_fid",
    "denoising_loss_scores",
    "downstream_accuracy",
    "load_inception_feature_extractor",
    "membership_auc",
    "train_classifier",
]
