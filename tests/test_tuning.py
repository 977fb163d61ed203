"""Private hyper-parameter selection (``dp-diffusers tune``; ``dp_diffusers.privacy.selection``): the tuned epsilon
against an independent recomputation of Papernot & Steinke's theorems, K's distribution, the score's sensitivity,
the search space, and the command end to end (only the winner released, K and the losers nowhere, resume)."""

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from dp_diffusers.privacy import Release
from dp_diffusers.privacy.selection import (
    ORDERS,
    REPEAT_DISTRIBUTIONS,
    RunSchedule,
    calibrate_tuning,
    repeat_gamma,
    run_event,
    run_rdp,
    sample_num_runs,
    tuned_epsilon,
)

SCHEDULES = [RunSchedule(1.1, 0.178, 85, (Release(2.0),)), RunSchedule(1.6, 0.178, 170, (Release(2.0),)),
             RunSchedule(0.9, 0.09, 40)]  # fmt: skip
SCORE_SIGMA, DELTA = 10.0, 1e-5


def rdp_curve(event) -> np.ndarray:
    accountant = rdp.RdpAccountant(list(ORDERS))
    accountant.compose(event)
    return np.asarray(accountant._rdp)


def theorem_2(orders: np.ndarray, curve: np.ndarray, mean: float, eta: float) -> np.ndarray:
    """PS22 Theorem 2 by hand (the reference note's formula): eps'(lambda) = eps(lambda) + (1 + eta)(1 - 1/lh)
    eps(lh) + (1 + eta) log(1/gamma) / lh + log(E[K]) / (lambda - 1), minimised over lh on the grid."""
    gamma = repeat_gamma(mean, eta)
    best = np.array([min(curve[i] + (1 + eta) * (1 - 1 / lh) * curve[j] + (1 + eta) * math.log(1 / gamma) / lh
                         + math.log(mean) / (lam - 1) for j, lh in enumerate(orders))
                     for i, lam in enumerate(orders)])  # fmt: skip
    return best


def theorem_6(orders: np.ndarray, curve: np.ndarray, mean: float) -> np.ndarray:
    """PS22 Theorem 6 by hand: eps'(lambda) = eps(lambda) + mu delta_hat + log(mu) / (lambda - 1), with eps_hat =
    log(lambda / (lambda - 1)) and delta_hat Q's own delta at eps_hat (read off its RDP curve)."""
    out = []
    for lam, eps in zip(orders, curve):
        eps_hat = math.log(lam / (lam - 1))
        delta_hat = rdp.compute_delta(orders, curve, eps_hat)[0]
        out.append(eps + mean * delta_hat + math.log(mean) / (lam - 1))
    return np.asarray(out)


@pytest.mark.parametrize("distribution", sorted(REPEAT_DISTRIBUTIONS))
@pytest.mark.parametrize("mean", [1.5, 3.0, 10.0])
def test_the_tuned_epsilon_is_an_independent_recomputation(distribution, mean):
    """The maximum of the candidates' curves (each from dp-accounting's own composition of the run's events), then
    the theorem by hand, then the usual conversion: at least as large as the library's value and within 2% of it
    (the library minimises more carefully; a smaller library value is the tighter, still valid, bound)."""
    orders = np.asarray(ORDERS)
    curve = np.max([rdp_curve(run_event(s, SCORE_SIGMA)) for s in SCHEDULES], axis=0)
    np.testing.assert_allclose(curve, run_rdp(SCHEDULES, SCORE_SIGMA), rtol=1e-10)
    shape = REPEAT_DISTRIBUTIONS[distribution]
    by_hand = theorem_6(orders, curve, mean) if math.isinf(shape) else theorem_2(orders, curve, mean, shape)
    expected = rdp.compute_epsilon(orders, by_hand, DELTA)[0]
    got = tuned_epsilon(SCHEDULES, SCORE_SIGMA, mean, distribution, DELTA)
    assert expected * 0.98 <= got <= expected * (1 + 1e-9)
    assert got > rdp.compute_epsilon(orders, curve, DELTA)[0]  # tuning costs more than one run


@pytest.mark.parametrize("distribution", sorted(REPEAT_DISTRIBUTIONS))
def test_one_schedule_equals_dp_accountings_repeat_and_select_event(distribution):
    shape = REPEAT_DISTRIBUTIONS[distribution]
    event = dp_event.RepeatAndSelectDpEvent(run_event(SCHEDULES[0], SCORE_SIGMA), 3.0, shape)
    accountant = rdp.RdpAccountant(list(ORDERS))
    accountant.compose(event)
    assert tuned_epsilon(SCHEDULES[:1], SCORE_SIGMA, 3.0, distribution, DELTA) == pytest.approx(
        accountant.get_epsilon(DELTA), rel=1e-12)


def test_published_figures_of_the_reference_note():
    """q 0.01, sigma 1, 2,000 steps, score sigma 20, E[K] 10 at delta 1e-5: logarithmic 4.70, geometric 5.47 (the
    note's fractional orders; ours are integers: within 1%)."""
    schedule = [RunSchedule(1.0, 0.01, 2000)]
    assert tuned_epsilon(schedule, 20.0, 10.0, "logarithmic", DELTA) == pytest.approx(4.70, rel=0.01)
    assert tuned_epsilon(schedule, 20.0, 10.0, "geometric", DELTA) == pytest.approx(5.47, rel=0.01)


@pytest.mark.parametrize("distribution", sorted(REPEAT_DISTRIBUTIONS))
def test_k_has_the_requested_mean(distribution):
    rng = np.random.default_rng(0)
    draws = np.array([sample_num_runs(3.0, distribution, rng) for _ in range(20000)])
    assert abs(draws.mean() - 3.0) < 0.1
    assert draws.min() >= (0 if distribution == "poisson" else 1)


def test_calibration_meets_the_total_and_bad_settings_are_refused():
    templates = [RunSchedule(math.nan, s.sample_rate, s.steps, s.other_releases) for s in SCHEDULES[:2]]
    schedules = calibrate_tuning(templates, SCORE_SIGMA, 3.0, "logarithmic", 10.0, DELTA)
    total = tuned_epsilon(schedules, SCORE_SIGMA, 3.0, "logarithmic", DELTA)
    assert 9.9 <= total <= 10.0
    assert schedules[1].noise_multiplier > schedules[0].noise_multiplier  # twice the steps: more noise
    from dp_diffusers.privacy import PrivacyBudgetError

    with pytest.raises(PrivacyBudgetError, match="cannot be met"):
        calibrate_tuning(templates, 0.05, 3.0, "logarithmic", 1.0, DELTA)  # the score alone spends more
    with pytest.raises(ValueError, match="E\\[K\\]"):
        tuned_epsilon(SCHEDULES, SCORE_SIGMA, 0.5, "logarithmic", DELTA)
    with pytest.raises(ValueError, match="repeat_distribution"):
        tuned_epsilon(SCHEDULES, SCORE_SIGMA, 2.0, "uniform", DELTA)
