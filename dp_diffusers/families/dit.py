"""DiT bases (``facebook/DiT-XL-2-256``): diffusers' ``DiTPipeline``.

Components ``transformer`` (``DiTTransformer2DModel``: class labels through its adaLN label embedding,
null class ``num_embeds_ada_norm`` for classifier-free guidance, learned sigma), ``vae`` (``AutoencoderKL``),
``scheduler``, and ``id2label`` in ``model_index.json`` (ImageNet names, comma-separated synonyms). The
transformer becomes ``DPLDMPipeline``'s denoiser; private classes it lacks get ``DiTClassRows`` after its null class.
"""

from __future__ import annotations

import os
from typing import Any

from diffusers import DiffusionPipeline

from ..models.dit import DiTClassRows
from .base import hub_options, register_family
from .class_conditional import ClassFamily

_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@register_family
class DiTFamily(ClassFamily):
    name = "dit"
    pipeline_class_name = "DiTPipeline"
    description = "DiT: AutoencoderKL + class-conditional DiTTransformer2DModel"
    lora_target_presets = {
        # the self-attention projections of every transformer block (the paper's choice for UNets)
        "attention": _ATTENTION,
        # ... plus the feed-forward projections
        "attention+ff": [*_ATTENTION, "ff.net.0.proj", "ff.net.2"],
        # ... plus the adaLN-Zero modulation (the timestep/class-conditioned scale, shift and gate)
        "attention+ff+adaln": [*_ATTENTION, "ff.net.0.proj", "ff.net.2", "norm1.linear"],
    }

    @classmethod
    def components(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        dit = cls.pipeline_class().from_pretrained(pretrained_model_name_or_path, **kwargs)
        # DiTPipeline keeps only its synonym lookup; the names by id are in model_index.json
        index = DiffusionPipeline.load_config(str(pretrained_model_name_or_path), **hub_options(kwargs))
        return {"vae": dit.vae, "unet": dit.transformer, "scheduler": dit.scheduler, "id2label": index.get("id2label")}

    @classmethod
    def num_classes(cls, modules):
        rows = modules.class_rows.config.num_rows + 1 if modules.class_rows is not None else 0  # after the null
        return modules.unet.config.num_embeds_ada_norm + rows

    @classmethod
    def null_class_id(cls, modules):
        return modules.unet.config.num_embeds_ada_norm

    @classmethod
    def add_classes(cls, pipe, count):
        # rows after the null class, which stays where DiTPipeline expects it
        pipe.class_rows = DiTClassRows.from_null_row(pipe.unet, count)
        return pipe.class_rows.config.first_id

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditions):
        return denoiser.backbone(noisy_latents, timesteps, class_labels=conditions["class_labels"])
