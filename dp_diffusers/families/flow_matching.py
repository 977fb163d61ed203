"""What the flow-matching transformer families (SD3 / SD3.5, FLUX.1) share: the objective's settings with
per-family defaults (diffusers' SD3 / FLUX LoRA scripts' flags), T5's sequence length, and LoRA on a transformer."""

from __future__ import annotations

from dataclasses import asdict
from typing import ClassVar

from .base import ConditionOptions, ObjectiveOptions
from .text import TextFamily


class FlowMatchingFamily(TextFamily):
    """A text-to-image transformer trained by rectified flow (``models.objectives.FlowMatching``)."""

    lora_prefix = "transformer"
    #: the objective's defaults (diffusers' script of the family); flags override them field by field
    objective_defaults: ClassVar[ObjectiveOptions]
    #: T5 tokens per caption when --max_sequence_length is not given (the family's diffusers script default)
    default_max_sequence_length: ClassVar[int]
    #: the tokenizer whose length is --max_sequence_length (the T5 one)
    t5_tokenizer: ClassVar[str]

    @classmethod
    def check_training(cls, pipe, options, objective=None):
        from ..data import DataError

        if options.train_class_embedding:
            raise DataError("--train_class_embedding: a text-to-image base has no class embedding to train.")
        if options.guidance_scale is not None and not getattr(pipe.unet.config, "guidance_embeds", False):
            raise DataError(f"--guidance_scale: this {cls.name} base's transformer takes no guidance input (only "
                            "guidance-distilled FLUX.1 bases, like -dev, do).")  # fmt: skip

    @classmethod
    def objective(cls, scheduler, options=None):
        from ..models.objectives import FlowMatching

        given = {k: v for k, v in asdict(options or ObjectiveOptions()).items() if v is not None}
        return FlowMatching(scheduler, **{**asdict(cls.objective_defaults), **given})

    @classmethod
    def max_sequence_length(cls, options: ConditionOptions | None) -> int:
        return (options and options.max_sequence_length) or cls.default_max_sequence_length

    @classmethod
    def trained_max_sequence_length(cls, options):
        return cls.max_sequence_length(options)

    @classmethod
    def sampling_kwargs(cls, pipe):
        return {"max_sequence_length": cls.max_sequence_length(pipe.condition_options)}

    @classmethod
    def max_lengths(cls, pipe, options):
        lengths = super().max_lengths(pipe, options)
        if cls.t5_tokenizer in lengths:
            lengths[cls.t5_tokenizer] = cls.max_sequence_length(options)
        return lengths

    @classmethod
    def transformer(cls, denoiser, **inputs):
        """The transformer's ``sample`` for keyword inputs; the latents and text embeddings in the input dtype
        (timesteps, guidance and ids as given, as diffusers' scripts pass them)."""
        cast = ("hidden_states", "encoder_hidden_states", "pooled_projections")
        return denoiser.unet(**{name: denoiser.cast(value) if name in cast else value
                                for name, value in inputs.items()}).sample  # fmt: skip
