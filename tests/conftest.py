"""Tiny models and bases built in the test session: no download, seconds on 2 CPU cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402

from dp_diffusers import ClassEmbedder, DPLDMPipeline  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_vae(channels: int = 1) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=8,
        sample_size=16,
    )


def tiny_cond_unet(conv_projection: bool = False) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=not conv_projection,
    )


def tiny_uncond_unet() -> UNet2DModel:
    """The CompVis unconditional LDM layout: UNet2DModel with attention blocks."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False
    )


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A class-conditional base folder (random weights) with digit class names."""
    path = tmp_path_factory.mktemp("tiny-base")
    unet = tiny_cond_unet()
    pipe = DPLDMPipeline(
        vae=tiny_vae(),
        unet=unet,
        scheduler=scheduler(),
        class_embedder=ClassEmbedder(10, unet.config.cross_attention_dim),
        id2label={i: str(i) for i in range(10)},
    )
    pipe.save_pretrained(path)
    return path
