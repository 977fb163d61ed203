from .class_embedder import ClassEmbedder
from .denoiser import LatentDenoiser, denoising_loss
from .unet_2d import UNet2DModelWithLoRA

__all__ = ["ClassEmbedder", "LatentDenoiser", "UNet2DModelWithLoRA", "denoising_loss"]
