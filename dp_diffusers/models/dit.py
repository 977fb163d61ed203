"""DiT for DP-LoRA: ``DiTTransformer2DModel`` with diffusers' PEFT adapter API, and label rows for new classes.

diffusers 0.42 gives ``DiTTransformer2DModel`` (the denoiser of ``facebook/DiT-XL-2-256``) no
``PeftAdapterMixin``, so ``add_adapter`` / ``load_lora_adapter`` / ``fuse_lora`` are missing. Mixing it
in is all that is needed: the weights and config are those of a plain ``DiTTransformer2DModel``.
"""

from __future__ import annotations

import torch

# diffusers' loader looks base classes up by name in the module recorded in model_index.json.
from diffusers import DiTTransformer2DModel, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.embeddings import LabelEmbedding
from torch import nn


class DiTTransformer2DModelWithLoRA(DiTTransformer2DModel, PeftAdapterMixin):
    pass


class DiTClassRows(ModelMixin, ConfigMixin):
    """Label rows for private classes a DiT base lacks, trained under DP with the LoRA weights.

    Class ids ``first_id .. first_id + num_rows - 1`` come after DiT's null class (``num_embeds_ada_norm``, which
    stays where ``DiTPipeline`` expects it). One table serves every transformer block, as the original DiT's one
    label embedding does (diffusers' conversion copies it into each block). :meth:`attach` makes each block's
    ``LabelEmbedding`` look those ids up here and every other id in its own frozen table.
    """

    @register_to_config
    def __init__(self, first_id: int, num_rows: int, embedding_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_rows, embedding_dim)

    @classmethod
    def from_null_row(cls, transformer: DiTTransformer2DModel, num_rows: int) -> DiTClassRows:
        """``num_rows`` new rows for ``transformer``, each initialised from its null-class row."""
        table = _label_embeddings(transformer)[0].embedding_table.weight
        null = transformer.config.num_embeds_ada_norm
        rows = cls(first_id=null + 1, num_rows=num_rows, embedding_dim=table.shape[1])
        with torch.no_grad():
            rows.embedding.weight.copy_(table[null].expand(num_rows, -1))
        return rows.to(device=table.device, dtype=table.dtype)

    def attach(self, transformer: DiTTransformer2DModel) -> None:
        """Make every block's label embedding look this table's ids up here (idempotent)."""
        for module in _label_embeddings(transformer):
            module.__class__ = _LabelEmbeddingWithRows
            module.__dict__["_dp_class_rows"] = self  # a plain reference: the rows are not the base's submodule

    @staticmethod
    def detach(transformer: DiTTransformer2DModel) -> None:
        for module in _label_embeddings(transformer):
            module.__class__ = LabelEmbedding
            module.__dict__.pop("_dp_class_rows", None)

    def lookup(self, label_embedding: LabelEmbedding, labels: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``labels``: this table's ids from its rows, every other id from the block's table."""
        first = self.config.first_id
        new = (labels >= first) & (labels < first + self.config.num_rows)
        base = label_embedding.embedding_table(torch.where(new, torch.zeros_like(labels), labels))
        rows = self.embedding(torch.where(new, labels - first, torch.zeros_like(labels)))
        return torch.where(new.unsqueeze(-1), rows.to(base.dtype), base)


class _LabelEmbeddingWithRows(LabelEmbedding):
    """A block's ``LabelEmbedding`` with ``DiTClassRows`` attached (a class swap, so copies of the model keep it)."""

    def forward(self, labels: torch.LongTensor, force_drop_ids=None) -> torch.Tensor:
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.__dict__["_dp_class_rows"].lookup(self, labels)


def _label_embeddings(transformer: nn.Module) -> list[LabelEmbedding]:
    return [m for m in transformer.modules() if isinstance(m, LabelEmbedding)]
