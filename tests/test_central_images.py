"""DP central images (DP-FETA's warm-up): the release's sensitivity and noise, its accounting composed with the
DP-SGD steps, and the training script's use of it (report, budget guard, resume)."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import base_args, crash_after_checkpoints, script, train
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.optimize import brentq
from scipy.stats import norm

from dp_diffusers.data import DataError, augmented_copies
from dp_diffusers.privacy import (
    PrivacyBudget,
    PrivacyBudgetError,
    Release,
    calibrate_noise_multiplier,
    central_image_query,
    epsilon_for,
    release_central_images,
)

C = 3.0


def _digits(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1, torch.randint(0, 4, (n,), generator=generator)


def _query_vector(images, labels) -> torch.Tensor:
    sums, counts = central_image_query([(images, labels)], 4, C)
    return torch.cat([sums.flatten(), counts])


@pytest.mark.parametrize("label", [0, 3])
def test_one_enormous_example_moves_the_whole_release_by_at_most_sqrt2_times_the_norm(label):
    images, labels = _digits()
    huge = torch.ones(1, 1, 8, 8) * 1e6  # every pixel far above the range: clamped, then clipped to C
    with_it = _query_vector(torch.cat([images, huge]), torch.cat([labels, torch.tensor([label])]))
    moved = (with_it - _query_vector(images, labels)).norm().item()
    assert moved == pytest.approx(math.sqrt(2) * C, rel=1e-9)  # the bound is met with equality: sum C, count C
    faint = torch.full((1, 1, 8, 8), -0.99)  # norm far below C: the sum moves by its own norm, the count by C
    with_faint = _query_vector(torch.cat([images, faint]), torch.cat([labels, torch.tensor([label])]))
    assert (with_faint - _query_vector(images, labels)).norm().item() < math.sqrt(2) * C


def test_streamed_batches_give_the_one_batch_query_and_bad_input_is_refused():
    images, labels = _digits()
    whole = _query_vector(images, labels)
    sums, counts = central_image_query([(images[:7], labels[:7]), (images[7:], labels[7:])], 4, C)
    assert torch.allclose(torch.cat([sums.flatten(), counts]), whole)
    with pytest.raises(ValueError, match="labels must be in"):
        central_image_query([(images, labels + 4)], 4, C)
    with pytest.raises(ValueError, match="no image"):
        central_image_query([], 4, C)
    with pytest.raises(ValueError, match="noise_multiplier must be positive"):
        release_central_images([(images, labels)], 4, noise_multiplier=0, max_image_norm=C,
                               generator=torch.Generator())  # fmt: skip


def test_noise_has_std_sigma_times_the_sensitivity_on_every_coordinate():
    images, labels = _digits(n=12)
    sums, counts = central_image_query([(images, labels)], 4, C)
    sigma, generator = 0.7, torch.Generator().manual_seed(0)
    draws = [release_central_images([(images, labels)], 4, noise_multiplier=sigma, max_image_norm=C,
                                    generator=generator) for _ in range(400)]  # fmt: skip
    sum_noise = torch.stack([d.sums for d in draws]) - sums
    count_noise = (torch.stack([d.counts for d in draws]).double() - counts / C) * C
    expected = sigma * math.sqrt(2) * C
    noise = torch.cat([sum_noise.flatten(), count_noise.flatten()])
    assert noise.mean().abs().item() < 0.05 * expected
    assert noise.std().item() == pytest.approx(expected, rel=0.02)  # 102,400 draws: 0.4 % standard error
    means = draws[0].images
    assert means.shape == (4, 1, 8, 8) and means.min() >= -1 and means.max() <= 1


def _gaussian_mechanism_epsilon(sigma: float, delta: float) -> float:
    """The exact (epsilon, delta) curve of the Gaussian mechanism (Balle and Wang 2018, Theorem 8)."""

    def delta_of(eps: float) -> float:
        return norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)

    return brentq(lambda eps: delta_of(eps) - delta, 1e-9, 100)


@pytest.mark.parametrize("sigma", [1.0, 2.0, 5.0])
def test_the_release_alone_costs_the_gaussian_mechanisms_epsilon(sigma):
    exact = _gaussian_mechanism_epsilon(sigma, 1e-5)
    prv = epsilon_for(1.0, 0.1, 0, 1e-5, "prv", [Release(sigma)])
    assert exact <= prv <= exact + 0.02  # PRV: an upper bound, tight to its discretisation


def test_release_and_steps_compose_as_an_independent_rdp_recomputation():
    sigma_m, sigma, q, steps, delta = 2.0, 1.1, 0.1, 60, 1e-5
    budget = PrivacyBudget("rdp", sigma, q, delta, planned_steps=steps, releases=[Release(sigma_m)])
    for _ in range(steps):  # what opacus' optimizer hook does at every DP step
        budget.accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert budget.steps == steps
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))  # opacus' default orders
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders) + orders / (2 * sigma_m**2)
    independent, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert budget.epsilon() == pytest.approx(independent, rel=1e-9)
    alone = epsilon_for(sigma, q, steps, delta, "rdp")
    assert budget.epsilon() > alone and budget.release_epsilon() > 0


def test_calibration_and_the_step_limit_include_the_release():
    q, steps, delta, target = 0.1, 50, 1e-5, 8.0
    plain = calibrate_noise_multiplier(target, delta, q, steps)
    with_release = calibrate_noise_multiplier(target, delta, q, steps, releases=[Release(2.0)])
    assert with_release > plain
    assert target - 0.011 <= epsilon_for(with_release, q, steps, delta, releases=[Release(2.0)]) <= target
    budget = PrivacyBudget("prv", plain, q, delta, steps, target, releases=[Release(2.0)])
    assert budget.max_steps < steps  # plain's sigma spends the target without the release: fewer steps fit
    assert epsilon_for(plain, q, budget.max_steps, delta, releases=[Release(2.0)]) <= target
    assert epsilon_for(plain, q, budget.max_steps + 1, delta, releases=[Release(2.0)]) > target
    with pytest.raises(PrivacyBudgetError, match="after the other releases"):
        calibrate_noise_multiplier(0.5, delta, q, steps, releases=[Release(1.0)])  # the release alone spends 4.4


def test_a_checkpoint_resumes_only_with_the_same_releases():
    budget = PrivacyBudget("prv", 1.0, 0.1, 1e-5, 10, releases=[Release(2.0)])
    state = budget.state_dict()
    PrivacyBudget("prv", 1.0, 0.1, 1e-5, 10, releases=[Release(2.0)]).load_state_dict(state)
    for releases in ([], [Release(3.0)]):
        with pytest.raises(PrivacyBudgetError, match="releases"):
            PrivacyBudget("prv", 1.0, 0.1, 1e-5, 10, releases=releases).load_state_dict(state)
    old = {k: v for k, v in PrivacyBudget("prv", 1.0, 0.1, 1e-5, 10).state_dict().items() if k != "releases"}
    PrivacyBudget("prv", 1.0, 0.1, 1e-5, 10).load_state_dict(old)  # checkpoints written before releases existed


def test_augmented_copies_are_seeded_resized_and_stay_in_range():
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    a, b = augmented_copies(images, 5, 16, seed=0), augmented_copies(images, 5, 16, seed=0)
    assert a.shape == (15, 1, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1]) and a.min() >= -1 and a.max() <= 1


def test_default_release_size_follows_the_training_resolution_not_the_autoencoders():
    """The means are released at half the *training* resolution, with C half of sqrt(pixels): a base whose
    autoencoder says 256 but trains at 32 releases 16x16 means (not 128x128 ones, 64 times the pixels)."""
    from argparse import Namespace
    from types import SimpleNamespace

    def settings(resolution, max_norm):
        flags = Namespace(central_image_noise_multiplier=2.0, central_image_resolution=resolution,
                          central_image_max_norm=max_norm)  # fmt: skip
        chosen = script("train_dp_lora").central_image_settings(flags, vae, 32)
        return chosen.resolution, chosen.max_image_norm

    vae = SimpleNamespace(config=SimpleNamespace(in_channels=3, sample_size=256))
    assert settings(None, None) == (16, pytest.approx(0.5 * math.sqrt(3 * 16 * 16)))
    assert settings(4, 1.5) == (4, 1.5)


CENTRAL = {"--central_image_noise_multiplier": 2.0, "--central_image_copies": 4, "--warmup_steps": 3,
           "--warmup_batch_size": 20}


def test_the_script_charges_the_release_and_reports_it(tiny_base, tmp_path, monkeypatch):
    from dp_diffusers import warm_up as warm_up_module

    module = script("train_dp_lora")
    seen = {}
    real_release, real_fit = warm_up_module.release_central_images, warm_up_module.fit

    def release(batches, num_classes, **kwargs):
        batches = list(batches)
        seen["examples"] = sum(len(labels) for _, labels in batches)
        seen["shape"] = tuple(batches[0][0].shape[1:])
        seen["release"] = real_release(batches, num_classes, **kwargs)
        return seen["release"]

    def fit(model, optimizer, loader, loss_fn, steps, *args, **kwargs):
        seen.setdefault("fits", []).append((steps, len(loader.dataset)))
        return real_fit(model, optimizer, loader, loss_fn, steps, *args, **kwargs)

    monkeypatch.setattr(warm_up_module, "release_central_images", release)
    monkeypatch.setattr(warm_up_module, "fit", fit)
    out = tmp_path / "central"
    module.main([str(a) for a in base_args(tiny_base, out, **CENTRAL)])
    report = json.loads((out / "dp_report.json").read_text())
    assert seen["examples"] == 200 and seen["shape"] == (1, 8, 8)  # every private example, at half the resolution
    assert seen["fits"] == [(3, 40)]  # the warm-up: 4 augmented copies of each of the 10 class means
    assert seen["release"].noise_multiplier == 2.0
    [entry] = report["other_releases"]
    assert entry["noise_multiplier"] == 2.0 and entry["sample_rate"] == 1.0 and entry["resolution"] == 8
    assert entry["max_image_norm"] == 4.0 and entry["sensitivity"] == pytest.approx(4 * math.sqrt(2))
    assert entry["epsilon_alone"] == pytest.approx(epsilon_for(1, 1, 0, 1e-4, releases=[Release(2.0)]))
    releases = [Release(2.0)]
    assert report["epsilon"] == pytest.approx(epsilon_for(report["noise_multiplier"], 0.1, 4, 1e-4, releases=releases),
                                              rel=1e-6)  # fmt: skip
    assert report["epsilon"] <= report["target_epsilon"] == 10.0
    assert report["noise_multiplier"] > calibrate_noise_multiplier(10.0, 1e-4, 0.1, 4)  # sigma paid for the release
    card = (out / "README.md").read_text()
    assert "DP central images (per-class mean images by the Gaussian mechanism" in card
    assert f"ε {entry['epsilon_alone']:.2f} on its own" in card


def test_the_script_stops_before_the_target_counting_the_release_and_resumes_without_a_second_one(
    tiny_base, tmp_path, monkeypatch
):
    sigma, q, delta = 1.5, 0.1, 1e-4
    target = epsilon_for(sigma, q, 2, delta, releases=[Release(2.0)]) * 1.001  # the release and two steps fit
    out = tmp_path / "stopped"
    train(base_args(tiny_base, out, **CENTRAL, **{"--noise_multiplier": sigma, "--target_epsilon": target}))
    report = json.loads((out / "dp_report.json").read_text())
    assert report["steps"] == 2 and report["epsilon"] <= target

    module = script("train_dp_lora")
    crash_after_checkpoints(monkeypatch, module)
    resumed = tmp_path / "resumed"
    argv = base_args(tiny_base, resumed, **CENTRAL, **{"--checkpointing_steps": 2, "--noise_multiplier": 1.0})
    with pytest.raises(KeyboardInterrupt):
        module.main([str(a) for a in argv])
    calls = []
    module = script("train_dp_lora")
    from dp_diffusers import warm_up as warm_up_module

    monkeypatch.setattr(warm_up_module, "release_central_images", lambda *a, **k: calls.append(1))
    with pytest.raises(PrivacyBudgetError, match="releases"):  # resumed with another release: refused
        other = {**CENTRAL, "--central_image_noise_multiplier": 3.0}
        module.main([str(a) for a in base_args(tiny_base, resumed, **other, **{
            "--checkpointing_steps": 2, "--noise_multiplier": 1.0, "--resume_from_checkpoint": "latest"})])  # fmt: skip
    module.main([str(a) for a in [*argv, "--resume_from_checkpoint", "latest"]])
    assert calls == []  # the release is in the checkpoint's accountant and its warm-up in the weights: not redone
    report = json.loads((resumed / "dp_report.json").read_text())
    assert report["steps"] == 4 and report["noise_multiplier"] == 1.0
    assert report["epsilon"] == pytest.approx(epsilon_for(1.0, q, 4, delta, releases=[Release(2.0)]), rel=1e-6)


def test_central_images_on_a_text_base_or_without_dp_are_refused(tiny_sd_base, tiny_base, tmp_path):
    with pytest.raises(DataError, match="no classes to average"):
        train(base_args(tiny_sd_base, tmp_path / "sd", **CENTRAL, **{"--caption_template": "a photo of a {label}",
                                                                      "--noise_multiplier": 1.0}))  # fmt: skip
    with pytest.raises(SystemExit):
        train(base_args(tiny_base, tmp_path / "nodp", **CENTRAL, **{"--disable_dp": True}))
    assert not (tmp_path / "sd").exists() or not any((tmp_path / "sd").glob("*.safetensors"))
