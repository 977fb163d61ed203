"""The randomness the DP guarantee rests on: the Gaussian noise and Poisson sampling are secret (they do not follow
torch's global seed, which training scripts set from a public ``--seed``), and every row's randomness inside the
private loss (timestep, diffusion noise, condition dropout, flip pick, each noise-multiplicity copy's draws, a unit's
choice of examples) is keyed by (secret run key, step, example, copy): an example's clipped gradient depends on that
example alone, never on which other examples are in its batch."""

import pytest
import torch
from helpers import lora_denoiser, model_objective, perturb_lora_b, private
from torch import nn
from torch.utils.data import TensorDataset

from dp_diffusers import DiffusionLoss
from dp_diffusers.privacy import (
    GRAD_SAMPLE_MODES,
    PrivacyBudget,
    PrivacyUnits,
    average_over_groups,
    expand_for_noise_multiplicity,
    make_private,
    private_backward,
)

N, Q = 1000, 0.5


def noise_and_batch(**generators) -> tuple[torch.Tensor, list[int]]:
    """The noise of one noise-only step and the first Poisson batch, after ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    model = nn.Linear(10, 10)
    budget = PrivacyBudget("prv", 1.0, Q, 1e-5, planned_steps=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dataset = TensorDataset(torch.arange(N))
    dp = make_private(model, optimizer, dataset, budget=budget, max_grad_norm=1.0, **generators)
    private_backward(dp.model, dp.optimizer, None, torch.zeros(0, 10), None)
    dp.optimizer.step()
    (batch, example_ids) = next(iter(dp.data_loader))
    assert torch.equal(batch, example_ids)  # the loader's last column: each row's data set index
    return torch.cat([p.grad.flatten() for p in model.parameters()]), batch.tolist()


def test_noise_and_sampling_do_not_follow_the_global_seed():
    noise_a, batch_a = noise_and_batch()
    noise_b, batch_b = noise_and_batch()
    assert noise_a.abs().min() > 0 and not torch.equal(noise_a, noise_b)
    assert batch_a != batch_b  # equal with probability 2**-1000


def test_seeded_generators_still_reproduce_a_run():
    def run():
        return noise_and_batch(
            noise_generator=torch.Generator().manual_seed(1), sampling_generator=torch.Generator().manual_seed(2)
        )

    (noise_a, batch_a), (noise_b, batch_b) = run(), run()
    assert torch.equal(noise_a, noise_b) and batch_a == batch_b


# ---- the per-row draws of the private loss -------------------------------------------------------------------------

#: 12 examples (image and mirror latents: --random_flip), classes 0..9; units of 1 to 5 examples (cap 2).
EXAMPLES = 12
UNITS = [[0, 1, 2, 3, 4], [5], [6, 7], [8, 9, 10], [11]]


class RecordingObjective:
    """The objective, recording each row's draws as the loss sees them: its (flipped) latents, its (dropped) label,
    its timestep and its noise, one flat row each."""

    def __init__(self, objective):
        self.objective, self.rows = objective, None

    def sample_timesteps(self, rows, device, generator=None):
        return self.objective.sample_timesteps(rows, device, generator)

    def loss(self, model, latents, conditions, timesteps, noise):
        columns = (latents, conditions["class_labels"], timesteps, noise)
        self.rows = torch.cat([column.flatten(1) if column.dim() > 1 else column[:, None] for column in columns], 1)
        return self.objective.loss(model, latents, conditions, timesteps, noise)


def per_group(mode: str, k: int, chosen: list[int], units: PrivacyUnits | None, key: int | None, step: int = 0,
              seed: int = 0) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:  # fmt: skip
    """One ``private_backward`` of the examples (or units) ``chosen``, as the DP loader collates them, at logical step
    ``step``, with every per-row draw the DP loss makes (flip pick, label dropout, noise, timestep). Returns, by
    example (unit) index, its gradient (its k copies, its rows, averaged as before the clip) and its rows' draws."""
    torch.manual_seed(seed)  # the public seed: whatever still drew from the global generator would follow it
    model = lora_denoiser("cond", "attention")
    perturb_lora_b(model, seed=1)
    data = torch.Generator().manual_seed(2)
    dataset = TensorDataset(torch.randn(EXAMPLES, 2, 3, 8, 8, generator=data), torch.arange(EXAMPLES) % 10)
    dp, budget = private(model, dataset, sigma=0.0, clip=1.0, batch=2, k=k, mode=mode, units=units, row_key=key)
    budget.accountant.history.append((0.0, budget.sample_rate, step))  # (steps already taken: the key's step)
    loader = dp.data_loader
    *columns, example_ids = loader.collate_fn([loader.dataset[i] for i in chosen])
    groups = None
    if units is not None:
        example_ids, groups = columns.pop(), example_ids
    objective = RecordingObjective(model_objective(model))
    loss = DiffusionLoss(objective, ("class_labels",), null_condition={"class_labels": torch.tensor([0])},
                         dropout=0.5, random_flip=True)  # fmt: skip
    private_backward(dp.model, dp.optimizer, loss, *columns, units=groups, example_ids=example_ids)
    row_groups = expand_for_noise_multiplicity(torch.arange(len(chosen)) if groups is None else groups, k)
    folded = []
    for p in dp.optimizer.params:
        g = p.grad_sample
        if not dp.optimizer.copies_folded_in_backward:  # opacus' modes: fold the rows as the optimizer does
            g = average_over_groups(g, row_groups)
        folded.append(g.flatten(1))
    gradients = dict(zip(chosen, torch.cat(folded, 1)))
    draws = {index: objective.rows[row_groups == g] for g, index in enumerate(chosen)}
    return gradients, draws


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("level", ["example", "unit"])
def test_another_example_in_the_batch_leaves_every_other_examples_draws_and_gradient_unchanged(mode, k, level):
    """With the key fixed, each example's (unit's) draws (its flips, dropout, noise and timesteps, and a unit's choice
    of its examples) are the same, bit for bit, whether one more example (unit) is in the batch or not, before or
    after it, and under another public seed; so is its gradient, up to the float rounding of batched kernels
    (measured: 1e-8 absolute on gradients of 5e-3, 2e-6 relative; draws in batch order change it by its whole
    size). The per-example clip is a function of that gradient alone."""
    units = PrivacyUnits(UNITS, max_examples=2) if level == "unit" else None
    if level == "unit":  # unit 3 has 3 examples (its choice of 2 is a draw too), unit 0 five
        base, before, after = [3, 4], [0, 3, 4], [3, 4, 1]
    else:
        base, before, after = [3, 5, 8], [1, 3, 5, 8], [3, 5, 8, 11]
    grads, draws = per_group(mode, k, base, units, key=7)
    for batch in (before, after):
        other_grads, other_draws = per_group(mode, k, batch, units, key=7, seed=1)  # another public seed, too
        for index in base:
            assert torch.equal(other_draws[index], draws[index]), f"{index} in {batch}"
            torch.testing.assert_close(other_grads[index], grads[index], rtol=1e-5, atol=1e-7)
        assert grads[base[0]].norm() > 1e-3


def test_the_draws_are_keyed_by_step_and_key_and_secret_by_default():
    """Another step or another key draws other values; without a key two runs with the same public seed differ."""
    def draws(**kw) -> torch.Tensor:
        return per_group("fused", 1, [3], None, **kw)[1][3]

    reference = draws(key=7)
    assert torch.equal(draws(key=7), reference)
    assert not torch.equal(draws(key=7, step=1), reference)
    assert not torch.equal(draws(key=8), reference)
    assert not torch.equal(draws(key=None), draws(key=None))


def test_a_loss_with_per_row_draws_needs_the_example_ids():
    model = lora_denoiser("cond", "attention")
    dataset = TensorDataset(torch.randn(4, 2, 3, 8, 8), torch.arange(4))
    dp, _ = private(model, dataset, sigma=1.0, clip=1.0, batch=2)
    loss = DiffusionLoss(model_objective(model), ("class_labels",), random_flip=True)
    with pytest.raises(ValueError, match="example_ids"):
        private_backward(dp.model, dp.optimizer, loss, *dataset.tensors)
