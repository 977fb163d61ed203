"""Choosing C from public data: exact per-example norms and the quantile rule."""

import pytest
import torch
from torch import nn

from dp_diffusers.privacy import per_example_gradient_norms, suggest_max_grad_norm


def squared_error(model, x, y):
    return (model(x).squeeze(-1) - y).pow(2)


def test_per_example_norms_match_the_closed_form():
    """For f(x) = w.x + b and loss (f(x) - y)^2 the gradient is 2 r (x, 1), norm 2|r| sqrt(|x|^2 + 1)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    x, y = torch.randn(16, 5), torch.randn(16)
    norms = per_example_gradient_norms(model, squared_error, x, y)
    with torch.no_grad():
        residual = model(x).squeeze(-1) - y
    expected = 2 * residual.abs() * torch.sqrt(x.pow(2).sum(1) + 1)
    torch.testing.assert_close(norms, expected)


def test_frozen_parameters_are_not_counted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 1))
    model[0].requires_grad_(False)
    x, y = torch.randn(4, 5), torch.randn(4)
    norms = per_example_gradient_norms(model, squared_error, x, y)
    head_only = per_example_gradient_norms(model[1], squared_error, model[0](x).detach(), y)
    torch.testing.assert_close(norms, head_only)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        per_example_gradient_norms(model, squared_error, x, y)


def test_suggested_norm_clips_most_examples():
    norms = torch.linspace(1.0, 100.0, 100)
    c = suggest_max_grad_norm(norms, quantile=0.1)
    assert (norms > c).float().mean() == pytest.approx(0.9, abs=0.01)
    with pytest.raises(ValueError):
        suggest_max_grad_norm(torch.tensor([]))
