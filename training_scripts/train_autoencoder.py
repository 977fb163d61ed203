#!/usr/bin/env python
"""Stage 1a (public data, no privacy): train a KL-regularised AutoencoderKL.

    accelerate launch training_scripts/train_autoencoder.py --preset tiny --output_dir outputs/vae

Loss: L1 + MSE reconstruction plus a small KL term (LDM's KL-f autoencoders; the perceptual and
adversarial terms of the original LDM are left out, which is enough for small digit images).
"""

import argparse

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, TensorDataset

from dp_diffusers.data import dataset_to_tensors, latent_scaling_factor, resolve_columns
from dp_diffusers.presets import get_preset
from dp_diffusers.training_utils import load_training_dataset, make_accelerator, parse_public_args, train_public_model

logger = get_logger(__name__, log_level="INFO")  # shown whatever configured logging first (diffusers scripts)

#: what the trackers (--report_to) are told of the run: no path, no data set name
TRACKED_HYPERPARAMETERS = (
    "preset", "resolution", "num_channels", "train_batch_size", "max_train_steps", "learning_rate", "kl_weight",
    "mixed_precision", "seed",
)


class AutoencoderWithKL(torch.nn.Module):
    """``images -> (reconstruction, KL per pixel)`` in one forward, so DDP sees a single call."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor):
        posterior = self.vae.encode(images).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        return reconstruction, posterior.kl().mean() / images[0].numel()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=str, default="tiny", help="Architecture preset (see dp_diffusers.presets).")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--resolution", type=int, default=None, help="Default: the preset's.")
    parser.add_argument("--num_channels", type=int, default=None, help="1 (grayscale) or 3 (RGB); default: preset.")
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--max_train_steps", type=int, default=600)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-6)
    parser.add_argument(
        "--scaling_images", type=int, default=5000, help="Training images whose latent std sets scaling_factor."
    )
    return parse_public_args(parser, argv, checkpointing_steps=200)


def main(argv=None):
    args = parse_args(argv)
    preset = get_preset(args.preset)
    resolution = args.resolution or preset.resolution
    num_channels = args.num_channels or preset.num_channels
    accelerator = make_accelerator(args, args.mixed_precision)
    set_seed(args.seed)

    # Validate everything before anything is written.
    vae = AutoencoderKL(
        **{**preset.vae_config(), "in_channels": num_channels, "out_channels": num_channels, "sample_size": resolution}
    )
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(
            f"--resolution {resolution} is not divisible by the autoencoder's downsampling factor {factor}."
        )
    dataset = load_training_dataset(args)
    image_column, _ = resolve_columns(dataset, args.image_column, args.label_column)
    pixels, _ = dataset_to_tensors(dataset, resolution, num_channels, image_column, label_column=None)
    logger.info(f"{len(pixels)} training images of shape {tuple(pixels.shape[1:])}")

    loader = DataLoader(TensorDataset(pixels), batch_size=args.train_batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.learning_rate, total_steps=args.max_train_steps
    )
    model, optimizer, loader, scheduler = accelerator.prepare(AutoencoderWithKL(vae), optimizer, loader, scheduler)

    def step(batch) -> dict[str, float]:
        (images,) = batch
        recon, kl = model(images)
        rec_loss = (recon - images).abs().mean() + (recon - images).pow(2).mean()
        accelerator.backward(rec_loss + args.kl_weight * kl)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        return {"reconstruction_loss": rec_loss.item(), "kl": kl.item()}

    train_public_model(accelerator, args, loader, step, project="train_autoencoder", tracked=TRACKED_HYPERPARAMETERS)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model).vae.eval()
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, pixels[: args.scaling_images]))
        logger.info(f"Latent scaling factor (1 / std on the training images): {vae.config.scaling_factor:.4f}")
        vae.save_pretrained(args.output_dir)
        logger.info(f"Saved the autoencoder to {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
