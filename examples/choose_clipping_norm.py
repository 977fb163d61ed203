#!/usr/bin/env python
"""Choose ``--max_grad_norm`` for train_dp_lora.py from PUBLIC data (no privacy cost).

Adds the same LoRA adapter the private run will train to the public base, measures each public
example's gradient norm of the diffusion loss (random timestep and noise, as in training; with
``--noise_multiplicity k`` the loss averaged over k draws, the quantity the private run clips), prints
the quantiles and a suggested C below most of them (``dp_diffusers.privacy.clipping``). Never
point it at the private data: a C tuned on private gradients is a release the accountant does
not count.

    python examples/choose_clipping_norm.py --base outputs/base --dataset_name public-digits
"""

import argparse
import json

import torch

from dp_diffusers import DiffusionLoss, DPLDMPipeline, LatentDenoiser
from dp_diffusers.data import dataset_to_tensors, encode_latents, load_image_dataset, resolve_columns
from dp_diffusers.lora import add_lora, make_lora_config
from dp_diffusers.privacy import expand_for_noise_multiplicity, per_example_gradient_norms, suggest_max_grad_norm


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="outputs/base")
    parser.add_argument("--dataset_name", default="public-digits", help="A PUBLIC data set (embedded name or Hub id).")
    parser.add_argument("--num_examples", type=int, default=256)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_target_modules", default="attention")
    parser.add_argument("--noise_multiplicity", type=int, default=1, help="The k of the private run.")
    parser.add_argument("--label_dropout", type=float, default=0.1, help="The --label_dropout of the private run.")
    parser.add_argument("--quantile", type=float, default=0.1, help="Suggest C at this quantile of the norms.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    pipe = DPLDMPipeline.from_pretrained(args.base)
    data = load_image_dataset(args.dataset_name, split="train")
    data = data.shuffle(seed=args.seed).select(range(min(args.num_examples, len(data))))
    image_column, label_column = resolve_columns(data)
    class_names = [pipe.config.id2label[k] for k in sorted(pipe.config.id2label)] if pipe.config.id2label else None
    pixels, labels = dataset_to_tensors(
        data, pipe.vae.config.sample_size, pipe.vae.config.in_channels, image_column, label_column, class_names
    )
    latents = encode_latents(pipe.vae, pixels)
    add_lora(pipe.unet, make_lora_config(args.lora_rank, targets=args.lora_target_modules))
    model = LatentDenoiser(pipe.unet, pipe.family, pipe.class_embedder)
    conditions = [labels] if labels is not None else []
    null = pipe.family.null_condition(pipe) if conditions else {}
    diffusion_loss = DiffusionLoss(  # the private run's loss, label dropout included
        pipe.family.objective(pipe.scheduler), ("class_labels",) if conditions else (), null_condition=null or None,
        dropout=args.label_dropout if null else 0.0,
    )  # fmt: skip

    def loss_fn(model, latents, *conditions):
        # k diffusion draws per example, averaged before the norm is taken (as the private run clips)
        k = args.noise_multiplicity
        rows = [expand_for_noise_multiplicity(column, k) for column in (latents, *conditions)]
        return diffusion_loss(model, *rows).view(len(latents), k).mean(dim=1)

    norms = per_example_gradient_norms(model, loss_fn, latents, *conditions)
    quantiles = {f"p{int(q * 100)}": float(torch.quantile(norms, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
    result = {
        "num_examples": len(norms),
        "dataset": args.dataset_name,
        "per_example_gradient_norm": quantiles,
        "suggested_max_grad_norm": suggest_max_grad_norm(norms, args.quantile),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
