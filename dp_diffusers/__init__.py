"""dp-diffusers: differentially private LoRA fine-tuning of latent diffusion models.

The names below load on first use (as diffusers' own top level does), so importing a part,
e.g. ``dp_diffusers.privacy``, does not load the pipelines and models.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dp-diffusers")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "ClassEmbedder": ".models",
    "DiffusionLoss": ".models",
    "LatentDenoiser": ".models",
    "NoisePrediction": ".models",
    "UNet2DModelWithLoRA": ".models",
    "DPLDMPipeline": ".pipelines",
    "PRESETS": ".presets",
    "ModelPreset": ".presets",
    "get_preset": ".presets",
}

__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
