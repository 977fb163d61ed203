"""Model cards and Hub uploads for DP-LoRA adapters.

An adapter folder is the ``--output_dir`` of the DP-LoRA training script: the LoRA weights, the
``dp_report.json`` of the privacy accountant, optionally the ``metrics.json`` of the evaluation and
images, next to training state (checkpoints, latent caches, logs) that must never leave the machine.
The card states an (epsilon, delta) guarantee only when it can read it from ``dp_report.json``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id

from .adapter_config import DPLoRAConfig
from .constants import (
    CARD_NAME,
    DP_REPORT_NAME,
    EPSILON_PLOT_NAME,
    LORA_WEIGHT_NAME,
    METRICS_NAME,
    SAMPLES_NAME,
)

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"

CARD_TAGS = ["differential-privacy", "dp-sgd", "lora", "diffusers", "dp-diffusers", "latent-diffusion"]
# Dropped when there is no privacy report: a card without a guarantee must not be found as private.
PRIVACY_TAGS = ("differential-privacy", "dp-sgd")

# Upload patterns, passed as they are to `HfApi.upload_folder` and used by `upload_file_list`. They follow
# `huggingface_hub.utils.filter_repo_objects`: `fnmatch` on paths relative to the folder, where `*` also
# matches `/`. A file is uploaded if it matches an allow pattern and no ignore pattern.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "README.md", "*.png"]
IGNORE_PATTERNS = [
    # training state
    "checkpoints/*",
    "*/checkpoints/*",
    "checkpoint-*/*",
    "*/checkpoint-*/*",
    # trackers
    "logs/*",
    "*/logs/*",
    # latent caches
    "latents-*",
    "*/latents-*",
    "*.npy",
    "*cache*",
    # optimizer states and pickles
    "*.pt",
    "*.pth",
    "*.bin",
    "*.pkl",
    "*.ckpt",
    # hidden files and folders
    ".*",
    "*/.*",
    # images from the top level only (samples, epsilon plot), never a folder of possibly private images
    "*/*.png",
]

# Keys a privacy report must have, with the model-card metadata key each one is published under.
REPORT_METADATA_KEYS = {
    "epsilon": "dp_epsilon",
    "delta": "dp_delta",
    "accountant": "dp_accountant",
    "noise_multiplier": "dp_noise_multiplier",
    "max_grad_norm": "dp_max_grad_norm",
    "sample_rate": "dp_sample_rate",
    "steps": "dp_steps",
    "epochs": "dp_epochs",
    "noise_multiplicity": "dp_noise_multiplicity",
    "dataset_size": "dp_dataset_size",
}

# (report key, label, meaning) rows of the card's privacy table; absent keys are left out. The meaning of a row that
# depends on the privacy unit is for example-level runs; a user-level run's is in _UNIT_TABLE ({unit}: the column).
_PRIVACY_TABLE = [
    ("epsilon", "ε (epsilon)", "bound on the privacy loss"),
    ("delta", "δ (delta)", "probability that the ε bound may fail"),
    ("target_epsilon", "Target ε", "ε the noise multiplier was calibrated for"),
    ("accountant", "Accountant", "method that computed ε from the parameters below"),
    ("noise_multiplier", "Noise multiplier σ", "noise standard deviation / clipping norm"),
    ("max_grad_norm", "Clipping norm C", "bound on each example's gradient norm"),
    ("sample_rate", "Sample rate q", "probability that an example is in a batch"),
    ("steps", "Steps", "noisy gradient steps, all accounted for"),
    ("epochs", "Epochs", "passes over the private data"),
    ("noise_multiplicity", "Noise multiplicity", "noise draws averaged per example before clipping"),
    ("ema_decay", "Weight averaging (EMA decay)", "the adapter averages the DP iterates: post-processing, no cost"),
    ("privacy_unit", "Privacy unit", "the column naming one person: the guarantee is per person"),
    ("num_privacy_units", "Privacy units", "people in the private fine-tuning set"),
    ("max_examples_per_unit", "Examples per person and step", "most examples a sampled person contributes (mean)"),
    ("dataset_size", "Training-set size N", "examples in the private fine-tuning set"),
    ("num_canaries", "Audit canaries", "random-pattern examples trained on for the audit, counted in N"),
    ("batch_size", "Batch size", "logical (expected) batch size"),
    ("world_size", "World size", "training processes"),
    ("trainable_parameters", "Trainable parameters", "LoRA parameters trained with DP-SGD"),
    ("lora_rank", "LoRA rank", ""),
    ("lora_alpha", "LoRA alpha", ""),
    ("adapted_modules", "Adapted modules", ""),
    ("base_model", "Base model", "public pre-trained model, not protected"),
    ("dp_diffusers_version", "dp-diffusers version", ""),
]

# report key -> (label, meaning) of a user-level run (``privacy_unit`` set), where the unit is one person, not one
# example; ``{unit}`` is the column, as `person`.
_UNIT_TABLE = {
    "max_grad_norm": ("Clipping norm C", "bound on each {unit}'s gradient norm: the mean over their sampled examples, "
                      "clipped once"),
    "sample_rate": ("Sample rate q", "probability that a {unit} (with their examples) is sampled in a step"),
    "epochs": ("Epochs (over people)", "steps × q: the expected number of steps each {unit} is sampled in"),
    "noise_multiplicity": ("Noise multiplicity", "diffusion noise draws of each of a {unit}'s examples, averaged "
                           "with their other rows before the one clip"),
    "num_privacy_units": ("Privacy units", "distinct {unit} values in the private fine-tuning set: the N of q and δ"),
    "max_examples_per_unit": ("Examples per {unit} and step", "most examples a sampled {unit} contributes (their "
                              "mean)"),
    "dataset_size": ("Training-set size (examples)", "examples in the private fine-tuning set, all {unit}s' together"),
    "num_canaries": ("Audit canaries", "random-pattern canary units trained on for the audit, counted in the privacy "
                     "units"),
    "batch_size": ("Batch size", "expected {unit}s per step (logical batch)"),
}

# metrics.json key -> (metric type, display name, key that qualifies the name)
_METRICS = {
    "fid": ("fid", "FID", "feature_extractor"),
    "kid": ("kid", "KID", "feature_extractor"),
    "downstream_accuracy": ("accuracy", "Downstream accuracy", "classifier"),
    "membership_auc": ("roc_auc", "Membership-inference AUC", "attack"),
    "one_run_audit": ("epsilon_lower_bound", "Empirical ε lower bound (one-run audit)", None),
}


def _one_run_audit_text(metrics: dict[str, dict[str, Any]], report: dict[str, Any] | None) -> str | None:
    """The card's sentence on the one-run audit (Steinke, Nasr & Jagielski 2023), when the folder has one."""
    audit = metrics.get("one_run_audit") or {}
    if audit.get("value") is None:
        return None
    claimed = f"; claimed ε {_format(report['epsilon'])}" if report else ""
    return (f"**Empirical ε lower bound (one-run audit, {_format(audit['total_canaries'])} canaries, "
            f"{audit['confidence']:.0%}): {audit['value']:.3g}{claimed}.** A bound above the claimed ε would prove a "
            "bug; one below it is what this attack (each canary scored by its denoising-loss drop, the highest "
            f"{_format(audit['num_guesses'])} of {_format(audit['num_canaries'])} guessed as trained on: "
            f"{_format(audit['num_correct'])} right) shows, not a tighter guarantee.")


def _tuning_text(report: dict[str, Any] | None) -> str | None:
    """The card's sentence for an adapter chosen by ``dp-diffusers tune``: ε above is the whole tuning's. Only what
    the report holds (the space, the distribution of K, the score's mechanism): never K or another run."""
    tuning = (report or {}).get("tuning")
    if not tuning:
        return None
    score, split = tuning["score"], tuning["validation_split"]
    flags = ", ".join(f"`--{name}`" for name in tuning["search_space"])
    winner = tuning.get("winner")
    chosen = (f" (`{' '.join(f'--{k} {v}' for k, v in winner['flags'].items())}`, noisy validation score "
              f"{winner['score']:.3g})") if winner else ""
    return (f"**ε = {_format(report['epsilon'])} covers the hyper-parameter tuning that chose this adapter** "
            f"(`dp-diffusers tune`, Papernot & Steinke 2022): a secret random number of training runs "
            f"({tuning['distribution']} distribution, mean {tuning['expected_runs']:g}) with {flags} drawn from the "
            f"search space, each scored on a validation part of the private data ({split['fraction']:.0%}, "
            f"{_format(split['num_units'])} units, never trained on) with {score['mechanism']} noise of "
            f"{_format(score['noise_multiplier'])} × sensitivity {_format(score['sensitivity'])}; only the best run "
            f"was released{chosen}. One run alone: ε at most {tuning['per_run_epsilon']:.3g}. How many runs there "
            "were and what the others scored is not published.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if isinstance(data, dict):
        return data
    raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")


def load_dp_report(folder: str | Path) -> dict[str, Any] | None:
    """Read and validate the folder's `dp_report.json`; `None` if there is none.

    Raises `ValueError` if the report is not a JSON object, misses required keys (named in the message) or
    has an epsilon or delta that is not a finite number (epsilon >= 0, 0 <= delta < 1).
    """
    path = Path(folder) / DP_REPORT_NAME
    if not path.is_file():
        return None
    report = _read_json_object(path)
    missing = [key for key in REPORT_METADATA_KEYS if key not in report]
    if missing:
        raise ValueError(f"{path} is missing required keys: {', '.join(missing)}.")
    for key in ("epsilon", "delta"):
        value = report[key]
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{path}: {key!r} must be a finite non-negative number, got {value!r}.")
    if report["delta"] >= 1:
        raise ValueError(f"{path}: 'delta' must be smaller than 1, got {report['delta']!r}.")
    return report


def load_metrics(folder: str | Path) -> dict[str, dict[str, Any]] | None:
    """Read the folder's `metrics.json`; `None` if there is none.

    Each metric becomes a dict with at least a `"value"` (a bare number is wrapped); a metric recorded as not
    computed (`"value": null` with a `"not_computed"` reason) is kept; other metrics without a value are skipped
    with a warning.
    """
    path = Path(folder) / METRICS_NAME
    if not path.is_file():
        return None
    metrics = {}
    for name, metric in _read_json_object(path).items():
        if _is_number(metric):
            metric = {"value": metric}
        if not isinstance(metric, dict) or (metric.get("value") is None and not metric.get("not_computed")):
            logger.warning("Ignoring metric %r of %s: it has no 'value'.", name, path)
            continue
        metrics[name] = metric
    return metrics


def plot_epsilon(report: dict[str, Any], path: str | Path) -> Path:
    """Plot epsilon against the training step from the report's `epsilon_history`, the target dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history = report.get("epsilon_history")
    if not history:
        raise ValueError("The report has no 'epsilon_history' to plot.")
    steps, epsilons = zip(*history)
    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(steps, epsilons, marker=".", label=f"ε ({report.get('accountant', 'accountant')})")
    if report.get("target_epsilon") is not None:
        ax.axhline(report["target_epsilon"], linestyle="--", color="gray", label="target ε")
    ax.set_xlabel("step")
    ax.set_ylabel(f"ε  (δ = {report['delta']:g})" if _is_number(report.get("delta")) else "ε")
    ax.set_title("Privacy loss during training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def module_patterns(names: list[str]) -> list[str]:
    """Adapted module names as patterns with counts, the block indices folded: ``transformer_blocks.0.attn1.to_q``
    ... ``transformer_blocks.27.attn1.to_q`` -> ``*.attn1.to_q x 28`` (order of first appearance)."""
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        digits = [i for i, part in enumerate(parts) if part.isdigit() and i < len(parts) - 1]
        tail = ".".join(parts[digits[-1] + 1 :]) if digits else name
        key = f"*.{tail}" if digits else tail
        counts[key] = counts.get(key, 0) + 1
    return [f"{key} x {count}" if count > 1 else key for key, count in counts.items()]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if _is_number(value):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{item}`" for item in value)
    return str(value)


def _base_model(folder: Path, report: dict[str, Any] | None) -> str | None:
    """The base id or path: from the privacy report, else the adapter config of dp-diffusers or peft."""
    if report and report.get("base_model"):
        return str(report["base_model"])
    if DPLoRAConfig.is_adapter_folder(folder):
        return DPLoRAConfig.from_pretrained(folder).base_model
    peft_config = folder / "adapter_config.json"  # a plain peft adapter
    if peft_config.is_file():
        base = _read_json_object(peft_config).get("base_model_name_or_path")
        return str(base) if base else None
    return None


def _is_hub_id(name: str) -> bool:
    """Whether `name` reads as a `namespace/name` Hub repo id rather than a local path."""
    if name.count("/") != 1 or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


#: the card's evaluation task, by the base family's conditioning
_TASK_NAMES = {
    "class": "Class-conditional image generation",
    "text": "Text-to-image generation",
    "none": "Unconditional image generation",
}


def _family(config: DPLoRAConfig | None):
    """The adapter's base family (``dp_diffusers.families``); the project's own layout without an adapter config (a
    folder of an earlier version, or a plain LoRA)."""
    from .families import DPLDMFamily, family_named

    return DPLDMFamily if config is None else family_named(config.base_family)


def _evaluation(
    metrics: dict[str, dict[str, Any]], task_name: str
) -> tuple[list[EvalResult], list[tuple[str, str, str]]]:
    """`EvalResult`s for the card metadata and (metric, value, details) rows for its table."""
    results, rows = [], []
    for key, metric in metrics.items():
        metric_type, display_name, qualifier_key = _METRICS.get(key, (key, key, None))
        if metric.get("value") is None:  # not computed (e.g. FID without Inception weights): say why, claim nothing
            rows.append((display_name, "not computed", str(metric.get("not_computed", ""))))
            continue
        qualifier = metric.get(qualifier_key) if qualifier_key else None
        metric_name = f"{display_name} ({qualifier})" if qualifier else display_name
        details = {name: value for name, value in metric.items() if name not in ("value", "dataset")}
        dataset = metric.get("dataset")
        results.append(
            EvalResult(
                task_type="image-generation",
                task_name=task_name,
                dataset_type=str(dataset or "private"),
                dataset_name=str(dataset or "Private data (held-out split)"),
                metric_type=metric_type,
                metric_value=metric["value"],
                metric_name=metric_name,
                metric_args=details or None,
            )
        )
        text = "; ".join(
            f"{name.replace('_', ' ')}: {_format(value)}" for name, value in details.items() if name != qualifier_key
        )
        rows.append((metric_name, _format(metric["value"]), text))
    return results, rows


def _group_privacy_text(report: dict[str, Any] | None) -> str:
    """``"m = 2: ε 3.7; m = 5: ε 12.3; m = 10: no bound"`` of an example-level report (earlier reports: the rule)."""
    entries = (report or {}).get("group_privacy") or []
    if not entries:
        return "at best (mε, m·e^((m-1)ε)·δ)-DP"
    parts = [f"m = {e['examples']}: " + (f"ε {e['epsilon']:.3g}" if e.get("epsilon") is not None else "no bound")
             for e in entries]  # fmt: skip
    return "; ".join(parts)


def _released_outside_epsilon(report: dict[str, Any], config: DPLoRAConfig | None, evaluated: bool) -> list[str]:
    """The card's list of what the folder publishes from the private data without noise, outside ε: the exact data
    set size (always), the evaluation's numbers (with metrics), the class names (``class_names_from_data``) and the
    training loss (the report's ``loss_trackers``: the remote trackers that received it)."""
    unit = report.get("privacy_unit")
    people = f" of {_format(report['num_privacy_units'])} `{unit}`s" if unit and report.get("num_privacy_units") else ""
    items = [
        f"**The exact size of the private set**: {_format(report['dataset_size'])} examples{people}, stated without "
        "noise, as opacus does (its accountant takes N as public)."
    ]
    if evaluated:
        items.append("**The evaluation's numbers** (the Evaluation table, `metrics.json`): computed without noise on "
                     "private data, the held-out split and, for the membership audit, training examples.")
    if report.get("class_names_from_data"):
        items.append("**The class names**, taken from the private data (`--class_names_from_data`): `id2label` in "
                     "`dp_lora_config.json` and which classes occur (the samples' rows, the DP central images' "
                     "classes) are published as they are.")
    if report.get("loss_trackers"):
        items.append("**The training loss curve**: each step's loss on its private batch, sent without noise to "
                     f"remote experiment trackers (`--report_private_loss`: {_format(report['loss_trackers'])}).")
    return items


def build_model_card(
    folder: str | Path,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """Build the model card of an adapter folder from its `dp_report.json` and `metrics.json`.

    Without a privacy report the card claims no differential-privacy guarantee and carries no `dp_*`
    metadata. `repo_id` is used in the usage example (the folder path otherwise) and, with the folder name,
    as the default `model_name`.
    """
    folder = Path(folder)
    report = load_dp_report(folder)
    metrics = load_metrics(folder) or {}
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else folder.resolve().name)

    config = DPLoRAConfig.from_pretrained(folder) if DPLoRAConfig.is_adapter_folder(folder) else None
    family = _family(config)
    conditioning = family.conditioning
    text_to_image = conditioning == "text"
    prompts = (config.validation_prompts or []) if text_to_image else []  # public prompts, never training captions
    base_model = _base_model(folder, report)
    hub_base_model = base_model if base_model and _is_hub_id(base_model) else None
    if hub_base_model:
        base_model_text = f"[`{base_model}`](https://huggingface.co/{base_model})"
    elif base_model:
        base_model_text = f"`{base_model}` (a local model)"
    else:
        base_model_text = "(unknown)"

    eval_results, eval_rows = _evaluation(metrics, _TASK_NAMES[conditioning])
    dp_metadata = {meta: report[key] for key, meta in REPORT_METADATA_KEYS.items()} if report else {}
    if report:  # the unit that q, N and delta count: a column (user-level) or "example"
        dp_metadata["dp_privacy_unit"] = report.get("privacy_unit") or "example"
        dp_metadata["dp_num_privacy_units"] = report.get("num_privacy_units") or report["dataset_size"]
    card_data = ModelCardData(
        base_model=hub_base_model,
        library_name="diffusers",
        license=license,
        tags=CARD_TAGS if report else [tag for tag in CARD_TAGS if tag not in PRIVACY_TAGS],
        model_name=model_name,
        eval_results=eval_results or None,
        pipeline_tag="text-to-image" if text_to_image else None,
        widget=[{"text": prompt} for prompt in prompts] or None,
        **dp_metadata,
    )

    privacy_rows = []
    delta_note = None
    outside_epsilon = []
    if report:
        column = f"`{report['privacy_unit']}`" if report.get("privacy_unit") else None
        for key, label, meaning in _PRIVACY_TABLE:
            if column and key in _UNIT_TABLE:  # user-level: the rows name the unit, not an example
                label, meaning = (text.format(unit=column) for text in _UNIT_TABLE[key])
            value = report.get(key)
            if value is None and key == "target_epsilon":
                value = "none (σ was given)"
            if key == "adapted_modules" and isinstance(value, list):
                value = module_patterns(value)
            if value is not None:
                privacy_rows.append((label, _format(value), meaning))
        size = report.get("num_privacy_units") or report["dataset_size"]  # N: the privacy units
        unit = "person" if report.get("privacy_unit") else "training example"
        if _is_number(size) and size > 0 and report["delta"] >= 1 / size:
            delta_note = (
                f"**δ is not small.** δ = {report['delta']:g} ≥ 1/N = {1 / size:.3g}: a mechanism that "
                f"publishes one random {unit} outright satisfies such a δ, so this guarantee is "
                "weak. δ ≪ 1/N is the usual requirement."
            )
        outside_epsilon = _released_outside_epsilon(report, config, bool(eval_rows))

    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        report=report,
        epsilon=_format(report["epsilon"]) if report else None,
        delta=f"{report['delta']:g}" if report else None,
        steps=_format(report["steps"]) if report else None,
        max_grad_norm=_format(report["max_grad_norm"]) if report else None,
        dataset_size=_format(report["dataset_size"]) if report else None,
        privacy_rows=privacy_rows,
        delta_note=delta_note,
        eval_rows=eval_rows,
        one_run_audit=_one_run_audit_text(metrics, report),
        tuning=_tuning_text(report),
        base_model_text=base_model_text,
        has_samples=(folder / SAMPLES_NAME).is_file(),
        has_epsilon_plot=bool(report) and (folder / EPSILON_PLOT_NAME).is_file(),
        load_target=repo_id or folder.as_posix(),
        text_to_image=text_to_image,
        pipeline_class=family.pipeline_class_name,
        base_load_target=base_model or "<the base model>",
        group_privacy=_group_privacy_text(report),
        outside_epsilon=outside_epsilon,
        example_prompt=prompts[0] if prompts else "a photo",
    )


def write_model_card(folder: str | Path, repo_id: str | None = None, model_name: str | None = None,
                     license: str = "apache-2.0") -> Path:  # fmt: skip
    """Write the folder's `README.md` model card, and its `epsilon.png` when the report has a history."""
    folder = Path(folder)
    report = load_dp_report(folder)
    if report and report.get("epsilon_history"):
        plot_epsilon(report, folder / EPSILON_PLOT_NAME)
    card = build_model_card(folder, repo_id=repo_id, model_name=model_name, license=license)
    path = folder / CARD_NAME
    card.save(path)
    return path


def upload_file_list(folder: str | Path) -> list[str]:
    """The sorted paths, relative to `folder`, that `push_to_hub` uploads.

    Lists and filters files exactly like `HfApi.upload_folder` does with `ALLOW_PATTERNS` and
    `IGNORE_PATTERNS`.
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"{folder} is not a directory.")
    paths = [path.relative_to(root).as_posix() for path in sorted(root.glob("**/*")) if path.is_file()]
    return sorted(filter_repo_objects(paths, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload DP-LoRA adapter with dp-diffusers",
    create_pr: bool = False,
    api: HfApi | None = None,
) -> str:
    """Upload an adapter folder to a Hub model repo (created if needed); returns the repo or PR url.

    Writes the model card first if the folder has none. Only `upload_file_list(folder)` is uploaded: never
    checkpoints, latent caches, logs or optimizer states.
    """
    folder = Path(folder)
    files = upload_file_list(folder)
    if LORA_WEIGHT_NAME not in files and "model_index.json" not in files:
        raise ValueError(
            f"{folder} has no {LORA_WEIGHT_NAME} (nor a full pipeline with model_index.json): nothing to push."
        )
    if not (folder / CARD_NAME).is_file():
        write_model_card(folder, repo_id=repo_id)

    api = api or HfApi(token=token)
    repo_url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=folder,
        repo_type="model",
        token=token,
        commit_message=commit_message,
        create_pr=create_pr,
        # copies: `upload_folder` extends `ignore_patterns` in place
        allow_patterns=list(ALLOW_PATTERNS),
        ignore_patterns=list(IGNORE_PATTERNS),
    )
    return commit.pr_url if create_pr else str(repo_url)
