"""Evaluate an adapter folder and write ``metrics.json`` next to its ``dp_report.json``.

Downstream accuracy (class-conditional models: the data's classes, by name) and the membership audit always
run; FID and KID (clean-fid) whenever Inception weights are available (the file given, ``DP_DIFFUSERS_FID_INCEPTION``,
or clean-fid's own, downloaded unless offline), else they are recorded as not computed, with why and how to fix it.
The held-out split is only read here, never trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapter_config import DPLoRAConfig
from ..constants import DP_REPORT_NAME, METRICS_NAME
from ..data import (
    DataError,
    canary_candidates,
    dataset_to_tensors,
    encode_latents,
    label_names,
    load_image_dataset,
    privacy_unit_members,
    resolve_columns,
    trained_rows,
)
from ..families import ConditionOptions
from ..models import LatentDenoiser
from .downstream import downstream_accuracy
from .fid import InceptionWeightsNotFoundError, compute_fid
from .membership import audit, denoising_loss_scores, membership_auc
from .one_run_audit import OneRunAudit, load_coins, one_run_audit

logger = logging.getLogger(__name__)

#: the one-run audit's score and delta when the folder has no DP report (a --disable_dp reference)
ONE_RUN_SCORE = "the canary's denoising loss drop from the public base (fixed timesteps and noise; a unit: the mean)"
ONE_RUN_RAW_SCORE = "minus the canary's denoising loss (fixed timesteps and noise; a unit: the mean)"
ONE_RUN_AUDIT_DELTA = 1e-5
NO_COINS = ("the canaries' coins stay on the machine that trained the adapter (its .audit/ folder, never uploaded); "
            "evaluate the training folder itself")


def canary_scores(loss_fn, latents, conditions, units: list[list[int]], seed: int, base_loss_fn=None) -> dict:
    """Each canary unit's mean denoising loss at fixed timesteps and noise (``loss``), the public base's
    (``base``) and the drop from it (``calibrated``: loss minus the base's), as float64 arrays."""
    def by_unit(scores: torch.Tensor) -> np.ndarray:
        return np.array([scores[members].double().mean().item() for members in units])

    out = {"loss": by_unit(denoising_loss_scores(loss_fn, latents, conditions, seed=seed))}
    if base_loss_fn is not None:
        out["base"] = by_unit(denoising_loss_scores(base_loss_fn, latents, conditions, seed=seed))
        out["calibrated"] = out["loss"] - out["base"]
    return out


@torch.no_grad()
def generate_labelled(pipe, conditions: dict[str, list], per_class: int, num_inference_steps: int, seed: int,
                      resolution: int | None = None, batch: int = 250, **call_kwargs):  # fmt: skip
    """``per_class`` samples of each condition (``{"class_labels": ids}`` or ``{"prompt": prompts}``: a pipeline
    call argument, one value per class), at ``resolution`` pixels, with further ``call_kwargs`` (e.g. T5's
    ``max_sequence_length``). Images (N, C, H, W) in [-1, 1] and labels (N,) as *positions* in that list (the data
    set's own class order)."""
    (key, values), = conditions.items()
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(len(values)).repeat_interleave(per_class)
    images = []
    for chunk in tqdm(positions.split(batch), desc="Evaluation samples", unit="batch"):
        chosen = [values[i] for i in chunk.tolist()]
        out = pipe(**{key: chosen}, num_inference_steps=num_inference_steps, generator=generator, output_type="pt",
                   height=resolution, width=resolution, **call_kwargs)  # fmt: skip
        images.append(out.images * 2 - 1)
    return torch.cat(images).clamp(-1, 1), positions


def synthetic_call_kwargs(pipe, guidance_scale: float | None = None) -> tuple[int, dict]:
    """The resolution (pixels) and pipeline call arguments of synthetic data: as the adapter was trained (its
    resolution, a T5 base's sequence length) at ``guidance_scale``, by default the family's for synthetic data."""
    call_kwargs = pipe.trained_call_kwargs()
    resolution = call_kwargs.pop("height", None) or pipe.vae.config.sample_size
    call_kwargs.pop("width", None)
    guidance_scale = pipe.family.synthetic_data_guidance_scale if guidance_scale is None else guidance_scale
    if guidance_scale is not None:
        call_kwargs["guidance_scale"] = guidance_scale
    return resolution, call_kwargs


@torch.no_grad()
def generate_unconditional(pipe, num_images: int, num_inference_steps: int, seed: int, resolution: int | None = None,
                           batch: int = 250, **call_kwargs):  # fmt: skip
    """``num_images`` samples of an unconditional model at ``resolution`` pixels: images (N, C, H, W) in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in tqdm(range(0, num_images, batch), desc="Evaluation samples", unit="batch"):
        size = min(batch, num_images - start)
        out = pipe(batch_size=size, num_inference_steps=num_inference_steps, generator=generator, output_type="pt",
                   height=resolution, width=resolution, **call_kwargs)  # fmt: skip
        images.append(out.images * 2 - 1)
    return torch.cat(images).clamp(-1, 1)


def evaluate_from_args(adapter_dir: str | Path, args: argparse.Namespace) -> dict:
    """:func:`evaluate_adapter` with the flags of :func:`add_evaluation_args`, the data flags of ``add_data_args``
    (the training script's) and ``--scheduler``, ``--seed``."""
    passed = ("dataset_name", "train_data_dir", "dataset_config_name", "image_column", "label_column", "caption_column",
              "scheduler", "audit_reference", "seed")  # flags spelled as evaluate_adapter's arguments
    return evaluate_adapter(adapter_dir, **{name: getattr(args, name) for name in passed},
                            samples_per_class=args.eval_samples_per_class, inception_path=args.fid_inception_path,
                            num_inference_steps=args.eval_inference_steps,
                            guidance_scale=args.eval_guidance_scale)  # fmt: skip


def denoiser_loss_fn(pipe, objective_options=None):
    """``(latents, conditions, levels, noise) -> (B,)``: the training objective's loss of ``pipe``'s model at given
    noise levels (in [0, 1000), the objective's timesteps there) and noise, for the audit."""
    model = LatentDenoiser(pipe.unet, pipe.family, pipe.class_embedder, pipe.class_rows).eval()
    objective = pipe.family.objective(pipe.scheduler, objective_options)

    def loss_fn(latents, conditions, levels, noise):
        return objective.loss(model, latents, conditions or {}, objective.timesteps_at(levels), noise)

    return loss_fn


def _without_adapter(unet, loss_fn):
    """``loss_fn`` of the public base: the same (unfused) UNet with its LoRA layers switched off."""

    def base_loss_fn(*args):
        unet.disable_adapters()
        try:
            return loss_fn(*args)
        finally:
            unet.enable_adapters()

    return base_loss_fn


def _audit_members(members, nonmembers, config: DPLoRAConfig | None, seed: int) -> tuple[torch.Tensor, dict]:
    """(the member examples' indices, ``audit``'s unit arguments): at most as many members as non-members, drawn
    with ``seed``; for a user-level adapter whole people (its ``privacy_unit`` column), at most as many as the
    held-out people, and the units of both sides."""
    generator = torch.Generator().manual_seed(seed)
    column = config.privacy_unit if config is not None else None
    if column is None:
        return torch.randperm(len(members), generator=generator)[: len(nonmembers)], {}
    people, held_out = privacy_unit_members(members, column), privacy_unit_members(nonmembers, column)
    chosen = [people[i] for i in torch.randperm(len(people), generator=generator)[: len(held_out)].tolist()]
    starts = np.cumsum([0] + [len(unit) for unit in chosen])
    units = [list(range(start, start + len(unit))) for start, unit in zip(starts, chosen)]
    return torch.tensor([i for unit in chosen for i in unit]), {"member_units": units, "nonmember_units": held_out}


def _adapter_config(adapter_dir: str | Path) -> DPLoRAConfig | None:
    """The adapter config of an adapter folder (``None`` for a base pipeline folder)."""
    return DPLoRAConfig.from_pretrained(adapter_dir) if DPLoRAConfig.is_adapter_folder(adapter_dir) else None


def _train_subset(adapter_dir: str | Path) -> dict | None:
    """``train_dp_lora.py``'s record of ``--max_train_samples`` (``None``: the whole train split)."""
    config = _adapter_config(adapter_dir)
    return config.train_subset if config is not None else None


def evaluate_adapter(
    adapter_dir: str | Path,
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    samples_per_class: int = 100,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    scheduler: str | None = None,
    inception_path: str | None = None,
    audit_reference: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """Evaluate the adapter (or base) in ``adapter_dir`` against the private data set's splits.

    The data: ``dataset_name`` (an embedded or Hub data set) or ``train_data_dir`` (an imagefolder whose ``test/``
    split holds the held-out images), with the training script's column flags; the samples at ``guidance_scale``
    (default: the family's for synthetic data, as ``dp-diffusers generate``); by default the data set the adapter
    records (an embedded or Hub one; a local folder is never recorded: its adapter asks for ``--train_data_dir``),
    else ``private-digits``. ``audit_reference``: a non-private fine-tune on the same data, whose audit AUC is
    reported next to the DP one. Returns the metrics dict it writes to ``metrics.json``.
    """
    from ..pipelines import DPLDMPipeline

    adapter_dir = Path(adapter_dir)
    config = _adapter_config(adapter_dir)
    if dataset_name is None and train_data_dir is None:
        if config is not None and config.local_data:
            raise DataError(f"{adapter_dir} was trained on a local imagefolder (its path is not recorded): pass it "
                            "with --train_data_dir (held-out images in its test/ subfolder).")  # fmt: skip
        recorded = config.dataset_name if config is not None else None
        dataset_name = recorded or "private-digits"
        if recorded:
            dataset_config_name = dataset_config_name or config.dataset_config_name
    if config is not None:  # the columns as the run was given them (names, never paths)
        image_column = config.image_column if image_column is None else image_column
        label_column = config.label_column if label_column is None else label_column
        caption_column = config.caption_column if caption_column is None else caption_column
    data_name = dataset_name or "the local imagefolder"
    pipe = DPLDMPipeline.from_pretrained(adapter_dir)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.set_scheduler(scheduler)
    adapted = bool(getattr(pipe.unet, "peft_config", None))
    if adapted:
        pipe.fuse_lora()  # same model, no per-step LoRA matmuls: sampling costs what the base costs
    family, vae = pipe.family, pipe.vae
    resolution, call_kwargs = synthetic_call_kwargs(pipe, guidance_scale)
    channels = vae.config.in_channels
    options = config.condition_options() if config is not None else ConditionOptions()
    options = dataclasses.replace(options, label_column=label_column, caption_column=caption_column)
    objective = config.objective_options() if config is not None else None
    names = None  # the data set's class names (its test split's), in its own order

    def split(name, subset=None):
        """(examples as the family sees them, pixels, label positions in ``names`` or None) of a split."""
        nonlocal names
        data = load_image_dataset(dataset_name, train_data_dir, dataset_config_name, split=name)
        if subset:
            data = trained_rows(data, subset, config.privacy_unit)
        images, labels_column = resolve_columns(data, image_column, label_column)
        names = names or label_names(data, labels_column)
        pixels, labels = dataset_to_tensors(data, resolution, channels, images, labels_column, names)
        examples = family.prepare_examples(pipe, data, images, labels_column, resolution, options)
        return examples, pixels, labels

    (test, test_x, test_y), (train, train_x, train_y) = split(test_split), split(train_split)
    subset = config.train_subset if config is not None else None
    if audit_reference is not None and (reference_subset := _train_subset(audit_reference)) != subset:
        raise ValueError(
            f"The audit reference {audit_reference} trained on other examples ({reference_subset}) than "
            f"{adapter_dir} ({subset}): its members differ, so its AUC would not be comparable."
        )
    member, member_x, _ = split(train_split, subset) if subset else (train, train_x, train_y)
    guidance = call_kwargs.get("guidance_scale")
    guidance = "the pipeline's default guidance" if guidance is None else f"guidance {guidance:g}"
    sampler = f"{type(pipe.scheduler).__name__}, {num_inference_steps} steps, {guidance}"
    metrics = {}
    # the model's condition for each of the data's classes: class ids by name, or the template's prompts
    class_conditions = family.sampling_conditions(pipe, names, options) if names else None
    if pipe.num_classes is not None and names is None:
        raise DataError(f"{data_name!r} has no labels: a class-conditional model is evaluated on labelled data.")
    if class_conditions is not None:
        synthetic_x, synthetic_y = generate_labelled(pipe, class_conditions, samples_per_class, num_inference_steps,
                                                     seed, resolution, **call_kwargs)  # fmt: skip
        downstream = downstream_accuracy(
            synthetic_x, synthetic_y, train_x, train_y, test_x, test_y, len(names), seed=seed
        )
        metrics["downstream_accuracy"] = {
            "value": downstream["downstream_accuracy"],
            "real_data_accuracy": downstream["real_data_accuracy"],
            "classifier": downstream["classifier"],
            "num_synthetic": downstream["num_synthetic"],
            "num_test": downstream["num_test"],
            "sampler": sampler,
            "dataset": f"{data_name} ({test_split} split, held out)",
        }
    elif test.captions is not None:  # captions without classes: one image per held-out caption (FID's images)
        logger.warning("Downstream accuracy skipped: the captions carry no classes (no --caption_template).")
        synthetic_x, _ = generate_labelled(pipe, {"prompt": test.captions}, 1, num_inference_steps, seed, resolution,
                                           **call_kwargs)  # fmt: skip
    else:  # unconditional (CompVis LDMs): no labelled samples to train a classifier on; FID and the audit only
        logger.warning("Downstream accuracy skipped: the model is unconditional, its samples have no labels.")
        synthetic_x = generate_unconditional(
            pipe, samples_per_class * len(names or [None]), num_inference_steps, seed, resolution, **call_kwargs
        )

    # Membership audit: every held-out example is a non-member; members are examples the run trained on, at
    # most as many as the non-members (a random part of a large train split, all of a small subset). Each example
    # is scored under its own conditions (its class, or its own caption's encoding). A user-level run's audit is of
    # people: members and non-members are privacy units, each scored by its examples' mean.
    members, units = _audit_members(member.dataset, test.dataset, config, seed)
    labels_of = lambda examples: resolve_columns(examples.dataset, image_column, label_column)[1]  # noqa: E731
    chosen = family.prepare_examples(pipe, member.dataset.select(members.tolist()), member.image_column,
                                     labels_of(member), resolution, options)  # fmt: skip
    sets = (encode_latents(vae, member_x[members]), family.encode_conditions(pipe, chosen),
            encode_latents(vae, test_x), family.encode_conditions(pipe, test))  # fmt: skip
    base_loss_fn = None
    if adapted:
        pipe.unfuse_lora()  # the samples are drawn; the audit switches the adapter off for the base's scores
        if not (config.class_embedder or config.class_rows):  # (trained class rows may add classes the base lacks)
            base_loss_fn = _without_adapter(pipe.unet, denoiser_loss_fn(pipe, objective))
    result = audit(denoiser_loss_fn(pipe, objective), *sets, seed=seed, calibration_loss_fn=base_loss_fn, **units)
    metrics["membership_auc"] = {"value": result.pop("membership_auc"), **result}
    if base_loss_fn is not None:
        # The public base never saw either set: its AUC is this split's chance level (a few hundred examples
        # per side put it a few hundredths off 0.5, e.g. when the members happen to be easier to denoise).
        metrics["membership_auc"]["public_base_auc"] = metrics["membership_auc"].pop("calibration_auc")
    canaries = config.canaries if config is not None else None
    report_path = adapter_dir / DP_REPORT_NAME
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    if canaries:  # the run also trained on canaries: each canary unit is a member by its coin, else a non-member
        # the range train_dp_lora.py drew the canaries' labels from (1 for an unconditional base)
        label_range = max(int(k) for k in pipe.config.id2label) + 1 if pipe.config.id2label else 1
        size = canaries.get("resolution", resolution)
        candidates = canary_candidates(canaries["num_canaries"], channels, size, label_range, canaries["seed"],
                                       canaries.get("per_unit", 1))  # fmt: skip
        empty = family.prepare_examples(pipe, test.dataset.select([]), test.image_column, labels_of(test), size,
                                        options)  # fmt: skip
        family.add_canaries(empty, candidates.pixels, candidates.labels, candidates.captions)
        canary_data = (encode_latents(vae, candidates.pixels), family.encode_conditions(pipe, empty))

        def canary_metrics(folder: Path, canary_config: dict | None, loss_fn) -> tuple[dict, OneRunAudit | None]:
            """The canary AUCs and the one-run audit of the model of ``folder`` on its own canaries' coins."""
            coins = load_coins(folder) if canary_config.get("coins") else None
            if canary_config.get("coins") and coins is None:
                return {"one_run_audit_not_computed": NO_COINS}, None
            if coins is None:  # runs before the one-run audit: the first half trained on
                coins = [True] * canaries["num_canaries"] + [False] * canaries["num_canaries"]
            inside = np.asarray(coins, dtype=bool)
            scores = canary_scores(loss_fn, *canary_data, candidates.unit_members(0), seed, base_loss_fn)
            result = {"num_canaries": int(inside.sum())}
            for name, key in (("loss", "canary_auc"), ("calibrated", "canary_calibrated_auc"),
                              ("base", "canary_public_base_auc")):  # fmt: skip
                if name in scores and 0 < inside.sum() < len(inside):  # low loss (or drop): member-like
                    result[key] = membership_auc(scores[name][inside], scores[name][~inside])
            if not canary_config.get("coins"):
                return result, None
            if len(coins) < 4:
                return {**result, "one_run_audit_not_computed": "fewer than 4 canary units"}, None
            delta = report["delta"] if report is not None else ONE_RUN_AUDIT_DELTA
            score = -scores["calibrated"] if "calibrated" in scores else -scores["loss"]  # higher: more member-like
            return result, one_run_audit(score, coins, delta)

        found, one_run = canary_metrics(adapter_dir, canaries, denoiser_loss_fn(pipe, objective))
        metrics["membership_auc"].update({k: v for k, v in found.items() if k != "one_run_audit_not_computed"})
        if one_run is not None:
            metrics["one_run_audit"] = {"value": one_run.epsilon_lower_bound, **one_run.to_dict(),
                                        "claimed_epsilon": report["epsilon"] if report is not None else None,
                                        "score": ONE_RUN_SCORE if base_loss_fn is not None else ONE_RUN_RAW_SCORE}
        elif "one_run_audit_not_computed" in found:
            metrics["one_run_audit"] = {"value": None, "not_computed": found["one_run_audit_not_computed"]}
    if audit_reference is not None:
        reference = DPLDMPipeline.from_pretrained(audit_reference)
        ref = audit(denoiser_loss_fn(reference, objective), *sets, seed=seed, calibration_loss_fn=base_loss_fn,
                    **units)  # fmt: skip
        metrics["membership_auc"]["reference_nonprivate_auc"] = ref["membership_auc"]
        if base_loss_fn is not None:
            metrics["membership_auc"]["reference_nonprivate_calibrated_auc"] = ref["calibrated_auc"]
        reference_canaries = getattr(_adapter_config(audit_reference), "canaries", None)
        if canaries and reference_canaries and {k: v for k, v in reference_canaries.items() if k != "coins"} == {
                k: v for k, v in canaries.items() if k != "coins"}:  # the same canaries, each on its own coins
            ref_canaries, _ = canary_metrics(Path(audit_reference), reference_canaries,
                                             denoiser_loss_fn(reference, objective))  # fmt: skip
            for key in ("canary_auc", "canary_calibrated_auc"):  # (the counts and the base's AUC are the adapter's)
                if key in ref_canaries:
                    metrics["membership_auc"][f"reference_nonprivate_{key}"] = ref_canaries[key]

    reference_set = f"{data_name} ({test_split} split, {len(test_x)} images)"
    to_uint8 = lambda x: ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).squeeze(-1).numpy()  # noqa: E731
    try:
        scores = compute_fid(to_uint8(synthetic_x), to_uint8(test_x), inception_path=inception_path, seed=seed)
    except InceptionWeightsNotFoundError as err:  # the rest of the evaluation stands; the card says why
        logger.warning(f"FID and KID not computed: {err}")
        for name in ("fid", "kid"):
            metrics[name] = {"value": None, "not_computed": str(err), "dataset": reference_set}
    else:
        common = {key: scores[key] for key in ("num_generated", "num_reference", "feature_extractor", "mode")}
        common.update(sampler=sampler, dataset=reference_set)
        metrics["fid"] = {"value": scores["fid"], **common}
        metrics["kid"] = {"value": scores["kid"], "subsets": scores["kid_subsets"],
                          "subset_size": scores["kid_subset_size"], **common}  # fmt: skip

    path = adapter_dir / METRICS_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, path)
    return metrics
