"""One module for "predict the noise (or v, or the flow) of these latents at these timesteps under these
conditions", whatever the base family.

Stage-1 training, DP fine-tuning (opacus wraps this module), the membership audit and the pipeline's sampling loop
all go through ``LatentDenoiser``; how the conditions enter the backbone is the base family's
(``dp_diffusers.families``: ``family.predict``), so every path conditions the backbone the same way. ``models``
knows a family only as :class:`Predictor`, so that ``families`` depends on ``models`` and never the other way.
"""

from __future__ import annotations

from typing import Protocol

import torch
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from .class_embedder import ClassEmbedder
from .dit import DiTClassRows


class Predictor(Protocol):
    """What ``LatentDenoiser`` needs of a base family (a ``dp_diffusers.families.BaseFamily`` subclass)."""

    def predict(
        self, denoiser: LatentDenoiser, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
        conditions: dict[str, torch.Tensor],
    ) -> torch.Tensor:  # fmt: skip
        """The prediction (the objective's target, the latents' shape) of ``denoiser`` under ``conditions``."""


class LatentDenoiser(nn.Module):
    """The base's denoising backbone (``unet``: a UNet or a transformer) with what conditions it and is trained with
    it: a ``ClassEmbedder`` (the project's own bases: labels -> cross-attention context) and ``DiTClassRows``
    (label rows for classes a DiT base lacks), if any.

    ``forward(noisy_latents, timesteps, conditions)``: ``conditions`` maps the family's condition names to per-row
    tensors (class ids, a caption's context, pooled embeddings, ...); the family's ``predict`` turns them into the
    backbone's inputs. The output has the latents' shape: a backbone that also predicts its variance (DiT's learned
    sigma) has that half cut off, as ``DiTPipeline`` does. A ``LabelEmbedding``'s own dropout (DiT's) stays off, also
    after ``train()``: condition dropout is ``DiffusionLoss``'s, the same for every family.

    Mixed precision (``--mixed_precision bf16|fp16``): the frozen backbone in half precision, the trainable weights
    in fp32; ``input_dtype`` (the backbone's weight dtype) is what inputs are cast to on the way in. The prediction
    comes back in that dtype; the loss is taken in fp32.
    """

    def __init__(
        self,
        unet: nn.Module,
        family: Predictor,
        class_embedder: ClassEmbedder | None = None,
        class_rows: DiTClassRows | None = None,
        input_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.unet = unet
        self.family = family
        self.input_dtype = input_dtype
        self.class_embedder = class_embedder
        self.class_rows = class_rows
        if class_rows is not None:
            class_rows.attach(unet)
        self._label_embeddings = [m for m in unet.modules() if isinstance(m, LabelEmbedding)]
        for module in self._label_embeddings:
            module.eval()

    def train(self, mode: bool = True) -> LatentDenoiser:
        super().train(mode)
        for module in self._label_embeddings:
            module.eval()
        return self

    def cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in the backbone's input dtype (floating-point tensors only)."""
        if self.input_dtype is None or not tensor.is_floating_point():
            return tensor
        return tensor.to(self.input_dtype)

    def backbone(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, **inputs) -> torch.Tensor:
        """The backbone's ``sample`` for latents (cast to ``input_dtype``) and ``inputs``, variance half cut off."""
        prediction = self.unet(self.cast(noisy_latents), timesteps, **inputs).sample
        channels = noisy_latents.shape[1]
        return prediction[:, :channels] if prediction.shape[1] == 2 * channels else prediction

    def forward(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditions: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        return self.family.predict(self, noisy_latents, timesteps, conditions or {})
