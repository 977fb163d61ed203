#!/usr/bin/env python
"""Stage 2 (private data): DP-SGD fine-tuning of LoRA adapters on a public base LDM (DP-LoRA).

    accelerate launch training_scripts/train_dp_lora.py \\
        --pretrained_model_name_or_path outputs/base --output_dir outputs/dp-lora \\
        --target_epsilon 10 --target_delta 1e-5

The base's family (dp_diffusers.families: the project's own bases, CompVis LDM, DiT, Stable Diffusion 1.x/2.x,
SDXL) says how each private example is conditioned (its label, or its caption through the base's own frozen text
encoders: --caption_column or --caption_template), what the denoiser is trained to predict and how it samples. The
private images are encoded once by the frozen public autoencoder; only LoRA adapters (and, with
--train_class_embedding, class rows) are trained, with per-example clipping, Gaussian noise, Poisson sampling and a
PRV/RDP accountant (opacus). All privacy logic lives in ``dp_diffusers.privacy``; this script wires the parts:
setup, data, privacy plan, model, encoding, training loop, outputs.

``--evaluate`` then measures the adapter (downstream accuracy, membership audit, FID when the Inception file is
given) and ``--push_to_hub`` uploads the adapter, report and model card. ``--disable_dp`` (as in opacus' examples)
trains the same LoRA without clipping or noise: the non-private reference of the audit; its output has no
``dp_report.json`` and claims no guarantee.
"""

import argparse
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel, cast_training_params
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from dp_diffusers import DiffusionLoss, DPLDMPipeline, LatentDenoiser
from dp_diffusers.adapter_config import DPLoRAConfig
from dp_diffusers.constants import CLASS_EMBEDDER_FOLDER, CLASS_ROWS_FOLDER, DP_REPORT_NAME, SAMPLES_NAME
from dp_diffusers.data import (
    CANARY_UNIT_SIZE,
    DataError,
    canary_candidates,
    dataset_latents,
    encode_latents,
    load_image_dataset,
    privacy_unit_members,
    public_class_names,
    resolve_columns,
)
from dp_diffusers.evaluation.one_run_audit import draw_coins, load_coins, save_coins
from dp_diffusers.families import ConditionOptions, ObjectiveOptions, PrivateExamples
from dp_diffusers.hub import push_to_hub, write_model_card
from dp_diffusers.lora import add_lora, make_lora_config, save_lora_weights
from dp_diffusers.pipelines import scheduler_class
from dp_diffusers.privacy import (
    ACCOUNTANTS,
    GRAD_SAMPLE_MODES,
    DPReport,
    PrivacyBudget,
    PrivacyUnits,
    PrivateTrainingState,
    Release,
    build_dp_report,
    calibrate_noise_multiplier,
    check_delta,
    make_private,
    private_backward,
)
from dp_diffusers.training_utils import (
    add_data_args,
    add_evaluation_args,
    add_run_args,
    add_validation_args,
    check_training_moved,
    fit,
    frozen_checksum,
    init_lora_weights_flag,
    load_training_dataset,
    log_to_trackers,
    make_accelerator,
    remote_trackers,
    resolve_dataset_source,
    resolve_resume,
    save_checkpoint,
    tracker_config,
    weight_dtype,
)
from dp_diffusers.visualization import sample_grid
from dp_diffusers.warm_up import CentralImageSettings, release_private_central_images, warm_up

logger = get_logger(__name__, log_level="INFO")  # the script's own lines show whatever configured logging first

#: What the trackers (--report_to) are told of the run: hyper-parameters only, never a token, a path, a column, a data
#: set name or a prompt (an allow-list: tests/test_logs.py reads every file a tracked run writes).
TRACKED_HYPERPARAMETERS = (
    "resolution", "random_flip", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "init_lora_weights",
    "train_class_embedding", "label_dropout", "caption_dropout", "max_sequence_length", "guidance_scale",
    "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs", "target_epsilon",
    "target_delta", "noise_multiplier", "max_grad_norm", "noise_multiplicity", "accountant", "grad_sample_mode",
    "secure_mode", "batch_size", "max_physical_batch_size", "max_examples_per_unit", "central_image_noise_multiplier",
    "central_image_resolution", "central_image_max_norm", "central_image_copies", "warmup_steps", "warmup_batch_size",
    "num_train_epochs", "max_train_steps", "learning_rate", "adam_weight_decay", "ema_decay", "mixed_precision",
    "gradient_checkpointing", "num_canaries", "seed",
)
#: Logged values computed on private batches without noise: outside epsilon, kept off remote trackers by default.
PRIVATE_LOGS = ("loss",)

#: --target_epsilon when neither it nor --noise_multiplier is given.
DEFAULT_TARGET_EPSILON = 10.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="Base folder or Hub id.")
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument(
        "--pretrained_vae_model_name_or_path", type=str, default=None,
        help="Another AutoencoderKL to encode the images with, in --mixed_precision (e.g. an fp16-safe SDXL VAE); "
        "without it the base's autoencoder encodes in fp32 (SDXL's overflows in fp16).",
    )  # fmt: skip
    parser.add_argument("--output_dir", type=str, required=True)
    add_data_args(parser, default_dataset="private-digits")
    add_validation_args(parser.add_argument_group("validation part (dp-diffusers tune scores on it)"))
    parser.add_argument("--resolution", type=int, default=None, help="Default: the base autoencoder's (center crop).")
    parser.add_argument("--random_flip", action="store_true",
                        help="Encode each image and its mirror; every row of every step trains on one at random.")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_rank", type=int, default=8)
    lora.add_argument("--lora_alpha", type=float, default=None, help="Default: the rank (scale 1).")
    lora.add_argument("--lora_dropout", type=float, default=0.0,
                      help="peft's LoRA dropout; --disable_dp runs only (its masks come from the global generator in "
                      "batch order, not from each row's own keyed draws).")  # fmt: skip
    lora.add_argument("--lora_target_modules", type=str, default="attention",
                      help="A preset of the base's family (docs/bases.md: attention, attention+proj, ...) or "
                      "comma-separated module names.")  # fmt: skip
    lora.add_argument("--init_lora_weights", type=str, default="gaussian", help="peft init: gaussian, true, ...")
    lora.add_argument("--train_class_embedding", action="store_true",
                      help="Also train class rows (DP): needed for private classes the base does not know.")
    label_set = lora.add_mutually_exclusive_group()
    label_set.add_argument("--class_names", type=str, nargs="+", default=None,
                           help="Class-conditional bases: the PUBLIC label set the adapter publishes (its id2label, "
                           "the classes it samples), e.g. --class_names cat dog; rows with another label are an "
                           "error. Default: the base's classes (an embedded data set: its public names 0..9).")
    label_set.add_argument("--class_names_from_data", action="store_true",
                           help="Take the label set from the private data instead: its names (and which classes "
                           "occur) are then published WITHOUT noise, outside epsilon; the model card says so.")
    lora.add_argument("--label_dropout", type=float, default=0.1, help="Null-class probability (keeps CFG).")

    text = parser.add_argument_group("text-to-image bases (Stable Diffusion, SDXL, SD3, FLUX)")
    text.add_argument("--caption_template", type=str, default=None,
                      help="Captions from labels instead, e.g. 'a photo of a {label}' ({label}: the class name).")
    text.add_argument("--caption_dropout", type=float, default=0.1,
                      help="Probability that a row's caption becomes the empty prompt (each noise-multiplicity copy "
                      "drawn on its own), so that classifier-free guidance keeps working.")  # fmt: skip
    text.add_argument("--validation_prompt", type=str, action="append", default=None,
                      help="A public prompt for samples.png and the card's widget (repeat for several). Never a "
                      "training caption: captions are private data.")  # fmt: skip

    flow = parser.add_argument_group("flow-matching bases (SD3 / SD3.5, FLUX.1): diffusers' flags, per-family defaults")
    flow.add_argument("--max_sequence_length", type=int, default=None, help="T5 tokens per caption (SD3 77, FLUX 512).")
    flow.add_argument("--guidance_scale", type=float, default=None,
                      help="Guidance-distilled FLUX bases (-dev): the guidance value in training (default 1).")
    flow.add_argument("--weighting_scheme", type=str, default=None,
                      choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
                      help="Timestep density and loss weighting (SD3: logit_normal, FLUX: none).")  # fmt: skip
    flow.add_argument("--logit_mean", type=float, default=None, help="logit_normal's mean (0).")
    flow.add_argument("--logit_std", type=float, default=None, help="logit_normal's std (1).")
    flow.add_argument("--mode_scale", type=float, default=None, help="The mode scheme's scale (1.29).")
    flow.add_argument("--precondition_outputs", type=int, default=None, choices=[0, 1],
                      help="Train the output as x0 = output * (-sigma) + noisy (SD3: 1, FLUX: 0).")

    dp = parser.add_argument_group("differential privacy")
    dp.add_argument("--disable_dp", action="store_true",
                    help="Train WITHOUT differential privacy (no clipping, noise or accountant): a reference run.")
    dp.add_argument("--target_epsilon", type=float, default=None,
                    help=f"Calibrate sigma so that the planned steps spend this epsilon (default "
                    f"{DEFAULT_TARGET_EPSILON:g}). With --noise_multiplier: stop before epsilon would pass it.")
    dp.add_argument("--target_delta", type=float, default=1e-5)
    dp.add_argument("--noise_multiplier", type=float, default=None,
                    help="Give sigma instead of calibrating it: the run takes the planned steps and reports the "
                    "epsilon they spend (no target), or stops before --target_epsilon if that is given too.")
    dp.add_argument(
        "--max_grad_norm", type=float, default=1e-3,
        help="Per-example clipping norm C. Keep it below most per-example gradient norms (every example clipped; "
        "with Adam the update then does not depend on C's scale): LoRA gradients of the diffusion loss are small "
        "(tiny base, public data: median 0.006, 10th percentile 0.002), and opacus' habitual 1.0 would clip "
        "nothing and drown the signal in noise. For another base: examples/choose_clipping_norm.py on public data.",
    )  # fmt: skip
    dp.add_argument("--noise_multiplicity", type=int, default=1, help="k diffusion draws per example, one clip.")
    dp.add_argument("--accountant", type=str, default="prv", choices=ACCOUNTANTS)
    dp.add_argument("--grad_sample_mode", type=str, default=GRAD_SAMPLE_MODES[0], choices=GRAD_SAMPLE_MODES,
                    help="Per-example gradients: fused (in the layers' backward; fastest), or opacus' modes.")
    dp.add_argument("--secure_mode", action="store_true", help="opacus' floating-point-safe noise (slower).")
    dp.add_argument("--batch_size", type=int, default=64, help="Expected logical (Poisson) batch size, all ranks.")
    dp.add_argument("--max_physical_batch_size", type=int, default=None,
                    help="Examples (with --privacy_unit_column: units) per forward pass.")
    dp.add_argument("--privacy_unit_column", type=str, default=None,
                    help="User-level DP: the column naming each example's person (e.g. patient_id). Steps sample "
                    "people; each contributes the mean of up to --max_examples_per_unit of its examples, clipped "
                    "once; epsilon is per person. Default: each example is its own unit.")  # fmt: skip
    dp.add_argument("--max_examples_per_unit", type=int, default=16,
                    help="A sampled person's examples per step (a fresh random subset; the privacy holds for any).")

    central = parser.add_argument_group(
        "DP central images (DP-FETA's warm-up: per-class mean images released by the Gaussian mechanism, trained on "
        "without noise before DP-SGD; one more release in the same accountant)"
    )
    central.add_argument("--central_image_noise_multiplier", type=float, default=None,
                         help="Turns the warm-up on: noise std / sensitivity of the release (e.g. 2: epsilon 2.0 "
                         "alone at delta 1e-5, but composed with DP-SGD at epsilon 10 it raises sigma by ~2%%).")
    central.add_argument("--central_image_resolution", type=int, default=None,
                         help="Side of the released means (default: half the training resolution).")
    central.add_argument("--central_image_max_norm", type=float, default=None,
                         help="L2 clipping norm of each [0, 1] image at that resolution (default: half of "
                         "sqrt(pixels)). Sensitivity sqrt(2) times it (sum and count).")
    central.add_argument("--central_image_copies", type=int, default=100, help="Augmented copies of each mean.")
    central.add_argument("--warmup_steps", type=int, default=200, help="Non-private steps on those copies.")
    central.add_argument("--warmup_batch_size", type=int, default=64, help="Batch size of those steps.")

    train = parser.add_argument_group("training")
    train.add_argument("--num_train_epochs", type=float, default=10.0)
    train.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    train.add_argument("--learning_rate", type=float, default=1e-3)
    train.add_argument("--adam_weight_decay", type=float, default=0.0)
    train.add_argument("--ema_decay", type=float, default=None,
                       help="Save an exponential moving average of the trained weights (diffusers' EMAModel) "
                       "instead of the last iterate: post-processing of released iterates, no privacy cost.")
    train.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
                       help="The frozen base in half precision; LoRA weights and per-sample gradients stay fp32.")
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute the base's activations in the backward (less memory; fused mode only).")
    train.add_argument("--epsilon_log_steps", type=int, default=25, help="Record epsilon every N steps.")
    train.add_argument("--samples_per_class", type=int, default=8, help="samples.png rows; 0 to skip.")
    train.add_argument("--num_inference_steps", type=int, default=50)
    train.add_argument("--scheduler", default=None, help="Sampler of samples.png and --evaluate (class name).")
    add_run_args(parser, checkpointing_steps=100)
    parser.add_argument("--report_private_loss", action="store_true",
                        help="Also send the training loss to remote trackers (--report_to wandb, ...). It is computed "
                        "on private batches without noise: a release outside epsilon, which the model card then "
                        "names. Local TensorBoard files and the progress bar always show it.")  # fmt: skip

    evaluation = parser.add_argument_group("evaluation and sharing")
    evaluation.add_argument("--evaluate", action="store_true", help="Write metrics.json (dp_diffusers.evaluation).")
    add_evaluation_args(evaluation)
    evaluation.add_argument("--num_canaries", type=int, default=0,
                            help="Audit mode: train on N random-pattern canaries too (counted in the data set size "
                            "and the guarantee) and report how well the audit tells them from N never-trained ones. "
                            "They cost utility: not for a model you ship.")  # fmt: skip
    evaluation.add_argument("--push_to_hub", action="store_true", help="Upload adapter, report, card and images.")
    evaluation.add_argument("--hub_model_id", type=str, default=None, help="Default: the output folder's name.")
    evaluation.add_argument("--hub_token", type=str, default=None)
    evaluation.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)
    resolve_dataset_source(args, "private-digits")
    errors = {
        "--noise_multiplicity must be >= 1": args.noise_multiplicity < 1,
        f"--noise_multiplier must be > 0 (sigma 0 adds no noise: no privacy), got {args.noise_multiplier}":
            args.noise_multiplier is not None and args.noise_multiplier <= 0,
        "--num_canaries must be >= 0": args.num_canaries < 0,
        f"--max_examples_per_unit must be >= 1, got {args.max_examples_per_unit}": args.max_examples_per_unit < 1,
        f"--ema_decay must be in (0, 1), got {args.ema_decay}":
            args.ema_decay is not None and not 0 < args.ema_decay < 1,
        "--gradient_checkpointing needs --grad_sample_mode fused: opacus' hooks record each forward's activations, "
        "and the recomputation in the backward would be recorded again.":
            args.gradient_checkpointing and args.grad_sample_mode != "fused" and not args.disable_dp,
        f"--caption_dropout must be in [0, 1), got {args.caption_dropout}": not 0 <= args.caption_dropout < 1,
        f"--central_image_noise_multiplier must be > 0, got {args.central_image_noise_multiplier}":
            args.central_image_noise_multiplier is not None and args.central_image_noise_multiplier <= 0,
        "--central_image_noise_multiplier is a DP release; --disable_dp runs have no accountant for it.":
            args.central_image_noise_multiplier is not None and args.disable_dp,
        "--lora_dropout > 0 under DP: its masks are drawn for the whole batch from the global generator (public "
        "--seed, batch order), so a row's masks would depend on the other rows of its batch. Use 0 (the default).":
            args.lora_dropout > 0 and not args.disable_dp,
        "--disable_dp runs are not checkpointed; --resume_from_checkpoint is for DP runs.":
            args.disable_dp and args.resume_from_checkpoint,
    }  # fmt: skip
    for message, failed in errors.items():
        if failed:
            parser.error(message)
    if args.scheduler is not None:
        try:
            scheduler_class(args.scheduler)
        except ValueError as error:
            parser.error(str(error))
    return args


# ---- setup and data: everything is validated before anything is written ----


def load_base(args) -> tuple[DPLDMPipeline, int]:
    """The public base (any supported family) with LoRA-ready denoiser and frozen autoencoder, and the resolution."""
    pipe = DPLDMPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision)
    pipe.ensure_peft_unet()  # CompVis-style UNet2DModel and DiT bases get diffusers' adapter API
    if args.pretrained_vae_model_name_or_path is not None:  # diffusers' flag: a VAE that is safe in half precision
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, revision=args.revision)
        pipe.register_modules(vae=vae.to(dtype=weight_dtype(args.mixed_precision)))
    pipe.vae.eval().requires_grad_(False)
    resolution = args.resolution or pipe.vae.config.sample_size
    pipe.family.check_resolution(pipe, resolution)
    if args.scheduler is not None:  # the sampler of samples.png and --evaluate: one the family can use, said now
        try:
            pipe.family.check_scheduler(pipe.scheduler, args.scheduler)
        except ValueError as err:
            raise DataError(f"--scheduler: {err}") from err
    return pipe, resolution


def condition_options(args) -> ConditionOptions:
    """The data flags as the family takes them; the label set is ``--class_names``, else an embedded data set's
    public names, else (``None``) the base's classes."""
    class_names = args.class_names
    if class_names is None and not args.class_names_from_data:
        class_names = public_class_names(args.dataset_name)
    return ConditionOptions(args.label_column, args.caption_column, args.caption_template, args.validation_prompt,
                            args.train_class_embedding, args.max_sequence_length, args.guidance_scale,
                            class_names=class_names, class_names_from_data=args.class_names_from_data)  # fmt: skip


def objective_options(args) -> ObjectiveOptions:
    precondition = None if args.precondition_outputs is None else bool(args.precondition_outputs)
    return ObjectiveOptions(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale, precondition)


def load_private_examples(args, pipe, resolution: int, accelerator) -> PrivateExamples:
    """The private examples with their labels or captions validated by the base's family, and the audit canaries
    (training examples like any other: Poisson-sampled, clipped, noised)."""
    family = pipe.family
    family.check_training(pipe, condition_options(args), objective_options(args))
    conditioning = family.conditioning_of(pipe)
    if (args.class_names is not None or args.class_names_from_data) and conditioning != "class":
        kind = "text-to-image" if conditioning == "text" else "unconditional"
        raise DataError(f"--class_names / --class_names_from_data set the labels of a class-conditional base; this "
                        f"{family.name} base is {kind}.")  # fmt: skip
    if args.central_image_noise_multiplier is not None and not family.supports_central_images:
        raise DataError(f"--central_image_noise_multiplier: a {family.name} base has no classes to average over.")
    dataset = load_training_dataset(args)
    if args.evaluate and args.train_data_dir:  # the evaluation needs held-out images: check before training
        load_image_dataset(None, args.train_data_dir, split="test")
    image_column, label_column = resolve_columns(dataset, args.image_column, args.label_column)
    examples = family.prepare_examples(pipe, dataset, image_column, label_column, resolution, condition_options(args))
    if args.privacy_unit_column:  # user-level DP: the units' members, canary units added below
        examples.units = privacy_unit_members(dataset, args.privacy_unit_column)
    if args.num_canaries:  # the one-run audit: 2N canary units, each trained on by a secret fair coin
        num_classes = max(examples.id2label) + 1 if examples.id2label else 1
        candidates = canary_candidates(args.num_canaries, pipe.vae.config.in_channels, resolution, num_classes,
                                       args.seed, canaries_per_unit(args))  # fmt: skip
        canaries = candidates.units(canary_coins(args, accelerator, candidates.num_units))
        family.add_canaries(examples, canaries.pixels, canaries.labels, canaries.captions)
        if examples.units is not None:
            examples.units += canaries.unit_members(len(dataset))
    unit = "privacy units" if examples.units is not None else "examples"
    if examples.num_units < args.batch_size:
        raise DataError(f"The private data set has {examples.num_units} {unit}, fewer than one batch (--batch_size "
                        f"{args.batch_size}).")  # fmt: skip
    return examples


def canary_coins(args, accelerator, m: int) -> list[bool]:
    """The ``m`` canary units' secret coins: drawn by the main process (a resumed run reuses its own), kept in the
    output folder's hidden ``.audit/`` (never uploaded) for the evaluation, and the same on every rank."""
    from accelerate.utils import broadcast_object_list

    coins = [None]
    if accelerator.is_main_process:
        kept = load_coins(args.output_dir) if args.resume_from_checkpoint else None
        coins[0] = kept if kept is not None and len(kept) == m else draw_coins(m)
        save_coins(args.output_dir, coins[0])
    if accelerator.num_processes > 1:
        broadcast_object_list(coins)
    return coins[0]


def privacy_population(args, examples: PrivateExamples) -> tuple[int, int]:
    """(privacy units, examples) the sample rate, the update's scale and the report are computed for: the data's,
    and ``--num_canaries`` canary units for the audit's 2N canaries (the number its fair coins include on average, so
    that nothing published or scaled depends on the coins)."""
    per_unit = canaries_per_unit(args)
    included = examples.num_canaries // per_unit
    return (examples.num_units - included + args.num_canaries,
            len(examples) - examples.num_canaries + args.num_canaries * per_unit)  # fmt: skip


def train_subset(args) -> dict | None:
    """The adapter config's record of which train-split rows were trained on (``None``: all of them)."""
    subset = {"max_samples": args.max_train_samples, "seed": args.seed} if args.max_train_samples else {}
    if args.validation_split is not None:
        subset.update(validation_split=args.validation_split, validation_split_seed=args.validation_split_seed)
    return subset or None


def canaries_per_unit(args) -> int:
    return min(CANARY_UNIT_SIZE, args.max_examples_per_unit) if args.privacy_unit_column else 1


def planned_steps(args, n: int) -> int:
    return args.max_train_steps or math.ceil(args.num_train_epochs / (args.batch_size / n))


def plan_privacy(args, n: int) -> tuple[PrivacyBudget, list[Release]]:
    """The noise multiplier (calibrated to --target_epsilon over the planned steps and the other releases, or given)
    and the budget that counts every step and stops before the target; ``n`` privacy units (examples or people)."""
    sample_rate, steps = args.batch_size / n, planned_steps(args, n)
    releases = [Release(args.central_image_noise_multiplier)] if args.central_image_noise_multiplier else []
    check_delta(args.target_delta, n, "privacy unit" if args.privacy_unit_column else "example")
    if args.noise_multiplier is None:
        target_epsilon = args.target_epsilon if args.target_epsilon is not None else DEFAULT_TARGET_EPSILON
        sigma = calibrate_noise_multiplier(target_epsilon, args.target_delta, sample_rate, steps, args.accountant,
                                           releases)  # fmt: skip
    else:  # sigma given: no target unless one was set explicitly
        sigma, target_epsilon = args.noise_multiplier, args.target_epsilon
    unit = {"privacy_unit": args.privacy_unit_column, "num_privacy_units": n,
            "max_examples_per_unit": args.max_examples_per_unit if args.privacy_unit_column else None}  # fmt: skip
    budget = PrivacyBudget(args.accountant, sigma, sample_rate, args.target_delta, steps, target_epsilon, releases,
                           privacy_unit=unit)  # fmt: skip
    if budget.max_steps == 0:
        raise ValueError(f"Not even one step fits in target_epsilon={target_epsilon} with sigma={sigma}.")
    return budget, releases


def build_model(args, pipe, accelerator):
    """LoRA (peft, the family's presets) in the denoiser, the base frozen in the weight dtype, every trainable
    parameter in fp32 (diffusers' ``cast_training_params``). Returns (model, LoRA config, adapted modules)."""
    targets = pipe.family.lora_targets(args.lora_target_modules, pipe.unet)
    lora_config = make_lora_config(args.lora_rank, args.lora_alpha, args.lora_dropout, targets,
                                   init_lora_weights_flag(args.init_lora_weights))  # fmt: skip
    unet, class_embedder, class_rows = pipe.unet, pipe.class_embedder, pipe.class_rows
    adapted_modules = add_lora(unet, lora_config)
    if class_embedder is not None:
        class_embedder.requires_grad_(args.train_class_embedding)
    if class_rows is not None:
        class_rows.requires_grad_(True)  # new DiT classes (only made with --train_class_embedding)
    for module in (unet, class_embedder):  # the base (and its class embedding) in the weight dtype ...
        if module is not None:
            module.to(dtype=weight_dtype(args.mixed_precision))
    cast_training_params([m for m in (unet, class_embedder, class_rows) if m is not None], dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    input_dtype = weight_dtype(args.mixed_precision) if args.mixed_precision != "no" else None
    model = LatentDenoiser(unet, pipe.family, class_embedder, class_rows, input_dtype).to(accelerator.device)
    logger.info(f"LoRA on {len(adapted_modules)} modules: {adapted_modules}")
    return model, lora_config, adapted_modules


def encode_examples(args, pipe, examples: PrivateExamples, accelerator):
    """Latents by the frozen public autoencoder (streamed batches, cached with --cache_dir) and each example's
    conditions by the family's frozen public encoders: per-example pre-processing by public models, no privacy
    cost. An unreadable image fails here, with its index, before anything is trained or written."""
    pipe.to(accelerator.device)
    latents = dataset_latents(examples.dataset, pipe.vae, examples.resolution, examples.image_column, args.cache_dir,
                              mirrored=args.random_flip)  # fmt: skip
    if examples.canary_pixels is not None and len(examples.canary_pixels):  # the coins may include none
        latents = torch.cat([latents, encode_latents(pipe.vae, examples.canary_pixels, mirrored=args.random_flip)])
    # caption encodings in fp16 for a half-precision base (it takes them so): half the memory-mapped bytes
    storage = torch.float16 if args.mixed_precision != "no" else torch.float32
    conditions = pipe.family.encode_conditions(pipe, examples, args.cache_dir, storage)
    examples.captions = None  # nothing below sees the caption texts
    return latents, conditions


def make_loss(args, pipe, conditions: dict) -> DiffusionLoss:
    """The family's objective with per-row condition dropout to its null condition (label or caption dropout)."""
    null = pipe.family.null_condition(pipe, condition_options(args))
    dropout = getattr(args, pipe.family.dropout_flag) if null else 0.0
    objective = pipe.family.objective(pipe.scheduler, objective_options(args))
    return DiffusionLoss(objective, tuple(conditions), null_condition=null or None, dropout=dropout,
                         random_flip=args.random_flip)  # fmt: skip


# ---- training ----


def train_private(args, accelerator, pipe, model, examples, data, loss_fn, budget, resolution, population: int
                  ) -> list[str]:  # fmt: skip
    """DP-SGD (opacus, through ``dp_diffusers.privacy``) until the budget allows no further step; checkpoints
    carry the accountant, so a resumed run continues its spent budget. Returns the remote trackers that were sent the
    training loss (``--report_private_loss``: a release outside epsilon)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    checksum = frozen_checksum(model)
    checkpoint = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if budget.releases and checkpoint is None and accelerator.is_main_process:
        # DP central images, then the warm-up on them (post-processing); a resumed run has both in its weights and
        # the release in its accountant. Other ranks get rank 0's weights from DPDDP's broadcast.
        release_ids = [examples.class_ids[name] for name in examples.names] if examples.names else [0]
        central = release_private_central_images(examples, pipe.vae.config.in_channels, release_ids,
                                                  central_image_settings(args, pipe.vae, resolution))  # fmt: skip
        logger.info(f"Warm-up: {args.warmup_steps} steps on {args.central_image_copies} augmented copies of each of "
                    f"{len(release_ids)} DP central images")  # fmt: skip
        warm_up(model, loss_fn, central, release_ids, pipe.vae, resolution, copies=args.central_image_copies,
                steps=args.warmup_steps, batch_size=args.warmup_batch_size, learning_rate=args.learning_rate,
                weight_decay=args.adam_weight_decay, seed=args.seed, mirrored=args.random_flip)  # fmt: skip
    if accelerator.num_processes > 1:
        model = DPDDP(model)  # opacus' DDP: noise on rank 0, one all-reduce per logical batch
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    units = None if examples.units is None else PrivacyUnits(examples.units, args.max_examples_per_unit)
    dp = make_private(model, optimizer, data, budget=budget, max_grad_norm=args.max_grad_norm,
                      noise_multiplicity=args.noise_multiplicity, grad_sample_mode=args.grad_sample_mode,
                      secure_mode=args.secure_mode, units=units, population=population)  # fmt: skip
    accelerator.register_for_checkpointing(PrivateTrainingState(model, dp.optimizer, budget))
    ema = make_ema(args, accelerator, trainable)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        logger.info(f"Resumed from {checkpoint}: {budget.steps} steps and epsilon={budget.epsilon():.3f} already spent")
    if accelerator.is_main_process:
        config = {**tracker_config(args, TRACKED_HYPERPARAMETERS), "noise_multiplier": budget.noise_multiplier}
        accelerator.init_trackers("train_dp_lora", config=config)

    progress = tqdm(total=budget.max_steps, initial=budget.steps, disable=not accelerator.is_local_main_process)
    physical = args.max_physical_batch_size or max(1, 2 * args.batch_size)
    first_snapshot = None
    while budget.can_step():
        with BatchMemoryManager(data_loader=dp.data_loader, max_physical_batch_size=physical,
                                optimizer=dp.optimizer) as loader:  # fmt: skip
            for batch in loader:
                steps_before = budget.steps
                if first_snapshot is None:
                    first_snapshot = [p.detach().clone() for p in trainable]
                batch = [t.to(accelerator.device) for t in batch] + ([] if units else [None])
                *columns, example_ids, batch_units = batch  # the loader's last columns: indices (and units)
                loss = private_backward(dp.model, dp.optimizer, loss_fn, *columns, units=batch_units,
                                        example_ids=example_ids)  # fmt: skip
                dp.optimizer.step()
                dp.optimizer.zero_grad(set_to_none=True)
                if budget.steps == steps_before:
                    continue  # a physical part of a logical batch: clipped and accumulated, no step yet
                if budget.steps == 1 or budget.steps == budget.max_steps:
                    check_training_moved(trainable, first_snapshot, model, checksum)
                progress.update(budget.steps - steps_before)
                if ema is not None:
                    ema.step(trainable)
                logs = {"loss": float(loss) if loss is not None else float("nan")}
                if budget.steps % args.epsilon_log_steps == 0 or budget.steps == budget.max_steps:
                    logs["epsilon"] = budget.record()
                    progress.set_postfix(loss=f"{logs['loss']:.4f}", eps=f"{logs['epsilon']:.2f}")
                log_to_trackers(accelerator, logs, budget.steps, PRIVATE_LOGS, args.report_private_loss)
                if budget.steps % args.checkpointing_steps == 0 and budget.can_step():
                    save_checkpoint(accelerator, args.output_dir, budget.steps, args.checkpoints_total_limit)
                if not budget.can_step():
                    break
    progress.close()
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(trainable)
    return remote_trackers(accelerator) if args.report_private_loss else []


def train_without_privacy(args, accelerator, model, data, loss_fn, steps: int) -> None:
    """``--disable_dp``: the same LoRA, loss, noise multiplicity, batch size and number of steps as the DP run,
    with shuffled batches, no clipping and no noise (not checkpointed: a reference run, minutes long)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    snapshot, checksum = [p.detach().clone() for p in trainable], frozen_checksum(model)
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = make_ema(args, accelerator, trainable)
    on_step = None if ema is None else (lambda: ema.step(trainable))
    k, show = args.noise_multiplicity, accelerator.is_local_main_process
    fit(model, optimizer, loader, loss_fn, steps, k, accelerator.backward, accelerator.log, on_step, show)
    if ema is not None:
        ema.copy_to(trainable)
    check_training_moved(trainable, snapshot, model, checksum)


def central_image_settings(args, vae, resolution: int) -> CentralImageSettings:
    return CentralImageSettings.defaults(args.central_image_noise_multiplier, resolution, vae.config.in_channels,
                                         args.central_image_resolution, args.central_image_max_norm)  # fmt: skip


def make_ema(args, accelerator, trainable) -> EMAModel | None:
    """``--ema_decay``: an average of the iterates, saved in every checkpoint (resume continues it)."""
    if args.ema_decay is None:
        return None
    ema = EMAModel(trainable, decay=args.ema_decay)
    accelerator.register_for_checkpointing(ema)
    return ema


# ---- outputs ----


def save_outputs(args, pipe, examples: PrivateExamples, report: DPReport | None) -> None:
    """Adapter (the base pipeline's standard LoRA file), its config, trained class rows, ``dp_report.json`` (DP runs
    only), samples, then ``--evaluate``'s metrics.json, the model card and ``--push_to_hub``. Main process only."""
    out = Path(args.output_dir)
    weights = save_lora_weights(pipe.unet, out, pipe.family)
    trained_embedder = args.train_class_embedding and pipe.class_embedder is not None
    adapter_config = DPLoRAConfig(
        base_model=args.pretrained_model_name_or_path, revision=args.revision, base_family=pipe.base_family,
        lora_weights=weights.name, class_embedder=CLASS_EMBEDDER_FOLDER if trained_embedder else None,
        class_rows=CLASS_ROWS_FOLDER if pipe.class_rows is not None else None, id2label=examples.id2label or None,
        # The examples trained on (the audit's members): the whole train split, or --max_train_samples' subset, minus
        # --validation_split's part.
        train_subset=train_subset(args),
        canaries={"num_canaries": args.num_canaries, "seed": args.seed, "resolution": examples.resolution,
                  "coins": True, **({"per_unit": canaries_per_unit(args)} if args.privacy_unit_column else {})}
        if args.num_canaries else None,
        caption_column=args.caption_column, caption_template=args.caption_template,
        validation_prompts=args.validation_prompt, resolution=examples.resolution,
        max_sequence_length=pipe.family.trained_max_sequence_length(condition_options(args)),
        guidance_scale=args.guidance_scale, privacy_unit=args.privacy_unit_column, dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name, local_data=args.train_data_dir is not None,
        image_column=args.image_column, label_column=args.label_column,
        objective={k: v for k, v in asdict(objective_options(args)).items() if v is not None} or None,
    )  # fmt: skip
    trained = {CLASS_EMBEDDER_FOLDER: pipe.class_embedder, CLASS_ROWS_FOLDER: pipe.class_rows}
    for folder, module in trained.items():
        if folder in (adapter_config.class_embedder, adapter_config.class_rows):
            module.save_pretrained(out / folder)
        elif (out / folder).exists():
            shutil.rmtree(out / folder)  # a stale one would be loaded with this adapter
    adapter_config.save_pretrained(out)
    if report is not None:
        report.save_pretrained(out)
    elif (out / DP_REPORT_NAME).exists():
        (out / DP_REPORT_NAME).unlink()  # a stale report must not lend this run a guarantee
    logger.info(f"Adapter in {out}")
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler is not None:
        pipe.set_scheduler(args.scheduler)
    # samples as the adapter was trained (its resolution, T5's length), as from the folder it was written to
    pipe.adapter_config, pipe.condition_options = adapter_config, adapter_config.condition_options()
    # public prompts only, never captions: a text model without --validation_prompt draws no samples
    grid = sample_grid(pipe, examples.names[:10] if examples.id2label else None, args.samples_per_class,
                       args.num_inference_steps, args.seed, args.validation_prompt)  # fmt: skip
    if grid is not None:
        grid.save(out / SAMPLES_NAME)
    elif (out / SAMPLES_NAME).exists():
        (out / SAMPLES_NAME).unlink()  # a stale grid would show another run's model
    if args.evaluate:
        from dp_diffusers.evaluation.evaluate import evaluate_from_args

        metrics = evaluate_from_args(out, args)
        logger.info(f"Evaluation: { {name: metric['value'] for name, metric in metrics.items()} }")
    card = write_model_card(out, repo_id=args.hub_model_id)
    logger.info(f"Model card: {card}")
    if args.push_to_hub:
        url = push_to_hub(out, args.hub_model_id or out.resolve().name, token=args.hub_token,
                          private=args.hub_private_repo)  # fmt: skip
        logger.info(f"Pushed to {url}")


def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args)  # --mixed_precision casts the frozen base's weights (build_model): no autocast
    set_seed(args.seed, device_specific=True)
    pipe, resolution = load_base(args)
    examples = load_private_examples(args, pipe, resolution, accelerator)
    units, n = privacy_population(args, examples)
    if args.disable_dp:
        logger.warning("--disable_dp: training WITHOUT differential privacy; the adapter claims no guarantee.")
    else:
        budget, releases = plan_privacy(args, units)
    model, lora_config, adapted_modules = build_model(args, pipe, accelerator)
    latents, conditions = encode_examples(args, pipe, examples, accelerator)
    data = TensorDataset(latents, *conditions.values())
    loss_fn = make_loss(args, pipe, conditions)
    if args.disable_dp:
        train_without_privacy(args, accelerator, model, data, loss_fn, planned_steps(args, n))
        if accelerator.is_main_process:
            save_outputs(args, pipe, examples, report=None)
        accelerator.end_training()
        return

    trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    people = f" of {units} privacy units" if examples.units is not None else ""
    logger.info(f"{n} private examples{people}, q={budget.sample_rate:.4g}, sigma={budget.noise_multiplier:.4f}, "
                f"C={args.max_grad_norm}, k={args.noise_multiplicity}, {budget.max_steps} steps, "
                f"{trainable_parameters} trainable parameters")  # fmt: skip
    loss_trackers = train_private(args, accelerator, pipe, model, examples, data, loss_fn, budget, resolution, units)
    epsilon = budget.record()
    if budget.target_epsilon is not None and epsilon > budget.target_epsilon:
        raise RuntimeError(
            f"epsilon {epsilon} exceeds the target {budget.target_epsilon}: refusing to write the adapter."
        )
    if accelerator.is_main_process:
        report = build_dp_report(
            budget, max_grad_norm=args.max_grad_norm, noise_multiplicity=args.noise_multiplicity, dataset_size=n,
            batch_size=args.batch_size, world_size=accelerator.num_processes,
            trainable_parameters=trainable_parameters, lora_rank=args.lora_rank, lora_alpha=lora_config.lora_alpha,
            adapted_modules=adapted_modules, base_model=args.pretrained_model_name_or_path,
            trained_class_embedding=args.train_class_embedding, grad_sample_mode=args.grad_sample_mode,
            ema_decay=args.ema_decay, num_canaries=args.num_canaries or None, mixed_precision=args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing, random_flip=args.random_flip,
            training_guidance_scale=float(conditions["guidance"][0]) if "guidance" in conditions else None,
            privacy_unit=args.privacy_unit_column, num_privacy_units=units if examples.units else None,
            class_names_from_data=examples.names_from_data, loss_trackers=loss_trackers,
            max_examples_per_unit=args.max_examples_per_unit if examples.units else None,
            other_releases=[central_image_settings(args, pipe.vae, resolution).record(
                budget.release_epsilon(), warmup_steps=args.warmup_steps, warmup_batch_size=args.warmup_batch_size,
                copies_per_image=args.central_image_copies)] if releases else [],
        )  # fmt: skip
        logger.info(f"epsilon={epsilon:.3f} (delta={args.target_delta}) after {budget.steps} steps")
        save_outputs(args, pipe, examples, report)
    accelerator.end_training()


if __name__ == "__main__":
    main()
