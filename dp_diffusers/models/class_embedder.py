"""Learned class embedding that conditions the UNet through cross-attention (as in LDM / DP-LDM)."""

from __future__ import annotations

import torch

# ModelMixin imported by name here is also what lets diffusers' loader resolve this component.
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn


class ClassEmbedder(ModelMixin, ConfigMixin):
    """``class id -> (B, 1, embedding_dim)`` context for the UNet's cross-attention.

    Row ``num_classes`` is the *null* class used for label dropout during training and for the
    unconditional branch of classifier-free guidance.
    """

    @register_to_config
    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, embedding_dim)

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(class_labels).unsqueeze(1)
