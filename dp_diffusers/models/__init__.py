from .class_embedder import ClassEmbedder
from .denoiser import LatentDenoiser
from .dit import DiTClassRows, DiTTransformer2DModelWithLoRA
from .objectives import DiffusionLoss, NoisePrediction, Objective
from .unet_2d import UNet2DModelWithLoRA

__all__ = [
    "ClassEmbedder",
    "DiffusionLoss",
    "DiTClassRows",
    "DiTTransformer2DModelWithLoRA",
    "LatentDenoiser",
    "NoisePrediction",
    "Objective",
    "UNet2DModelWithLoRA",
]
