"""``dp_report.json``: the privacy guarantee of an adapter, as flat machine-readable keys."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__  # importlib.metadata; the package root loads nothing else eagerly
from ..constants import DP_REPORT_NAME
from .accounting import PrivacyBudget

__all__ = ["DP_REPORT_NAME", "build_dp_report", "write_dp_report"]


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
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of the design contract. ``epsilon`` is the accountant's value for the steps
    actually taken; ``epochs`` is steps * sample_rate (expected passes over the data)."""
    epsilon = budget.record()
    report = {
        "accountant": budget.accountant_name,
        "epsilon": epsilon,
        "delta": budget.delta,
        "target_epsilon": budget.target_epsilon,
        "noise_multiplier": budget.noise_multiplier,
        "max_grad_norm": max_grad_norm,
        "sample_rate": budget.sample_rate,
        "steps": budget.steps,
        "epochs": budget.steps * budget.sample_rate,
        "noise_multiplicity": noise_multiplicity,
        "dataset_size": dataset_size,
        "batch_size": batch_size,
        "world_size": world_size,
        "trainable_parameters": trainable_parameters,
        "lora_rank": lora_rank,
        "lora_alpha": lora_alpha,
        "adapted_modules": list(adapted_modules),
        "base_model": base_model,
        "epsilon_history": budget.epsilon_history,
        "dp_diffusers_version": __version__,
    }
    report.update(extra or {})
    return report


def write_dp_report(report: dict[str, Any], output_dir: str | Path) -> Path:
    path = Path(output_dir) / DP_REPORT_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    return path
