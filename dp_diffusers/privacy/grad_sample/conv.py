"""Fused per-example gradients of ``nn.Conv2d`` (LoRA on ``proj_in`` / ``conv_out`` / ResNet convolutions).

The per-example (per-group) weight gradients are the weight gradient of ONE grouped convolution: the examples
become groups (channels ``b*C..(b+1)*C`` belong to example b) and the k copies (a privacy unit's rows) its batch, so
an example's copies are summed before clipping. opacus unfolds the input instead (a rows x C*kh*kw x
positions copy, then bmm): 4-12x slower for the UNet's 3x3 LoRA convolutions on CPU (docs/performance.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import group_scale, grouped_rows, scaled, store_grad_sample


def copies_as_batch(grouped: torch.Tensor) -> torch.Tensor:
    """``(G, n, C, H, W)`` grouped rows -> ``(n, G * C, H, W)``: row j of every group in batch row j, each group's
    channels side by side (the layout of a convolution with G groups)."""
    groups, n = grouped.shape[:2]
    return grouped.transpose(0, 1).reshape(n, groups * grouped.shape[2], *grouped.shape[3:])


class FusedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv: nn.Conv2d, state, generation):
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.state, ctx.generation = conv, state, generation
        ctx.weight_ref, ctx.bias_ref = weight, bias
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        conv, state = ctx.conv, ctx.state
        scale = group_scale(x.shape[0], state, x.device)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight.to(grad_out.dtype), None, conv.stride, conv.padding, conv.dilation, False,
                [0, 0], conv.groups, [True, False, False],
            )[0]  # fmt: skip
        if ctx.needs_input_grad[1]:
            grouped_g = grouped_rows(grad_out, state)
            groups = grouped_g.shape[0]
            grouped_x = copies_as_batch(grouped_rows(x.to(grad_out.dtype), state))
            grouped_weight = weight.new_empty((groups * weight.shape[0], *weight.shape[1:]), dtype=grad_out.dtype)
            gs = torch.ops.aten.convolution_backward(
                copies_as_batch(grouped_g), grouped_x, grouped_weight, None, conv.stride, conv.padding, conv.dilation,
                False, [0, 0], groups, [False, True, False],
            )[1]  # fmt: skip
            store_grad_sample(state, ctx.generation, ctx.weight_ref, scaled(gs.view(-1, *weight.shape), scale))
        if ctx.bias_ref is not None and ctx.needs_input_grad[2]:
            grouped_g = grouped_rows(grad_out, state)
            gb = grouped_g.reshape(*grouped_g.shape[:3], -1).sum((1, 3))
            store_grad_sample(state, ctx.generation, ctx.bias_ref, scaled(gb, scale))
        return grad_x, None, None, None, None, None


def make_conv_inputs_contiguous(model: nn.Module) -> int:
    """Forward pre-hooks that make the input of every trainable ``nn.Conv2d`` contiguous (opacus' modes).

    opacus' conv per-sample gradient (``unfold2d``) assumes NCHW strides and returns all-zero
    per-sample gradients, silently, for other layouts; diffusers' attention blocks hand such
    tensors on. Returns the number of hooked modules.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and any(p.requires_grad for p in module.parameters(recurse=False)):
            module.register_forward_pre_hook(lambda _m, args: tuple(a.contiguous() for a in args))
            count += 1
    return count
