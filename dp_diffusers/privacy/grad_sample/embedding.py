"""Fused per-example gradients of ``nn.Embedding`` (a trained class embedding, DiT's label table).

Per group b (an example, or a privacy unit): the rows of ``grad_out`` are scattered into that group's own ``(V, D)``
table (one ``index_add_`` over ``G * V`` rows); the padding row's gradient is zero, as in autograd.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .common import group_scale, grouped_rows, scaled, store_grad_sample


class FusedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, weight, padding_idx, state, generation):
        ctx.save_for_backward(indices)
        ctx.num_embeddings, ctx.padding_idx = weight.shape[0], padding_idx
        ctx.state, ctx.generation, ctx.weight_ref = state, generation, weight
        return F.embedding(indices, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        state, v = ctx.state, ctx.num_embeddings
        scale = group_scale(indices.shape[0], state, indices.device)
        dim = grad_out.shape[-1]
        grouped_g = grouped_rows(grad_out, state)  # padding rows carry zero gradient
        groups = grouped_g.shape[0]
        idx = grouped_rows(indices, state).reshape(groups, -1)
        flat = (idx + v * torch.arange(groups, device=idx.device).unsqueeze(1)).reshape(-1)
        gs = torch.zeros(groups * v, dim, device=grad_out.device, dtype=grad_out.dtype)
        gs.index_add_(0, flat, grouped_g.reshape(-1, dim))
        gs = gs.view(groups, v, dim)
        if ctx.padding_idx is not None:
            gs[:, ctx.padding_idx] = 0
        store_grad_sample(state, ctx.generation, ctx.weight_ref, scaled(gs, scale))
        return None, None, None, None, None
