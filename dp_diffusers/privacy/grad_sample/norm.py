"""Fused per-example gradients of the affine part of ``nn.LayerNorm`` and ``nn.GroupNorm`` (full fine-tuning).

``y = xhat * weight + bias`` with ``xhat`` the normalised input (differentiated by autograd as usual):
per example b, ``dweight_b = B * sum xhat * g`` and ``dbias_b = B * sum g`` over its rows and the
non-parameter dimensions.
"""

from __future__ import annotations

import torch

from .common import group_scale, grouped_rows, scaled, store_grad_sample


class FusedAffine(torch.autograd.Function):
    """``channel_dim=None``: LayerNorm (weight covers the trailing dims); ``1``: GroupNorm (channels)."""

    @staticmethod
    def forward(ctx, xhat, weight, bias, channel_dim, state, generation):
        shape = [1] * xhat.dim()
        if channel_dim is None:
            shape[xhat.dim() - weight.dim() :] = weight.shape
        else:
            shape[channel_dim] = weight.shape[0]
        ctx.save_for_backward(xhat, weight)
        ctx.shape, ctx.channel_dim, ctx.state, ctx.generation = shape, channel_dim, state, generation
        ctx.weight_ref, ctx.bias_ref = weight, bias
        y = xhat * weight.view(shape)
        return y + bias.view(shape) if bias is not None else y

    @staticmethod
    def backward(ctx, grad_out):
        xhat, weight = ctx.saved_tensors
        state = ctx.state
        scale = group_scale(xhat.shape[0], state, xhat.device)
        grad_xhat = grad_out * weight.view(ctx.shape).to(grad_out.dtype) if ctx.needs_input_grad[0] else None

        def per_group_sum(t):
            grouped = grouped_rows(t, state)  # (G, n, ...)
            if ctx.channel_dim is None:  # (G, n, ..., *weight.shape) -> (G, *weight.shape)
                return grouped.reshape(grouped.shape[0], -1, *weight.shape).sum(1)
            c = weight.shape[0]  # (G, n, C, ...) -> (G, C)
            return grouped.reshape(*grouped.shape[:2], c, -1).sum((1, 3))

        if ctx.needs_input_grad[1]:
            store_grad_sample(state, ctx.generation, ctx.weight_ref, scaled(per_group_sum(grad_out * xhat), scale))
        if ctx.bias_ref is not None and ctx.needs_input_grad[2]:
            store_grad_sample(state, ctx.generation, ctx.bias_ref, scaled(per_group_sum(grad_out), scale))
        return grad_xhat, None, None, None, None, None
