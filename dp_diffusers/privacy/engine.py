"""Wiring opacus for DP-LoRA: per-sample gradients, Poisson sampling, clipping, noise, accounting.

``make_private`` is ``opacus.PrivacyEngine.make_private`` taken apart so that the optimizer can be
the noise-multiplicity one (``noise_multiplicity.py``) and the sample rate is exactly
``batch_size / N``, the one the accountant and the noise calibration use. The parts: per-sample
gradients from ``grad_sample/`` (the fused engine, or opacus' hooks / functorch / expanded
weights), Poisson sampling and the secret generators from ``data_loader.py``, the keyed per-row randomness of the
private loss from ``row_randomness.py``, opacus' DP optimizers, the accountant in ``accounting.py``. Nothing here
computes a gradient, a clip or a noise draw.

Guarantee (per logical step, over the whole global batch): every example (with ``units``: every privacy unit) is
in the batch independently with probability ``q``; each private example's gradient (the mean over its k noise
draws; a unit's: the mean over its examples' draws; over *all* trainable parameters: a trained class embedding or
DiT class rows included) is clipped to ``max_grad_norm``; Gaussian noise of std ``noise_multiplier *
max_grad_norm`` is added once (on rank 0 with several processes, then summed across ranks) and the sum is divided
by the expected global batch size ``q * N`` (N examples, or units); the step is recorded in the accountant with
sample rate ``q``. Every row's randomness inside the loss (timestep, diffusion noise, dropout, flip, each copy's)
comes from its own generator keyed by (secret run key, step, example index, copy): an example's term depends on that
example alone, whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .accounting import PrivacyBudget
from .data_loader import PrivacyUnits, poisson_data_loader, secret_generator, unit_poisson_data_loader
from .grad_sample import GRAD_SAMPLE_MODES, prepare_module
from .noise_multiplicity import (
    DistributedDPOptimizerWithNoiseMultiplicity,
    DPOptimizerWithNoiseMultiplicity,
    expand_for_noise_multiplicity,
)
from .row_randomness import RowRandomness

__all__ = ["DPTraining", "GRAD_SAMPLE_MODES", "PrivateTrainingState", "make_private", "private_backward"]


@dataclass
class DPTraining:
    """What ``make_private`` returns: use these three in place of the originals."""

    model: nn.Module
    optimizer: DPOptimizerWithNoiseMultiplicity
    data_loader: DataLoader


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    *,
    budget: PrivacyBudget,
    max_grad_norm: float,
    noise_multiplicity: int = 1,
    grad_sample_mode: str = "fused",
    secure_mode: bool = False,
    noise_generator: torch.Generator | None = None,
    sampling_generator: torch.Generator | None = None,
    units: PrivacyUnits | None = None,
    row_key: int | None = None,
    population: int | None = None,
) -> DPTraining:
    """Wrap ``model`` (optionally already in opacus' ``DPDDP``), ``optimizer`` and ``dataset``.

    With ``units`` (unit-level DP) the privacy unit replaces the example everywhere: units are Poisson-sampled at
    ``budget.sample_rate`` (over units), each brings up to ``units.max_examples`` of its examples, their rows are
    averaged and clipped once per unit (``private_backward(..., units=...)``), and the expected batch is
    ``q * len(units)`` units.

    The optimizer must hold exactly the trainable parameters of ``model``; frozen modules get no
    per-sample hooks, the modules owning trainable parameters are put in training mode
    (``grad_sample.train_trainable_layers``). ``budget`` supplies the noise multiplier and the sample rate, and
    receives every real (non-skipped) optimizer step. With ``DPDDP`` every rank calls this with the
    whole data set: the loader gives each rank its share of every Poisson batch, and the
    optimizer's ``expected_batch_size`` is the per-rank share ``q * N / world_size`` (the
    all-reduce averages over ranks, so the update is divided by ``q * N``).

    ``noise_generator`` and ``sampling_generator`` default to ``secret_generator()``s and ``row_key`` (the key of
    the per-row draws inside the loss and of a unit's choice of examples: ``RowRandomness``) to secret bits, so
    the randomness the guarantee rests on is independent of ``torch.manual_seed`` / ``set_seed`` (the public
    ``--seed`` still fixes the initialisation and everything outside the private loss). Pass seeded generators and
    keys for tests only: a known seed voids the guarantee. ``secure_mode`` is opacus' noise sampling that resists
    floating-point attacks; it does not make the generator cryptographic.

    ``population``: the number of examples (units) ``budget.sample_rate`` was computed for, when it is not the data
    set's (the one-run audit's canaries, each present by a secret coin, count as their expected number): the update is
    divided by ``q * population``, a number that does not depend on the data.

    The loader's batches end with each row's example index (then, with ``units``, each row's unit in the batch):
    pass them to ``private_backward(..., example_ids=...)``.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
    if noise_multiplicity < 1:
        raise ValueError(f"noise_multiplicity must be >= 1, got {noise_multiplicity}")
    trainable = {p for p in model.parameters() if p.requires_grad}
    in_optimizer = {p for group in optimizer.param_groups for p in group["params"]}
    if trainable != in_optimizer:
        raise ValueError("The optimizer must hold exactly the model's trainable parameters.")
    if not trainable:
        raise ValueError("The model has no trainable parameters.")

    distributed = isinstance(model, DPDDP)
    world_size = torch.distributed.get_world_size() if distributed else 1
    if noise_generator is None:
        noise_generator = secret_generator(next(iter(trainable)).device)
    if sampling_generator is None:
        sampling_generator = secret_generator()
    gsm = prepare_module(model, grad_sample_mode, noise_multiplicity=noise_multiplicity)
    # keyed by the logical step being taken: the accountant's count, which a resumed run restores
    randomness = RowRandomness(step=lambda: budget.steps, key=row_key)

    if units is None:
        loader = poisson_data_loader(dataset, budget.sample_rate, distributed=distributed, generator=sampling_generator)
    else:
        loader = unit_poisson_data_loader(dataset, units, budget.sample_rate, distributed=distributed,
                                          randomness=randomness, generator=sampling_generator)  # fmt: skip
    optimizer_class = DistributedDPOptimizerWithNoiseMultiplicity if distributed else DPOptimizerWithNoiseMultiplicity
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplicity=noise_multiplicity,
        noise_multiplier=budget.noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=budget.sample_rate * (population or len(dataset if units is None else units)) / world_size,
        loss_reduction="mean",
        generator=noise_generator,
        secure_mode=secure_mode,
        copies_folded_in_backward=grad_sample_mode == "fused",  # fused contracts each example's k rows itself
    )
    dp_optimizer.row_randomness = randomness
    dp_optimizer.attach_step_hook(budget.accountant.get_optimizer_hook_fn(sample_rate=budget.sample_rate))
    return DPTraining(model=gsm, optimizer=dp_optimizer, data_loader=loader)


def private_backward(
    model: nn.Module,
    optimizer: DPOptimizerWithNoiseMultiplicity,
    loss_fn: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    *conditions: torch.Tensor | None,
    units: torch.Tensor | None = None,
    example_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Forward and backward of one physical batch; per-sample gradients land in ``p.grad_sample``.

    ``latents`` and ``conditions`` are the batch's columns (one row per example: its latents, then each of its
    condition tensors); ``loss_fn(model, latents, *conditions) -> (rows,)``. Rows are expanded to
    ``noise_multiplicity`` copies per example here; the optimizer folds them back before clipping, one clip per
    example or, with ``units`` ((examples,) privacy unit of each example in the batch, 0..U-1, a unit's examples
    adjacent: ``unit_poisson_data_loader``'s last column), one clip per unit. An empty Poisson batch still makes a
    (noise-only) step: its per-sample gradients are empty tensors, so opacus clips nothing and adds the noise.
    Returns the mean loss.

    A loss that draws randomness per row (``loss_fn.draws_per_row``: ``DiffusionLoss``, whose timesteps, noise,
    dropout and flips these are) must be given ``example_ids`` (the loader's column: each example's data set index)
    and is called with ``generators=``, one per row keyed by (run key, step, example, copy): see
    ``row_randomness.py``. It is an error to leave them out.
    """
    k = optimizer.noise_multiplicity
    if len(latents) == 0:
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        return None
    row_groups = None if units is None else expand_for_noise_multiplicity(units, k)
    optimizer.row_groups = row_groups
    if hasattr(model, "set_row_groups"):  # the fused engine folds in the backward
        model.set_row_groups(row_groups)
    rows = [expand_for_noise_multiplicity(column, k) for column in (latents, *conditions)]
    if getattr(loss_fn, "draws_per_row", False):
        if example_ids is None or len(example_ids) != len(latents):
            raise ValueError("This loss draws randomness per row: pass example_ids (each example's data set index, the "
                             "DP loader's column) so that every row draws from its own keyed generator.")  # fmt: skip
        generators = optimizer.row_randomness.row_generators(example_ids, k, latents.device)
        loss = loss_fn(model, *rows, generators=generators).mean()
    else:
        loss = loss_fn(model, *rows).mean()
    loss.backward()
    return loss.detach()


class PrivateTrainingState:
    """Everything a resumed DP run needs, for ``accelerator.register_for_checkpointing``:
    trainable weights, the optimizer's state and the privacy budget spent (the accountant).

    Guarantee: loading restores the accountant's history, so a resumed run continues counting
    from the steps already taken; it never starts a fresh budget.
    """

    def __init__(self, model: nn.Module, optimizer: DPOptimizerWithNoiseMultiplicity, budget: PrivacyBudget):
        self.model = model
        self.optimizer = optimizer
        self.budget = budget

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict:
        return {
            "trainable": {name: p.detach().cpu().clone() for name, p in self._trainable().items()},
            "optimizer": self.optimizer.original_optimizer.state_dict(),
            "budget": self.budget.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        params = self._trainable()
        if set(state["trainable"]) != set(params):
            raise ValueError("The checkpoint's trainable parameters do not match this model's LoRA setup.")
        self.budget.load_state_dict(state["budget"])
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["trainable"][name])
        self.optimizer.original_optimizer.load_state_dict(state["optimizer"])
