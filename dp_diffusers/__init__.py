"""dp-diffusers: differentially private LoRA fine-tuning of latent diffusion models."""

__version__ = "0.1.0"

from .models import ClassEmbedder, LatentDenoiser, UNet2DModelWithLoRA, denoising_loss
from .pipelines import DPLDMPipeline
from .presets import PRESETS, ModelPreset, get_preset

__all__ = [
    "ClassEmbedder",
    "DPLDMPipeline",
    "LatentDenoiser",
    "ModelPreset",
    "PRESETS",
    "UNet2DModelWithLoRA",
    "__version__",
    "denoising_loss",
    "get_preset",
]
