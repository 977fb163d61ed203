"""Accounting is computed once per schedule: the cached epsilon (``epsilon_for``, ``PrivacyBudget.epsilon``, the
memoised RDP of one step inside opacus' PRV domain bound) equals what an uncached opacus accountant computes from the
same history, for several schedules, releases and both accountants."""

import pytest
from opacus.accountants import create_accountant
from opacus.accountants.analysis import rdp as opacus_rdp

from dp_diffusers.privacy import PrivacyBudget, Release, calibrate_noise_multiplier, epsilon_for

SCHEDULES = [  # sigma, q, steps, releases
    (1.1, 64 / 1437, 180, ()),
    (0.8, 0.01, 1000, ()),
    (1.124, 0.178, 85, (Release(2.0),)),
    (2.5, 0.5, 7, (Release(5.0), Release(3.0, 0.1, 4))),
]


def uncached_epsilon(monkeypatch, accountant: str, history: list, delta: float) -> float:
    """A fresh opacus accountant, stepped as the DP optimizer's hook steps it, with opacus' own RDP function."""
    with monkeypatch.context() as patch:
        patch.setattr(opacus_rdp, "_compute_rdp", opacus_rdp._compute_rdp.__wrapped__)
        acc = create_accountant(mechanism=accountant)
        for sigma, q, count in history:
            for _ in range(count):
                acc.step(noise_multiplier=sigma, sample_rate=q)
        return float(acc.get_epsilon(delta=delta))


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("sigma,q,steps,releases", SCHEDULES)
def test_the_cached_epsilon_is_the_uncached_accountants(monkeypatch, accountant, sigma, q, steps, releases):
    delta = 1e-5
    expected = uncached_epsilon(monkeypatch, accountant, [*releases, (sigma, q, steps)], delta)
    assert epsilon_for(sigma, q, steps, delta, accountant, releases) == pytest.approx(expected, rel=1e-9)
    budget = PrivacyBudget(accountant, sigma, q, delta, steps, releases=releases)
    for _ in range(steps):  # as the optimizer's step hook does
        budget.accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert budget.steps == steps and budget.epsilon() == pytest.approx(expected, rel=1e-9)
    assert budget.record() == pytest.approx(expected, rel=1e-9)


def test_calibration_pays_each_schedule_once():
    """Calibrating twice, and then the budget's step limit at the calibrated sigma, compute no epsilon anew."""
    from dp_diffusers.privacy import accounting

    calibrate_noise_multiplier(3.0, 1e-5, 0.02, 300)
    before = accounting._epsilon.cache_info()
    sigma = calibrate_noise_multiplier(3.0, 1e-5, 0.02, 300)
    budget = PrivacyBudget("prv", sigma, 0.02, 1e-5, 300, target_epsilon=3.0)
    after = accounting._epsilon.cache_info()
    assert budget.max_steps == 300 and after.misses == before.misses and after.hits > before.hits
