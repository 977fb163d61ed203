"""Model presets: the ``tiny`` CPU default and paper-scale settings for GPU users.

A preset fixes the image format, the autoencoder, the latent UNet and the noise schedule; the
training scripts take one with ``--preset`` and each value can still be overridden by a flag.
Paper-scale presets mirror the DP-LDM / DP-LoRA configs (arXiv 2305.15759, 2406.01355): KL
autoencoders with f=8 (MNIST, 32x32 -> 4x4x3) or f=2 (CIFAR-10 / CelebA-32 -> 16x16x3,
CelebA-64 -> 32x32x3), 1000 diffusion steps, linear betas 0.0015 -> 0.0195, class conditioning
through cross-attention on a learned class embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """Architecture and schedule of a base LDM. ``latent_size = resolution / 2**(len(vae blocks)-1)``.
    The defaults are the paper presets' shared values."""

    name: str
    resolution: int
    num_channels: int
    vae_block_out_channels: tuple[int, ...]
    unet_block_out_channels: tuple[int, ...]
    cross_attention_dim: int
    latent_channels: int = 3
    unet_layers_per_block: int = 2
    vae_layers_per_block: int = 2
    attention_head_dim: int = 32
    #: per UNet level, whether it has (cross-)attention; empty: every level
    attention_levels: tuple[bool, ...] = ()
    beta_start: float = 0.0015
    beta_end: float = 0.0155
    num_train_timesteps: int = 1000
    description: str = ""

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    def vae_config(self) -> dict[str, Any]:
        n = len(self.vae_block_out_channels)
        return dict(
            in_channels=self.num_channels,
            out_channels=self.num_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=self.vae_block_out_channels,
            layers_per_block=self.vae_layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=min(32, self.vae_block_out_channels[0]),
            sample_size=self.resolution,
        )

    def unet_config(self) -> dict[str, Any]:
        levels = self.attention_levels or (True,) * len(self.unet_block_out_channels)
        return dict(
            sample_size=self.latent_size,
            in_channels=self.latent_channels,
            out_channels=self.latent_channels,
            block_out_channels=self.unet_block_out_channels,
            layers_per_block=self.unet_layers_per_block,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)),
            mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=self.cross_attention_dim,
            attention_head_dim=self.attention_head_dim,
            use_linear_projection=True,
            norm_num_groups=min(32, self.unet_block_out_channels[0]),
        )

    def scheduler_config(self) -> dict[str, Any]:
        return dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule="linear",
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            prediction_type="epsilon",
            clip_sample=False,
        )


_CIFAR10 = ModelPreset(
    name="cifar10",
    resolution=32,
    num_channels=3,
    vae_block_out_channels=(128, 256),
    unet_block_out_channels=(192, 384, 576),
    cross_attention_dim=512,
    description="Paper CIFAR-10 / CelebA-32 setting: KL f=2 -> 16x16x3 latents (pre-train on ImageNet-32).",
)


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        name="tiny",
        resolution=16,
        num_channels=1,
        vae_block_out_channels=(32, 64),
        unet_block_out_channels=(64, 128),
        cross_attention_dim=64,
        unet_layers_per_block=1,
        vae_layers_per_block=1,
        attention_levels=(False, True),
        beta_end=0.0195,
        description="16x16 grayscale digits, KL f=2 -> 8x8x3 latents; trains on 2 CPU cores in minutes.",
    ),
    "mnist": ModelPreset(
        name="mnist",
        resolution=32,
        num_channels=1,
        vae_block_out_channels=(64, 128, 256, 256),
        unet_block_out_channels=(128, 256, 256),
        cross_attention_dim=256,
        description="Paper MNIST setting: 32x32 input, KL f=8 -> 4x4x3 latents (pre-train on EMNIST letters).",
    ),
    "cifar10": _CIFAR10,
    # the CIFAR-10 architecture at 64x64 (32x32x3 latents)
    "celeba64": replace(
        _CIFAR10,
        name="celeba64",
        resolution=64,
        beta_end=0.0195,
        description="Paper CelebA-64 setting: KL f=2 -> 32x32x3 latents (pre-train on ImageNet-64).",
    ),
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]
