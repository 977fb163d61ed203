"""Private hyper-parameter selection (Papernot & Steinke, ICLR 2022, "Hyperparameter Tuning with Renyi
Differential Privacy"): run a DP training run a random number K of times, each with hyper-parameters drawn from a
fixed space, score each run with a DP score on a private validation split, release only the best.

The mechanism Q of one run: draw a candidate from the space (independently of the data), train with DP-SGD (its
steps, and its other releases such as the DP central images), and release (adapter, noisy score). The score is a sum
over validation units with per-unit sensitivity ``score_sensitivity`` plus Gaussian noise of std ``sigma_s *
sensitivity``; training and validation rows are disjoint, but the score's RDP is still *added* to the run's
(sequential composition: valid whatever the split). A run that draws its candidate at random has, at every RDP order,
at most the largest RDP of the candidates' schedules (a mixture of mechanisms is no worse than its worst component),
so Q's RDP curve is the per-order maximum over the privacy-relevant combinations (``RunSchedule``s, listed in the
report: they follow from the space and N, public).

Guarantee: with K drawn independently of the data from the truncated negative binomial (``logarithmic``: eta = 0;
``geometric``: eta = 1) or the Poisson distribution with mean ``expected_runs``, and only the best (adapter, score)
released (ties broken by run order, which is data-independent), the whole procedure is (lambda, eps')-RDP with eps'
from PS22 Theorem 2 (truncated negative binomial) or Theorem 6 (Poisson), computed by dp-accounting's RDP accountant
(``RepeatAndSelectDpEvent``'s rule), and converted to (epsilon, delta) once at the end. The theorems also require
that K, the other runs and their scores are never released: not in the report, the card, the Hub or a tracker.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from .accounting import PrivacyBudgetError, Release

#: ``--repeat_distribution``: the shape of the distribution of K in dp-accounting's ``RepeatAndSelectDpEvent``
REPEAT_DISTRIBUTIONS = {"logarithmic": 0.0, "geometric": 1.0, "poisson": math.inf}
#: RDP orders: integers (dp-accounting computes them in closed form; its series at fractional orders below 2 fail to
#: converge at small sigma), dense up to 64 and sparser up to 1024 for small deltas
ORDERS = tuple(float(order) for order in [*range(2, 65), 72, 80, 96, 112, 128, 160, 192, 256, 384, 512, 1024])


@dataclass(frozen=True)
class RunSchedule:
    """What one run spends, for one combination of the privacy-relevant hyper-parameters: DP-SGD ``steps`` at
    ``noise_multiplier`` and ``sample_rate``, and its other releases (e.g. the DP central images)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    other_releases: tuple[Release, ...] = field(default=())

    def to_dict(self) -> dict:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": self.steps,
                "other_releases": [r._asdict() for r in self.other_releases]}  # fmt: skip


def _gaussian(noise_multiplier: float, sample_rate: float) -> dp_event.DpEvent:
    gaussian = dp_event.GaussianDpEvent(noise_multiplier)
    return gaussian if sample_rate >= 1.0 else dp_event.PoissonSampledDpEvent(sample_rate, gaussian)


def run_event(schedule: RunSchedule, score_noise_multiplier: float) -> dp_event.DpEvent:
    """One run as a dp-accounting event: its steps, its other releases and its score's Gaussian mechanism."""
    parts = [dp_event.SelfComposedDpEvent(_gaussian(schedule.noise_multiplier, schedule.sample_rate), schedule.steps)]
    parts += [dp_event.SelfComposedDpEvent(_gaussian(r.noise_multiplier, r.sample_rate), r.count)
              for r in schedule.other_releases]  # fmt: skip
    parts.append(dp_event.GaussianDpEvent(score_noise_multiplier))
    return dp_event.ComposedDpEvent(parts)


@functools.lru_cache(maxsize=1024)
def _mechanism_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP at ``ORDERS`` of one (Poisson-subsampled) Gaussian mechanism, by dp-accounting (cached: calibration asks
    for the same mechanisms many times)."""
    accountant = rdp.RdpAccountant(list(ORDERS))
    accountant.compose(_gaussian(noise_multiplier, sample_rate))
    return np.asarray(accountant._rdp)  # dp-accounting keeps the curve there; no public getter


def run_rdp(schedules: Sequence[RunSchedule], score_noise_multiplier: float) -> np.ndarray:
    """RDP of one run at ``ORDERS``, the per-order maximum over the candidates' schedules; a run's is the sum of its
    parts' (RDP composes additively: what dp-accounting's ``run_event`` composition computes, tested)."""
    curves = []
    for schedule in schedules:
        curve = schedule.steps * _mechanism_rdp(schedule.noise_multiplier, schedule.sample_rate)
        for release in schedule.other_releases:
            curve = curve + release.count * _mechanism_rdp(release.noise_multiplier, release.sample_rate)
        curves.append(curve + _mechanism_rdp(score_noise_multiplier, 1.0))
    return np.max(curves, axis=0)


def tuned_epsilon(
    schedules: Sequence[RunSchedule], score_noise_multiplier: float, expected_runs: float, distribution: str,
    delta: float,
) -> float:  # fmt: skip
    """Epsilon at ``delta`` of the whole tuning: K ~ ``distribution`` with mean ``expected_runs`` runs of the worst
    schedule, only the best released (PS22 Theorems 2 and 6, dp-accounting's implementation)."""
    check_tuning(expected_runs, distribution)
    shape = REPEAT_DISTRIBUTIONS[distribution]
    # dp-accounting's handler of RepeatAndSelectDpEvent applied to the maximum curve (its public event takes one
    # inner event; the maximum over candidates is not one): the same function, tested equal for one schedule
    curve = rdp._compute_rdp_repeat_and_select(list(ORDERS), run_rdp(schedules, score_noise_multiplier),
                                               expected_runs, shape)  # fmt: skip
    return float(rdp.compute_epsilon(list(ORDERS), curve, delta)[0])


def run_epsilon(schedules: Sequence[RunSchedule], score_noise_multiplier: float, delta: float) -> float:
    """Epsilon at ``delta`` of one run of the worst schedule (what a single run spends, score included)."""
    return float(rdp.compute_epsilon(list(ORDERS), run_rdp(schedules, score_noise_multiplier), delta)[0])


def check_tuning(expected_runs: float, distribution: str) -> None:
    if distribution not in REPEAT_DISTRIBUTIONS:
        raise ValueError(f"--repeat_distribution must be one of {sorted(REPEAT_DISTRIBUTIONS)}, got {distribution!r}")
    if not expected_runs >= 1:
        raise ValueError(f"--expected_runs is E[K] and must be >= 1, got {expected_runs}")


def _truncated_negative_binomial_mean(gamma: float, eta: float) -> float:
    """E[K] of PS22's D_{eta, gamma} (Def. 1): eta (1 - gamma) / (gamma (1 - gamma^eta)); eta = 0: the limit
    (1 / gamma - 1) / log(1 / gamma)."""
    if eta == 0:
        return (1 / gamma - 1) / math.log(1 / gamma)
    return eta * (1 - gamma) / (gamma * (1 - gamma**eta))


def repeat_gamma(expected_runs: float, eta: float) -> float:
    """The gamma in (0, 1) of D_{eta, gamma} with mean ``expected_runs`` (bisection: the mean falls as gamma
    grows)."""
    if expected_runs == 1:
        return 1.0
    low, high = 1e-12, 1.0 - 1e-12
    for _ in range(200):
        middle = (low + high) / 2
        if _truncated_negative_binomial_mean(middle, eta) > expected_runs:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def sample_num_runs(expected_runs: float, distribution: str, rng: np.random.Generator) -> int:
    """K, drawn from ``rng`` (a secret generator: K is never released): logarithmic ``logseries(1 - gamma)``,
    geometric ``geometric(gamma)`` (support 1, 2, ...; TF Privacy's sampling) or ``poisson(expected_runs)`` (0
    possible: then nothing is released)."""
    check_tuning(expected_runs, distribution)
    if distribution == "poisson":
        return int(rng.poisson(expected_runs))
    gamma = repeat_gamma(expected_runs, REPEAT_DISTRIBUTIONS[distribution])
    if gamma >= 1.0:
        return 1
    if distribution == "geometric":
        return int(rng.geometric(gamma))
    return int(rng.logseries(1.0 - gamma))


def noisy_score(total: float, sensitivity: float, score_noise_multiplier: float, rng: np.random.Generator) -> float:
    """The Gaussian mechanism on a validation sum: ``total + N(0, (score_noise_multiplier * sensitivity)^2)``,
    drawn from ``rng`` (secret)."""
    if score_noise_multiplier <= 0:
        raise PrivacyBudgetError(f"The score's noise multiplier must be > 0, got {score_noise_multiplier}.")
    return float(total + rng.normal(0.0, score_noise_multiplier * sensitivity))


#: the largest noise multiplier calibration tries (as ``accounting.MAX_NOISE_MULTIPLIER``)
MAX_NOISE_MULTIPLIER = 50.0


def calibrate_tuning(
    templates: Sequence[RunSchedule], score_noise_multiplier: float, expected_runs: float, distribution: str,
    target_epsilon: float, delta: float,
) -> list[RunSchedule]:  # fmt: skip
    """Each combination's noise multiplier (``templates`` with ``noise_multiplier`` NaN; a given one is kept) so that
    the whole tuning spends at most ``target_epsilon`` at ``delta``: every calibrated combination spends the same
    per-run epsilon (its own RDP, converted at ``delta``), the largest for which the tuned total fits (bisection)."""
    check_tuning(expected_runs, distribution)
    if target_epsilon <= 0:
        raise PrivacyBudgetError(f"target_epsilon must be positive, got {target_epsilon}.")

    def sigma_for(template: RunSchedule, per_run: float) -> float:
        if not math.isnan(template.noise_multiplier):
            return template.noise_multiplier
        low, high = 0.05, MAX_NOISE_MULTIPLIER  # run epsilon falls as sigma grows
        if run_epsilon([_with(template, high)], score_noise_multiplier, delta) > per_run:
            return math.inf
        while high - low > 1e-4 * high:
            middle = (low + high) / 2
            if run_epsilon([_with(template, middle)], score_noise_multiplier, delta) <= per_run:
                high = middle
            else:
                low = middle
        return high

    def schedules_at(per_run: float) -> list[RunSchedule] | None:
        schedules = [_with(t, sigma_for(t, per_run)) for t in templates]
        return None if any(math.isinf(s.noise_multiplier) for s in schedules) else schedules

    def fits(schedules: list[RunSchedule] | None) -> bool:
        return schedules is not None and tuned_epsilon(schedules, score_noise_multiplier, expected_runs,
                                                       distribution, delta) <= target_epsilon  # fmt: skip

    low, high = 0.0, target_epsilon  # a run alone never spends more than the whole tuning
    best = None
    for _ in range(30):
        middle = (low + high) / 2
        schedules = schedules_at(middle)
        if fits(schedules):
            low, best = middle, schedules
        else:
            high = middle
        if best is not None and high - low < 0.01:
            break
    if best is None:
        raise PrivacyBudgetError(
            f"target_epsilon={target_epsilon} cannot be met by the tuning at delta={delta} with E[K]={expected_runs} "
            f"({distribution}): even noise_multiplier={MAX_NOISE_MULTIPLIER:g} for every run, with the score's noise "
            f"multiplier {score_noise_multiplier:g} and any given noise, spends more. Fewer steps or runs, more "
            "score noise, or a larger target."
        )
    return best


def _with(template: RunSchedule, noise_multiplier: float) -> RunSchedule:
    return RunSchedule(noise_multiplier, template.sample_rate, template.steps, template.other_releases)
