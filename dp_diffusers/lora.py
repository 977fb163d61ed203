"""Which UNet modules get LoRA adapters, and injecting / saving them with peft and diffusers.

DP-LoRA (arXiv 2406.01355) adapts the attention blocks and their output projections. Target
names are peft's suffix matches on module names; ``to_out.0`` is the attention output Linear
(the reference code's ``to_out.Linear`` matches nothing, so only q/k/v got adapters there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

LORA_TARGET_PRESETS: dict[str, list[str]] = {
    # attention projections of every attention block (self- and cross-attention)
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    # ... plus the transformer blocks' input/output projections
    "attention+proj": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"],
    # ... plus the UNet's final output convolution
    "attention+proj+conv_out": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv_out"],
    # ... plus the two convolutions of every ResNet block: beyond the paper's choice. On the tiny base
    # it carries the style shift attention alone does not (eps=10 downstream 0.453 vs 0.297; docs/results.md)
    # for 4x the trainable parameters and ~1.03x the attention-only DP step time.
    "attention+resnets": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_out"],
}


class NoLoRATargetError(ValueError):
    """No module of the base model matches the LoRA target names."""


def resolve_target_modules(
    targets: str | Sequence[str], presets: Mapping[str, Sequence[str]] = LORA_TARGET_PRESETS
) -> list[str]:
    """A preset name of ``presets`` (a base family's; by default the UNet presets ``attention``,
    ``attention+proj``, ``attention+proj+conv_out``, ``attention+resnets``) or a list / comma-separated string
    of module-name suffixes."""
    if isinstance(targets, str):
        if targets in presets:
            return list(presets[targets])
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return list(targets)


def make_lora_config(
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: str | Sequence[str] = "attention",
    init_lora_weights: bool | str = "gaussian",
    presets: Mapping[str, Sequence[str]] = LORA_TARGET_PRESETS,
) -> LoraConfig:
    """peft ``LoraConfig`` as diffusers' LoRA scripts build it (alpha defaults to rank: scale 1); ``targets`` may
    name one of ``presets``."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights=init_lora_weights,
        target_modules=resolve_target_modules(targets, presets),
    )


def _matching_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    return [name for name, _ in model.named_modules() if any(name == t or name.endswith("." + t) for t in targets)]


def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> list[str]:
    """Inject LoRA layers in place (``add_adapter`` where the model has diffusers' peft mixin,
    ``peft.inject_adapter_in_model`` otherwise, e.g. for a plain ``UNet2DModel``), freeze
    everything else, and return the sorted names of the adapted modules.
    """
    targets = sorted(config.target_modules)
    if not _matching_names(model, targets):
        sample = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:8]
        raise NoLoRATargetError(
            f"No module of the base model matches the LoRA targets {targets}: the model has no attention "
            f"layers of those names. Its Linear/Conv2d modules are named like {sample}; pass "
            "--lora_target_modules with matching names."
        )
    model.requires_grad_(False)
    if hasattr(model, "add_adapter"):
        model.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    adapted = sorted(name for name, module in model.named_modules() if isinstance(module, LoraLayer))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return adapted


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft naming (``<module>.lora_A.weight``, ``<module>.lora_B.weight``), which
    diffusers' ``load_lora_adapter`` loads as they are (its newer training scripts save this format too).

    Not ``convert_state_dict_to_diffusers``: its old ``.lora.down`` / ``.lora.up`` names exist only for the
    attention projections, so adapters on ``proj_in`` or convolutions came out mixed, and diffusers, which
    picks one format from the first key, silently dropped the attention half on load.
    """
    return get_peft_model_state_dict(model)


def save_lora_weights(model: nn.Module, output_dir: str | Path, family) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` through the base pipeline's own diffusers LoRA serialisation
    (``family.save_lora_weights``: e.g. ``StableDiffusionXLPipeline.save_lora_weights``, as diffusers' LoRA training
    scripts save; the project's own and the class-conditional layouts, which diffusers gives no LoRA loader, use
    ``StableDiffusionLoraLoaderMixin``'s): keys ``<unet|transformer>.<module>.lora_A.weight`` in peft naming, and the
    ``LoraConfig`` in the file's metadata (so rank, alpha and targets load back exactly). ``family``: the base's
    ``dp_diffusers.families`` class."""
    state = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    config = model.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set: sorted, so the file is reproducible
    return family.save_lora_weights(output_dir, state, config)
