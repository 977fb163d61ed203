"""The randomness the DP guarantee rests on (Gaussian noise, Poisson sampling) is secret by default:
it does not follow torch's global seed, which training scripts set from a public ``--seed``."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dp_diffusers.privacy import PrivacyBudget, make_private, private_backward

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
    (batch,) = next(iter(dp.data_loader))
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
