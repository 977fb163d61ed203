"""``dp_report.json``: the privacy guarantee of an adapter, as flat machine-readable keys.

``DPReport`` is the one definition of the file (a dataclass with field metadata, save / load); the training
script writes it, the model card and the Space read it (``dp_diffusers.hub.load_dp_report``, which also reads
reports of earlier versions that lack the newer fields).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..constants import DP_REPORT_NAME  # file names only: constants.py imports nothing
from .accounting import PrivacyBudget, group_privacy_epsilon

__all__ = ["DP_REPORT_NAME", "DPReport", "build_dp_report"]

#: the examples per person an example-level report states the group-privacy epsilon for
GROUP_SIZES = (2, 5, 10)


def _installed_version() -> str:
    """dp-diffusers' version, from the package metadata rather than the package root: of the package above it, the
    privacy core imports only the file names (``constants``), so that it can be audited alone."""
    try:
        return version("dp-diffusers")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def _field(text: str, **kwargs: Any) -> Any:
    """A report field with its help ``text`` (its meaning and unit) in the field's metadata."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class DPReport:
    """The (epsilon, delta) guarantee of one DP-LoRA run and every parameter it rests on."""

    accountant: str = _field("opacus accountant that computed epsilon (prv or rdp)")
    epsilon: float = _field("privacy loss bound for the steps actually taken")
    delta: float = _field("probability that the epsilon bound may fail")
    target_epsilon: float | None = _field("epsilon sigma was calibrated for; None when sigma was given")
    noise_multiplier: float = _field("Gaussian noise std / max_grad_norm")
    max_grad_norm: float = _field("clipping norm C: the sensitivity of one privacy unit (an example's gradient; with "
                                  "privacy_unit, the mean gradient of a person's sampled examples, clipped once)")
    sample_rate: float = _field("Poisson sampling probability q of each privacy unit per step (an example; with "
                                "privacy_unit, a person: q = batch_size / num_privacy_units)")
    steps: int = _field("noisy steps taken, all in the accountant")
    epochs: float = _field("steps * sample_rate: expected number of steps each privacy unit is sampled in (passes over "
                           "the examples; with privacy_unit, the steps each person is sampled in)")
    noise_multiplicity: int = _field("diffusion draws per example, averaged (with the rest of its unit's rows) before "
                                     "the one clip")
    dataset_size: int = _field("private examples (audit canaries included), published exactly (opacus' convention: "
                               "outside epsilon); the privacy units are num_privacy_units when privacy_unit is set")
    batch_size: int = _field("expected logical batch q * N over all processes, in privacy units (examples; with "
                             "privacy_unit, people: each person brings up to max_examples_per_unit examples)")
    world_size: int = _field("training processes")
    trainable_parameters: int = _field("parameters trained under DP (LoRA, class embedding or rows)")
    lora_rank: int = _field("LoRA rank")
    lora_alpha: float = _field("LoRA alpha")
    adapted_modules: list[str] = _field("modules with LoRA adapters")
    base_model: str = _field("the public base (not protected)")
    epsilon_history: list[list[float]] = _field("[step, epsilon] pairs along the run")
    dp_diffusers_version: str = _field("version that wrote the report", default=_installed_version())
    trained_class_embedding: bool = _field("--train_class_embedding", default=False)
    grad_sample_mode: str = _field("how per-example gradients were computed", default="fused")
    ema_decay: float | None = _field("average of the DP iterates (post-processing)", default=None)
    num_canaries: int | None = _field("audit canaries trained on, counted in N", default=None)
    mixed_precision: str = _field("precision of the frozen base", default="no")
    gradient_checkpointing: bool = _field("activations recomputed in the backward", default=False)
    random_flip: bool = _field("each row drew the image or its mirror (per example)", default=False)
    privacy_unit: str | None = _field("the column whose value is one privacy unit (a person); None: each example",
                                      default=None)
    num_privacy_units: int | None = _field("privacy units N_units (canary units included)", default=None)
    max_examples_per_unit: int | None = _field("the most examples a sampled unit contributes to one step (their "
                                               "mean, one clip)", default=None)
    group_privacy: list[dict[str, float | None]] = _field(
        "example-level runs: epsilon at delta for a person with m examples (group privacy over RDP; null: no bound)",
        default_factory=list,
    )
    training_guidance_scale: float | None = _field(
        "guidance-distilled FLUX bases: the guidance input in training (default 1, as diffusers#11181 and "
        "black-forest-labs/flux#79 advise; a public setting)", default=None,
    )
    other_releases: list[dict[str, Any]] = _field(
        "every other DP release of the run (mechanism, noise, its share of the budget); none so far",
        default_factory=list,
    )
    class_names_from_data: bool = _field(
        "--class_names_from_data: the label set (id2label's names, which classes occur) was taken from the private "
        "data and is published without noise, outside epsilon", default=False,
    )
    tuning: dict[str, Any] | None = _field(
        "dp-diffusers tune: epsilon above covers the whole tuning (K runs drawn from distribution with mean "
        "expected_runs, only the best released); the search space, the validation split, the score's mechanism, the "
        "winner's flags and noisy score (the released run's own output), each privacy combination's schedule "
        "(per_run) and the worst run's epsilon. Never K, the other runs or their scores", default=None,
    )
    loss_trackers: list[str] = _field(
        "remote trackers (--report_to) sent the training loss on private batches without noise "
        "(--report_private_loss): a release outside epsilon", default_factory=list,
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``dp_report.json`` into ``folder`` (atomically: a crash never leaves half a report)."""
        path = Path(folder) / DP_REPORT_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> DPReport:
        """Read ``folder/dp_report.json`` (``ValueError`` naming missing or unknown fields)."""
        path = Path(folder) / DP_REPORT_NAME
        data = json.loads(path.read_text())
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is f.default_factory is MISSING]
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if missing or unknown:
            raise ValueError(f"{path}: missing fields {missing}, unknown fields {unknown}.")
        return cls(**data)


def build_dp_report(
    budget: PrivacyBudget,
    *,
    max_grad_norm: float,
    noise_multiplicity: int,
    dataset_size: int,
    batch_size: int,
    world_size: int,
    trainable_parameters: int,
    lora_rank: int,
    lora_alpha: float,
    adapted_modules: Sequence[str],
    base_model: str,
    **settings: Any,
) -> DPReport:
    """The report of the run ``budget`` accounted. ``epsilon`` is the accountant's value for the steps actually
    taken; ``epochs`` is steps * sample_rate (expected steps each privacy unit is in); ``settings`` are the optional
    fields of :class:`DPReport` (an unknown one is a ``TypeError``). An example-level run also states what its
    guarantee means for a person with m = 2, 5, 10 examples (``group_privacy``)."""
    if settings.get("privacy_unit") is None and "group_privacy" not in settings:
        settings["group_privacy"] = []
        for m in GROUP_SIZES:  # epsilon null: group privacy gives no bound at this delta
            eps = group_privacy_epsilon(budget.noise_multiplier, budget.sample_rate, budget.steps, budget.delta, m,
                                        budget.releases)  # fmt: skip
            settings["group_privacy"].append({"examples": m, "epsilon": eps if math.isfinite(eps) else None,
                                              "delta": budget.delta})  # fmt: skip
    return DPReport(
        accountant=budget.accountant_name,
        epsilon=budget.record(),
        delta=budget.delta,
        target_epsilon=budget.target_epsilon,
        noise_multiplier=budget.noise_multiplier,
        max_grad_norm=max_grad_norm,
        sample_rate=budget.sample_rate,
        steps=budget.steps,
        epochs=budget.steps * budget.sample_rate,
        noise_multiplicity=noise_multiplicity,
        dataset_size=dataset_size,
        batch_size=batch_size,
        world_size=world_size,
        trainable_parameters=trainable_parameters,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        adapted_modules=list(adapted_modules),
        base_model=base_model,
        epsilon_history=list(budget.epsilon_history),
        **settings,
    )
