"""Exactness of the fast paths of the DP step against the one-example-at-a-time reference.

``grad_sample_mode="fused"`` computes per-example gradients inside the layers' backward and
contracts the k noise-multiplicity copies there; every number must still be the micro-batch
reference's (those checks are in test_privacy_gradients.py, with opacus' modes and full fine-tuning); here
the fused module's own contract and whole DP steps against opacus' hooks.
"""

import copy

import pytest
import torch
from helpers import (
    dp_setup,
    fixed_loss,
    lora_denoiser,
    per_sample_gradients,
    private,
)
from torch.utils.data import TensorDataset

from dp_diffusers.privacy import GRAD_SAMPLE_MODES, average_over_copies, make_private, private_backward
from dp_diffusers.privacy.grad_sample import FusedGradSampleModule

B = 3

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def test_fused_is_a_mode_and_the_default():
    import inspect

    assert "fused" in GRAD_SAMPLE_MODES
    assert inspect.signature(make_private).parameters["grad_sample_mode"].default == "fused"


@pytest.mark.parametrize("k", [1, 4])
def test_fused_and_hooks_make_the_same_clipped_step(k):
    """Whole DP step, noise off, tight clipping: same update from both modes."""
    torch.manual_seed(3)
    base = lora_denoiser("cond", "attention+proj", train_class_embedding=True)
    latents = torch.randn(5, 3, 8, 8)
    labels = torch.randint(0, 10, (5,))
    timesteps = torch.randint(0, 1000, (5 * k,))
    noise = torch.randn(5 * k, 3, 8, 8)
    grads = {}
    for mode in ("fused", "hooks"):
        dataset = TensorDataset(torch.randn(64, 3, 8, 8), torch.zeros(64))
        dp, _ = private(copy.deepcopy(base), dataset, sigma=0.0, clip=0.05, batch=8, k=k, mode=mode)
        _, loss_fn = fixed_loss(timesteps, noise)
        private_backward(dp.model, dp.optimizer, loss_fn, latents, labels)
        dp.optimizer.step()
        grads[mode] = [p.grad.clone() for p in dp.optimizer.params]
    for a, b in zip(grads["fused"], grads["hooks"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def test_fused_refuses_grad_accumulation_and_counts_a_shared_layer_twice():
    torch.manual_seed(4)
    lin = torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)  # the same layer used twice
    reference = copy.deepcopy(model)
    fused = FusedGradSampleModule(model)
    x = torch.randn(4, 3)
    y = torch.randn(4, 3)
    (fused(x) * y).sum(1).mean().backward()
    for i in range(4):
        loss = (reference(x[i : i + 1]) * y[i : i + 1]).sum()
        g = torch.autograd.grad(loss, [reference[0].weight, reference[0].bias])
        torch.testing.assert_close(lin.weight.grad_sample[i], g[0])
        torch.testing.assert_close(lin.bias.grad_sample[i], g[1])
    with pytest.raises(ValueError, match="grad accumulation"):
        (fused(x) * y).sum(1).mean().backward()


def test_fused_leaves_inference_and_unhooked_use_alone():
    torch.manual_seed(5)
    model = lora_denoiser("cond", "attention")
    reference = copy.deepcopy(model)
    fused = FusedGradSampleModule(model)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), {"class_labels": torch.tensor([1, 2])}
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t, y), reference(x, t, y))
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    fused.remove_hooks()
    model(x, t, y).sum().backward()  # plain autograd again
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fused_rejects_what_it_cannot_compute():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="hooks"):
        FusedGradSampleModule(model)
    conv = torch.nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups"):
        FusedGradSampleModule(conv)


def test_fused_rows_must_be_whole_examples():
    model = FusedGradSampleModule(torch.nn.Linear(3, 2), noise_multiplicity=2)
    with pytest.raises(ValueError, match="multiple of noise_multiplicity"):
        model(torch.randn(3, 3)).mean().backward()


def test_fused_empty_batch_is_a_noise_only_step():
    torch.manual_seed(6)
    model = lora_denoiser("cond", "attention")
    dp = dp_setup(model, noise_multiplier=1.0, max_grad_norm=0.1, k=2)
    assert isinstance(dp.model, FusedGradSampleModule)
    before = [p.detach().clone() for p in dp.optimizer.params]
    private_backward(dp.model, dp.optimizer, lambda *a: None, torch.zeros(0, 3, 8, 8), torch.zeros(0).long())
    dp.optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(dp.optimizer.params, before))


def test_hooks_mode_still_hands_per_row_gradients_to_the_optimizer():
    """Only the fused mode folds in the backward; the others keep (B*k, ...) rows for the mixin."""
    torch.manual_seed(7)
    model = lora_denoiser("cond", "attention")
    latents, labels = torch.randn(2, 3, 8, 8), {"class_labels": torch.tensor([1, 2])}
    timesteps, noise = torch.randint(0, 1000, (6,)), torch.randn(6, 3, 8, 8)
    dp, _ = per_sample_gradients(model, latents, labels, timesteps, noise, 3, "hooks")
    assert not dp.optimizer.copies_folded_in_backward
    g = next(p.grad_sample for p in dp.optimizer.params)
    assert g.shape[0] == 6 and average_over_copies(g, 3).shape[0] == 2
