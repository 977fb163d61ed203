"""Data, one concern a module; every name is importable from ``dp_diffusers.data``. Everything here runs offline.

``embedded``: the embedded digit sets; ``user_data``: user data sets, their columns, subsets and validation part;
``units``: privacy units (user-level DP); ``images``: images to pixels; ``canaries``: audit canaries; ``encoding``:
latents by the frozen public autoencoder; ``cache``: encoded rows in memory or memory-mapped files; ``errors``: the
``DataError`` they raise.
"""

from .cache import rows_to_array, rows_to_arrays
from .canaries import CANARY_UNIT_SIZE, Canaries, audit_canaries, canary_candidates, canary_captions, make_canaries
from .embedded import (
    DIGIT_NAMES,
    EMBEDDED_DATASETS,
    load_private_digit_units,
    load_private_digits,
    load_public_digits,
    load_public_digits_8x8,
    public_class_names,
    uci_preprocessing,
)
from .encoding import (
    check_resolution,
    dataset_latents,
    decode_latents,
    encode_latents,
    latent_normalization,
    latent_scaling_factor,
    vae_scale_factor,
)
from .errors import DataError, row_list
from .images import (
    UNREADABLE_IMAGE_ERRORS,
    augmented_copies,
    dataset_to_tensors,
    image_transform,
    pixel_batches,
    unreadable_image,
)
from .units import privacy_unit_members, unit_members
from .user_data import (
    IMAGE_EXTENSIONS,
    dataset_captions,
    dataset_labels,
    label_names,
    load_image_dataset,
    resolve_columns,
    row_labels,
    seeded_subset,
    trained_rows,
    validation_split,
)

__all__ = [
    "DataError", "row_list",
    "DIGIT_NAMES", "EMBEDDED_DATASETS", "load_public_digits", "load_public_digits_8x8",
    "uci_preprocessing", "load_private_digits", "load_private_digit_units",
    "public_class_names",
    "IMAGE_EXTENSIONS", "load_image_dataset", "seeded_subset", "validation_split", "trained_rows", "resolve_columns",
    "label_names", "row_labels", "dataset_labels", "dataset_captions",
    "privacy_unit_members", "unit_members",
    "UNREADABLE_IMAGE_ERRORS", "image_transform", "unreadable_image", "pixel_batches", "dataset_to_tensors",
    "augmented_copies",
    "CANARY_UNIT_SIZE", "Canaries", "make_canaries", "audit_canaries", "canary_candidates", "canary_captions",
    "vae_scale_factor", "check_resolution", "latent_normalization", "encode_latents", "decode_latents",
    "latent_scaling_factor", "dataset_latents",
    "rows_to_array", "rows_to_arrays",
]  # fmt: skip
