"""``DiTTransformer2DModel`` with diffusers' PEFT adapter API.

diffusers 0.42 gives ``DiTTransformer2DModel`` (the denoiser of ``facebook/DiT-XL-2-256``) no
``PeftAdapterMixin``, so ``add_adapter`` / ``load_lora_adapter`` / ``fuse_lora`` are missing. Mixing it
in is all that is needed: the weights and config are those of a plain ``DiTTransformer2DModel``.
"""

# diffusers' loader looks base classes up by name in the module recorded in model_index.json.
from diffusers import DiTTransformer2DModel, ModelMixin  # noqa: F401
from diffusers.loaders.peft import PeftAdapterMixin


class DiTTransformer2DModelWithLoRA(DiTTransformer2DModel, PeftAdapterMixin):
    pass
