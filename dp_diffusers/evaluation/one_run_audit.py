"""One-run privacy audit (Steinke, Nasr & Jagielski, NeurIPS 2023, "Privacy Auditing with One (1) Training Run",
Algorithm 1): an empirical lower bound on epsilon from one training run with canaries.

Each of m canaries is included in the training data by an independent secret fair coin ``S_i``. After training,
each canary gets a score (higher: more member-like); the auditor guesses "in" for the r highest scores and counts
the v correct guesses. If training is (epsilon, delta)-DP with respect to each canary, v is stochastically at most
Binomial(r, e^eps / (1 + e^eps)) up to a delta term, so

    p(eps, delta) = P[Bin(r, q) >= v] + 2 m delta max_{i=1..v} P[v - i <= Bin(r, q) < v] / i,   q = e^eps / (1 + e^eps)

is a p-value for "the run is (eps, delta)-DP", and the lower bound at confidence 1 - beta is the largest eps the
test rejects: ``sup{eps : p(eps, delta) < beta}`` (the paper's Appendix D code, ``p_value_DP_audit`` and
``get_eps_audit``, which this module follows; jax_privacy's ``CanaryScoreAuditor.epsilon_one_run`` computes the
same). Written here because none of the project's dependencies ships it (opacus has no auditing; jax_privacy
needs JAX).

The number of guesses is chosen on one half of the canaries (by a public rule: every other canary) and the bound is
computed on the other half only: taking the best bound over several r on the same canaries would be an uncorrected
multiple test, not a valid bound.

What it proves: a bound above the claimed epsilon proves the run leaks more than its guarantee (a bug). A bound
below it proves nothing about the claim; it is how much this particular attack gets. A perfect attack with r guesses
cannot show more than log(a / (1 - a)), a = beta^(1/r) (r = 100: 3.5; r = 1000: 5.8).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binom

#: where a run keeps its canaries' coins: a hidden folder of the adapter's, never uploaded (the coins are the audit's
#: secret: publishing them would publish which canaries were trained on)
COINS_PATH = Path(".audit") / "canary_coins.json"

#: numbers of "in" guesses tried on the selection half (those that fit in it)
GUESS_GRID = (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of ``v`` correct guesses out of ``r`` among ``m`` canaries under "(epsilon, delta)-DP"."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomised response
    tail = float(binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if v == 0 or delta == 0:
        return min(1.0, tail)
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # i-th: P[v - i <= Bin(r, q) < v], i = 1..v
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct of ``r`` guesses (``m`` canaries) reject at ``confidence``
    (0 when none is rejected); bisection as in the paper's code."""
    beta = 1.0 - confidence
    if not 0 < beta < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0  # p(low) < beta <= p(high)
    while p_value(m, r, v, high, delta) < beta:
        low, high = high, high + 1.0
    for _ in range(30):
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) < beta:
            low = middle
        else:
            high = middle
    return low


@dataclass
class OneRunAudit:
    """The result of a one-run audit: what ``metrics.json`` records (never the coins or the scores)."""

    #: the empirical lower bound on epsilon at ``confidence``
    epsilon_lower_bound: float
    #: canaries the bound is computed on (the evaluation half), of ``total_canaries``
    num_canaries: int
    #: "in" guesses on that half (the highest scores), and how many of them were right
    num_guesses: int
    num_correct: int
    delta: float
    confidence: float
    total_canaries: int
    how_guesses_were_chosen: str = (
        "the number of guesses maximising the bound on the other half of the canaries (every other canary)"
    )

    def to_dict(self) -> dict:
        return asdict(self)


def _guesses_correct(scores: np.ndarray, included: np.ndarray, r: int) -> int:
    order = np.argsort(-scores, kind="stable")  # ties: by canary index, never by membership
    return int(included[order[:r]].sum())


def one_run_audit(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    delta: float,
    confidence: float = 0.95,
    guess_grid: Sequence[int] = GUESS_GRID,
) -> OneRunAudit:
    """The one-run lower bound from each canary's ``scores`` (higher: more member-like) and its secret coin
    ``included``. The number of guesses r is the one of ``guess_grid`` with the best bound on the even-indexed
    canaries; the bound is that of the top-r guesses on the odd-indexed ones (r scaled to that half's size)."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1 or len(scores) < 4:
        raise ValueError(f"need one score and one coin per canary (4 or more), got {scores.shape}, {included.shape}")
    selection, evaluation = slice(0, None, 2), slice(1, None, 2)
    m_select, m_eval = len(scores[selection]), len(scores[evaluation])
    tried = [r for r in guess_grid if r <= m_select] or [m_select]
    bounds = {r: epsilon_lower_bound(m_select, r, _guesses_correct(scores[selection], included[selection], r),
                                     delta, confidence) for r in tried}  # fmt: skip
    best = max(tried, key=lambda r: (bounds[r], -r))
    r = max(1, min(m_eval, round(best * m_eval / m_select)))
    v = _guesses_correct(scores[evaluation], included[evaluation], r)
    return OneRunAudit(epsilon_lower_bound(m_eval, r, v, delta, confidence), m_eval, r, v, delta, confidence,
                       len(scores))  # fmt: skip


def draw_coins(m: int) -> list[bool]:
    """``m`` independent fair coins from the operating system's entropy (never from ``--seed``)."""
    return [bool(secrets.randbits(1)) for _ in range(m)]


def save_coins(folder: str | os.PathLike, coins: Sequence[bool]) -> Path:
    path = Path(folder) / COINS_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([bool(c) for c in coins]))
    os.replace(tmp, path)
    return path


def load_coins(folder: str | os.PathLike) -> list[bool] | None:
    """The coins a run in ``folder`` drew (``None`` if it kept none there: another machine's run, an older one)."""
    path = Path(folder) / COINS_PATH
    return json.loads(path.read_text()) if path.is_file() else None
