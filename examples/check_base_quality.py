#!/usr/bin/env python
"""Does the public base generate the class it is asked for?

A small CNN trained on real public digits (MNIST-5k, at the base's resolution) classifies
``--per_class`` class-conditional samples of each digit; the score is the fraction recognised as
the class asked for (target for the tiny base: >= 0.80).

    python examples/check_base_quality.py --base outputs/base
"""

import argparse
import json

import torch

from dp_diffusers import DPLDMPipeline
from dp_diffusers.data import dataset_to_tensors, load_public_digits
from dp_diffusers.evaluation.downstream import accuracy, train_classifier


def generate(pipe: DPLDMPipeline, per_class: int, steps: int, seed: int, guidance_scale: float = 1.0):
    """``per_class`` samples of every class, as tensors in [-1, 1] with their class ids."""
    ids = sorted(pipe.labels.values())
    generator = torch.Generator().manual_seed(seed)
    images = pipe(
        class_labels=ids,
        num_images_per_prompt=per_class,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type="pt",
    ).images
    return images * 2 - 1, torch.tensor(ids).repeat_interleave(per_class)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="outputs/base")
    parser.add_argument("--per_class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="Write the result as JSON here.")
    args = parser.parse_args(argv)

    pipe = DPLDMPipeline.from_pretrained(args.base)
    pipe.set_progress_bar_config(disable=True)
    resolution = pipe.vae.config.sample_size
    real, labels = dataset_to_tensors(load_public_digits(), resolution, pipe.vae.config.in_channels)
    classifier = train_classifier(real, labels, num_classes=10, steps=1000, seed=args.seed)
    images, asked = generate(pipe, args.per_class, args.steps, args.seed, args.guidance_scale)
    result = {
        "class_accuracy_of_samples": accuracy(classifier, images.clamp(-1, 1), asked),
        "num_samples": len(images),
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "classifier": "SmallCNN trained on MNIST-5k (public)",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
