from .class_embedder import ClassEmbedder
from .denoiser import DiffusionLoss, LatentDenoiser, denoising_loss
from .dit import DiTClassRows, DiTTransformer2DModelWithLoRA
from .unet_2d import UNet2DModelWithLoRA

__all__ = [
    "ClassEmbedder",
    "DiffusionLoss",
    "DiTClassRows",
    "DiTTransformer2DModelWithLoRA",
    "LatentDenoiser",
    "UNet2DModelWithLoRA",
    "denoising_loss",
]
