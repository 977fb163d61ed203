"""``UNet2DModel`` with diffusers' PEFT adapter API.

diffusers 0.42 gives ``UNet2DModel`` (the UNet of CompVis' unconditional latent diffusion bases)
no ``PeftAdapterMixin``, so ``add_adapter`` / ``load_lora_adapter`` / ``fuse_lora`` are missing.
Mixing it in is all that is needed: the weights and config are those of a plain ``UNet2DModel``,
so this class loads any ``UNet2DModel`` checkpoint.
"""

# diffusers' loader imports the module recorded in model_index.json and looks its base classes up
# *by name in that module*: ModelMixin must be importable from here for from_pretrained to work.
from diffusers import ModelMixin, UNet2DModel  # noqa: F401
from diffusers.loaders.peft import PeftAdapterMixin


class UNet2DModelWithLoRA(UNet2DModel, PeftAdapterMixin):
    pass
