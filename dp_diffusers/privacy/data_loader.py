"""Poisson sampling of the private data (examples, or privacy units) and the secret randomness DP rests on.

Guarantees: every example (with privacy units: every unit) is in a logical batch independently with probability
``sample_rate`` (one process or several: the union of the ranks' batches is that one Poisson batch), every rank
steps together (empty shares included), and the sampling and the noise draw from generators seeded by the
operating system, never from the public ``--seed``. A sampled unit brings at most ``max_examples`` of its
examples, a fresh uniform subset at every step, drawn from that unit's own keyed generator (``row_randomness.py``:
secret, and independent of which other units are in the batch). Every batch ends with each row's example index
(its data set index: the key of its per-row draws), then, for units, each row's unit within the batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler, UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset

from .row_randomness import RowRandomness


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


class _WithIndex(Dataset):
    """Item i: ``(*dataset[i], i)``, the example's columns and its index."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        return (*self.dataset[index], torch.tensor(index))


def poisson_data_loader(
    dataset: Dataset, sample_rate: float, *, distributed: bool, generator: torch.Generator | None = None
) -> DataLoader:
    """opacus' ``DPDataLoader`` (Poisson sampling, empty batches as zero-length tensors); with
    ``distributed`` the same loader over ``DistributedPoissonSampler``. Batches are ``(*columns, example_ids)``."""
    dataset = _WithIndex(dataset)
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=generator)
    if not distributed:
        return loader
    sampler = DistributedPoissonSampler(total_size=len(dataset), sample_rate=sample_rate, generator=generator)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=loader.collate_fn, generator=generator)


@dataclass
class PrivacyUnits:
    """The privacy units of a data set (``--privacy_unit_column``: e.g. one per patient): ``members[u]`` holds unit
    u's example indices; a sampled unit contributes at most ``max_examples`` of them per step."""

    members: list[list[int]]
    max_examples: int

    def __post_init__(self) -> None:
        if self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {self.max_examples}")
        if any(not members for members in self.members):
            raise ValueError("Every privacy unit needs at least one example.")

    def __len__(self) -> int:
        return len(self.members)


class _UnitExamples(Dataset):
    """Item u: at most ``units.max_examples`` of unit u's examples with their indices, a uniform subset drawn anew
    at every step from unit u's own generator (``randomness.unit_generator``; all of them when the unit has no
    more), in data set order."""

    def __init__(self, dataset: Dataset, units: PrivacyUnits, randomness: RowRandomness):
        self.dataset, self.units, self.randomness = _WithIndex(dataset), units, randomness

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, unit: int) -> list:
        members = self.units.members[unit]
        if len(members) > self.units.max_examples:
            generator = self.randomness.unit_generator(unit)
            chosen = torch.randperm(len(members), generator=generator)[: self.units.max_examples]
            members = [members[i] for i in sorted(chosen.tolist())]
        return [self.dataset[i] for i in members]


def _collate_units(example: tuple):
    """Collate units into the examples' columns (their indices last) plus a last column, each example's unit within
    the batch (0..U-1, a unit's examples adjacent); an empty batch gives zero-row columns shaped like
    ``example``'s."""

    def collate(units: list[list[tuple]]) -> tuple[torch.Tensor, ...]:
        rows = [row for unit in units for row in unit]
        groups = torch.tensor([u for u, unit in enumerate(units) for _ in unit], dtype=torch.long)
        if not rows:
            return (*(torch.zeros((0, *column.shape), dtype=column.dtype) for column in example), groups)
        return (*(torch.stack(column) for column in zip(*rows)), groups)

    return collate


def unit_poisson_data_loader(
    dataset: Dataset,
    units: PrivacyUnits,
    sample_rate: float,
    *,
    distributed: bool,
    randomness: RowRandomness,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """User-level sampling: each step every privacy unit is in the batch independently with probability
    ``sample_rate`` (opacus' ``UniformWithReplacementSampler``, or ``DistributedPoissonSampler`` over units: ranks
    are dealt units, not examples), and brings up to ``units.max_examples`` of its examples drawn from its own
    generator of ``randomness`` (keyed by the step and the unit). Batches are ``(*columns, example_ids, units)``;
    ``BatchMemoryManager`` splits them into physical batches of whole units."""
    examples = _UnitExamples(dataset, units, randomness)
    if distributed:
        sampler = DistributedPoissonSampler(total_size=len(units), sample_rate=sample_rate, generator=generator)
    else:
        sampler = UniformWithReplacementSampler(num_samples=len(units), sample_rate=sample_rate, generator=generator)
    collate = _collate_units(examples.dataset[0])
    return DataLoader(examples, batch_sampler=sampler, collate_fn=collate, generator=generator)
