"""A trained class embedding is part of the DP update: per-example gradients, clipped together with
the LoRA weights', in every grad_sample_mode, also when it is in eval mode as ``from_pretrained``
leaves it (regression: hooks mode failed with "No activations detected for Embedding" when
--train_class_embedding was given and every private label was known to the base).
"""

import copy
import json

import pytest
import torch
from helpers import base_args, fixed_loss, lora_denoiser, train
from torch.utils.data import TensorDataset

from dp_diffusers import ClassEmbedder
from dp_diffusers.privacy import PrivacyBudget, make_private, private_backward

MODES = ["fused", "hooks", "functorch"]


@pytest.mark.parametrize("mode", MODES)
def test_class_embedding_is_clipped_together_with_the_lora_weights(mode):
    torch.manual_seed(0)
    k, clip, n = 2, 0.01, 3
    model = lora_denoiser("cond", "attention", train_class_embedding=True)
    model.class_embedder.eval()  # as ClassEmbedder.from_pretrained leaves it
    reference = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    budget = PrivacyBudget("prv", 0.0, 0.25, 1e-5, planned_steps=1)
    dp = make_private(
        model,
        torch.optim.SGD(params, lr=1.0),
        TensorDataset(torch.zeros(12, 1)),
        budget=budget,
        max_grad_norm=clip,
        noise_multiplicity=k,
        grad_sample_mode=mode,
    )
    assert model.class_embedder.embedding.training
    latents, labels = torch.randn(n, 3, 8, 8), torch.tensor([1, 4, 4])
    timesteps, noise = torch.randint(0, 1000, (n * k,)), torch.randn(n * k, 3, 8, 8)
    sched, loss_fn = fixed_loss(timesteps, noise)
    private_backward(dp.model, dp.optimizer, loss_fn, latents, labels)
    dp.optimizer.step()

    names = [name for name, p in reference.named_parameters() if p.requires_grad]
    embedding = names.index("class_embedder.embedding.weight")
    joint, lora_only = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for i in range(n):
        rows = slice(i * k, (i + 1) * k)
        own = {"class_labels": labels[i].repeat(k)}
        loss = sched.loss(reference, latents[i : i + 1].repeat(k, 1, 1, 1), own, timesteps[rows], noise[rows]).mean()
        grads = torch.autograd.grad(loss, [p for p in reference.parameters() if p.requires_grad])
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        lora_norm = torch.sqrt(sum(g.pow(2).sum() for j, g in enumerate(grads) if j != embedding))
        assert norm > clip  # every example is clipped, so where the norm comes from matters
        assert grads[embedding].norm() > 0.1 * norm  # the embedding weighs in the example's norm
        for j, g in enumerate(grads):
            joint[j] += g * min(1.0, clip / (norm.item() + 1e-6)) / dp.optimizer.expected_batch_size
            lora_only[j] += g * min(1.0, clip / (lora_norm.item() + 1e-6)) / dp.optimizer.expected_batch_size
    got = torch.cat([p.grad.flatten() for p in params])
    torch.testing.assert_close(got, torch.cat([g.flatten() for g in joint]), rtol=1e-4, atol=1e-8)
    assert not torch.allclose(got, torch.cat([g.flatten() for g in lora_only]), rtol=1e-2, atol=0)
    assert params[embedding].grad[[1, 4]].abs().sum() > 0 and params[embedding].grad[[0, 2, 3]].abs().sum() == 0


@pytest.mark.parametrize("mode", ["hooks", "fused"])
def test_train_dp_lora_trains_the_class_embedding_of_known_labels(tiny_base, tmp_path, mode):
    out = tmp_path / "adapter"
    train(base_args(tiny_base, out, **{"--train_class_embedding": True, "--grad_sample_mode": mode}))
    config = json.loads((out / "dp_lora_config.json").read_text())
    assert config["class_embedder"] == "class_embedder" and config["id2label"]["9"] == "9"
    trained = ClassEmbedder.from_pretrained(out / "class_embedder").embedding.weight
    base = ClassEmbedder.from_pretrained(tiny_base / "class_embedder").embedding.weight
    assert trained.shape == base.shape  # every private label was known: no new rows
    assert not torch.equal(trained, base)
