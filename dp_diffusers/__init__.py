"""dp-diffusers: differentially private LoRA fine-tuning of latent diffusion models."""

__version__ = "0.1.0"

# diffusers' loader resolves a saved component by ``getattr(import_module(library), name)`` and
# checks it against base classes looked up *by name in the same library*; exporting ModelMixin
# here is what lets ``DPLDMPipeline.from_pretrained`` load our own components (ClassEmbedder,
# UNet2DModelWithLoRA).
from diffusers import ModelMixin

from .models import ClassEmbedder, LatentDenoiser, UNet2DModelWithLoRA, denoising_loss
from .pipelines import DPLDMPipeline
from .presets import PRESETS, ModelPreset, get_preset

__all__ = [
    "ClassEmbedder",
    "DPLDMPipeline",
    "LatentDenoiser",
    "ModelMixin",
    "ModelPreset",
    "PRESETS",
    "UNet2DModelWithLoRA",
    "__version__",
    "denoising_loss",
    "get_preset",
]
