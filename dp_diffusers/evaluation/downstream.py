"""Downstream accuracy (DP-LDM / DPDM protocol): train a classifier on synthetic images, test on real.

The same small CNN trained on the real training split gives the reference accuracy the synthetic
data should approach. Images are float tensors ``(N, C, H, W)`` in [-1, 1] (grayscale or RGB, any
small resolution such as 8x8, 16x16 or 32x32); labels are integer class ids in ``[0, num_classes)``.
Training is seeded and CPU friendly (600 Adam steps of 64 16x16 images: a few seconds). Both classifiers of
``downstream_accuracy`` get the same number of steps, whatever the size of their training set, so a small
synthetic set is not handicapped by fewer updates.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _check(images: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"{name} images must be a float tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError(f"{name} images are empty")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{name}: {len(images)} images but labels of shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{name} labels must be integers in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    if images.min() < -1.0 - 1e-3 or images.max() > 1.0 + 1e-3:
        raise ValueError(f"{name} images must be scaled to [-1, 1], got {images.min():.3g}..{images.max():.3g}")


class SmallCNN(nn.Sequential):
    """Two conv blocks (32 and 64 channels) + a 4x4 adaptive pool + linear head; any input resolution."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(64 * 16, num_classes),
        )


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int = 600,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Train a :class:`SmallCNN` with ``steps`` Adam updates on minibatches of ``images`` in [-1, 1] (passes
    over reshuffled data, the last one cut short); deterministic given ``seed``.

    Returns the model in eval mode. The global RNG state is left untouched.
    """
    _check(images, labels, num_classes, "training")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(images.shape[1], num_classes).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        done = 0
        while done < steps:
            for idx in torch.randperm(len(images), generator=generator).split(batch_size)[: steps - done]:
                loss = F.cross_entropy(model(images[idx].to(device)), labels[idx].to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                done += 1
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``images`` in [-1, 1] with integer ``labels``."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        correct += (model(x.to(device)).argmax(dim=1).cpu() == y.cpu()).sum().item()
    return correct / len(labels)


#: real-data accuracy by (data, settings): the same real split and seed give the same deterministic classifier, so
#: evaluating several adapters in one process (examples/privacy_utility.py) trains it once
_REAL_DATA_ACCURACY: dict[str, float] = {}


def _real_key(*tensors: torch.Tensor, **settings: Any) -> str:
    digest = hashlib.sha256(repr(sorted(settings.items())).encode())
    for tensor in tensors:
        digest.update(repr((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def downstream_accuracy(
    synthetic_images: torch.Tensor,
    synthetic_labels: torch.Tensor,
    real_train_images: torch.Tensor,
    real_train_labels: torch.Tensor,
    real_test_images: torch.Tensor,
    real_test_labels: torch.Tensor,
    num_classes: int,
    **training: Any,
) -> dict:
    """Accuracy on real test images of a classifier trained on synthetic images, and of the same
    classifier (same architecture, hyperparameters and seed) trained on the real training images.
    ``training``: :func:`train_classifier`'s keyword arguments (``steps``, ``lr``, ``batch_size``, ``seed``,
    ``device``), the same for both.

    Returns ``{"downstream_accuracy", "real_data_accuracy", "classifier", "num_synthetic", "num_test"}``
    with accuracies in [0, 1].
    """
    _check(synthetic_images, synthetic_labels, num_classes, "synthetic")
    _check(real_train_images, real_train_labels, num_classes, "real train")
    _check(real_test_images, real_test_labels, num_classes, "real test")
    shapes = {tuple(x.shape[1:]) for x in (synthetic_images, real_train_images, real_test_images)}
    if len(shapes) != 1:
        raise ValueError(f"synthetic, real train and real test images differ in (C, H, W): {sorted(shapes)}")
    on_synthetic = train_classifier(synthetic_images, synthetic_labels, num_classes, **training)
    real = (real_train_images, real_train_labels, real_test_images, real_test_labels)
    key = _real_key(*real, num_classes=num_classes, **training)
    if key not in _REAL_DATA_ACCURACY:  # the reference does not depend on the model under evaluation
        on_real = train_classifier(real_train_images, real_train_labels, num_classes, **training)
        _REAL_DATA_ACCURACY[key] = accuracy(on_real, real_test_images, real_test_labels)
    defaults = inspect.signature(train_classifier).parameters
    steps, lr, batch_size = (training.get(name, defaults[name].default) for name in ("steps", "lr", "batch_size"))
    return {
        "downstream_accuracy": accuracy(on_synthetic, real_test_images, real_test_labels),
        "real_data_accuracy": _REAL_DATA_ACCURACY[key],
        "classifier": f"SmallCNN (conv32-conv64-linear), Adam lr={lr:g}, {steps} steps, batch {batch_size}",
        "num_synthetic": len(synthetic_images),
        "num_test": len(real_test_images),
    }


def train_dp_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    target_epsilon: float,
    delta: float,
    epochs: float = 30,
    batch_size: int = 128,
    max_grad_norm: float = 1.0,
    lr: float = 2e-3,
    accountant: str = "prv",
    seed: int = 0,
    noise_generator: torch.Generator | None = None,
    sampling_generator: torch.Generator | None = None,
) -> tuple[nn.Module, dict]:
    """The reference a synthetic data set must beat: the same :class:`SmallCNN` trained directly on the private
    images with DP-SGD at (``target_epsilon``, ``delta``), through the same privacy core as DP-LoRA
    (``dp_diffusers.privacy``: Poisson sampling, per-example clipping to ``max_grad_norm`` with opacus' hooks,
    noise calibrated by the accountant over ``epochs / q`` steps, the step past the target refused).

    ``seed`` fixes the initialisation and the dropout; the noise and the sampling use secret generators unless
    given (tests only). Returns the model in eval mode and its guarantee ``{"epsilon", "delta", "steps",
    "noise_multiplier", "sample_rate"}``.
    """
    from ..privacy import PrivacyBudget, calibrate_noise_multiplier, check_delta, make_private, private_backward

    _check(images, labels, num_classes, "private")
    n = len(images)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} private images")
    check_delta(delta, n)
    sample_rate = batch_size / n
    steps = max(1, round(epochs / sample_rate))
    sigma = calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
    budget = PrivacyBudget(accountant, sigma, sample_rate, delta, steps, target_epsilon)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(images.shape[1], num_classes)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        dp = make_private(
            model, optimizer, torch.utils.data.TensorDataset(images, labels), budget=budget,
            max_grad_norm=max_grad_norm, grad_sample_mode="hooks", noise_generator=noise_generator,
            sampling_generator=sampling_generator,
        )  # fmt: skip
        dp.model.train()

        def loss_fn(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(module(x), y, reduction="none")

        while budget.can_step():
            for x, y, _ in dp.data_loader:  # (the example indices: no per-row draws)
                private_backward(dp.model, dp.optimizer, loss_fn, x, y)
                dp.optimizer.step()
                dp.optimizer.zero_grad(set_to_none=True)
                if not budget.can_step():
                    break
    guarantee = {"epsilon": budget.epsilon(), "delta": delta, "steps": budget.steps, "noise_multiplier": sigma,
                 "sample_rate": sample_rate}  # fmt: skip
    return model.eval(), guarantee
