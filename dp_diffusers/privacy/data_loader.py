"""Poisson sampling of the private data and the secret randomness DP rests on.

Guarantees: every example is in a logical batch independently with probability ``sample_rate``
(one process or several: the union of the ranks' batches is that one Poisson batch), every rank
steps together (empty shares included), and the sampling and the noise draw from generators
seeded by the operating system, never from the public ``--seed``.
"""

from __future__ import annotations

import secrets

import torch
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the operating system's entropy (``secrets``), not from torch's
    global seed: what DP noise and Poisson sampling must draw from. With the global RNG, a run's
    noise and batches follow from ``--seed`` (public, often 0) and the data set size, and whoever
    knows them can subtract the noise again."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


class DistributedPoissonSampler(DistributedUniformWithReplacementSampler):
    """Poisson sampling of the whole data set across ranks: rank ``r`` takes the sampled indices
    ``i`` with ``i % world_size == r``.

    Guarantees: every example is in a logical batch independently with probability
    ``sample_rate``, so the union of the ranks' batches is exactly the batch the accountant
    assumes, whatever the ranks' generators (each step draws one mask over all N examples; ranks
    with identically seeded generators draw the same mask, independent ones independent shares);
    every rank yields exactly ``num_batches`` batches per epoch, empty ones included, so all ranks
    step, and all-reduce, together. opacus' sampler drops a rank's empty local batch (that rank
    then falls a step behind the others: mismatched all-reduces, a hang at the end) and masks by
    position inside each rank's shard (identically seeded ranks then pick their examples in pairs).
    """

    def __init__(self, *, total_size: int, sample_rate: float, generator: torch.Generator | None = None):
        super().__init__(total_size=total_size, sample_rate=sample_rate, shuffle=False, generator=generator)

    def __iter__(self):
        for _ in range(self.num_batches):
            mask = torch.rand(self.total_size, generator=self.generator) < self.sample_rate
            selected = mask.nonzero().reshape(-1)
            yield selected[selected % self.num_replicas == self.rank].tolist()


def poisson_data_loader(
    dataset: Dataset, sample_rate: float, *, distributed: bool, generator: torch.Generator | None = None
) -> DataLoader:
    """opacus' ``DPDataLoader`` (Poisson sampling, empty batches as zero-length tensors); with
    ``distributed`` the same loader over ``DistributedPoissonSampler``."""
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=generator)
    if not distributed:
        return loader
    sampler = DistributedPoissonSampler(total_size=len(dataset), sample_rate=sample_rate, generator=generator)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=loader.collate_fn, generator=generator)
