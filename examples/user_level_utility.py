#!/usr/bin/env python
"""User-level vs example-level DP-LoRA on the embedded digits grouped into people (``private-digits-units``: about
175 people of 5-15 digits, split by person), at the same epsilon:

    python examples/user_level_utility.py --base outputs/base --output_dir outputs/user-level

Rows (``--seeds`` runs each, mean and spread): the public base itself; example-level DP-LoRA (the demo's
settings: each image is a unit; what it guarantees a person is group privacy over their m images, computed from its
own report for the people's smallest, median and largest m) and user-level DP-LoRA (``--privacy_unit_column
person``: epsilon per person). Both with the DP central-image warm-up unless ``--unit_central_image_noise_multiplier
none``. Downstream accuracy on the held-out people's images (see docs/results.md).

Honest protocol: choose the user-level settings with ``--dataset_name private-digits-units-tuning`` (train people vs
validation people carved from the train people), then run them once on ``private-digits-units``. Writes ``table.md``
and ``results.json`` in ``--output_dir``.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from privacy_utility import evaluate, public_base_copy, spread, train  # noqa: E402  (the same calls)

from dp_diffusers.constants import LORA_WEIGHT_NAME  # noqa: E402
from dp_diffusers.data import load_image_dataset, privacy_unit_members  # noqa: E402
from dp_diffusers.privacy import Release, group_privacy_epsilon  # noqa: E402


def person_epsilons(report: dict, sizes: list[int]) -> dict[int, float]:
    """The epsilon an example-level run gives a person with m examples, for each m in ``sizes`` (group privacy)."""
    releases = [Release(r["noise_multiplier"]) for r in report["other_releases"]]
    return {m: group_privacy_epsilon(report["noise_multiplier"], report["sample_rate"], report["steps"],
                                     report["delta"], m, releases) for m in sizes}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="outputs/base")
    parser.add_argument("--output_dir", default="outputs/user-level")
    parser.add_argument("--dataset_name", default="private-digits-units", help="-tuning to choose settings.")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--target_epsilon", default="10")
    parser.add_argument("--target_delta", type=float, default=1e-5)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--max_grad_norm", type=float, default=1e-3)
    parser.add_argument("--lora_target_modules", default="attention+resnets")
    parser.add_argument("--central_image_noise_multiplier", default="2")
    parser.add_argument("--unit_central_image_noise_multiplier", default=None,
                        help="User-level run: default the same; 'none': no central images (a person's images weigh "
                        "1/m in the class means, so with few people the means are mostly noise).")  # fmt: skip
    parser.add_argument("--warmup_steps", type=int, default=200)
    parser.add_argument("--epochs", type=float, default=15, help="Example-level: passes over the images.")
    parser.add_argument("--batch_size", type=int, default=256, help="Example-level: expected images a step.")
    parser.add_argument("--unit_epochs", type=float, default=15, help="User-level: passes over the people.")
    parser.add_argument("--unit_batch_size", type=int, default=32, help="User-level: expected people a step.")
    parser.add_argument("--unit_learning_rate", type=float, default=None, help="Default: --learning_rate.")
    parser.add_argument("--max_examples_per_unit", type=int, default=16)
    parser.add_argument("--eval_samples_per_class", type=int, default=50)
    parser.add_argument("--eval_inference_steps", type=int, default=10)
    parser.add_argument("--eval_guidance_scale", type=float, default=None,
                        help="Default: the base family's for synthetic data (1 for train_ldm.py's bases).")  # fmt: skip
    parser.add_argument("--scheduler", default="DPMSolverMultistepScheduler")
    parser.add_argument("--num_canaries", type=int, default=0)
    parser.add_argument("--train_only", action="store_true")
    args = parser.parse_args(argv)

    base, root = Path(args.base), Path(args.output_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    common = ["--target_epsilon", args.target_epsilon, "--target_delta", str(args.target_delta)]

    def central(sigma: str) -> list[str]:
        return [] if sigma == "none" else ["--central_image_noise_multiplier", sigma, "--warmup_steps",
                                           str(args.warmup_steps)]  # fmt: skip

    unit_sigma = args.unit_central_image_noise_multiplier or args.central_image_noise_multiplier
    unit_lr = args.unit_learning_rate or args.learning_rate
    runs = {
        "example-level DP-LoRA": (root / "example-level", [*common, *central(args.central_image_noise_multiplier)],
                                  args.epochs, args.batch_size),
        "user-level DP-LoRA (`--privacy_unit_column person`)": (
            root / "user-level",
            [*common, *central(unit_sigma), "--privacy_unit_column", "person", "--max_examples_per_unit",
             str(args.max_examples_per_unit), "--learning_rate", str(unit_lr)],
            args.unit_epochs, args.unit_batch_size,
        ),
    }  # fmt: skip
    for seed in seeds:
        for out, extra, epochs, batch in runs.values():
            if not (out / f"seed{seed}" / LORA_WEIGHT_NAME).is_file():
                train(base, out / f"seed{seed}", extra, args, epochs, batch, seed)
    if args.train_only:
        return

    people = privacy_unit_members(load_image_dataset(args.dataset_name, split="train"), "person")
    sizes = sorted(len(members) for members in people)
    shown = sorted({sizes[0], sizes[len(sizes) // 2], sizes[-1]})
    results, rows = {"config": vars(args), "people": len(people), "sizes": shown, "runs": {}}, []
    base_copy = public_base_copy(base, root)  # the starting point, on the same held-out people's images
    base_metrics = [evaluate(base_copy, args.eval_samples_per_class, None, args, seed)[0]["downstream_accuracy"]
                    for seed in seeds]  # fmt: skip
    base_accuracies, sampler = [metrics["value"] for metrics in base_metrics], base_metrics[0]["sampler"]
    results["public base, no fine-tuning"] = base_accuracies
    rows.append(f"| public base, no fine-tuning | - | - | - | {spread(base_accuracies)} |")
    for name, (out, _, _, _) in runs.items():
        accuracies, per_person = [], []
        for seed in seeds:
            metrics, report = evaluate(out / f"seed{seed}", args.eval_samples_per_class, None, args, seed)
            accuracies.append(metrics["downstream_accuracy"]["value"])
            entry = {"seed": seed, "metrics": metrics, "report": report}
            if report["privacy_unit"] is None:
                entry["person_epsilon"] = person_epsilons(report, shown)
                per_person.append(entry["person_epsilon"])
            results["runs"].setdefault(name, []).append(entry)
        reports = [entry["report"] for entry in results["runs"][name]]
        epsilon = max(report["epsilon"] for report in reports)
        if per_person:
            guarantee = "; ".join(f"m = {m}: " + (f"ε {max(p[m] for p in per_person):.1f}"
                                                  if all(p[m] < float("inf") for p in per_person) else "no bound")
                                  for m in shown)  # fmt: skip
            unit = f"ε {epsilon:.2f} per image; per person (group privacy): {guarantee}"
        else:
            unit = f"ε {epsilon:.2f} per person"
        sigma = statistics.mean(report["noise_multiplier"] for report in reports)
        rows.append(f"| {name} | {unit} | {sigma:.3f} | {reports[0]['steps']} | {spread(accuracies)} |")
    table = "\n".join([
        f"| run (target ε = {args.target_epsilon}, δ = {args.target_delta:g}) | what it guarantees | σ | steps "
        "| downstream accuracy |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"{args.dataset_name}: {len(people)} train people, {sizes[0]}-{sizes[-1]} images each; mean ± standard "
        f"deviation over seeds {args.seeds}. Example-level: {args.epochs:g} epochs, batch {args.batch_size} images; "
        f"user-level: {args.unit_epochs:g} epochs, batch {args.unit_batch_size} people, at most "
        f"{args.max_examples_per_unit} images each a step, lr {unit_lr:g}; both lr {args.learning_rate:g} (unless "
        f"said), C {args.max_grad_norm:g}, LoRA `{args.lora_target_modules}`, central images σ "
        f"{args.central_image_noise_multiplier} + {args.warmup_steps} warm-up steps (user-level: "
        f"{'none' if unit_sigma == 'none' else 'σ ' + unit_sigma}); {args.eval_samples_per_class} "
        f"samples per class, {sampler}.",
    ])  # fmt: skip
    print(table)
    (root / "table.md").write_text(table + "\n")
    (root / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
