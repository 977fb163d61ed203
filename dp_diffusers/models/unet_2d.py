"""``UNet2DModel`` with diffusers' PEFT adapter API.

diffusers 0.42 gives ``UNet2DModel`` (the UNet of CompVis' unconditional latent diffusion bases)
no ``PeftAdapterMixin``, so ``add_adapter`` / ``load_lora_adapter`` / ``fuse_lora`` are missing.
Mixing it in is all that is needed: the weights and config are those of a plain ``UNet2DModel``,
so this class loads any ``UNet2DModel`` checkpoint.
"""

from diffusers import UNet2DModel
from diffusers.loaders.peft import PeftAdapterMixin


class UNet2DModelWithLoRA(UNet2DModel, PeftAdapterMixin):
    pass
