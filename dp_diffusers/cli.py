"""The ``dp-diffusers`` command: ``card``, ``push``, ``evaluate``, ``sample``.

dp-diffusers evaluate outputs/dp-lora-eps10
dp-diffusers card outputs/dp-lora-eps10 --repo-id you/dp-lora-digits
dp-diffusers push outputs/dp-lora-eps10 --repo-id you/dp-lora-digits
dp-diffusers sample outputs/dp-lora-eps10 --labels 3 7 --out grid.png
"""

from __future__ import annotations

import argparse
import json


def _card(args) -> None:
    from .hub import write_model_card

    print(write_model_card(args.folder, repo_id=args.repo_id))


def _push(args) -> None:
    from .hub import push_to_hub

    print(push_to_hub(args.folder, args.repo_id, token=args.token, private=args.private, create_pr=args.create_pr))


def _evaluate(args) -> None:
    from .evaluation.evaluate import evaluate_adapter

    metrics = evaluate_adapter(
        args.folder,
        dataset_name=args.dataset_name,
        samples_per_class=args.samples_per_class,
        num_inference_steps=args.num_inference_steps,
        inception_path=args.fid_inception_path,
        reference_adapter_dir=args.reference_adapter,
    )
    print(json.dumps(metrics, indent=2))


def _sample(args) -> None:
    from .pipelines import DPLDMPipeline
    from .visualization import sample_grid

    pipe = DPLDMPipeline.from_pretrained(args.folder)
    sample_grid(pipe, args.labels, args.num_images, args.steps, args.seed).save(args.out)
    print(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dp-diffusers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    card = sub.add_parser("card", help="Write the model card (README.md) of an adapter folder.")
    card.add_argument("folder")
    card.add_argument("--repo-id", default=None)
    card.set_defaults(func=_card)

    push = sub.add_parser("push", help="Upload an adapter folder (no checkpoints, no private data) to the Hub.")
    push.add_argument("folder")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--token", default=None)
    push.add_argument("--private", action="store_true")
    push.add_argument("--create-pr", action="store_true")
    push.set_defaults(func=_push)

    evaluate = sub.add_parser("evaluate", help="Downstream accuracy, membership audit, FID -> metrics.json.")
    evaluate.add_argument("folder")
    evaluate.add_argument("--dataset_name", default="private-digits")
    evaluate.add_argument("--samples_per_class", type=int, default=100)
    evaluate.add_argument("--num_inference_steps", type=int, default=50)
    evaluate.add_argument("--fid_inception_path", default=None)
    evaluate.add_argument("--reference_adapter", default=None, help="A non-private fine-tune, for the audit.")
    evaluate.set_defaults(func=_evaluate)

    sample = sub.add_parser("sample", help="A labelled sample grid from a base or adapter.")
    sample.add_argument("folder")
    sample.add_argument("--labels", nargs="+", required=True)
    sample.add_argument("--num-images", type=int, default=8)
    sample.add_argument("--steps", type=int, default=50)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", default="samples.png")
    sample.set_defaults(func=_sample)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
