"""Pieces the training scripts share: the data and run flags, the accelerator, checkpoint folders, resuming."""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

CHECKPOINTS_DIR = "checkpoints"
#: what the stage-1 scripts (public data) train on by default
PUBLIC_DATASET = "public-digits"


def add_data_args(parser: argparse.ArgumentParser, default_dataset: str | None) -> None:
    """The diffusers data flags: ``--dataset_name`` / ``--train_data_dir`` and the column names."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Embedded set (public-digits, public-digits-8x8: the same digits in the private ones' published 8x8 "
        "format; private-digits; private-digits-tuning: a validation split carved from "
        "private-digits' train split, for choosing hyper-parameters; private-digits-units(-tuning): the digits of "
        "about 175 people, split by person) or a Hub data set id. "
        + (f"Default: {default_dataset}." if default_dataset else "Default: the data set the adapter was trained on."),
    )
    group.add_argument("--dataset_config_name", type=str, default=None)
    group.add_argument("--train_data_dir", type=str, default=None,
                       help="An imagefolder directory (train/ and test/ subfolders: the evaluation's held-out test "
                       "split).")  # fmt: skip
    group.add_argument("--image_column", type=str, default=None, help="Default: 'image' or the first column.")
    group.add_argument(
        "--label_column", type=str, default=None, help="Default: 'label' when present; '' trains unlabelled."
    )
    group.add_argument("--caption_column", type=str, default=None,
                       help="Text-to-image bases: the captions' column (default: 'text').")  # fmt: skip
    group.add_argument("--cache_dir", type=str, default=None, help="datasets / latents cache directory.")
    group.add_argument(
        "--max_train_samples", type=int, default=None, help="Use only the first N examples (debugging, tests)."
    )


def add_run_args(parser: argparse.ArgumentParser, *, checkpointing_steps: int) -> None:
    """The run flags of diffusers' training scripts: checkpoints, resuming, seed, trackers."""
    group = parser.add_argument_group("run")
    group.add_argument("--checkpointing_steps", type=int, default=checkpointing_steps)
    group.add_argument("--checkpoints_total_limit", type=int, default=2)
    group.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint folder or 'latest'.")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--report_to", type=str, default=None,
                       help="accelerate's trackers, e.g. tensorboard (local files) or wandb (remote). They receive "
                       "the allow-listed hyper-parameters only: never a token, a path, a column or a caption.")
    group.add_argument("--logging_dir", type=str, default="logs")


#: ``--report_to`` trackers that only write files under ``--output_dir`` (the operator's own); every other one sends
#: what it is given to a service
LOCAL_TRACKERS = frozenset({"tensorboard"})


def tracker_config(args: argparse.Namespace, hyperparameters: Sequence[str]) -> dict[str, Any]:
    """``accelerator.init_trackers``' config: the ``hyperparameters`` of ``args`` that are set, an allow-list, so
    that no token (``--hub_token``), local path, column name or prompt reaches TensorBoard's hparams or a remote
    tracker's config (``vars(args)`` would send them all)."""
    return {name: getattr(args, name) for name in hyperparameters if getattr(args, name) is not None}


def log_to_trackers(accelerator: Accelerator, values: dict[str, float], step: int,
                    private: Collection[str] = (), private_to_remote: bool = False) -> None:  # fmt: skip
    """``accelerator.log``, except that the ``private`` values (computed on private data without noise: outside
    epsilon) go only to local trackers (``LOCAL_TRACKERS``) unless ``private_to_remote``."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        local = tracker.name in LOCAL_TRACKERS
        shown = {k: v for k, v in values.items() if k not in private or local or private_to_remote}
        if shown:
            tracker.log(shown, step=step)


def remote_trackers(accelerator: Accelerator) -> list[str]:
    """The names of the run's trackers that send what they are given to a service (not ``LOCAL_TRACKERS``)."""
    return sorted(tracker.name for tracker in accelerator.trackers if tracker.name not in LOCAL_TRACKERS)


class LaunchError(RuntimeError):
    """The processes were started in a way accelerate cannot join into one distributed run."""


def make_accelerator(args: argparse.Namespace, mixed_precision: str = "no") -> Accelerator:
    """The run's ``Accelerator`` (trackers and checkpoints under ``--output_dir``) and log format.

    Raises :class:`LaunchError` when the environment says several processes (``WORLD_SIZE`` > 1) but accelerate
    sees one: each process would then train alone, on the whole private set, into the same folder (plain
    ``torchrun`` on CPU does that).
    """
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=Path(args.output_dir, args.logging_dir)
        ),
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes == 1:
        raise LaunchError(
            f"WORLD_SIZE={world_size} says {world_size} processes, but accelerate sees one (distributed type "
            f"{accelerator.distributed_type}): each would train alone into {args.output_dir}. Launch with "
            "`accelerate launch --multi_gpu --num_processes N` on GPUs (add --num_machines / --machine_rank / "
            "--main_process_ip for several nodes), or on CPU `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N`."
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return accelerator


def fit(model, optimizer, loader, loss_fn, steps: int, k: int, backward, log=None, on_step=None, show=True) -> None:
    """``steps`` plain optimizer steps over ``loader`` (passes over reshuffled data), each row repeated ``k``
    times like a DP run's noise multiplicity: for data that is not private (the central images' warm-up), or not
    protected (``--disable_dp``). ``loss_fn(model, *batch) -> (rows,)``."""
    from tqdm.auto import tqdm

    progress = tqdm(total=steps, disable=not show)
    done = 0  # (a disabled tqdm does not count: its n stays 0)
    while done < steps:
        for batch in loader:
            loss = loss_fn(model, *(t.repeat_interleave(k, 0) for t in batch)).mean()
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


def weight_dtype(mixed_precision: str):
    """The frozen base's dtype for ``--mixed_precision`` (no, fp16, bf16)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def init_lora_weights_flag(value: str) -> bool | str:
    """peft's ``init_lora_weights`` from the command line: ``true`` / ``false`` or a method name (``gaussian``)."""
    return {"true": True, "false": False}.get(value.lower(), value)


def frozen_checksum(model) -> float:
    """The sum of every frozen weight (float64): unchanged while only adapters train."""
    return float(sum(p.double().sum() for p in model.parameters() if not p.requires_grad))


def check_training_moved(trainable, snapshot, model, checksum: float) -> None:
    """Guard against silent no-op training (opacus#820): the adapters moved from ``snapshot``, the frozen base
    kept its ``checksum``."""
    import torch

    if all(torch.equal(p.detach(), s) for p, s in zip(trainable, snapshot)):
        raise RuntimeError("The step left every trainable parameter unchanged: per-sample gradients are not flowing.")
    if frozen_checksum(model) != checksum:
        raise RuntimeError("The frozen base weights changed during DP-LoRA training.")


def resume_step(accelerator: Accelerator, args: argparse.Namespace) -> int:
    """Load ``--resume_from_checkpoint`` into ``accelerator`` (nothing when absent) and return its step."""
    checkpoint = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is None:
        return 0
    accelerator.load_state(str(checkpoint))
    logging.getLogger(__name__).info(f"Resumed from {checkpoint} at step {step_of(checkpoint)}")
    return step_of(checkpoint)


def parse_public_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *,
                      checkpointing_steps: int) -> argparse.Namespace:  # fmt: skip
    """Parse ``argv`` with the script's own flags (in ``parser``) and those every stage-1 script (public data, no
    privacy) ends with: ``--mixed_precision``, the data flags (default: the public digits) and the run flags."""
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    add_data_args(parser, default_dataset=PUBLIC_DATASET)
    add_run_args(parser, checkpointing_steps=checkpointing_steps)
    args = parser.parse_args(argv)
    resolve_dataset_source(args, PUBLIC_DATASET)
    return args


def train_public_model(accelerator: Accelerator, args: argparse.Namespace, loader, step: Callable[[Any], dict],
                       *, project: str, tracked: Sequence[str]) -> None:  # fmt: skip
    """A stage-1 training run (public data, no privacy): the trackers started (``project``, told the ``tracked``
    flags only: :func:`tracker_config`), ``--resume_from_checkpoint`` loaded, then ``step(batch)`` trains on one
    batch of ``loader`` and returns what to log (its first value is shown on the progress bar), until
    ``--max_train_steps``; a checkpoint every ``--checkpointing_steps`` but the last (the model itself is the
    script's to save)."""
    from tqdm.auto import tqdm

    if accelerator.is_main_process:
        accelerator.init_trackers(project, config=tracker_config(args, tracked))
    global_step = resume_step(accelerator, args)
    progress = tqdm(total=args.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process)
    for _ in range(math.ceil(args.max_train_steps / len(loader))):
        if global_step >= args.max_train_steps:
            break
        for batch in loader:
            logs = step(batch)
            global_step += 1
            progress.update(1)
            progress.set_postfix({name: f"{value:.4f}" for name, value in list(logs.items())[:1]})
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if global_step >= args.max_train_steps:
                break


def add_evaluation_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The evaluation flags, one spelling for ``train_dp_lora.py --evaluate`` and ``dp-diffusers evaluate``
    (``dp_diffusers.evaluation.evaluate.evaluate_from_args`` reads them)."""
    parser.add_argument("--eval_samples_per_class", type=int, default=100,
                        help="Generated images per class (a text model with captions but no classes: one per held-out "
                        "caption).")  # fmt: skip
    parser.add_argument("--eval_inference_steps", type=int, default=50, help="Denoising steps of those images.")
    parser.add_argument("--eval_guidance_scale", type=float, default=None,
                        help="Their guidance scale (default: the base family's for synthetic data, 1 for "
                        "train_ldm.py's bases, else the pipeline's).")  # fmt: skip
    parser.add_argument("--fid_inception_path", type=str, default=None, help="inception-2015-12-05.pt for FID.")
    parser.add_argument(
        "--audit_reference", type=str, default=None, help="A non-private fine-tune (--disable_dp) for the audit."
    )


def resolve_dataset_source(args: argparse.Namespace, default_dataset: str | None) -> None:
    if args.dataset_name is None and args.train_data_dir is None:
        args.dataset_name = default_dataset


def load_training_dataset(args: argparse.Namespace, part: str = "train"):
    """The data set the flags name, cut to ``--max_train_samples`` (a seeded random subset), then, with
    ``--validation_split``, its ``part``: ``train`` (what is trained on) or ``validation`` (held out by a public
    rule, by privacy unit with ``--privacy_unit_column``)."""
    from .data import load_image_dataset, seeded_subset, validation_split

    dataset = load_image_dataset(
        args.dataset_name, args.train_data_dir, args.dataset_config_name, cache_dir=args.cache_dir
    )
    dataset = seeded_subset(dataset, args.max_train_samples, args.seed)
    if getattr(args, "validation_split", None) is None:
        if part != "train":
            raise ValueError("A validation part needs --validation_split.")
        return dataset
    train, validation = validation_split(dataset, args.validation_split, args.validation_split_seed,
                                         getattr(args, "privacy_unit_column", None))  # fmt: skip
    return train if part == "train" else validation


def add_validation_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--validation_split``: a part of the private train split never trained on (``dp-diffusers tune``'s DP
    score is computed on it)."""
    parser.add_argument("--validation_split", type=float, default=None,
                        help="Hold out this fraction of the train split (of its privacy units with "
                        "--privacy_unit_column), chosen by a public rule (a permutation seeded by "
                        "--validation_split_seed); never trained on.")  # fmt: skip
    parser.add_argument("--validation_split_seed", type=int, default=0, help="The held-out part's seed (public).")


def checkpoint_dirs(output_dir: str) -> list[Path]:
    """Existing ``checkpoint-<step>`` folders, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(output_dir: str, resume_from_checkpoint: str | None) -> Path | None:
    """``latest`` -> newest checkpoint of ``output_dir`` (or ``None`` if there is none); a path -> itself."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        dirs = checkpoint_dirs(output_dir)
        return dirs[-1] if dirs else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder.")
    return path


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None) -> Path:
    """``accelerator.save_state`` into ``output_dir/checkpoints/checkpoint-<step>``, written to a
    temporary folder first so that a crash mid-save never leaves a checkpoint that looks complete."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and total_limit is not None:
        old = checkpoint_dirs(output_dir)
        for path in old[: max(0, len(old) - total_limit + 1)]:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final
