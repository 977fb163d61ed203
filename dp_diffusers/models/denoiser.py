"""One module for "predict the noise of these latents at these timesteps under this condition" (class labels,
a text context, or none), and one training loss.

Stage-1 training, DP fine-tuning (opacus wraps this module), the membership audit and the
pipeline all go through ``LatentDenoiser``, so every path conditions the UNet the same way; stage 1,
the DP stage, the benchmarks and the examples all train with ``DiffusionLoss``.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from .class_embedder import ClassEmbedder
from .dit import DiTClassRows


class LatentDenoiser(nn.Module):
    """The base's denoising backbone (``unet``: a UNet or DiT's transformer) plus its conditioning.

    * ``UNet2DConditionModel`` + ``ClassEmbedder``: labels -> cross-attention context (the paper's
      class-conditional LDM); null class: the embedder's last row;
    * ``UNet2DConditionModel`` alone (Stable Diffusion): the condition *is* the cross-attention context, (B, L, D)
      text-encoder hidden states (computed once by the frozen public text encoder); its null is the empty
      prompt's context (``DiffusionLoss(null_context=...)``);
    * ``DiTTransformer2DModel``: labels through its adaLN label embedding; null class: its row
      ``num_embeds_ada_norm`` (DiT's classifier-free guidance); ``class_rows`` (``DiTClassRows``) adds private
      classes after it;
    * ``UNet2DModel`` with ``num_class_embeds``: labels added to the time embedding (no null class);
    * any UNet without either: unconditional (labels are ignored).

    The output is the noise (or v / sample) prediction only: a backbone that also predicts its variance
    (DiT's learned sigma, ``out_channels = 2 * in_channels``) has that half cut off, as ``DiTPipeline`` does.
    DiT's own label dropout (its ``LabelEmbedding`` drops labels at random in training mode) stays off, also
    after ``train()``: label dropout is ``DiffusionLoss``'s, the same for every family.

    Mixed precision (``--mixed_precision bf16|fp16``): the frozen backbone's weights in half precision, the
    trainable ones in fp32; ``input_dtype`` (the backbone's weight dtype) is what the latents and the class
    context are cast to on the way in. The prediction comes back in that dtype; the loss is taken in fp32.
    """

    def __init__(
        self,
        unet: nn.Module,
        class_embedder: ClassEmbedder | None = None,
        class_rows: DiTClassRows | None = None,
        input_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.unet = unet
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

    @property
    def conditioning_kind(self) -> str:
        """``"class"`` (labels), ``"text"`` (a cross-attention context) or ``"none"`` (unconditional)."""
        if self.class_embedder is None and isinstance(self.unet, UNet2DConditionModel):
            return "text"
        return "none" if self.num_classes is None else "class"

    @property
    def num_classes(self) -> int | None:
        """Classes the model is conditioned on (``None``: unconditional)."""
        if self.class_embedder is not None:
            return self.class_embedder.config.num_classes
        if isinstance(self.unet, DiTTransformer2DModel):
            rows = self.class_rows.config.num_rows + 1 if self.class_rows is not None else 0  # after the null class
            return self.unet.config.num_embeds_ada_norm + rows
        return getattr(self.unet.config, "num_class_embeds", None)

    @property
    def null_class_id(self) -> int | None:
        """The class id of "no class" (label dropout, the unconditional half of guidance); ``None`` if none."""
        if self.class_embedder is not None:
            return self.class_embedder.null_class_id
        if isinstance(self.unet, DiTTransformer2DModel):
            return self.unet.config.num_embeds_ada_norm
        return None

    def conditioning(self, condition: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The backbone keyword arguments that carry ``condition``: class labels (B,), or for a text model its
        context (B, L, D) (computed once per sampling call)."""
        if self.class_embedder is not None:
            context = self.class_embedder(condition)
        elif isinstance(self.unet, UNet2DConditionModel):
            if condition is None or not condition.is_floating_point():
                raise ValueError("A text-conditioned UNet needs its cross-attention context (B, L, D), not labels.")
            context = condition
        elif self.num_classes is not None:
            return {"class_labels": condition}
        else:
            return {}
        return {"encoder_hidden_states": context if self.input_dtype is None else context.to(self.input_dtype)}

    def denoise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The backbone's prediction for ``conditioning`` (from :meth:`conditioning`), variance half cut off."""
        inputs = noisy_latents if self.input_dtype is None else noisy_latents.to(self.input_dtype)
        prediction = self.unet(inputs, timesteps, **conditioning).sample
        channels = noisy_latents.shape[1]
        return prediction[:, :channels] if prediction.shape[1] == 2 * channels else prediction

    def forward(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.denoise(noisy_latents, timesteps, self.conditioning(condition))


def denoising_loss(
    model: nn.Module,
    scheduler,
    latents: torch.Tensor,
    condition: torch.Tensor | None,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Per-example diffusion loss, shape (B,): mean squared error of the model's prediction
    (epsilon, v or sample, following ``scheduler.config.prediction_type``) under ``condition`` (class labels or
    text context)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = model(noisy, timesteps, condition)
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


class DiffusionLoss:
    """The per-row training loss of every training path (stage 1, the DP stage, benchmarks, examples), shape (rows,).

    Each row (each noise-multiplicity copy too) gets its own timestep, uniform over the scheduler's training
    steps, and its own Gaussian noise; with ``null_class``, each row's label is replaced by the null class with
    probability ``label_dropout`` (the training that makes classifier-free guidance work); for a text model
    (conditions are (B, L, D) contexts) ``null_context``, the empty prompt's (1, L, D) context, replaces a row's
    caption with that probability (caption dropout); ``snr_gamma`` weights
    rows by Min-SNR (Hang et al. 2023, as diffusers' train_text_to_image.py); ``random_flip`` takes latents
    (rows, 2, c, h, w), an image's and its mirror's, and uses one of the two per row at random (diffusers'
    ``--random_flip``, drawn anew at every step and for every noise-multiplicity copy). All of it is per row: a
    row's draws change only its own loss, so under DP they stay inside that example's clipped gradient.
    ``use_labels=False`` (an unconditional base) ignores the labels.
    """

    def __init__(
        self,
        scheduler,
        *,
        use_labels: bool = True,
        null_class: int | None = None,
        label_dropout: float = 0.0,
        snr_gamma: float | None = None,
        null_context: torch.Tensor | None = None,
        random_flip: bool = False,
    ):
        if label_dropout > 0 and null_class is None and null_context is None:
            raise ValueError("label_dropout needs a null class (or null context) to drop the conditions to.")
        self.scheduler = scheduler
        self.use_labels = use_labels
        self.null_class = null_class
        self.null_context = null_context
        self.random_flip = random_flip
        self.label_dropout = label_dropout
        self.snr_gamma = snr_gamma

    def __call__(self, model: nn.Module, latents: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.random_flip:  # (rows, 2, c, h, w): each row's own pick of the image or its mirror
            pick = torch.randint(0, 2, (len(latents),), device=latents.device)
            latents = latents[torch.arange(len(latents), device=latents.device), pick]
        if not self.use_labels:
            labels = None
        elif self.label_dropout > 0:
            drop = torch.rand(len(labels), device=labels.device) < self.label_dropout
            if self.null_context is not None:  # text contexts (B, L, D): the empty prompt's
                null = self.null_context.to(device=labels.device, dtype=labels.dtype)
                labels = torch.where(drop[:, None, None], null, labels)
            else:
                labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        noise = torch.randn_like(latents)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(latents),), device=latents.device)
        loss = denoising_loss(model, self.scheduler, latents, labels, timesteps, noise)
        if self.snr_gamma is not None:
            loss = loss * min_snr_weights(self.scheduler, timesteps, self.snr_gamma)
        return loss


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-row loss weights min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = snr.clamp(max=gamma)
    if scheduler.config.prediction_type == "epsilon":
        return weights / snr
    if scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights
