"""``FusedGradSampleModule``: opacus' ``AbstractGradSampleModule`` whose per-example gradients are
computed inside the trainable layers' own backward (``grad_sample_mode="fused"``).

Guarantee: after one forward/backward of ``B * k`` example-major rows, every trainable parameter's
``p.grad_sample`` is the ``(B, *p.shape)`` per-*example* gradient, the mean over each example's k
noise-multiplicity rows (with ``set_row_groups``: the ``(G, *p.shape)`` per-*unit* gradient, the mean over each
privacy unit's rows) (exactly opacus' hooks mode followed by ``average_over_copies``; tested
against a one-example-at-a-time autograd reference), and autograd computes no summed ``p.grad``.
A second backward before the optimizer step raises, as opacus' ``forbid_grad_accumulation`` does.
``zero_grad``, ``to_standard_module`` and the attribute clean-up are opacus' own.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from torch import nn
from torch.nn import functional as F

from .common import FusedState
from .conv import FusedConv2d
from .embedding import FusedEmbedding
from .linear import FusedLinear
from .norm import FusedAffine


def _fused_forward(module: nn.Module, state: FusedState):
    """The replacement ``forward`` of one trainable layer; the layer's own when off or without grad."""
    original = type(module).forward

    def forward(x, *args, **kwargs):
        if not (state.enabled and torch.is_grad_enabled()) or args or kwargs:
            return original(module, x, *args, **kwargs)
        gen = state.generation
        if isinstance(module, nn.Linear):
            return FusedLinear.apply(x, module.weight, module.bias, state, gen)
        if isinstance(module, nn.Conv2d):
            return FusedConv2d.apply(x, module.weight, module.bias, module, state, gen)
        if isinstance(module, nn.Embedding):
            return FusedEmbedding.apply(x, module.weight, module.padding_idx, state, gen)
        if isinstance(module, nn.LayerNorm):
            xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
            return FusedAffine.apply(xhat, module.weight, module.bias, None, state, gen)
        xhat = F.group_norm(x, module.num_groups, None, None, module.eps)  # nn.GroupNorm
        return FusedAffine.apply(xhat, module.weight, module.bias, 1, state, gen)

    return forward


def unsupported_reason(module: nn.Module) -> str | None:
    """Why the fused path cannot compute ``module``'s per-example gradients (None: it can)."""
    kind = type(module)
    if kind is nn.Linear:
        return None
    if kind is nn.Conv2d:
        if module.padding_mode != "zeros" or isinstance(module.padding, str) or module.groups != 1:
            return "Conv2d with groups > 1, padding_mode other than 'zeros' or string padding"
        return None
    if kind is nn.Embedding:
        if module.max_norm is not None or module.scale_grad_by_freq:
            return "Embedding with max_norm or scale_grad_by_freq"
        return None
    if kind is nn.LayerNorm:
        return None if module.elementwise_affine else "LayerNorm without affine weights"
    if kind is nn.GroupNorm:
        return None if module.affine else "GroupNorm without affine weights"
    return f"no fused per-sample gradient for {kind.__name__}"


def _owns_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


class FusedGradSampleModule(AbstractGradSampleModule):
    """Wraps ``module``; its trainable ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``, ``nn.LayerNorm``
    and ``nn.GroupNorm`` layers (exact types: peft's LoRA A/B layers, the UNet's own layers for full
    fine-tuning, a class embedding) run through this package's Functions; any other trainable
    module raises here. Frozen modules are untouched. Layers run their own forward under
    ``torch.no_grad`` or after ``disable_hooks()``, so sampling with the same model is unaffected.
    """

    def __init__(self, module: nn.Module, *, noise_multiplicity: int = 1, loss_reduction: str = "mean"):
        if loss_reduction != "mean":
            raise ValueError("grad_sample_mode='fused' implements loss_reduction='mean' only.")
        problems = [
            f"{name or type(module).__name__}: {reason}"
            for name, sub in module.named_modules()
            if _owns_trainable(sub) and (reason := unsupported_reason(sub)) is not None
        ]
        if problems:
            raise ValueError(
                "grad_sample_mode='fused' cannot handle these trainable modules: "
                + "; ".join(problems[:5])
                + ". Use grad_sample_mode='hooks' (or 'functorch')."
            )
        super().__init__(module, batch_first=True, loss_reduction=loss_reduction)
        self._fused_state = FusedState(noise_multiplicity)
        self._patched: list[nn.Module] = []
        self._pre_hook = None
        self.add_hooks()

    @property
    def noise_multiplicity(self) -> int:
        return self._fused_state.k

    def set_row_groups(self, row_groups: torch.Tensor | None) -> None:
        """The rows' groups for the next backward (unit-level DP: each privacy unit's rows, adjacent, become one
        per-sample gradient); ``None``: k rows per example."""
        self._fused_state.row_groups = row_groups

    @property
    def patched_modules(self) -> list[nn.Module]:
        """The layers whose per-example gradients this module computes."""
        return list(self._patched)

    def _next_generation(self, *_) -> None:
        self._fused_state.generation += 1

    def add_hooks(self) -> None:
        for sub in self._module.modules():
            if _owns_trainable(sub):
                sub.forward = _fused_forward(sub, self._fused_state)
                self._patched.append(sub)
        self._pre_hook = self._module.register_forward_pre_hook(self._next_generation)

    def remove_hooks(self) -> None:
        """Give every layer its own forward back."""
        for sub in self._patched:
            del sub.forward
        self._patched.clear()
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None

    def disable_hooks(self) -> None:
        self._fused_state.enabled = False

    def enable_hooks(self) -> None:
        self._fused_state.enabled = True

    def allow_grad_accumulation(self) -> None:
        raise ValueError("grad_sample_mode='fused' never accumulates per-sample gradients across backward passes.")

    def cleanup(self) -> None:
        super().cleanup()
        for p in self._module.parameters():
            if hasattr(p, "_fused_generation"):
                del p._fused_generation
