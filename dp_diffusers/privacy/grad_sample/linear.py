"""Fused per-example gradients of ``nn.Linear`` (peft's LoRA A and B layers, attention projections).

Per group g: ``dW_g = R / n_g * sum_rows g_r^T a_r`` over the group's rows and positions (one batched
matmul), ``db_g = R / n_g * sum_rows g_r``; see ``common.py`` for the contract.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .common import group_scale, grouped_rows, scaled, store_grad_sample


class FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state, generation):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.state, ctx.generation = bias is not None, state, generation
        ctx.weight_ref, ctx.bias_ref = weight, bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        state = ctx.state
        scale = group_scale(x.shape[0], state, x.device)
        grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        g = grouped_rows(grad_out, state)
        g = g.reshape(g.shape[0], -1, grad_out.shape[-1])
        a = grouped_rows(x.to(g.dtype), state)
        a = a.reshape(a.shape[0], -1, x.shape[-1])
        if ctx.needs_input_grad[1]:
            gs = torch.bmm(g.transpose(1, 2), a)
            store_grad_sample(state, ctx.generation, ctx.weight_ref, scaled(gs, scale))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            store_grad_sample(state, ctx.generation, ctx.bias_ref, scaled(g.sum(1), scale))
        return grad_x, None, None, None, None
