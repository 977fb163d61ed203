#!/usr/bin/env python
"""Stage 2 (private data): DP-SGD fine-tuning of LoRA adapters on a public base LDM (DP-LoRA).

    accelerate launch training_scripts/train_dp_lora.py \\
        --pretrained_model_name_or_path outputs/base --output_dir outputs/dp-lora \\
        --target_epsilon 10 --target_delta 1e-5

The private images are encoded once by the frozen public autoencoder (and, on a Stable Diffusion
base, their captions by its frozen text encoder: --caption_column or --caption_template); only
LoRA adapters (and, with --train_class_embedding, the class embedding) are trained, with per-example clipping,
Gaussian noise, Poisson sampling and a PRV/RDP accountant (opacus). All privacy logic lives in
``dp_diffusers.privacy``; this script wires the parts together.

``--evaluate`` then measures the adapter (downstream accuracy, membership audit, FID when the
Inception file is given) and ``--push_to_hub`` uploads the adapter, report and model card.
``--disable_dp`` (as in opacus' examples) trains the same LoRA without clipping or noise: the
non-private reference of the audit; its output has no ``dp_report.json`` and claims no guarantee.
"""

import argparse
import itertools
import math
import shutil
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, cast_training_params
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from dp_diffusers import ClassEmbedder, DiffusionLoss, DPLDMPipeline, LatentDenoiser
from dp_diffusers.adapter_config import DPLoRAConfig
from dp_diffusers.constants import (
    CLASS_EMBEDDER_FOLDER,
    CLASS_ROWS_FOLDER,
    DP_REPORT_NAME,
    SAMPLES_NAME,
)
from dp_diffusers.data import (
    DataError,
    augmented_copies,
    canary_captions,
    caption_contexts,
    check_resolution,
    dataset_captions,
    dataset_labels,
    dataset_latents,
    encode_latents,
    label_names,
    make_canaries,
    pixel_batches,
    resolve_columns,
)
from dp_diffusers.families import DiTFamily
from dp_diffusers.hub import push_to_hub, write_model_card
from dp_diffusers.lora import LORA_TARGET_PRESETS, add_lora, make_lora_config, save_lora_weights
from dp_diffusers.models import DiTClassRows
from dp_diffusers.pipelines.pipeline_dp_ldm import scheduler_class
from dp_diffusers.privacy import (
    ACCOUNTANTS,
    GRAD_SAMPLE_MODES,
    DPReport,
    PrivacyBudget,
    PrivateTrainingState,
    Release,
    build_dp_report,
    calibrate_noise_multiplier,
    central_image_sensitivity,
    check_delta,
    make_private,
    private_backward,
    release_central_images,
    secret_generator,
)
from dp_diffusers.training_utils import (
    add_data_args,
    add_evaluation_args,
    add_run_args,
    load_training_dataset,
    make_accelerator,
    resolve_dataset_source,
    resolve_resume,
    save_checkpoint,
)
from dp_diffusers.visualization import sample_grid

logger = get_logger(__name__)

#: --target_epsilon when neither it nor --noise_multiplier is given.
DEFAULT_TARGET_EPSILON = 10.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="Base folder or Hub id.")
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--output_dir", type=str, required=True)
    add_data_args(parser, default_dataset="private-digits")
    parser.add_argument(
        "--resolution", type=int, default=None, help="Default: the base autoencoder's (images are center-cropped)."
    )
    parser.add_argument(
        "--random_flip",
        action="store_true",
        help="Encode each image and its horizontal mirror; every row of every step trains on one of them at random.",
    )

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_rank", type=int, default=8)
    lora.add_argument("--lora_alpha", type=float, default=None, help="Default: the rank (scale 1).")
    lora.add_argument("--lora_dropout", type=float, default=0.0)
    lora.add_argument(
        "--lora_target_modules",
        type=str,
        default="attention",
        help="A preset of the base's family (UNet bases: " + ", ".join(LORA_TARGET_PRESETS) + "; DiT: "
        + ", ".join(DiTFamily.lora_target_presets) + ") or comma-separated module names.",
    )
    lora.add_argument("--init_lora_weights", type=str, default="gaussian", help="peft init: gaussian, true, ...")
    lora.add_argument(
        "--train_class_embedding",
        action="store_true",
        help="Also train the class embedding (DP); needed for private classes the base does not know.",
    )
    lora.add_argument("--label_dropout", type=float, default=0.1, help="Null-class probability (keeps CFG).")

    text = parser.add_argument_group("text-to-image bases (Stable Diffusion)")
    text.add_argument(
        "--caption_column", type=str, default=None, help="The captions' column (default: 'text' if there is one)."
    )
    text.add_argument(
        "--caption_template",
        type=str,
        default=None,
        help="Captions from labels instead, e.g. 'a photo of a {label}' ({label}: the example's class name).",
    )
    text.add_argument(
        "--caption_dropout",
        type=float,
        default=0.1,
        help="Probability that a row's caption becomes the empty prompt (each noise-multiplicity copy drawn on its "
        "own), so that classifier-free guidance keeps working.",
    )
    text.add_argument(
        "--validation_prompt",
        type=str,
        action="append",
        default=None,
        help="A public prompt for samples.png and the model card's widget (repeat the flag for several). Never a "
        "training caption: captions are private data.",
    )

    dp = parser.add_argument_group("differential privacy")
    dp.add_argument(
        "--disable_dp",
        action="store_true",
        help="Train WITHOUT differential privacy (no clipping, noise or accountant): a non-private reference.",
    )
    dp.add_argument(
        "--target_epsilon",
        type=float,
        default=None,
        help=f"Calibrate sigma so that the planned steps spend this epsilon (default {DEFAULT_TARGET_EPSILON:g}). "
        "With --noise_multiplier: stop before epsilon would pass it.",
    )
    dp.add_argument("--target_delta", type=float, default=1e-5)
    dp.add_argument(
        "--noise_multiplier",
        type=float,
        default=None,
        help="Give sigma instead of calibrating it: the run takes the planned steps and reports the epsilon they "
        "spend (no target), or stops before --target_epsilon if that is given too.",
    )
    dp.add_argument(
        "--max_grad_norm",
        type=float,
        default=1e-3,
        help="Per-example clipping norm C. Keep it below most per-example gradient norms (every example clipped; "
        "with Adam the update then does not depend on C's scale): LoRA gradients of the diffusion loss are small "
        "(tiny base, public data: median 0.006, 10th percentile 0.002), and opacus' habitual 1.0 would clip "
        "nothing and drown the signal in noise. For another base: examples/choose_clipping_norm.py on public data.",
    )
    dp.add_argument("--noise_multiplicity", type=int, default=1, help="k diffusion draws per example, one clip.")
    dp.add_argument("--accountant", type=str, default="prv", choices=ACCOUNTANTS)
    dp.add_argument(
        "--grad_sample_mode",
        type=str,
        default=GRAD_SAMPLE_MODES[0],
        choices=GRAD_SAMPLE_MODES,
        help="Per-example gradients: fused (in the layers' backward; fastest), or opacus' hooks / functorch / ew.",
    )
    dp.add_argument("--secure_mode", action="store_true", help="opacus' floating-point-safe noise (slower).")
    dp.add_argument("--batch_size", type=int, default=64, help="Expected logical (Poisson) batch size, all ranks.")
    dp.add_argument("--max_physical_batch_size", type=int, default=None, help="Examples per forward pass.")

    central = parser.add_argument_group(
        "DP central images (DP-FETA's warm-up: per-class mean images released by the Gaussian mechanism, trained on "
        "without noise before DP-SGD; one more release in the same accountant)"
    )
    central.add_argument(
        "--central_image_noise_multiplier",
        type=float,
        default=None,
        help="Turns the warm-up on: noise std / sensitivity of the release (e.g. 2: epsilon 2.0 alone at delta 1e-5, "
        "but composed with DP-SGD at epsilon 10 it raises sigma by only ~2%%).",
    )
    central.add_argument(
        "--central_image_resolution",
        type=int,
        default=None,
        help="Side of the released means (default: half the training resolution; fewer pixels, less noise each).",
    )
    central.add_argument(
        "--central_image_max_norm",
        type=float,
        default=None,
        help="L2 clipping norm of each [0, 1] image at that resolution (default: half of sqrt(pixels), i.e. a "
        "mean pixel of 0.25 on a black background). Sensitivity sqrt(2) times it (sum and count).",
    )
    central.add_argument("--central_image_copies", type=int, default=100, help="Augmented copies of each mean.")
    central.add_argument("--warmup_steps", type=int, default=200, help="Non-private steps on those copies.")
    central.add_argument("--warmup_batch_size", type=int, default=64, help="Batch size of those steps.")

    train = parser.add_argument_group("training")
    train.add_argument("--num_train_epochs", type=float, default=10.0)
    train.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    train.add_argument("--learning_rate", type=float, default=1e-3)
    train.add_argument("--adam_weight_decay", type=float, default=0.0)
    train.add_argument(
        "--ema_decay",
        type=float,
        default=None,
        help="Save an exponential moving average of the trained weights (diffusers' EMAModel, its warm-up "
        "included) instead of the last iterate. Averaging released iterates is post-processing: no privacy cost.",
    )
    train.add_argument(
        "--mixed_precision",
        type=str,
        default="no",
        choices=["no", "fp16", "bf16"],
        help="The frozen base in half precision; LoRA weights, class rows and per-sample gradients stay fp32.",
    )
    train.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute the base's activations in the backward (less memory; grad_sample_mode fused only).",
    )
    train.add_argument("--epsilon_log_steps", type=int, default=25, help="Record epsilon every N steps.")
    train.add_argument("--samples_per_class", type=int, default=8, help="samples.png rows; 0 to skip.")
    train.add_argument("--num_inference_steps", type=int, default=50)
    train.add_argument("--scheduler", default=None, help="Sampler of samples.png and --evaluate (class name).")

    add_run_args(parser, checkpointing_steps=100)

    evaluation = parser.add_argument_group("evaluation and sharing")
    evaluation.add_argument("--evaluate", action="store_true", help="Write metrics.json (dp_diffusers.evaluation).")
    add_evaluation_args(evaluation)
    evaluation.add_argument(
        "--num_canaries",
        type=int,
        default=0,
        help="Audit mode: train on N random-pattern canaries too (dp_diffusers.data.make_canaries; they count in "
        "the data set size and the guarantee) and report how well the audit tells them from N never-trained "
        "ones. They cost utility: not for a model you ship.",
    )
    evaluation.add_argument("--push_to_hub", action="store_true", help="Upload adapter, report, card and images.")
    evaluation.add_argument("--hub_model_id", type=str, default=None, help="Default: the output folder's name.")
    evaluation.add_argument("--hub_token", type=str, default=None)
    evaluation.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)
    resolve_dataset_source(args, "private-digits")
    if args.noise_multiplicity < 1:
        parser.error("--noise_multiplicity must be >= 1")
    if args.noise_multiplier is not None and args.noise_multiplier <= 0:
        parser.error(f"--noise_multiplier must be > 0 (sigma 0 adds no noise: no privacy), got {args.noise_multiplier}")
    if args.num_canaries < 0:
        parser.error("--num_canaries must be >= 0")
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        parser.error(f"--ema_decay must be in (0, 1), got {args.ema_decay}")
    if args.scheduler is not None:
        try:
            scheduler_class(args.scheduler)
        except ValueError as error:
            parser.error(str(error))
    if args.evaluate and args.dataset_name is None:
        parser.error("--evaluate needs --dataset_name: a data set with a held-out 'test' split to evaluate against.")
    if args.gradient_checkpointing and args.grad_sample_mode != "fused" and not args.disable_dp:
        parser.error(
            "--gradient_checkpointing needs --grad_sample_mode fused: opacus' hooks record each forward's "
            "activations, and the recomputation in the backward would be recorded again."
        )
    if not 0 <= args.caption_dropout < 1:
        parser.error(f"--caption_dropout must be in [0, 1), got {args.caption_dropout}")
    if args.central_image_noise_multiplier is not None and args.central_image_noise_multiplier <= 0:
        parser.error(f"--central_image_noise_multiplier must be > 0, got {args.central_image_noise_multiplier}")
    if args.central_image_noise_multiplier is not None and args.disable_dp:
        parser.error("--central_image_noise_multiplier is a DP release; --disable_dp runs have no accountant for it.")
    if args.disable_dp and args.resume_from_checkpoint:
        parser.error("--disable_dp runs are not checkpointed; --resume_from_checkpoint is for DP runs.")
    return args


def prepare_labels(args, dataset, pipe, label_column):
    """Map private labels onto the base's classes by name (a DiT base's synonyms too); new classes need
    --train_class_embedding. An unconditional base uses no labels: an explicit --label_column is an error,
    found labels are only logged. New classes get a class embedding row (own bases) or a DiT label row after its null
    class. Returns (the data's label names, the model's class names by id, name -> class id)."""
    names = label_names(dataset, label_column)
    if pipe.num_classes is None:
        if args.label_column:
            raise DataError(
                f"--label_column {args.label_column!r} was given, but the base ({pipe.base_family}) is unconditional: "
                "it cannot use labels. Leave --label_column out (or pass --label_column '')."
            )
        if names:
            logger.warning(f"The base ({pipe.base_family}) is unconditional: the data's labels {names} are not used.")
        return None, None, None
    if names is None:
        raise DataError("The base model is class-conditional; the private data needs a label column.")
    base_id2label = {int(k): v for k, v in (pipe.config.id2label or {}).items()}
    base_names = [base_id2label[k] for k in sorted(base_id2label)]
    known = {**pipe.label_synonyms, **pipe.labels}
    new = [n for n in names if n not in known]
    if new and not args.train_class_embedding:
        shown = base_names if len(base_names) <= 20 else [*base_names[:20], "..."]
        raise DataError(
            f"Private labels {new} are unknown to the base model (its classes: {shown}). "
            "Pass --train_class_embedding to learn embeddings for them under DP."
        )
    first = len(base_names)
    if new and pipe.class_embedder is not None:
        pipe.class_embedder = extend_class_embedder(pipe.class_embedder, len(new))
    elif new:  # DiT: rows after the null class, which stays where DiTPipeline expects it
        pipe.class_rows = DiTClassRows.from_null_row(pipe.unet, len(new))
        first = pipe.class_rows.config.first_id
    new_ids = {name: first + i for i, name in enumerate(new)}
    id2label = {**base_id2label, **{i: name for name, i in new_ids.items()}}
    return names, id2label, {**known, **new_ids}


def extend_class_embedder(embedder: ClassEmbedder, extra: int) -> ClassEmbedder:
    """New rows for new classes, initialised from the null-class row; the null row stays last."""
    old = embedder.embedding.weight.detach()
    grown = ClassEmbedder(embedder.config.num_classes + extra, embedder.config.embedding_dim)
    with torch.no_grad():
        grown.embedding.weight[: old.shape[0] - 1] = old[:-1]
        grown.embedding.weight[old.shape[0] - 1 :] = old[-1]
    return grown


def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args)  # --mixed_precision casts the frozen base's weights (below): no autocast
    set_seed(args.seed, device_specific=True)
    world_size = accelerator.num_processes

    # ---- base model and private data: everything is validated before anything is written ----
    pipe = DPLDMPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision)
    pipe.ensure_peft_unet()  # CompVis-style UNet2DModel bases get diffusers' adapter API
    vae, unet = pipe.vae.eval().requires_grad_(False), pipe.unet
    resolution = args.resolution or vae.config.sample_size
    check_resolution(resolution, vae)
    dataset = load_training_dataset(args)
    image_column, label_column = resolve_columns(dataset, args.image_column, args.label_column)
    captions = None
    if pipe.is_text_to_image:  # conditioned on captions (private data), encoded below by the public text encoder
        if args.train_class_embedding:
            raise DataError("--train_class_embedding: a text-to-image base has no class embedding to train.")
        captions = dataset_captions(dataset, args.caption_column, args.caption_template, label_column)
        names, id2label, class_ids = None, None, None
    elif args.caption_column is not None or args.caption_template is not None:
        raise DataError(f"--caption_column / --caption_template are for text-to-image bases, not {pipe.base_family}.")
    else:
        names, id2label, class_ids = prepare_labels(args, dataset, pipe, label_column)
    labels = dataset_labels(dataset, label_column if names else None, class_ids)
    canaries = None
    if args.num_canaries:
        # Audit canaries are training examples like any other: counted in n, Poisson-sampled, clipped, noised.
        num_classes = max(id2label) + 1 if id2label else 1
        canaries, canary_labels, _, _ = make_canaries(
            args.num_canaries, vae.config.in_channels, resolution, num_classes, args.seed
        )
        labels = None if labels is None else torch.cat([labels, canary_labels])
        if captions is not None:  # a text model's canaries: random-word captions, trained on with their images
            captions = captions + canary_captions(args.num_canaries, args.seed)[0]
    n = len(dataset) + args.num_canaries
    if n < args.batch_size:
        raise DataError(
            f"The private data set has {n} examples, fewer than one batch (--batch_size {args.batch_size})."
        )
    sample_rate = args.batch_size / n
    planned_steps = args.max_train_steps or math.ceil(args.num_train_epochs / sample_rate)
    releases = []
    if args.central_image_noise_multiplier is not None:
        if pipe.is_text_to_image:
            raise DataError("--central_image_noise_multiplier: a text-to-image base has no classes to average over.")
        releases.append(Release(args.central_image_noise_multiplier))  # one Gaussian mechanism over all N examples
    if args.disable_dp:
        logger.warning("--disable_dp: training WITHOUT differential privacy; the adapter claims no guarantee.")
    else:
        check_delta(args.target_delta, n)
        if args.noise_multiplier is None:  # calibrate sigma to the target over the planned steps (and releases)
            target_epsilon = args.target_epsilon if args.target_epsilon is not None else DEFAULT_TARGET_EPSILON
            noise_multiplier = calibrate_noise_multiplier(
                target_epsilon, args.target_delta, sample_rate, planned_steps, args.accountant, releases
            )
        else:  # sigma given: no target unless one was set explicitly
            noise_multiplier, target_epsilon = args.noise_multiplier, args.target_epsilon
        budget = PrivacyBudget(
            args.accountant, noise_multiplier, sample_rate, args.target_delta, planned_steps, target_epsilon, releases
        )
        if budget.max_steps == 0:
            raise ValueError(
                f"Not even one step fits in target_epsilon={target_epsilon} with sigma={noise_multiplier}."
            )

    lora_config = make_lora_config(
        args.lora_rank,
        args.lora_alpha,
        args.lora_dropout,
        args.lora_target_modules,
        _init_flag(args.init_lora_weights),
        presets=pipe.family.lora_target_presets,
    )
    adapted_modules = add_lora(unet, lora_config)
    class_embedder, class_rows = pipe.class_embedder, pipe.class_rows
    if class_embedder is not None:
        class_embedder.requires_grad_(args.train_class_embedding)
    if class_rows is not None:
        class_rows.requires_grad_(True)  # new DiT classes (only made with --train_class_embedding)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    for module in (unet, class_embedder):  # the base (and its class embedding) in weight_dtype ...
        if module is not None:
            module.to(dtype=weight_dtype)
    trained = [m for m in (unet, class_embedder, class_rows) if m is not None]
    cast_training_params(trained, dtype=torch.float32)  # ... then diffusers' own: every trainable parameter in fp32
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    input_dtype = weight_dtype if weight_dtype != torch.float32 else None
    model = LatentDenoiser(unet, class_embedder, class_rows, input_dtype=input_dtype).to(accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_parameters = sum(p.numel() for p in trainable)
    logger.info(f"LoRA on {len(adapted_modules)} modules: {adapted_modules}")
    if not args.disable_dp:
        logger.info(
            f"{n} private examples, q={sample_rate:.4g}, sigma={noise_multiplier:.4f}, C={args.max_grad_norm}, "
            f"k={args.noise_multiplicity}, {budget.max_steps} steps, {trainable_parameters} trainable parameters"
        )

    # The public frozen autoencoder encodes the private images in streamed batches (no privacy cost); an unreadable
    # image fails here, with its index, before anything is trained or written.
    vae.to(accelerator.device)
    latents = dataset_latents(dataset, vae, resolution, image_column, args.cache_dir, mirrored=args.random_flip)
    if canaries is not None:
        latents = torch.cat([latents, encode_latents(vae, canaries, mirrored=args.random_flip)])
    null_context = None
    if captions is not None:  # the conditions are the captions' (N, L, D) contexts; the null is the empty prompt's
        pipe.text_encoder.requires_grad_(False).to(accelerator.device)
        labels = caption_contexts(pipe, captions, args.cache_dir)
        null_context = pipe.encode_prompt("").float().cpu()
        del captions  # (nothing below sees the caption texts)
    if labels is None:
        labels = torch.zeros(n, dtype=torch.long)
    frozen_checksum = _frozen_checksum(model)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    null_class = model.null_class_id  # a ClassEmbedder's last row, DiT's class 1000; None: no label dropout
    dropout = args.caption_dropout if null_context is not None else args.label_dropout if null_class is not None else 0
    loss_fn = DiffusionLoss(
        noise_scheduler,
        use_labels=bool(id2label) or null_context is not None,
        null_class=null_class,
        label_dropout=dropout,
        null_context=null_context,
        random_flip=args.random_flip,
    )
    if args.disable_dp:
        snapshot = [p.detach().clone() for p in trainable]
        train_without_privacy(args, accelerator, model, trainable, latents, labels, loss_fn, planned_steps)
        _check_training_moved(trainable, snapshot, model, frozen_checksum)
        if accelerator.is_main_process:
            save_outputs(args, pipe, unet, class_embedder, names, id2label, report=None)
        accelerator.end_training()
        return

    checkpoint = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if releases and checkpoint is None and accelerator.is_main_process:
        # ---- DP central images, then the warm-up on them (post-processing); a resumed run has both in its weights
        # and the release in its accountant. Other ranks get rank 0's weights from DPDDP's broadcast.
        release_ids = [class_ids[name] for name in names] if names else [0]
        central = release_private_central_images(
            args, vae, dataset, image_column, labels, canaries, release_ids, resolution
        )
        warm_up(args, vae, model, trainable, loss_fn, central, release_ids, resolution)

    # ---- DP-SGD (opacus) ----
    if world_size > 1:
        model = DPDDP(model)  # opacus' DDP: noise on rank 0, one all-reduce per logical batch
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    dp = make_private(
        model,
        optimizer,
        TensorDataset(latents, labels),
        budget=budget,
        max_grad_norm=args.max_grad_norm,
        noise_multiplicity=args.noise_multiplicity,
        grad_sample_mode=args.grad_sample_mode,
        secure_mode=args.secure_mode,
    )
    state = PrivateTrainingState(model, dp.optimizer, budget)
    accelerator.register_for_checkpointing(state)
    ema = make_ema(args, accelerator, trainable)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        logger.info(f"Resumed from {checkpoint}: {budget.steps} steps and epsilon={budget.epsilon():.3f} already spent")
    if accelerator.is_main_process:
        accelerator.init_trackers("train_dp_lora", config={k: v for k, v in vars(args).items() if v is not None})

    progress = tqdm(total=budget.max_steps, initial=budget.steps, disable=not accelerator.is_local_main_process)
    physical = args.max_physical_batch_size or max(1, 2 * args.batch_size)
    first_snapshot = None
    while budget.can_step():
        with BatchMemoryManager(
            data_loader=dp.data_loader, max_physical_batch_size=physical, optimizer=dp.optimizer
        ) as loader:
            for batch_latents, batch_labels in loader:
                steps_before = budget.steps
                if first_snapshot is None:
                    first_snapshot = [p.detach().clone() for p in trainable]
                loss = private_backward(
                    dp.model,
                    dp.optimizer,
                    loss_fn,
                    batch_latents.to(accelerator.device),
                    batch_labels.to(accelerator.device),
                )
                dp.optimizer.step()
                dp.optimizer.zero_grad(set_to_none=True)
                if budget.steps == steps_before:
                    continue  # a physical part of a logical batch: clipped and accumulated, no step yet
                if budget.steps == 1 or budget.steps == budget.max_steps:
                    _check_training_moved(trainable, first_snapshot, model, frozen_checksum)
                progress.update(budget.steps - steps_before)
                if ema is not None:
                    ema.step(trainable)
                logs = {"loss": float(loss) if loss is not None else float("nan")}
                if budget.steps % args.epsilon_log_steps == 0 or budget.steps == budget.max_steps:
                    logs["epsilon"] = budget.record()
                    progress.set_postfix(loss=f"{logs['loss']:.4f}", eps=f"{logs['epsilon']:.2f}")
                accelerator.log(logs, step=budget.steps)
                if budget.steps % args.checkpointing_steps == 0 and budget.can_step():
                    save_checkpoint(accelerator, args.output_dir, budget.steps, args.checkpoints_total_limit)
                if not budget.can_step():
                    break
    progress.close()

    # ---- outputs: adapter, report, samples ----
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(trainable)
    epsilon = budget.record()
    if target_epsilon is not None and epsilon > target_epsilon:
        raise RuntimeError(f"epsilon {epsilon} exceeds the target {target_epsilon}: refusing to write the adapter.")
    if accelerator.is_main_process:
        report = build_dp_report(
            budget,
            max_grad_norm=args.max_grad_norm,
            noise_multiplicity=args.noise_multiplicity,
            dataset_size=n,
            batch_size=args.batch_size,
            world_size=world_size,
            trainable_parameters=trainable_parameters,
            lora_rank=args.lora_rank,
            lora_alpha=lora_config.lora_alpha,
            adapted_modules=adapted_modules,
            base_model=args.pretrained_model_name_or_path,
            trained_class_embedding=args.train_class_embedding,
            grad_sample_mode=args.grad_sample_mode,
            ema_decay=args.ema_decay,
            num_canaries=args.num_canaries or None,
            mixed_precision=args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing,
            random_flip=args.random_flip,
            other_releases=[central_images_record(args, budget, vae, resolution)] if releases else [],
        )
        logger.info(f"epsilon={epsilon:.3f} (delta={args.target_delta}) after {budget.steps} steps")
        save_outputs(args, pipe, unet, class_embedder, names, id2label, report)
    accelerator.end_training()


def train_without_privacy(args, accelerator, model, trainable, latents, labels, loss_fn, steps: int) -> None:
    """``--disable_dp``: the same LoRA, loss, noise multiplicity, batch size and number of steps as the DP run,
    with shuffled batches, no clipping and no noise (not checkpointed: a reference run, minutes long)."""
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    loader = DataLoader(TensorDataset(latents, labels), batch_size=args.batch_size, shuffle=True, drop_last=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = make_ema(args, accelerator, trainable)
    on_step = None if ema is None else (lambda: ema.step(trainable))
    k, show = args.noise_multiplicity, accelerator.is_local_main_process
    fit(model, optimizer, loader, loss_fn, steps, k, accelerator.backward, accelerator.log, on_step, show)
    if ema is not None:
        ema.copy_to(trainable)


def fit(model, optimizer, loader, loss_fn, steps: int, k: int, backward, log=None, on_step=None, show=True) -> None:
    """``steps`` plain optimizer steps over ``loader`` (passes over reshuffled data), each row repeated ``k``
    times like the DP run's noise multiplicity. For data that is not private, or not protected (--disable_dp)."""
    progress = tqdm(total=steps, disable=not show)
    done = 0  # (a disabled tqdm does not count: its n stays 0)
    while done < steps:
        for batch_latents, batch_labels in loader:
            loss = loss_fn(model, batch_latents.repeat_interleave(k, 0), batch_labels.repeat_interleave(k, 0)).mean()
            backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step()
            done += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if log is not None:
                log({"loss": loss.item()}, step=done)
            if done >= steps:
                break
    progress.close()


def release_private_central_images(args, vae, dataset, image_column, labels, canaries, release_ids, resolution):
    """The one DP release outside DP-SGD (``privacy.release_central_images``, already charged to the budget): the
    mean image of each class in ``release_ids`` (model class ids; unlabelled data: one), over the private images and
    canaries, with secret noise. An example of another class (a canary's random label) takes no part."""
    size, max_norm = central_image_settings(args, vae, resolution)
    positions = {class_id: i for i, class_id in enumerate(release_ids)}
    rows = torch.tensor([positions.get(int(label), -1) for label in labels])
    parts = [pixel_batches(dataset, size, vae.config.in_channels, image_column, batch_size=256)]
    if canaries is not None:
        parts.append([torch.nn.functional.interpolate(canaries, size=(size, size), mode="area")])

    def batches():
        start = 0
        for pixels in itertools.chain(*parts):
            part = rows[start : start + len(pixels)]
            start += len(pixels)
            yield pixels[part >= 0], part[part >= 0]

    return release_central_images(
        batches(), len(release_ids), noise_multiplier=args.central_image_noise_multiplier, max_image_norm=max_norm,
        generator=secret_generator(),
    )  # fmt: skip


def central_image_settings(args, vae, resolution: int) -> tuple[int, float]:
    """(side, L2 clipping norm) of the released means: the flags, or half the training resolution and half of
    sqrt(pixels) (data-independent defaults: choosing them from the private images would leak)."""
    size = args.central_image_resolution or max(1, resolution // 2)
    return size, args.central_image_max_norm or 0.5 * math.sqrt(vae.config.in_channels * size * size)


def warm_up(args, vae, model, trainable, loss_fn, central, release_ids, resolution) -> None:
    """``--warmup_steps`` non-private steps on ``--central_image_copies`` augmented copies of each released mean
    (post-processing of the release: no privacy cost), with the DP run's loss and learning rate."""
    pixels = augmented_copies(central.images, args.central_image_copies, resolution, seed=args.seed)
    latents = encode_latents(vae, pixels, mirrored=args.random_flip)
    labels = torch.tensor(release_ids).repeat_interleave(args.central_image_copies)
    logger.info(f"Warm-up: {args.warmup_steps} steps on {len(pixels)} augmented DP central images")
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    batch = min(args.warmup_batch_size, len(latents))
    loader = DataLoader(TensorDataset(latents, labels), batch_size=batch, shuffle=True, drop_last=True)
    fit(model, optimizer, loader, loss_fn, args.warmup_steps, 1, lambda loss: loss.backward())


def central_images_record(args, budget, vae, resolution: int) -> dict:
    """The release's entry in ``dp_report.json``'s ``other_releases``."""
    size, max_norm = central_image_settings(args, vae, resolution)
    return {
        "mechanism": "DP central images (per-class mean images by the Gaussian mechanism; DP-FETA's warm-up)",
        "noise_multiplier": args.central_image_noise_multiplier,
        "sample_rate": 1.0,
        "max_image_norm": max_norm,
        "sensitivity": central_image_sensitivity(max_norm),
        "resolution": size,
        "epsilon_alone": budget.release_epsilon(),
        "warmup_steps": args.warmup_steps,
        "warmup_batch_size": args.warmup_batch_size,
        "copies_per_image": args.central_image_copies,
    }


def make_ema(args, accelerator, trainable) -> EMAModel | None:
    """``--ema_decay``: an average of the iterates, saved in every checkpoint (resume continues it)."""
    if args.ema_decay is None:
        return None
    ema = EMAModel(trainable, decay=args.ema_decay)
    accelerator.register_for_checkpointing(ema)
    return ema


def save_outputs(args, pipe, unet, class_embedder, names, id2label, report: DPReport | None) -> None:
    """Adapter, its config, the class embedding or DiT class rows if trained, ``dp_report.json`` (DP runs only),
    samples, then
    ``--evaluate``'s metrics.json, the model card and ``--push_to_hub``. Main process only."""
    out = Path(args.output_dir)
    weights = save_lora_weights(unet, out)
    adapter_config = DPLoRAConfig(
        base_model=args.pretrained_model_name_or_path,
        revision=args.revision,
        base_family=pipe.base_family,
        lora_weights=weights.name,
        class_embedder=CLASS_EMBEDDER_FOLDER if args.train_class_embedding and class_embedder is not None else None,
        class_rows=CLASS_ROWS_FOLDER if pipe.class_rows is not None else None,
        id2label=id2label or None,
        # The examples trained on (the audit's members): the whole train split, or --max_train_samples' subset.
        train_subset=None if args.max_train_samples is None else {"max_samples": args.max_train_samples,
                                                                   "seed": args.seed},  # fmt: skip
        canaries=_canaries_record(args, pipe),
        caption_column=args.caption_column if pipe.is_text_to_image else None,
        caption_template=args.caption_template if pipe.is_text_to_image else None,
        validation_prompts=args.validation_prompt if pipe.is_text_to_image else None,
    )
    trained = {CLASS_EMBEDDER_FOLDER: class_embedder, CLASS_ROWS_FOLDER: pipe.class_rows}
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
    prompts = args.validation_prompt if pipe.is_text_to_image else None  # public prompts only, never captions
    if args.samples_per_class > 0 and (prompts or not pipe.is_text_to_image):
        pipe.class_embedder = class_embedder
        pipe.set_progress_bar_config(disable=True)
        if args.scheduler is not None:
            pipe.set_scheduler(args.scheduler)
        shown = names[:10] if id2label else None  # None: one row of unconditional samples
        grid = sample_grid(pipe, shown, args.samples_per_class, args.num_inference_steps, args.seed, prompts)
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
        repo_id = args.hub_model_id or out.resolve().name
        url = push_to_hub(out, repo_id, token=args.hub_token, private=args.hub_private_repo)
        logger.info(f"Pushed to {url}")


def _canaries_record(args, pipe) -> dict | None:
    """What rebuilds the run's canaries: their number, seed and the resolution they were drawn at (which
    --resolution may set apart from the autoencoder's)."""
    if not args.num_canaries:
        return None
    return {"num_canaries": args.num_canaries, "seed": args.seed,
            "resolution": args.resolution or pipe.vae.config.sample_size}  # fmt: skip


def _init_flag(value: str):
    lowered = value.lower()
    return {"true": True, "false": False}.get(lowered, value)


def _frozen_checksum(model) -> float:
    return float(sum(p.double().sum() for p in model.parameters() if not p.requires_grad))


def _check_training_moved(trainable, snapshot, model, frozen_checksum):
    """Guard against silent no-op training (opacus#820): adapters moved, frozen base did not."""
    if all(torch.equal(p.detach(), s) for p, s in zip(trainable, snapshot)):
        raise RuntimeError(
            "The DP step left every trainable parameter unchanged: per-sample gradients are not flowing."
        )
    if _frozen_checksum(model) != frozen_checksum:
        raise RuntimeError("The frozen base weights changed during DP-LoRA training.")


if __name__ == "__main__":
    main()
