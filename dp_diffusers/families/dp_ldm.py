"""The project's own layout: ``DPLDMPipeline`` folders that ``train_ldm.py`` writes.

A ``UNet2DConditionModel`` conditioned through cross-attention on a ``ClassEmbedder`` (labels -> a one-token
context; null class: its last row), or a ``UNet2DModel`` (its own class embedding if ``num_class_embeds``, else
unconditional).
"""

from __future__ import annotations

import torch

from ..lora import LORA_TARGET_PRESETS
from ..models.class_embedder import ClassEmbedder
from .base import register_family
from .class_conditional import ClassFamily


def extend_class_embedder(embedder: ClassEmbedder, extra: int) -> ClassEmbedder:
    """New rows for ``extra`` new classes after the old ones, initialised from the null-class row, which stays
    last."""
    old = embedder.embedding.weight.detach()
    grown = ClassEmbedder(embedder.config.num_classes + extra, embedder.config.embedding_dim)
    with torch.no_grad():
        grown.embedding.weight[: old.shape[0] - 1] = old[:-1]
        grown.embedding.weight[old.shape[0] - 1 :] = old[-1]
    return grown


@register_family
class DPLDMFamily(ClassFamily):
    name = "dp-ldm"
    pipeline_class_name = "DPLDMPipeline"
    description = "train_ldm.py's bases: AutoencoderKL / VQModel, UNet2DConditionModel + ClassEmbedder"
    lora_target_presets = LORA_TARGET_PRESETS
    # 1: no guidance. More diverse samples train a better classifier than the pipeline's sharper guidance-3 ones:
    # on validation (docs/results.md, 3 seeds) 0.898 against 0.859 at eps 10, 0.924 against 0.855 without DP
    synthetic_data_guidance_scale = 1.0

    @classmethod
    def num_classes(cls, modules):
        if modules.class_embedder is not None:
            return modules.class_embedder.config.num_classes
        return getattr(modules.unet.config, "num_class_embeds", None)

    @classmethod
    def null_class_id(cls, modules):
        return modules.class_embedder.null_class_id if modules.class_embedder is not None else None

    @classmethod
    def add_classes(cls, pipe, count):
        first = pipe.class_embedder.config.num_classes
        pipe.class_embedder = extend_class_embedder(pipe.class_embedder, count)
        return first

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditions):
        labels = conditions.get("class_labels")
        if denoiser.class_embedder is not None:
            context = denoiser.cast(denoiser.class_embedder(labels))
            return denoiser.backbone(noisy_latents, timesteps, encoder_hidden_states=context)
        if labels is not None:  # a UNet2DModel's own class embedding
            return denoiser.backbone(noisy_latents, timesteps, class_labels=labels)
        return denoiser.backbone(noisy_latents, timesteps)
