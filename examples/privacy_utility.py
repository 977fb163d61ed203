#!/usr/bin/env python
"""Privacy/utility table on the embedded default: is the DP synthetic data worth more than the public data, and
than training the classifier directly under DP? Every row has ``--seeds`` runs (mean and spread):

    python examples/privacy_utility.py --base outputs/base --output_dir outputs/privacy-utility

Rows: the public base without fine-tuning; the same CNN trained on the 5,000 real *public* digits; DP-LoRA at each
epsilon (with the DP central-image warm-up where ``--central_image_noise_multiplier EPS=SIGMA`` gives one); the same
LoRA without DP (``--disable_dp``); the same CNN trained with DP-SGD (opacus, same epsilon and delta) directly on
the private train split; the same CNN on the real private train split. Downstream accuracy: a small CNN trained on
the class-conditional samples, tested on the data set's held-out split; audit AUC: the denoising-loss threshold
attack, raw and calibrated by the public base (see docs/results.md).

Honest protocol: choose every setting with ``--dataset_name private-digits-tuning`` (train on 1,149 images, test on
a 288-image validation part of the private *train* split), then run the chosen settings once on ``private-digits``
(the 360 held-out images) for the table you report. Writes ``table.md`` and ``results.json`` in ``--output_dir``.

``--audit_table`` adds the memorisation check of the audit: the same LoRA trained on ``--audit_subset`` examples
for ``--audit_epochs`` epochs, without DP (it memorises) and at each epsilon; with ``--num_canaries N`` every run
also trains on N canaries and ``results.json`` holds the canary audit of each.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from dp_diffusers.constants import LORA_WEIGHT_NAME, METRICS_NAME
from dp_diffusers.hub import load_dp_report

ROOT = Path(__file__).resolve().parents[1]


def train(base: Path, out: Path, extra: list[str], args, epochs: float, batch_size: int, seed: int) -> None:
    cmd = [
        sys.executable, str(ROOT / "training_scripts" / "train_dp_lora.py"),
        "--pretrained_model_name_or_path", str(base), "--output_dir", str(out), "--dataset_name", args.dataset_name,
        "--num_train_epochs", str(epochs), "--batch_size", str(batch_size), "--seed", str(seed),
        "--learning_rate", str(args.learning_rate), "--max_grad_norm", str(args.max_grad_norm),
        "--lora_target_modules", args.lora_target_modules, "--samples_per_class", "8",
        "--num_inference_steps", str(args.eval_inference_steps), "--scheduler", args.scheduler, *extra,
        *(["--num_canaries", str(args.num_canaries)] if args.num_canaries else []),
    ]  # fmt: skip
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def public_base_copy(base: Path, root: Path) -> Path:
    """The starting point, the public base itself, as a copy in ``root`` to evaluate (evaluation writes
    metrics.json into the folder it evaluates; the base stays untouched)."""
    copy = root / "base-no-finetune"
    if not (copy / "model_index.json").is_file():
        shutil.copytree(base, copy, ignore=shutil.ignore_patterns("checkpoint-*", METRICS_NAME))
    return copy


def evaluate(out: Path, samples_per_class: int, reference: Path | None, args, seed: int) -> tuple[dict, dict | None]:
    """``metrics.json`` of ``out`` (written by the evaluation) and its ``dp_report.json`` (None without DP)."""
    from dp_diffusers.evaluation.evaluate import evaluate_adapter

    metrics = evaluate_adapter(
        out,
        dataset_name=args.dataset_name,
        samples_per_class=samples_per_class,
        num_inference_steps=args.eval_inference_steps,
        guidance_scale=args.eval_guidance_scale,
        scheduler=args.scheduler,
        audit_reference=reference,
        seed=seed,
    )
    return metrics, load_dp_report(out)


def classifier_rows(args, seeds: list[int]) -> dict[str, list[float]]:
    """The CNN's accuracies (one per seed) trained on the public digits, with DP-SGD on the private train split at
    each epsilon, and on the real private train split."""
    from dp_diffusers.data import dataset_to_tensors as tensors
    from dp_diffusers.data import load_image_dataset
    from dp_diffusers.evaluation.downstream import accuracy, train_classifier, train_dp_classifier

    train_x, train_y = tensors(load_image_dataset(args.dataset_name, split="train"), args.resolution, 1)
    test_x, test_y = tensors(load_image_dataset(args.dataset_name, split="test"), args.resolution, 1)
    public_x, public_y = tensors(load_image_dataset(args.public_dataset), args.resolution, 1)
    rows: dict[str, list[float]] = {"public": [], "real": []}
    for seed in seeds:
        rows["public"].append(accuracy(train_classifier(public_x, public_y, 10, seed=seed), test_x, test_y))
        rows["real"].append(accuracy(train_classifier(train_x, train_y, 10, seed=seed), test_x, test_y))
        for eps in args.epsilons.split(","):
            model, _ = train_dp_classifier(
                train_x, train_y, 10, target_epsilon=float(eps), delta=args.target_delta, seed=seed,
                epochs=args.dp_classifier_epochs, batch_size=args.dp_classifier_batch_size,
                max_grad_norm=args.dp_classifier_max_grad_norm, lr=args.dp_classifier_lr,
            )  # fmt: skip
            rows.setdefault(f"dp-sgd eps={eps}", []).append(accuracy(model, test_x, test_y))
    return rows


def spread(values: list[float]) -> str:
    """``mean ± std`` over the seeds (the sample standard deviation; just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="outputs/base")
    parser.add_argument("--output_dir", default="outputs/privacy-utility")
    parser.add_argument("--dataset_name", default="private-digits", help="private-digits-tuning to choose settings.")
    parser.add_argument(
        "--public_dataset", default="public-digits-8x8", help="The public row's data: the base's stage-1 set."
    )
    parser.add_argument("--seeds", default="0,1,2", help="Training (and sampling) seeds of every row.")
    parser.add_argument("--epsilons", default="1,10")
    parser.add_argument("--target_delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=float, default=15)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--max_grad_norm", type=float, default=1e-3)
    parser.add_argument("--lora_target_modules", default="attention+resnets")
    parser.add_argument(
        "--central_image_noise_multiplier",
        default="1=5,10=2",
        help="EPS=SIGMA pairs: the DP central-image warm-up at that epsilon ('' or none: plain DP-LoRA).",
    )
    parser.add_argument("--warmup_steps", type=int, default=200)
    parser.add_argument("--eval_samples_per_class", type=int, default=50)
    parser.add_argument("--eval_inference_steps", type=int, default=10)
    parser.add_argument("--eval_guidance_scale", type=float, default=None,
                        help="Default: the base family's for synthetic data (1 for train_ldm.py's bases).")  # fmt: skip
    parser.add_argument("--scheduler", default="DPMSolverMultistepScheduler")
    parser.add_argument("--resolution", type=int, default=16, help="The base's image size (the CNN rows).")
    parser.add_argument("--dp_classifier_epochs", type=float, default=60)
    parser.add_argument("--dp_classifier_batch_size", type=int, default=256)
    parser.add_argument("--dp_classifier_max_grad_norm", type=float, default=1.0)
    parser.add_argument("--dp_classifier_lr", type=float, default=4e-3)
    parser.add_argument("--skip_nonprivate", action="store_true", help="Leave out the LoRA-without-DP row.")
    parser.add_argument(
        "--train_only",
        action="store_true",
        help="Train the missing runs of --seeds and stop: run one per seed side by side, then once without it.",
    )
    parser.add_argument("--audit_table", action="store_true", help="Add the memorisation runs' audit table.")
    parser.add_argument("--audit_subset", type=int, default=64, help="Private examples of the memorisation runs.")
    parser.add_argument("--audit_epochs", type=float, default=300)
    parser.add_argument("--audit_batch_size", type=int, default=32)
    parser.add_argument(
        "--num_canaries", type=int, default=0, help="Every run also trains on N canaries; adds canary AUC columns."
    )
    args = parser.parse_args(argv)

    base, root = Path(args.base), Path(args.output_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    central = dict(pair.split("=") for pair in args.central_image_noise_multiplier.split(",") if "=" in pair)
    runs = {} if args.skip_nonprivate else {"LoRA without DP (`--disable_dp`)": (root / "nonprivate", ["--disable_dp"])}
    for eps in args.epsilons.split(","):
        extra = ["--target_epsilon", eps, "--target_delta", str(args.target_delta)]
        name = f"DP-LoRA eps={eps}"
        if eps in central:
            extra += ["--central_image_noise_multiplier", central[eps], "--warmup_steps", str(args.warmup_steps)]
            name += f", central images sigma={central[eps]}"
        runs[name] = (root / f"eps{eps}", extra)
    for seed in seeds:
        for out, extra in runs.values():
            if not (out / f"seed{seed}" / LORA_WEIGHT_NAME).is_file():
                train(base, out / f"seed{seed}", extra, args, args.epochs, args.batch_size, seed)
    if args.train_only:
        return

    base_copy = public_base_copy(base, root)
    reference = runs.get("LoRA without DP (`--disable_dp`)", (None,))[0]
    results = {"config": vars(args), "runs": {}}
    rows = []
    for name, (out, _) in {"public base, no fine-tuning": (base_copy, None), **runs}.items():
        accuracies, aucs, calibrated, epsilons, sigmas = [], [], [], [], []
        for seed in seeds:
            folder = out if out == base_copy else out / f"seed{seed}"
            audit_reference = None if reference is None or out in (reference, base_copy) else reference / f"seed{seed}"
            metrics, report = evaluate(folder, args.eval_samples_per_class, audit_reference, args, seed)
            results["runs"].setdefault(name, []).append({"seed": seed, "metrics": metrics, "report": report})
            sampler = metrics["downstream_accuracy"]["sampler"]
            accuracies.append(metrics["downstream_accuracy"]["value"])
            auc = metrics["membership_auc"]
            aucs.append(auc["value"])
            calibrated += [auc["calibrated_auc"]] if "calibrated_auc" in auc else []
            epsilons += [report["epsilon"]] if report else []
            sigmas += [report["noise_multiplier"]] if report else []
        epsilon = f"{max(epsilons):.2f}" if epsilons else ("0 (no private data)" if out == base_copy else "none")
        sigma = f"{statistics.mean(sigmas):.3f}" if sigmas else "-"
        rows.append(f"| {name} | {epsilon} | {sigma} | {spread(accuracies)} | {spread(aucs)} | "
                    f"{spread(calibrated) if calibrated else '-'} |")  # fmt: skip

    cnn = classifier_rows(args, seeds)
    results["classifiers"] = cnn
    public = f"the same CNN on the real public digits (`{args.public_dataset}`)"
    rows.insert(1, f"| {public} | 0 | - | {spread(cnn['public'])} | - | - |")
    for eps in args.epsilons.split(","):
        rows.append(f"| the same CNN with DP-SGD on the private train split | {eps} | - | "
                    f"{spread(cnn[f'dp-sgd eps={eps}'])} | - | - |")  # fmt: skip
    rows.append(f"| the same CNN on the real private train split | none | - | {spread(cnn['real'])} | - | - |")
    table = "\n".join(
        [
            f"| run | epsilon (delta={args.target_delta:g}) | sigma (DP-SGD) | downstream accuracy | audit AUC "
            "| calibrated audit AUC |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    table += (
        f"\n\n{args.dataset_name}; mean ± standard deviation over seeds {args.seeds} (training, sampling and "
        f"classifier); {args.epochs:g} epochs, batch {args.batch_size}, lr {args.learning_rate:g}, "
        f"C {args.max_grad_norm:g}, LoRA `{args.lora_target_modules}`; warm-up {args.warmup_steps} steps; "
        f"{args.eval_samples_per_class} samples per class, {sampler}; "
        f"DP-SGD classifier: {args.dp_classifier_epochs:g} epochs, batch {args.dp_classifier_batch_size}, "
        f"C {args.dp_classifier_max_grad_norm:g}, Adam lr {args.dp_classifier_lr:g}."
    )
    if args.audit_table:
        table += "\n\n" + audit_table(args, base, root, runs, results)
    print(table)
    (root / "table.md").write_text(table + "\n")
    (root / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


def audit_table(args, base: Path, root: Path, runs: dict, results: dict) -> str:
    """The audit on a setting that memorises: ``--audit_subset`` examples, ``--audit_epochs`` epochs, seed 0."""
    audit_runs = {name: (out.with_name(f"{out.name}-subset{args.audit_subset}"), extra)
                  for name, (out, extra) in runs.items()}  # fmt: skip
    for out, extra in audit_runs.values():
        if not (out / LORA_WEIGHT_NAME).is_file():
            subset = ["--max_train_samples", str(args.audit_subset)]
            train(base, out, [*extra, *subset], args, args.audit_epochs, args.audit_batch_size, 0)
    rows, reference = [], audit_runs.get("LoRA without DP (`--disable_dp`)", (None,))[0]
    for name, (out, _) in audit_runs.items():
        metrics, report = evaluate(out, 10, None if out == reference else reference, args, 0)
        results["runs"][f"{name}, {args.audit_subset} examples"] = {"metrics": metrics, "report": report}
        auc = metrics["membership_auc"]
        epsilon = f"{report['epsilon']:.2f}" if report else "none"
        rows.append(f"| {name} | {epsilon} | {auc['value']:.3f} | {auc['public_base_auc']:.3f} | "
                    f"{auc['calibrated_auc']:.3f} |")  # fmt: skip
    return "\n".join(
        [
            f"| run on {args.audit_subset} private examples, {args.audit_epochs:g} epochs | epsilon | audit AUC "
            "| public base, same examples | calibrated audit AUC |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"batch {args.audit_batch_size}, other settings as above; audit: the {args.audit_subset} members vs the "
            "held-out non-members.",
        ]
    )


if __name__ == "__main__":
    main()
