"""Privacy accounting: noise calibration, the budget guard, and checks on (epsilon, delta).

Guarantee: every optimizer step on private data is one Poisson-subsampled Gaussian mechanism
(sample rate ``q``, noise multiplier ``sigma``, sensitivity ``max_grad_norm``), recorded in an
opacus accountant (PRV by default, RDP optional). Any other release of the run (the central images'
Gaussian mechanism) is a ``Release`` charged to the same accountant before the first step, and the
calibration, the step limit and epsilon all compose it with the steps (heterogeneous composition).
``PrivacyBudget`` refuses the step that would take epsilon past ``target_epsilon``; its state travels
with every checkpoint, so a resumed run continues from the budget already spent.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.analysis import rdp as _opacus_rdp

ACCOUNTANTS = ("prv", "rdp")
# Beyond this noise multiplier the update is noise; opacus' own search goes to 2,000+ and the PRV
# accountant becomes very slow there, so an unreachable target is reported from here instead.
MAX_NOISE_MULTIPLIER = 50.0


# Epsilon is a function of the schedule alone (sigma, q, steps, releases, delta), never of the data, so it is
# computed once per schedule (``epsilon_for``'s cache) and its costliest part is memoised: opacus' PRV accountant
# bounds its domain with the RDP of one step at ~60 orders, fractional ones by series (``_compute_rdp``, ~0.1 s), on
# every epsilon; that RDP depends on (q, sigma, order) only. opacus has no cache of its own; its module-level function
# is replaced by the same function behind ``functools.lru_cache`` (pure floats in and out: the values are identical,
# tested against an uncached accountant).
if not hasattr(_opacus_rdp._compute_rdp, "cache_info"):
    _opacus_rdp._compute_rdp = functools.lru_cache(maxsize=65536)(_opacus_rdp._compute_rdp)


class PrivacyBudgetError(ValueError):
    """The requested privacy budget cannot be met with the given schedule."""


class Release(NamedTuple):
    """A Gaussian mechanism run ``count`` times outside DP-SGD, in opacus' history format: noise std /
    sensitivity, the probability that an example takes part (1.0: the whole data set), and how many times."""

    noise_multiplier: float
    sample_rate: float = 1.0
    count: int = 1


def check_delta(delta: float, dataset_size: int, unit: str = "example") -> None:
    """delta must be in (0, 1/N), N the number of privacy units (examples, or e.g. people): a delta of 1/N allows
    releasing one whole unit."""
    if not 0 < delta < 1:
        raise PrivacyBudgetError(f"target_delta must be in (0, 1), got {delta}.")
    if delta >= 1.0 / dataset_size:
        raise PrivacyBudgetError(
            f"target_delta={delta} is not below 1/N = 1/{dataset_size} = {1.0 / dataset_size:.3g} (N: {unit}s): "
            f"such a delta permits leaking a whole training {unit}. Use delta well below 1/N, e.g. "
            f"{0.1 / dataset_size:.1e}."
        )


def _log_expm1(x: float) -> float:
    """log(e^x - 1) for x > 0, without overflow."""
    return x + math.log(-math.expm1(-x))


def group_privacy_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, group_size: int,
    releases: Sequence[Release] = (),
) -> float:  # fmt: skip
    """Epsilon at ``delta`` for a group of ``group_size`` examples (a person with m examples) of an example-level
    run, by group privacy (Vadhan 2017, Lemma 2.2, as TensorFlow Privacy's ``compute_dp_sgd_privacy_statement``
    computes it over RDP): every (eps, delta_ex) the run satisfies gives (m * eps, delta_ex * (e^{m eps} - 1) /
    (e^{eps} - 1)) for the group; the smallest m * eps whose group delta is at most ``delta`` (over delta_ex from
    ``delta`` down to ``delta * e^-300``; ``inf`` when none is). RDP curves over opacus' orders and 64 .. 255."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    history = _history(noise_multiplier, sample_rate, steps, releases)
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    orders = [*RDPAccountant.DEFAULT_ALPHAS, *range(64, 256)]  # opacus' orders, and larger ones for small deltas
    rdp = sum(np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=orders)) for sigma, q, n in history)

    def epsilon(log_delta: float) -> float:
        return float(get_privacy_spent(orders=orders, rdp=rdp, delta=math.exp(log_delta))[0])

    if group_size == 1:
        return epsilon(math.log(delta))
    best = math.inf
    for log_delta_example in np.linspace(math.log(delta), math.log(delta) - 300.0, 601):
        eps = epsilon(float(log_delta_example))
        log_group_delta = log_delta_example + (_log_expm1(group_size * eps) - _log_expm1(eps) if eps > 0 else
                                               math.log(group_size))  # fmt: skip
        if log_group_delta <= math.log(delta):
            best = min(best, group_size * eps)
    return best


def _history(
    noise_multiplier: float, sample_rate: float, steps: int, releases: Sequence[Release]
) -> list[tuple[float, float, int]]:
    return [*map(tuple, releases), *([(noise_multiplier, sample_rate, steps)] if steps > 0 else [])]


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv",
                releases: Sequence[Release] = ()) -> float:  # fmt: skip
    """Epsilon after ``releases`` and ``steps`` Poisson-subsampled Gaussian steps (0 for nothing at all); computed
    once per schedule (a cache: calibration, the step limit, the progress bar, the history and the report ask for
    the same schedules)."""
    return _epsilon(float(noise_multiplier), float(sample_rate), int(steps), float(delta), accountant,
                    tuple(Release(*release) for release in releases))  # fmt: skip


@functools.lru_cache(maxsize=4096)
def _epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str, releases: tuple
) -> float:  # fmt: skip
    history = _history(noise_multiplier, sample_rate, steps, releases)
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = history
    # opacus' PRV evaluates log(1 - q) on both branches of an np.where: at q = 1 (a release over the whole data
    # set) that is a harmless divide-by-zero warning; the result is the Gaussian mechanism's (tested).
    with np.errstate(divide="ignore"):
        epsilon = float(acc.get_epsilon(delta=delta))
    if accountant == "prv":
        _evict_fft_plans()
    return epsilon


def _evict_fft_plans() -> None:
    """Push the PRV accountant's FFT plans out of scipy.fft's plan cache. pocketfft keeps the last 16 plans of each
    transform type, with no API to clear them; the PRV's domains (10^5-10^6 points, a new size for every schedule)
    left ~100 MiB resident after a calibration, the largest part of a DP run's extra peak memory. Tiny transforms
    of 16 other sizes take their places."""
    from scipy.fft import irfft, rfft

    for n in range(2, 18):
        irfft(rfft(np.ones(n)), n)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    releases: Sequence[Release] = (),
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``, opacus' default) whose epsilon after ``releases`` and
    ``steps`` steps is at most ``target_epsilon`` (bisection, as opacus' ``get_noise_multiplier``, which cannot
    compose other releases)."""
    if target_epsilon <= 0:
        raise PrivacyBudgetError(f"target_epsilon must be positive, got {target_epsilon}.")

    def eps(sigma: float) -> float:
        return epsilon_for(sigma, sample_rate, steps, delta, accountant, releases)

    spent = epsilon_for(1.0, sample_rate, 0, delta, accountant, releases)
    floor = eps(MAX_NOISE_MULTIPLIER)
    if floor > target_epsilon:
        before = f" after the other releases (alone epsilon={spent:.3g})" if releases else ""
        raise PrivacyBudgetError(
            f"target_epsilon={target_epsilon} cannot be reached at delta={delta} with {steps} steps at sample rate "
            f"{sample_rate:.4g}{before}: even noise_multiplier={MAX_NOISE_MULTIPLIER:g} spends epsilon={floor:.3g}. "
            "Train fewer steps or epochs, use a smaller batch, add noise to the other releases, or raise "
            "target_epsilon."
        )
    low, high = 0.0, 10.0
    while eps(high) > target_epsilon:
        low, high = high, min(2 * high, MAX_NOISE_MULTIPLIER)
    while True:  # eps(high) <= target < eps(low) (eps(0) is infinite)
        mid = (low + high) / 2
        current = eps(mid)
        if current <= target_epsilon:
            high = mid
            if target_epsilon - current <= epsilon_tolerance:
                return high
        else:
            low = mid
        if high - low < 1e-6:
            return high


def max_steps_within_budget(noise_multiplier: float, sample_rate: float, delta: float, target_epsilon: float,
                            upper: int, accountant: str = "prv", releases: Sequence[Release] = ()) -> int:  # fmt: skip
    """Largest number of steps ``n <= upper`` with epsilon(releases + n steps) <= target_epsilon (binary search;
    epsilon grows with the number of steps)."""

    def eps(steps: int) -> float:
        return epsilon_for(noise_multiplier, sample_rate, steps, delta, accountant, releases)

    if eps(upper) <= target_epsilon:
        return upper
    if eps(0) > target_epsilon:
        return 0
    low, high = 0, upper  # eps(low) <= target < eps(high)
    while high - low > 1:
        mid = (low + high) // 2
        if eps(mid) <= target_epsilon:
            low = mid
        else:
            high = mid
    return low


#: ``PrivacyBudget.privacy_unit`` of an example-level run (the number of examples unknown)
EXAMPLE_LEVEL: dict[str, Any] = {"privacy_unit": None, "num_privacy_units": None, "max_examples_per_unit": None}


def _unit_text(unit: dict[str, Any]) -> str:
    count = "" if unit["num_privacy_units"] is None else f"{unit['num_privacy_units']} "
    if unit["privacy_unit"] is None:
        return f"{count}examples"
    cap = unit["max_examples_per_unit"]
    return f"{count}privacy units of column {unit['privacy_unit']!r} (at most {cap} examples a step)"


class PrivacyBudget:
    """The opacus accountant of a run, its step limit, and the epsilon history for the report.

    ``releases`` (the run's other Gaussian mechanisms, e.g. the central images) are charged to the accountant at
    construction, before any of them or any step runs, and count in every epsilon and in the step limit.
    ``steps`` is read from the accountant's history (minus the releases), so the step count and the privacy spent
    can never disagree; ``can_step()`` is False once one more step would exceed ``target_epsilon``.

    ``privacy_unit`` says what epsilon is about: ``{"privacy_unit": column or None (an example), "num_privacy_units":
    N, "max_examples_per_unit": cap or None}``. It travels with the state: a checkpoint resumes only as a run of the
    same unit (an example-level run resumed as a user-level one would claim per-person epsilon for per-example
    steps).
    """

    def __init__(
        self,
        accountant: str,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        planned_steps: int,
        target_epsilon: float | None = None,
        releases: Sequence[Release] = (),
        privacy_unit: dict[str, Any] | None = None,
    ):
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.accountant_name = accountant
        self.accountant = create_accountant(mechanism=accountant)
        self.releases = [Release(*release) for release in releases]
        self.accountant.history = [tuple(release) for release in self.releases]
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.target_epsilon = target_epsilon
        self.planned_steps = planned_steps
        self.max_steps = (
            planned_steps
            if target_epsilon is None
            else max_steps_within_budget(
                noise_multiplier, sample_rate, delta, target_epsilon, planned_steps, accountant, self.releases
            )
        )
        self.epsilon_history: list[list[float]] = []
        self.privacy_unit = {**EXAMPLE_LEVEL, **(privacy_unit or {})}

    @property
    def steps(self) -> int:
        """DP-SGD steps taken (opacus may merge an equal release into the steps' history entry: counts, not
        entries, are subtracted)."""
        total = sum(int(entry[-1]) for entry in self.accountant.history)
        return total - sum(release.count for release in self.releases)

    def can_step(self) -> bool:
        return self.steps < self.max_steps

    def epsilon(self) -> float:
        """Epsilon spent so far, releases included (the accountant's upper bound): its history is the releases and
        ``steps`` steps at (sigma, q), the schedule ``epsilon_for`` computes (once)."""
        return epsilon_for(self.noise_multiplier, self.sample_rate, self.steps, self.delta, self.accountant_name,
                           self.releases)  # fmt: skip

    def release_epsilon(self) -> float:
        """What the releases alone spend (0 without any)."""
        return epsilon_for(1.0, 1.0, 0, self.delta, self.accountant_name, self.releases)

    def record(self) -> float:
        """Append ``[step, epsilon]`` to the history and return epsilon."""
        eps = self.epsilon()
        if not self.epsilon_history or self.epsilon_history[-1][0] != self.steps:
            self.epsilon_history.append([self.steps, eps])
        return eps

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant.state_dict(),
            "epsilon_history": list(self.epsilon_history),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "releases": [list(release) for release in self.releases],
            "privacy_unit": dict(self.privacy_unit),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("noise_multiplier", "sample_rate", "delta"):
            if abs(float(state[key]) - float(getattr(self, key))) > 1e-12 * max(1.0, abs(float(state[key]))):
                raise PrivacyBudgetError(
                    f"The checkpoint was trained with {key}={state[key]}, this run has {getattr(self, key)}: "
                    "resuming would mis-account the budget. Resume with the original settings."
                )
        saved = [Release(*release) for release in state.get("releases", [])]  # checkpoints before releases: none
        if saved != self.releases:
            raise PrivacyBudgetError(
                f"The checkpoint's run made the releases {saved}, this run declares {self.releases}: resuming would "
                "mis-account the budget. Resume with the original central-image settings."
            )
        saved_unit = {**EXAMPLE_LEVEL, **state.get("privacy_unit", {})}  # checkpoints before units: example-level
        compared = ("privacy_unit", "max_examples_per_unit") if saved_unit["num_privacy_units"] is None else tuple(
            EXAMPLE_LEVEL)  # fmt: skip
        if any(saved_unit[key] != self.privacy_unit[key] for key in compared):
            raise PrivacyBudgetError(
                f"The checkpoint's epsilon is about {_unit_text(saved_unit)}, this run's would be about "
                f"{_unit_text(self.privacy_unit)}: resuming would claim a guarantee the spent steps do not have. "
                "Resume with the original --privacy_unit_column, --max_examples_per_unit and data."
            )
        self.accountant.load_state_dict(state["accountant"])
        self.epsilon_history = [list(x) for x in state["epsilon_history"]]
