"""Privacy accounting: noise calibration, the budget guard, and checks on (epsilon, delta).

Guarantee: every optimizer step on private data is one Poisson-subsampled Gaussian mechanism
(sample rate ``q``, noise multiplier ``sigma``, sensitivity ``max_grad_norm``), recorded in an
opacus accountant (PRV by default, RDP optional). ``PrivacyBudget`` refuses the step that would
take epsilon past ``target_epsilon``; its state travels with every checkpoint, so a resumed run
continues from the budget already spent.
"""

from __future__ import annotations

from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("prv", "rdp")
# Beyond this noise multiplier the update is noise; opacus' own search goes to 2,000+ and the PRV
# accountant becomes very slow there, so an unreachable target is reported from here instead.
MAX_NOISE_MULTIPLIER = 50.0


class PrivacyBudgetError(ValueError):
    """The requested privacy budget cannot be met with the given schedule."""


def check_delta(delta: float, dataset_size: int) -> None:
    """delta must be in (0, 1/N): a delta of 1/N allows releasing one whole example."""
    if not 0 < delta < 1:
        raise PrivacyBudgetError(f"target_delta must be in (0, 1), got {delta}.")
    if delta >= 1.0 / dataset_size:
        raise PrivacyBudgetError(
            f"target_delta={delta} is not below 1/N = 1/{dataset_size} = {1.0 / dataset_size:.3g}: such a delta "
            f"permits leaking a whole training example. Use delta well below 1/N, e.g. {0.1 / dataset_size:.1e}."
        )


def epsilon_for(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """Epsilon after ``steps`` Poisson-subsampled Gaussian steps (0 for no step)."""
    if steps <= 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """Smallest noise multiplier (to opacus' 0.01 epsilon tolerance) whose epsilon after ``steps``
    steps is at most ``target_epsilon``."""
    if target_epsilon <= 0:
        raise PrivacyBudgetError(f"target_epsilon must be positive, got {target_epsilon}.")
    floor = epsilon_for(MAX_NOISE_MULTIPLIER, sample_rate, steps, delta, accountant)
    if floor > target_epsilon:
        raise PrivacyBudgetError(
            f"target_epsilon={target_epsilon} cannot be reached at delta={delta} with {steps} steps at sample rate "
            f"{sample_rate:.4g}: even noise_multiplier={MAX_NOISE_MULTIPLIER:g} spends epsilon={floor:.3g}. Train "
            "fewer steps or epochs, use a smaller batch, or raise target_epsilon."
        )
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as err:
        raise PrivacyBudgetError(
            f"target_epsilon={target_epsilon} cannot be reached at delta={delta} with {steps} steps at sample rate "
            f"{sample_rate:.4g} (opacus: {err}). Train fewer steps or epochs, use a smaller batch, or raise "
            "target_epsilon."
        ) from err


def max_steps_within_budget(
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    target_epsilon: float,
    upper: int,
    accountant: str = "prv",
) -> int:
    """Largest number of steps ``n <= upper`` with epsilon(n) <= target_epsilon (binary search;
    epsilon grows with the number of steps)."""
    if epsilon_for(noise_multiplier, sample_rate, upper, delta, accountant) <= target_epsilon:
        return upper
    low, high = 0, upper  # eps(low) <= target < eps(high)
    while high - low > 1:
        mid = (low + high) // 2
        if epsilon_for(noise_multiplier, sample_rate, mid, delta, accountant) <= target_epsilon:
            low = mid
        else:
            high = mid
    return low


class PrivacyBudget:
    """The opacus accountant of a run, its step limit, and the epsilon history for the report.

    ``steps`` is read from the accountant's history, so the step count and the privacy spent can
    never disagree; ``can_step()`` is False once one more step would exceed ``target_epsilon``.
    """

    def __init__(
        self,
        accountant: str,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        planned_steps: int,
        target_epsilon: float | None = None,
    ):
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.accountant_name = accountant
        self.accountant = create_accountant(mechanism=accountant)
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.target_epsilon = target_epsilon
        self.planned_steps = planned_steps
        self.max_steps = (
            planned_steps
            if target_epsilon is None
            else max_steps_within_budget(
                noise_multiplier, sample_rate, delta, target_epsilon, planned_steps, accountant
            )
        )
        self.epsilon_history: list[list[float]] = []

    @property
    def steps(self) -> int:
        return int(sum(entry[-1] for entry in self.accountant.history))

    def can_step(self) -> bool:
        return self.steps < self.max_steps

    def epsilon(self) -> float:
        """Epsilon spent so far (the PRV accountant's upper bound)."""
        if self.steps == 0:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.delta))

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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("noise_multiplier", "sample_rate", "delta"):
            if abs(float(state[key]) - float(getattr(self, key))) > 1e-12 * max(1.0, abs(float(state[key]))):
                raise PrivacyBudgetError(
                    f"The checkpoint was trained with {key}={state[key]}, this run has {getattr(self, key)}: "
                    "resuming would mis-account the budget. Resume with the original settings."
                )
        self.accountant.load_state_dict(state["accountant"])
        self.epsilon_history = [list(x) for x in state["epsilon_history"]]
