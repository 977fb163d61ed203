#!/usr/bin/env python
"""Sampling cost of ``DPLDMPipeline`` with a fused LoRA adapter against a plain diffusers loop.

    python benchmarks/bench_sampling.py --out benchmarks/results/sampling.json

Same random-weight base (a preset's AutoencoderKL + UNet2DConditionModel + ClassEmbedder, DDIM),
same batch, same number of steps, classifier-free guidance in both (batch doubled with the null
class), VAE decode included. Variants, timed interleaved (median of per-round ratios to "plain"):

* ``plain``: a hand-written diffusers loop (``scheduler.step`` on ``unet(...).sample``) on a copy
  of the base UNet without any LoRA layer: the floor;
* ``pipeline_base``: ``DPLDMPipeline`` without an adapter (pipeline overhead alone);
* ``pipeline_fused``: ``DPLDMPipeline`` with a rank-8 adapter loaded and ``fuse_lora()``-ed
  (the recommended way to sample; target <= 1.02 x plain);
* ``pipeline_unfused``: the same adapter left as peft LoRA layers (extra matmuls per step).

Whole calls last seconds and a shared CPU's speed drifts by +-20 % over seconds, so a second,
finer measurement times single UNet forwards (fused adapter vs plain UNet, the same CFG batch)
interleaved a few hundred times: the cost fusing leaves behind (peft's merged-layer wrappers),
without the drift. Each ratio comes with a bootstrap 95 % interval; a verdict of "within noise"
means the interval straddles the target.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import bench_common as bc
import torch

TARGET_FUSED_OVER_PLAIN = 1.02


def build_pipeline(preset_name: str, seed: int):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from dp_diffusers import ClassEmbedder, DPLDMPipeline
    from dp_diffusers.presets import get_preset

    preset = get_preset(preset_name)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**preset.unet_config())
    pipe = DPLDMPipeline(
        vae=AutoencoderKL(**preset.vae_config()),
        unet=unet,
        scheduler=DDIMScheduler(**preset.scheduler_config()),
        class_embedder=ClassEmbedder(10, preset.cross_attention_dim),
        id2label={i: str(i) for i in range(10)},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_adapter(unet, folder: str, rank: int, seed: int) -> None:
    """A rank-``rank`` adapter on the attention projections with non-zero B (so fusing changes weights)."""
    from dp_diffusers.lora import add_lora, make_lora_config, save_lora_weights

    unet = copy.deepcopy(unet)
    add_lora(unet, make_lora_config(rank, targets="attention"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    save_lora_weights(unet, folder)


def plain_loop(unet, vae, embedder, scheduler, labels, steps: int, guidance_scale: float, seed: int):
    """The diffusers sampling loop written out, as a user without this package would."""
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    shape = (len(labels), unet.config.in_channels, size, size)
    latents = torch.randn(shape, generator=generator).to(labels.device)
    latents = latents * scheduler.init_noise_sigma
    context = embedder(torch.cat([torch.full_like(labels, embedder.null_class_id), labels]))
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond, cond = unet(model_input, t, encoder_hidden_states=context).sample.chunk(2)
        latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents, eta=0.0).prev_sample
    image = vae.decode(latents / (vae.config.scaling_factor or 1.0)).sample
    return (image / 2 + 0.5).clamp(0, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_common_args(parser)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch_size", type=int, default=20, help="Images per call (2x rows with guidance).")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per call.")
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--unet_calls", type=int, default=300, help="Interleaved rounds of single UNet forwards.")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    bc.set_threads(args.threads)

    fused = build_pipeline(args.preset, args.seed)
    unfused = build_pipeline(args.preset, args.seed)
    base = build_pipeline(args.preset, args.seed)
    plain_unet = copy.deepcopy(base.unet)
    plain_scheduler = copy.deepcopy(base.scheduler)
    with tempfile.TemporaryDirectory() as folder:
        write_adapter(base.unet, folder, args.rank, args.seed)
        fused.load_lora_weights(folder)
        fused.fuse_lora()
        unfused.load_lora_weights(folder)

    for pipe in (fused, unfused, base):
        pipe.to(args.device)
    plain_unet.to(args.device)
    labels = (torch.arange(args.batch_size) % 10).to(args.device)
    ids = labels.tolist()

    def call(pipe):
        return lambda: pipe(
            class_labels=ids,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="pt",
        )

    fns = {
        "plain": lambda: plain_loop(
            plain_unet,
            base.vae,
            base.class_embedder,
            plain_scheduler,
            labels,
            args.steps,
            args.guidance_scale,
            args.seed,
        ),  # fmt: skip
        "pipeline_base": call(base),
        "pipeline_fused": call(fused),
        "pipeline_unfused": call(unfused),
    }
    with torch.inference_mode():
        # the same numbers from the plain loop and the base pipeline: the comparison is like for like
        same = torch.allclose(fns["plain"](), call(base)().images, atol=1e-4)
        times = bc.interleaved(fns, reps=args.reps, warmup=args.warmup, device=args.device)
        unet_times = time_unet_calls(plain_unet, fused, labels, args)

    rows, results = [], {"machine": bc.machine_info(args.threads), "config": vars(args), "variants": {}}
    results["plain_equals_pipeline_base"] = bool(same)
    for name, seconds in times.items():
        add_row(rows, results, name, seconds, times["plain"], judged=name == "pipeline_fused")
    add_row(rows, results, "unet_call_fused", unet_times["fused"], unet_times["plain"], judged=True)
    table = bc.markdown_table(
        ["variant", "median s / call", "ratio to plain", "95% interval", "round spread", "target <= 1.02"], rows
    )
    table += (
        f"\n\n{args.batch_size} images x {args.steps} DDIM steps, CFG {args.guidance_scale:g}, preset {args.preset}, "
        f"{args.threads} thread(s), {args.reps} rounds of whole calls, {args.unet_calls} rounds of single UNet "
        f"forwards (batch {2 * args.batch_size}); plain loop == pipeline output: {same}"
    )
    print(table)
    if args.out:
        from pathlib import Path

        bc.write_json(args.out, results)
        Path(args.out).with_suffix(".md").write_text(table + "\n")


def time_unet_calls(plain_unet, fused, labels, args) -> dict[str, list[float]]:
    """Single denoiser forwards of the CFG batch, plain UNet vs the fused-adapter UNet, interleaved."""
    generator = torch.Generator().manual_seed(args.seed)
    config = plain_unet.config
    x = torch.randn(2 * len(labels), config.in_channels, config.sample_size, config.sample_size, generator=generator)
    x = x.to(args.device)
    t = torch.full((len(x),), 500, device=args.device)
    context = fused.class_embedder(torch.cat([labels, labels]))
    fns = {
        "plain": lambda: plain_unet(x, t, encoder_hidden_states=context),
        "fused": lambda: fused.unet(x, t, encoder_hidden_states=context),
    }
    return bc.interleaved(fns, reps=args.unet_calls, warmup=10, device=args.device)


def add_row(rows: list, results: dict, name: str, seconds: list[float], plain: list[float], judged: bool) -> None:
    ratio = bc.median_ratio(seconds, plain)
    low, high = bc.spread(seconds, plain)
    ci = bc.ratio_ci(seconds, plain)
    results["variants"][name] = {
        "median_s": bc.median(seconds),
        "ratio_to_plain": ratio,
        "ci95": list(ci),
        "spread": [low, high],
    }
    verdict = bc.verdict(ratio, TARGET_FUSED_OVER_PLAIN, ci) if judged else ""
    interval, round_spread = f"{ci[0]:.3f}-{ci[1]:.3f}", f"{low:.3f}-{high:.3f}"
    rows.append([name, f"{bc.median(seconds):.4f}", f"{ratio:.3f}", interval, round_spread, verdict])


if __name__ == "__main__":
    main()
