#!/usr/bin/env python
"""Cost of one DP step against the same step without privacy, per public base family.

    python benchmarks/bench_families.py --out benchmarks/results/dp_step_families.json

Models (random weights, LoRA rank 8 on the attention projections, 64 examples a step by default):
* ``dit``: a small ``DiTTransformer2DModel`` (hidden 128 = 4 heads x 32, 4 blocks, patch 2, 1,000 classes, learned
  sigma) on 4x16x16 latents (64 tokens); with ``--scale real`` the ``facebook/DiT-XL-2-256`` config (hidden 1152 =
  16 heads x 72, 28 blocks) on 4x32x32 latents;
* ``sd``: Stable Diffusion's ``UNet2DConditionModel`` layout (cross-attention at the first three levels) at
  widths (32, 64, 64, 64), a 64-dim text context of 77 tokens, on 4x16x16 latents; with ``--scale real`` the
  SD-1.5 UNet config (320, 640, 1280, 1280; 768-dim context) on 4x64x64 latents (512x512 images), LoRA on the
  self- and cross-attention projections;
* ``sdxl``: SDXL's ``UNet2DConditionModel`` layout (no attention at the first level, 1 / 2 / 2 transformer layers
  at the others, ``text_time`` added conditioning: a pooled embedding and 6 time ids per example) at widths (32, 64,
  64), a 128-dim context of 77 tokens, on 4x16x16 latents; with ``--scale real`` the SDXL-base UNet config (320, 640,
  1280; 1 / 2 / 10 transformer layers; 2048-dim context) on 4x128x128 latents (1024x1024 images);
* ``sd3``: an ``SD3Transformer2DModel`` (patch 2, dual attention, RMS qk-norm) with LoRA on its joint attention,
  under the flow-matching loss (logit-normal timesteps, preconditioned outputs): small (hidden 64, 2 blocks, 4x16x16
  latents, 64-dim contexts of 154 tokens); ``--scale wide`` at SD3.5-medium's widths with 2 blocks (hidden 1536,
  4096-dim context, 16x32x32 latents: 256 px); ``--scale real`` SD3.5-medium's config (24 blocks, 1024 px);
* ``flux``: a ``FluxTransformer2DModel`` (guidance embeddings, 2x2-packed latents) with LoRA on its double blocks'
  joint attention and the single blocks' q/k/v: small (hidden 64, 2 + 2 blocks, 4x16x16 latents, 64-token
  contexts); ``--scale wide`` at FLUX.1-dev's widths with 1 double + 1 single block (hidden 3072, 4096-dim context of
  64 tokens, 16x16x16 latents: 128 px); ``--scale real`` FLUX.1-dev's config (19 + 38 blocks, 512 px, 512 tokens);
* ``compvis``: a CompVis-style unconditional ``UNet2DModel`` (64, 128; attention at the second level and in the
  middle block) on 3x8x8 latents; with ``--scale real`` the ``CompVis/ldm-celebahq-256`` UNet config (224, 448,
  672, 896; attention at the three lower levels) on 3x64x64 latents. ``--scale real`` is for a GPU
  (``benchmarks/gpu_check.sh``); no weights are downloaded.

``--mixed_precision bf16`` puts the frozen backbone in bf16 (LoRA weights and per-sample gradients in fp32, as
train_dp_lora.py does); ``--gradient_checkpointing`` recomputes its activations in the backward (fused DP only).

DP step = ``private_backward`` + the DP optimizer's step (clip, noise, accountant) + ``zero_grad``, in fused mode
and in opacus' hooks mode; non-private step = the same LoRA with plain AdamW. All variants of a family run
interleaved in one process (median of per-round ratios, warm-up rounds dropped).
"""

from __future__ import annotations

import argparse

import bench_common as bc
import torch

TARGET = 1.10  # DP / non-private time, fused


def text_conditions(batch_size: int, context_dim: int, pooled_dim: int | None = None, resolution: int = 0,
                    length: int = 77, pooled_name: str = "text_embeds", guidance: bool = False):  # fmt: skip
    """Random per-example conditions of a text family, ``length``-token contexts (SDXL's also a pooled embedding and
    time ids; SD3 / FLUX a pooled embedding, FLUX-dev a guidance value), and their null (zeros)."""
    generator = torch.Generator().manual_seed(4321)
    conditions = {"encoder_hidden_states": torch.randn(batch_size, length, context_dim, generator=generator,
                                                       device="cpu")}  # fmt: skip
    if pooled_dim is not None:
        conditions[pooled_name] = torch.randn(batch_size, pooled_dim, generator=generator, device="cpu")
    if resolution:
        conditions["time_ids"] = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch_size,
                                              dtype=torch.float32)  # fmt: skip
    if guidance:
        conditions["guidance"] = torch.ones(batch_size)
    null = {name: torch.zeros(1, *value.shape[1:]) for name, value in conditions.items()
            if name not in ("time_ids", "guidance")}  # fmt: skip
    return conditions, null


def build(family: str, rank: int, seed: int, batch_size: int, scale: str = "tiny", mixed_precision: str = "no",
          gradient_checkpointing: bool = False):  # fmt: skip
    """(LatentDenoiser with LoRA on attention, latent shape, noise scheduler, per-example conditions and their null,
    or ``None`` for class labels, objective) of a base of ``family``: small, at the public checkpoint's configuration
    (``scale="real"``) or, for the transformers SD3 and FLUX, at its real widths with two blocks (``"wide"``)."""
    from diffusers import (
        DDPMScheduler,
        DiTTransformer2DModel,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
        UNet2DModel,
    )
    from diffusers.training_utils import cast_training_params

    from dp_diffusers import LatentDenoiser
    from dp_diffusers.families import FAMILIES
    from dp_diffusers.lora import add_lora, make_lora_config

    torch.manual_seed(seed)
    real = scale != "tiny"  # (the UNet families have no "wide" scale: it means their real one)
    conditions, null = None, None
    if family == "dit":
        heads, head_dim, layers, size = (16, 72, 28, 32) if real else (4, 32, 4, 16)
        backbone = DiTTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
            sample_size=size, patch_size=2, num_embeds_ada_norm=1000,
        )  # fmt: skip
        shape, pipeline = (4, size, size), "DiTPipeline"
    elif family == "sd":
        channels, size, heads, context = ((320, 640, 1280, 1280), 64, 8, 768) if real else ((32, 64, 64, 64), 16, 2, 64)
        backbone = UNet2DConditionModel(
            sample_size=size, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=context,
            attention_head_dim=heads, norm_num_groups=32 if real else 16,
        )  # fmt: skip
        shape, pipeline = (4, size, size), "StableDiffusionPipeline"
        conditions, null = text_conditions(batch_size, context)
    elif family == "sdxl":
        # stabilityai/stable-diffusion-xl-base-1.0's UNet config (1024 px: 4x128x128 latents) or a small one
        if real:
            channels, size, depth, heads = (320, 640, 1280), 128, (1, 2, 10), (5, 10, 20)
            context, pooled, time_dim = 2048, 1280, 256
        else:
            channels, size, depth, heads = (32, 64, 64), 16, (1, 2, 2), (2, 4, 4)
            context, pooled, time_dim = 128, 64, 16
        backbone = UNet2DConditionModel(
            sample_size=size, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=context,
            transformer_layers_per_block=depth, attention_head_dim=heads, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + pooled, norm_num_groups=32 if real else 16,
        )  # fmt: skip
        shape, pipeline = (4, size, size), "StableDiffusionXLPipeline"
        conditions, null = text_conditions(batch_size, context, pooled, size * 8)
    elif family == "sd3":
        # stabilityai/stable-diffusion-3.5-medium's transformer (hidden 1536 = 24 x 64, 24 blocks, dual attention in
        # the first 13, patch 2, 16-channel latents; 1024 px) or its widths with 2 blocks (256 px), or a small one
        heads, head_dim, layers, latent, size = {"real": (24, 64, 24, 16, 128), "wide": (24, 64, 2, 16, 32),
                                                 "tiny": (4, 16, 2, 4, 16)}[scale]  # fmt: skip
        joint, pooled = (4096, 2048) if scale != "tiny" else (64, 64)
        backbone = SD3Transformer2DModel(
            sample_size=size, patch_size=2, in_channels=latent, out_channels=latent, num_layers=layers,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint,
            caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled, pos_embed_max_size=max(size, 96),
            qk_norm="rms_norm", dual_attention_layers=tuple(range(min(13, layers))),
        )  # fmt: skip
        shape, pipeline = (latent, size, size), "StableDiffusion3Pipeline"
        conditions, null = text_conditions(batch_size, joint, pooled, length=77 + 77, pooled_name="pooled_projections")
    elif family == "flux":
        # black-forest-labs/FLUX.1-dev's transformer (hidden 3072 = 24 x 128, 19 double + 38 single blocks, 16-channel
        # latents packed 2x2; 512 px) or its widths with 1 + 1 blocks (128 px), or a small one; T5 context 512 tokens
        # (real), 64 (wide, tiny)
        heads, head_dim, double, single, latent, size, length = {
            "real": (24, 128, 19, 38, 16, 64, 512), "wide": (24, 128, 1, 1, 16, 16, 64),
            "tiny": (2, 32, 2, 2, 4, 16, 64)}[scale]  # fmt: skip
        joint, pooled = (4096, 768) if scale != "tiny" else (64, 32)
        backbone = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * latent, num_layers=double, num_single_layers=single,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint,
            pooled_projection_dim=pooled, guidance_embeds=True,
            axes_dims_rope=[16, 56, 56] if scale != "tiny" else [8, 12, 12],
        )  # fmt: skip
        shape, pipeline = (latent, size, size), "FluxPipeline"
        conditions, null = text_conditions(batch_size, joint, pooled, length=length, pooled_name="pooled_projections",
                                           guidance=True)  # fmt: skip
    else:
        if real:
            channels, size, per_block = (224, 448, 672, 896), 64, 2
            down = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
            up = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
        else:
            channels, size, per_block = (64, 128), 8, 1
            down, up = ("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")
        backbone = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=channels,
                               down_block_types=down, up_block_types=up, attention_head_dim=32,
                               layers_per_block=per_block)  # fmt: skip
        shape, pipeline, conditions, null = (3, size, size), "LDMPipeline", {}, {}
    add_lora(backbone, make_lora_config(rank, targets=FAMILIES[pipeline].lora_targets("attention", backbone)))
    with torch.no_grad():  # lora_B starts at 0; give it weights so every path carries gradient
        for name, param in backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    if dtype != torch.float32:
        backbone.to(dtype=dtype)
        cast_training_params(backbone, dtype=torch.float32)
    if gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    model = LatentDenoiser(backbone, FAMILIES[pipeline], input_dtype=dtype if dtype != torch.float32 else None)
    if family in ("sd3", "flux"):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0 if family == "sd3" else 1.0)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0015, beta_end=0.0195)
    return model, shape, scheduler, conditions, null, model.family.objective(scheduler)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_common_args(parser)
    parser.add_argument("--families", default="dit,compvis,sd,sdxl,sd3,flux")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Fused DP only (and non-private).")
    parser.add_argument("--scale", default="tiny", choices=["tiny", "wide", "real"],
                        help="real: the Hub checkpoints' configs; wide: SD3 / FLUX at real widths with two blocks.")
    parser.add_argument("--modes", default="fused,hooks")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="Write the results as JSON here (and a .md table beside it).")
    args = parser.parse_args(argv)
    bc.set_threads(args.threads)

    rows, results = [], {}
    for family in args.families.split(","):
        options = dict(scale=args.scale, mixed_precision=args.mixed_precision,
                       gradient_checkpointing=args.gradient_checkpointing)  # fmt: skip
        with torch.device(args.device):  # built where it runs: a 12B-parameter transformer initialises in seconds
            model, shape, scheduler, conditions, null, objective = build(family, args.rank, args.seed,
                                                                         args.batch_size, **options)  # fmt: skip
        common = dict(batch_size=args.batch_size, device=args.device, latent_shape=shape, scheduler=scheduler,
                      conditions=conditions, null_condition=null, objective=objective)  # fmt: skip
        _, np_step = bc.make_steps(model, grad_sample_mode=None, **common)
        steps = {"non-private": np_step}
        for mode in args.modes.split(","):
            with torch.device(args.device):
                dp_model = build(family, args.rank, args.seed, args.batch_size, **options)[0]
            steps[mode], _ = bc.make_steps(dp_model, grad_sample_mode=mode, make_nonprivate=False, **common)
        times = bc.interleaved(steps, args.reps, args.warmup, args.device, args.seed)
        trainable = sum(p.numel() for p in bc.trainable(model))
        ms = {k: 1000 * bc.median(v) for k, v in times.items()}
        results[family] = {"trainable": trainable, "ms": ms, "images_per_s": {k: args.batch_size / (v / 1000)
                                                                              for k, v in ms.items()}}  # fmt: skip
        for mode in args.modes.split(","):
            ratio = bc.median_ratio(times[mode], times["non-private"])
            low, high = bc.spread(times[mode], times["non-private"])
            results[family][mode] = {"ratio": ratio, "range": [low, high]}
            target = bc.verdict(ratio, TARGET) if mode == "fused" else ""
            ms = results[family]["ms"]
            rows.append([family, mode, trainable, f"{ms['non-private']:.0f}", f"{ms[mode]:.0f}",
                         f"{ratio:.3f} ({low:.2f}-{high:.2f})", target])  # fmt: skip

    table = bc.markdown_table(
        ["family", "mode", "trainable", "non-private ms", "DP ms", "DP / non-private time", f"<= {TARGET}"], rows
    )
    info = bc.machine_info(args.threads)
    print(table)
    if args.out:
        path = bc.write_json(args.out, {"machine": info, "config": vars(args), "results": results})
        header = (f"Machine: {info['cpu']} ({info['logical_cpus']} logical CPUs, torch threads={args.threads}), "
                  f"torch {info['torch']}, diffusers {info['diffusers']}, opacus {info['opacus']}, {info['date']}. "
                  f"Batch {args.batch_size}, LoRA rank {args.rank} on attention, {args.reps} interleaved rounds "
                  "(median; range of the per-round ratios in brackets).\n\n")  # fmt: skip
        path.with_suffix(".md").write_text(header + table + "\n")


if __name__ == "__main__":
    main()
