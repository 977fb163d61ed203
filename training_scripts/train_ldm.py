#!/usr/bin/env python
"""Stage 1b (public data, no privacy): train a class-conditional latent diffusion UNet.

    accelerate launch training_scripts/train_ldm.py --vae_path outputs/vae --output_dir outputs/base

The frozen autoencoder encodes the public images once; a ``UNet2DConditionModel`` learns to
denoise the latents, conditioned through cross-attention on a learned class embedding (LDM /
DP-LDM), with label dropout so that classifier-free guidance works. The output folder is a whole
``DPLDMPipeline`` (model_index.json, vae/, unet/, class_embedder/, scheduler/, class names).
"""

import argparse
from dataclasses import replace

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, TensorDataset

from dp_diffusers import ClassEmbedder, DiffusionLoss, DPLDMPipeline, LatentDenoiser, NoisePrediction
from dp_diffusers.data import (
    check_resolution,
    dataset_labels,
    dataset_latents,
    label_names,
    resolve_columns,
)
from dp_diffusers.families import DPLDMFamily
from dp_diffusers.presets import get_preset
from dp_diffusers.training_utils import load_training_dataset, make_accelerator, parse_public_args, train_public_model

logger = get_logger(__name__, log_level="INFO")  # shown whatever configured logging first (diffusers scripts)

#: what the trackers (--report_to) are told of the run: no path, no data set name
TRACKED_HYPERPARAMETERS = (
    "preset", "resolution", "train_batch_size", "max_train_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps",
    "label_dropout", "use_ema", "snr_gamma", "mixed_precision", "seed",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae_path", type=str, required=True, help="Folder of a trained AutoencoderKL.")
    parser.add_argument("--preset", type=str, default="tiny")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--resolution", type=int, default=None, help="Default: the preset's.")
    parser.add_argument(
        "--unet_block_out_channels",
        type=int,
        nargs="+",
        default=None,
        help="The UNet's channels per level (as many levels as the preset's). Default: the preset's.",
    )
    parser.add_argument("--train_batch_size", type=int, default=128)
    parser.add_argument("--max_train_steps", type=int, default=1500)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lr_scheduler", type=str, default="cosine", help="diffusers' get_scheduler name.")
    parser.add_argument("--lr_warmup_steps", type=int, default=100)
    parser.add_argument("--label_dropout", type=float, default=0.1, help="Null-class probability (CFG).")
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the UNet and save it.")
    parser.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR loss weighting (Hang et al. 2023, arXiv 2303.09556), as in diffusers' train_text_to_image.py. "
        "5.0 is the recommended value. Default: plain MSE.",
    )
    return parse_public_args(parser, argv, checkpointing_steps=500)


def main(argv=None):
    args = parse_args(argv)
    preset = get_preset(args.preset)
    if args.unet_block_out_channels:
        if len(args.unet_block_out_channels) != len(preset.unet_block_out_channels):
            raise ValueError(
                f"--unet_block_out_channels needs {len(preset.unet_block_out_channels)} values (the {preset.name!r} "
                f"preset's levels), got {args.unet_block_out_channels}."
            )
        preset = replace(preset, unet_block_out_channels=tuple(args.unet_block_out_channels))
    accelerator = make_accelerator(args, args.mixed_precision)
    set_seed(args.seed)

    # Validate and encode before anything is written.
    vae = AutoencoderKL.from_pretrained(args.vae_path).eval().requires_grad_(False)
    resolution = args.resolution or vae.config.sample_size
    check_resolution(resolution, vae)
    dataset = load_training_dataset(args)
    image_column, label_column = resolve_columns(dataset, args.image_column, args.label_column)
    names = label_names(dataset, label_column)
    labels = dataset_labels(dataset, label_column)
    latents = dataset_latents(dataset, vae, resolution, image_column, args.cache_dir)
    logger.info(f"{len(latents)} latents of shape {tuple(latents.shape[1:])}, classes: {names}")

    latent_size = latents.shape[-1]
    unet = UNet2DConditionModel(
        **{
            **preset.unet_config(),
            "sample_size": latent_size,
            "in_channels": latents.shape[1],
            "out_channels": latents.shape[1],
        }
    )
    num_classes = len(names) if names else 1
    class_embedder = ClassEmbedder(num_classes, unet.config.cross_attention_dim)
    if labels is None:  # unlabelled data: one class
        labels = torch.zeros(len(latents), dtype=torch.long)
        names = ["image"]
    model = LatentDenoiser(unet, DPLDMFamily, class_embedder)
    noise_scheduler = DDPMScheduler(**preset.scheduler_config())
    ema = EMAModel(model.parameters(), decay=0.999) if args.use_ema else None

    loader = DataLoader(TensorDataset(latents, labels), batch_size=args.train_batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=min(args.lr_warmup_steps, args.max_train_steps // 2),
        num_training_steps=args.max_train_steps,
    )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    loss_fn = DiffusionLoss(
        NoisePrediction(noise_scheduler, snr_gamma=args.snr_gamma),
        ("class_labels",),
        null_condition={"class_labels": torch.tensor([class_embedder.null_class_id])},
        dropout=args.label_dropout,
    )

    def step(batch) -> dict[str, float]:
        loss = loss_fn(model, *batch).mean()
        accelerator.backward(loss)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        if ema is not None:
            ema.step(model.parameters())
        return {"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0]}

    train_public_model(accelerator, args, loader, step, project="train_ldm", tracked=TRACKED_HYPERPARAMETERS)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(trained.parameters())
        pipeline = DPLDMPipeline(
            vae=vae,
            unet=trained.unet,
            scheduler=DDIMScheduler.from_config(noise_scheduler.config),
            class_embedder=trained.class_embedder,
            id2label=dict(enumerate(names)),
        )
        pipeline.save_pretrained(args.output_dir)
        logger.info(f"Saved the base pipeline to {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
