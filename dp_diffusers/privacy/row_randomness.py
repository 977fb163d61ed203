"""The per-row randomness of the private loss, keyed so that no row's draws depend on the other rows of its batch.

A DP step's per-example term ``clip(grad loss(x, xi))`` has randomness ``xi`` of its own: the diffusion timestep and
noise, condition dropout, the random-flip pick, a noise-multiplicity copy's draws, a privacy unit's subset of
examples. The subsampled-Gaussian proof needs each example's (each unit's) term to depend on that example alone. Draws
consumed row by row from one shared generator break that: which draws a row gets depends on how many rows came
before it, in this batch and in every earlier one, so adding or removing one example changes the *other* examples'
clipped gradients (with a known seed a constructed worst case moves the sum by about 2 C |B|, not C).

Here every row draws from its own generator, seeded by a hash of (run key, step, example index, copy); a unit's
subset of examples from one seeded by (run key, step, unit index). Guarantees:

* **Batch-independent, for every key.** A row's draws are a function of the key, the logical step (the accountant's
  step count, which resumes with the budget) and its own example index and copy, never of which other rows are in
  the batch or in which order: with the key fixed, adding or removing one example leaves every other example's
  clipped gradient bit for bit the same, so one example moves the sum by at most ``max_grad_norm``.
* **Secret.** The key comes from the operating system's entropy (``secrets``), never from ``--seed``: the draws of
  distinct (step, example, copy) are then independent uniformly random streams to anyone without the key, so an
  example's draws do not depend on its position in the data set either (adding one example may shift the indices
  of the others; with a secret key that only relabels i.i.d. streams). Pass a fixed ``key`` for tests only.

Generators are the device's own (``torch.Generator(device)``), one per row; a row consumes its draws in a fixed
order (the loss's), so the same row always gets the same values.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable

import torch

#: What a generator is for: the loss's draws of one row, or a unit's choice of examples.
_ROW, _UNIT_SUBSET = 0, 1


class RowRandomness:
    """Per-row generators of one DP run, keyed by (``key``, ``step()``, example index, copy).

    ``step`` returns the logical step being taken (``PrivacyBudget.steps``: the steps already taken, restored on
    resume); ``key`` defaults to 63 secret bits.
    """

    def __init__(self, step: Callable[[], int], key: int | None = None):
        self.key = secrets.randbits(63) if key is None else int(key)
        self.step = step

    def _generator(self, kind: int, index: int, copy: int, device: torch.device | str) -> torch.Generator:
        words = (self.key, kind, self.step(), index, copy)
        digest = hashlib.blake2b(b"".join(w.to_bytes(8, "little", signed=True) for w in words), digest_size=8).digest()
        generator = torch.Generator(device=device)
        generator.manual_seed(int.from_bytes(digest, "little") >> 1)  # 63 bits: torch's seeds are signed 64-bit
        return generator

    def row_generators(
        self, example_ids: torch.Tensor, copies: int, device: torch.device | str
    ) -> list[torch.Generator]:
        """One generator per row of a batch expanded to ``copies`` rows per example (example-major: example i's
        copies adjacent, as ``expand_for_noise_multiplicity``), for examples ``example_ids`` (their data set
        indices)."""
        return [self._generator(_ROW, int(i), c, device) for i in example_ids.tolist() for c in range(copies)]

    def unit_generator(self, unit: int) -> torch.Generator:
        """The generator of privacy unit ``unit``'s choice of examples at this step (CPU)."""
        return self._generator(_UNIT_SUBSET, unit, 0, "cpu")
