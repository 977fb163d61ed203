"""The ``dp-diffusers`` command.

dp-diffusers evaluate outputs/dp-lora
dp-diffusers card outputs/dp-lora --repo_id you/dp-lora-digits
dp-diffusers push outputs/dp-lora --repo_id you/dp-lora-digits
dp-diffusers sample outputs/dp-lora --labels 3 7 --out grid.png
dp-diffusers generate outputs/dp-lora --num_images 1000 --output_dir synthetic [--push_to_hub --repo_id you/data]
dp-diffusers tune --search_space space.json --expected_runs 3 --pretrained_model_name_or_path outputs/base \
    --output_dir outputs/dp-lora-tuned --target_epsilon 10      (then any train_dp_lora.py flag, fixed)
"""

from __future__ import annotations

import argparse
import json

import torch

from .hub import push_to_hub, write_model_card
from .pipelines import DPLDMPipeline
from .training_utils import add_data_args, add_evaluation_args
from .visualization import sample_grid


def card_command(subparsers: argparse._SubParsersAction) -> None:
    """``card FOLDER [--repo_id ID]``: write the folder's model card (README.md)."""
    parser = subparsers.add_parser("card", help="Write the model card (README.md) of an adapter folder.")
    parser.add_argument("folder", help="An adapter folder (the --output_dir of train_dp_lora.py).")
    parser.add_argument("--repo_id", default=None, help="The Hub repo the card's usage example loads from.")

    def run(args: argparse.Namespace) -> None:
        print(write_model_card(args.folder, repo_id=args.repo_id))

    parser.set_defaults(func=run)


def push_command(subparsers: argparse._SubParsersAction) -> None:
    """``push FOLDER --repo_id ID [--token T] [--private] [--create_pr]``: upload an adapter folder."""
    parser = subparsers.add_parser(
        "push", help="Upload an adapter folder to the Hub (model card written if missing; no checkpoints)."
    )
    parser.add_argument("folder", help="An adapter folder (the --output_dir of train_dp_lora.py).")
    parser.add_argument("--repo_id", required=True, help="The Hub model repo, created if needed.")
    parser.add_argument("--token", default=None, help="Hub token; default: HF_TOKEN or the saved login.")
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    parser.add_argument("--create_pr", action="store_true", help="Open a pull request instead of committing.")

    def run(args: argparse.Namespace) -> None:
        print(push_to_hub(args.folder, args.repo_id, token=args.token, private=args.private, create_pr=args.create_pr))

    parser.set_defaults(func=run)


def evaluate_command(subparsers: argparse._SubParsersAction) -> None:
    """``evaluate FOLDER [--dataset_name D | --train_data_dir DIR] [...]``: downstream accuracy, membership audit,
    FID and KID, written to metrics.json."""
    parser = subparsers.add_parser(
        "evaluate", help="Downstream accuracy, membership audit, FID and KID on held-out data -> metrics.json."
    )
    parser.add_argument("folder")
    add_data_args(parser, default_dataset=None)  # train_dp_lora.py's data flags
    parser.add_argument("--scheduler", default=None, help="diffusers scheduler class (default: the pipeline's).")
    parser.add_argument("--seed", type=int, default=0)
    add_evaluation_args(parser)

    def run(args: argparse.Namespace) -> None:
        from .evaluation.evaluate import evaluate_from_args  # data sets, classifier and FID: only when evaluating

        print(json.dumps(evaluate_from_args(args.folder, args), indent=2))

    parser.set_defaults(func=run)


def sample_command(subparsers: argparse._SubParsersAction) -> None:
    """``sample PATH [--labels L ... | --prompts P ...] [--num_images N] [--num_inference_steps S] [--seed X]
    [--out grid.png]``."""
    parser = subparsers.add_parser("sample", help="Write a labelled grid of samples of a base or an adapter.")
    parser.add_argument("path", help="A base or adapter folder, or a Hub repo id.")
    parser.add_argument("--labels", nargs="+", default=None, help="Class names, one row each (default: all).")
    parser.add_argument("--prompts", nargs="+", default=None, help="Text-to-image models: prompts, one row each.")
    parser.add_argument("--num_images", type=int, default=8, help="Images per label (in all if unconditional).")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="samples.png", help="The image file to write.")

    def run(args: argparse.Namespace) -> None:
        pipe = DPLDMPipeline.from_pretrained(args.path).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        if pipe.num_classes is None and args.labels:
            raise ValueError(f"{args.path} is not class-conditional: it takes no --labels.")
        text = pipe.conditioning == "text"
        if text != bool(args.prompts):
            kind = "needs --prompts" if text else "is not text-to-image: it takes no --prompts"
            raise ValueError(f"{args.path} {kind}.")
        labels = None if pipe.num_classes is None else args.labels or list(pipe.labels)
        grid = sample_grid(pipe, labels, args.num_images, args.num_inference_steps, args.seed, args.prompts)
        grid.save(args.out)
        print(args.out)

    parser.set_defaults(func=run)


def generate_command(subparsers: argparse._SubParsersAction) -> None:
    """``generate ADAPTER --num_images N --output_dir DIR [...]``: a DP synthetic data set (an imagefolder)."""
    parser = subparsers.add_parser(
        "generate", help="Sample a synthetic data set (imagefolder + dataset card) from an adapter; resumable."
    )
    parser.add_argument("adapter", help="An adapter folder or Hub repo id.")
    parser.add_argument("--num_images", type=int, required=True)
    parser.add_argument("--output_dir", required=True, help="The data set's folder (a rerun fills what is missing).")
    parser.add_argument("--labels", nargs="+", default=None, help="Class names to balance over (default: all).")
    parser.add_argument("--prompts", nargs="+", default=None, help="Text adapters: prompts to balance over "
                        "(default: the adapter's validation prompts).")  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=16, help="Images per sampling call (and per file batch).")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="Default: the base family's for synthetic data (1, no guidance, for train_ldm.py's "
                        "bases), else the pipeline's.")  # fmt: skip
    parser.add_argument("--scheduler", default=None, help="diffusers scheduler class (default: the pipeline's).")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Image side (default: the adapter's training resolution).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--push_to_hub", action="store_true", help="Upload it as a Hub dataset repo.")
    parser.add_argument("--repo_id", default=None, help="The Hub dataset repo (with --push_to_hub).")
    parser.add_argument("--token", default=None)
    parser.add_argument("--private", action="store_true")

    def run(args: argparse.Namespace) -> None:
        from .synthetic import generate_dataset, push_dataset

        if args.push_to_hub and not args.repo_id:
            raise ValueError("--push_to_hub needs --repo_id (the Hub dataset repo).")
        out = generate_dataset(args.adapter, args.output_dir, args.num_images, labels=args.labels,
                               prompts=args.prompts, batch_size=args.batch_size,
                               num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                               scheduler=args.scheduler, seed=args.seed, resolution=args.resolution,
                               device=args.device)  # fmt: skip
        print(out)
        if args.push_to_hub:
            print(push_dataset(out, args.repo_id, token=args.token, private=args.private))

    parser.set_defaults(func=run)


def tune_command(subparsers: argparse._SubParsersAction) -> None:
    """``tune --search_space FILE [--expected_runs E] [...] TRAINING FLAGS``: private hyper-parameter selection, the
    tuning inside the reported epsilon (``dp_diffusers.tuning``)."""
    from .training_utils import add_validation_args
    from .tuning import add_tune_args

    parser = subparsers.add_parser(
        "tune", help="Tune train_dp_lora.py's flags on private data, the tuning inside epsilon; keep the best run.",
        description="Any other flag is a train_dp_lora.py flag, the same for every run; --target_epsilon is the "
        "whole tuning's.",
    )  # fmt: skip
    add_tune_args(parser)
    add_validation_args(parser)
    parser.set_defaults(validation_split=0.2, accepts_training_flags=True)

    def run(args: argparse.Namespace) -> None:
        from .tuning import tune

        print(tune(args, args.training_argv))

    parser.set_defaults(func=run)


# A subcommand is a function that adds its parser to the subparsers, with the function to run as `func`.
SUBCOMMANDS = [evaluate_command, card_command, push_command, sample_command, generate_command, tune_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dp-diffusers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in SUBCOMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the ``dp-diffusers`` command line; errors in the inputs exit with their message, no traceback."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "accepts_training_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.training_argv = rest
    try:
        args.func(args)
    except (OSError, ValueError) as err:
        parser.exit(1, f"dp-diffusers {args.command}: error: {err}\n")


if __name__ == "__main__":
    main()
