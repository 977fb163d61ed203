"""One module for "predict the noise of these latents at these timesteps for these classes".

Stage-1 training, DP fine-tuning (opacus wraps this module), the membership audit and the
pipeline all go through it, so every path conditions the UNet the same way.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .class_embedder import ClassEmbedder


class LatentDenoiser(nn.Module):
    """``unet`` plus its class conditioning.

    * ``UNet2DConditionModel`` + ``ClassEmbedder``: labels -> cross-attention context (the paper's
      class-conditional LDM);
    * ``UNet2DModel`` with ``num_class_embeds``: labels added to the time embedding;
    * any UNet without either: unconditional (labels are ignored).
    """

    def __init__(self, unet: nn.Module, class_embedder: ClassEmbedder | None = None):
        super().__init__()
        self.unet = unet
        self.class_embedder = class_embedder
        if isinstance(unet, UNet2DConditionModel) and class_embedder is None:
            raise ValueError("A UNet2DConditionModel needs a ClassEmbedder to provide its cross-attention context.")

    def conditioning(self, class_labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The UNet keyword arguments that carry ``class_labels`` (computed once per sampling call)."""
        if self.class_embedder is not None:
            return {"encoder_hidden_states": self.class_embedder(class_labels)}
        if getattr(self.unet.config, "num_class_embeds", None) is not None:
            return {"class_labels": class_labels}
        return {}

    def forward(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, **self.conditioning(class_labels)).sample


def denoising_loss(
    model: nn.Module,
    scheduler,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Per-example diffusion loss, shape (B,): mean squared error of the model's prediction
    (epsilon, v or sample, following ``scheduler.config.prediction_type``)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = model(noisy, timesteps, class_labels)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif kind == "sample":
        target = latents
    else:
        raise ValueError(f"Unknown prediction_type {kind!r}")
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
