"""Sequential CERTIFY: group-sequential tests of p_A against the radii's thresholds.

Fixed-n CERTIFY (Cohen et al. 2019) draws n estimation samples for every input and
reports the one-sided Clopper-Pearson lower bound on p_A. Most inputs are decided long before n:
an input with p_A = 1 passes the top radius of a grid after a few thousand draws, and one with
p_A < 1/2 abstains after a few hundred. Stopping as soon as the certified grid level is decided
needs a test that keeps its level at a data-dependent stopping time, which a fixed-n bound does
not. This module supplies such tests and the stopping rule; it is pure NumPy/SciPy.

Levels. A grid of radii r_1 < ... < r_K needs thresholds t_1 < ... < t_K on p_A (t_k = Φ(r_k/σ)
for Gaussian noise; ``ancer.noise.Noise.probability_for_radius``). With t_0 = 1/2 (a prediction
at all), level k is the claim p_A > t_k. The hypotheses H_k: p_A <= t_k are nested (H_k true
implies H_{k+1} true), so testing them in order, each at the full level alpha, and claiming the
highest k whose test and all lower ones rejected, is wrong with probability at most alpha: a
wrong claim means that the test of the first true hypothesis rejected (fixed-sequence testing
of nested hypotheses; Maurer et al. 1995). No union bound over the grid is paid.

Group-sequential test of H: p <= t. Estimation draws arrive in rounds whose cumulative sizes
n_1 < ... < n_J = n (the looks) are fixed in advance by the budget n, ``first_round`` and
``growth``, never by the data. After look j the test rejects if the successes S_j reach the
boundary c_j(t). The boundaries spend alpha along the looks with the error-spending function
alpha (n_j / n)^rho of Lan & DeMets 1983, in the power family of Kim & DeMets 1987: c_j is the
smallest count with P_t(S_1 < c_1, ..., S_{j-1} < c_{j-1}, S_j >= c_j) <= alpha (n_j/n)^rho
minus what earlier looks spent, computed exactly by recursion over the binomial law of S_j on
the paths not yet stopped (exact calculations for binary data; Jennison & Turnbull 2000). Since
the rejection probability of each look grows with p, P_p(reject) <= alpha for every p <= t.
Stopping earlier than n_J, for any reason, only removes chances to reject, so the test keeps
its level whatever the stopping rule (futility stops are "non-binding"); a rejection at any
look is final, so the level reached is the highest the input has passed at any look.

The power rho = 1/2 spends alpha early enough that an input with p_A = 1 passes Φ(3) (radius
3σ) at alpha = 0.001 after 6,185 draws (5,114 for a fixed-n Clopper-Pearson test that knew
the count in advance): one look is placed exactly where an all-success stream first passes
the top threshold. Although 29% of alpha is left for the looks past n/2, the looks are so
strongly correlated that the last boundary lies only about half a standard error above
fixed-n CERTIFY's critical count, so inputs near a threshold, which need the whole budget,
are tested almost as sharply as by fixed-n CERTIFY.

Reported bound. An input stopped at level k reports p_lower = t_k (0 at level 0, where it
abstains), so ``P(p_A <= p_lower) <= alpha``; its radius is the grid radius r_k. The value
used for t_0 is the float just above 1/2, so that a prediction passes the usual p_lower > 1/2
check with a radius of about 1e-16.

Stopping rule. An input stops when it passes the top threshold, when it reaches the budget, or
when the next level is futile: the posterior predictive probability (Jeffreys prior, a
beta-binomial law of the remaining draws) that S_n reaches that level's final boundary is below
``futility``. Futility only decides when to stop drawing, never what is claimed, so it moves
cost and certified accuracy but not soundness.

Voráček 2024 and Cullen et al. 2026 (see docs/design.md, References) study sequential
estimation for randomized smoothing in the same spirit, with confidence sequences and
e-processes, which are valid at arbitrary (also data-dependent) look times; fixed looks allow
the exact binomial boundaries above, which are sharper.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import betabinom, binom

from ancer.errors import ArgumentError
from ancer.stats import check_alpha, check_count

#: t_0: the claim p_A > PREDICTION_LEVEL is a prediction (the float just above 1/2).
PREDICTION_LEVEL = math.nextafter(0.5, 1.0)

# Relative margin on every look's alpha share. Every probability below is a sum of
# nonnegative terms (binomial masses, their direct convolutions and tail sums), computed to a
# relative error of about (terms) x 1e-16 whatever its size, so this margin keeps the computed
# boundaries conservative at any alpha. (An FFT convolution errs by about 1e-16 of the total
# mass instead, which exceeds this margin once alpha is below about 1e-6.)
_MARGIN = 1e-9
# Mass neglected at each look, as a fraction of alpha: binomial increments are evaluated where
# their tails exceed it, and the far left of the law of S_j is dropped up to it; both are
# bounded exactly and counted as if they rejected, which keeps the boundaries conservative.
_NEGLIGIBLE = 1e-13


def look_times(budget: int, first_round: int, growth: float) -> tuple[int, ...]:
    """Cumulative draws at each look: first_round, then rounds growing by ``growth``, ending
    exactly at ``budget`` (a look closer than first_round / 2 to the budget is dropped)."""
    looks, size, total = [], float(first_round), 0.0
    while round(total + size) < budget:
        total += size
        looks.append(round(total))
        size *= growth
    while looks and budget - looks[-1] < first_round / 2:
        looks.pop()
    return tuple(looks) + (budget,)


@functools.lru_cache(maxsize=1024)
def rejection_boundaries(
    threshold: float, alpha: float, looks: tuple[int, ...], spending_power: float
) -> tuple[tuple[int, ...], float]:
    """The boundaries c_j of the group-sequential test of H: p <= ``threshold`` (module
    docstring) and its exact level P_threshold(exists j: S_j >= c_j) <= alpha.

    c_j = looks[j] + 1 means that look j cannot reject. Computed by the forward recursion
    f_j = (f_{j-1} restricted to s < c_{j-1}) * Binomial(n_j - n_{j-1}, threshold), where f_j
    is the law of S_j on the paths not yet rejected.
    """
    budget = looks[-1]
    negligible = alpha * _NEGLIGIBLE
    offset, mass = 0, np.ones(1)  # mass[i] = P(S_j = offset + i, not rejected before)
    spent, previous, boundaries = 0.0, 0, []
    for look in looks:
        draws = look - previous
        previous = look
        low = max(0, int(binom.ppf(negligible, draws, threshold)))
        high = min(draws, int(binom.isf(negligible, draws, threshold)) + 1)
        increment = binom.pmf(np.arange(low, high + 1), draws, threshold)
        outside = float(binom.cdf(low - 1, draws, threshold) + binom.sf(high, draws, threshold))
        spent += outside * float(mass.sum())  # counted as rejected: conservative
        mass = np.convolve(mass, increment)  # direct: each entry to a relative rounding error
        offset += low
        allowed = alpha * (look / budget) ** spending_power * (1.0 - _MARGIN) - spent
        tails = np.cumsum(mass[::-1])[::-1]  # tails[i] = P(S_j >= offset + i, not rejected)
        within = np.flatnonzero(tails <= allowed)
        cut = int(within[0]) if len(within) else len(mass)
        boundaries.append(min(offset + cut, look + 1))
        spent += float(tails[cut]) if cut < len(mass) else 0.0
        mass = mass[:cut]
        dropped = int(np.searchsorted(np.cumsum(mass), negligible, side="right"))
        if dropped:  # the far left tail, counted as rejected
            spent += float(mass[:dropped].sum())
            offset += dropped
            mass = mass[dropped:]
    return tuple(boundaries), spent


@dataclass(frozen=True)
class Decision:
    """What to do with one input after a look."""

    stop: bool  #: True: stop drawing for this input.
    level: int  #: Levels passed so far: 0 none, 1 a prediction (p_A > 1/2), k + 1 threshold k.
    p_lower: float  #: The level's value: P(p_A <= p_lower) <= alpha; 0.0 at level 0.


@dataclass(frozen=True)
class SequentialPlan:
    """Looks, tests and stopping rule of sequential CERTIFY for one alpha, budget and grid.

    An input that stops with ``Decision.level`` = k has p_A > ``levels[k - 1]`` with
    probability at least 1 - alpha, whatever the stopping rule (module docstring).
    """

    alpha: float  #: Probability that the claimed level is wrong.
    budget: int  #: n: at most this many estimation draws per input.
    thresholds: tuple[float, ...]  #: Increasing p_A levels the radii need, each in (1/2, 1).
    growth: float = 1.25  #: Each round is this factor larger than the previous one.
    first_round: int = 500  #: Size of the first estimation round.
    spending_power: float = 0.5  #: rho: by look n_j the tests have spent alpha (n_j / n)^rho.
    futility: float = 0.02  #: Stop once the next level's predictive probability is below this.

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        object.__setattr__(self, "budget", check_count("budget", self.budget))
        object.__setattr__(self, "first_round", check_count("first_round", self.first_round))
        object.__setattr__(self, "growth", _positive("growth", self.growth, above=1.0,
                                                     example="1.25; rounds grow by this factor"))
        object.__setattr__(self, "spending_power", _positive(
            "spending_power", self.spending_power, above=0.0,
            example="0.5; smaller spends alpha earlier"))
        futility = _positive("futility", self.futility, above=0.0,
                             example="0.02; it only sets how eagerly hopeless inputs stop")
        if futility >= 1.0:
            raise ArgumentError(f"futility must lie in (0, 1), got {self.futility!r}; e.g. 0.02")
        object.__setattr__(self, "futility", futility)
        try:
            thresholds = tuple(float(value) for value in self.thresholds)
        except (TypeError, ValueError):
            raise ArgumentError(
                f"thresholds must be a sequence of numbers, got {self.thresholds!r}"
            ) from None
        for value in thresholds:
            if not PREDICTION_LEVEL < value < 1.0:
                raise ArgumentError(
                    f"threshold {value!r} is outside (1/2, 1); drop radius 0 (a prediction is "
                    "always a level) and radii no p_A < 1 can certify"
                )
        if any(low >= high for low, high in zip(thresholds, thresholds[1:])):
            raise ArgumentError(
                f"thresholds must be strictly increasing, got {thresholds}; sort the radii and "
                "drop duplicates"
            )
        object.__setattr__(self, "thresholds", thresholds)

    @property
    def levels(self) -> tuple[float, ...]:
        """The values a certified input can claim p_A exceeds, in order: 1/2, then thresholds."""
        return (PREDICTION_LEVEL,) + self.thresholds

    def looks(self) -> tuple[int, ...]:
        """Cumulative estimation draws at which the tests are evaluated; the last is the budget.

        ``look_times``, plus one look where an all-success stream first passes the top level
        (the common case p_A ~ 1 then draws nothing past its decisive point); looks within a
        factor sqrt(growth) or first_round / 2 of it are dropped."""
        return _looks_with_anchor(self)

    def rounds(self) -> list[int]:
        """Sizes of the estimation rounds: positive ints summing exactly to ``budget``."""
        return np.diff((0,) + self.looks()).tolist()

    def boundaries(self, level: int) -> tuple[int, ...]:
        """c_j of the test of p_A <= levels[level] at each look (``rejection_boundaries``)."""
        return rejection_boundaries(self.levels[level], self.alpha, self.looks(),
                                    self.spending_power)[0]

    def decide(self, successes: int, trials: int, level: int = 0) -> Decision:
        """Stop or continue after the look at ``trials`` cumulative estimation draws, given the
        cumulative votes ``successes`` for the selected class and the ``level`` passed at
        earlier looks (0 at the first). At ``trials == budget`` the decision always stops."""
        successes = check_count("successes", successes, minimum=0)
        trials = check_count("trials", trials)
        if successes > trials:
            raise ArgumentError(f"successes={successes} exceeds trials={trials}; pass the votes "
                                "for the selected class among the estimation draws")
        looks = self.looks()
        try:
            look = looks.index(trials)
        except ValueError:
            raise ArgumentError(f"trials={trials} is not a look of this plan; draw the rounds "
                                "of rounds() and decide after each") from None
        levels = self.levels
        level = check_count("level", level, minimum=0)
        if level > len(levels):
            raise ArgumentError(f"level must lie in [0, {len(levels)}], got {level!r}")
        while level < len(levels) and successes >= self.boundaries(level)[look]:
            level += 1
        p_lower = levels[level - 1] if level else 0.0
        stop = level == len(levels) or trials == self.budget or self._futile(
            successes, trials, level)
        return Decision(stop=stop, level=level, p_lower=p_lower)

    def _futile(self, successes: int, trials: int, level: int) -> bool:
        """True if the posterior predictive probability (Jeffreys prior) that the final look
        reaches ``level``'s boundary is below ``futility``."""
        needed = self.boundaries(level)[-1] - successes
        remaining = self.budget - trials
        if needed > remaining:
            return True
        chance = betabinom.sf(needed - 1, remaining, successes + 0.5, trials - successes + 0.5)
        return bool(chance < self.futility)


@functools.lru_cache(maxsize=256)
def _looks_with_anchor(plan: SequentialPlan) -> tuple[int, ...]:
    base = look_times(plan.budget, plan.first_round, plan.growth)
    top = plan.levels[-1]
    # first guess: the smallest t with top^t <= alpha (t / n)^rho, i.e. what the all-success
    # path costs at a look with the whole allowance of that look to itself
    anchor = plan.first_round
    while anchor < plan.budget and top ** anchor > plan.alpha * (anchor / plan.budget) ** plan.spending_power:
        anchor = max(anchor + 1, math.ceil(anchor * 1.01))
    spread = math.sqrt(plan.growth)
    for _ in range(100):  # earlier looks spend too: move the anchor out until it rejects there
        if anchor >= plan.budget - plan.first_round / 2:
            return base
        near = {t for t in base[:-1]
                if anchor / spread < t < anchor * spread or abs(t - anchor) < plan.first_round / 2}
        looks = tuple(sorted((set(base) - near) | {anchor}))
        boundaries = rejection_boundaries(top, plan.alpha, looks, plan.spending_power)[0]
        if boundaries[looks.index(anchor)] <= anchor:
            return looks
        anchor = math.ceil(anchor * 1.002)
    return base


def _positive(name: str, value: float, above: float, example: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number > above or math.isinf(number):
        raise ArgumentError(f"{name} must be a finite number > {above:g}, got {value!r}; e.g. "
                            f"{example}")
    return number


def max_certifiable_probability(budget: int, alpha: float) -> float:
    """The largest threshold t < 1 that a default ``SequentialPlan`` with this budget and alpha
    can pass: an all-success stream reaches some look's boundary for t (bisection, to 1e-9).
    Thresholds above it are never certified."""
    budget = check_count("budget", budget)
    alpha = check_alpha(alpha)
    plan = SequentialPlan(alpha, budget, ())
    looks = plan.looks()

    def passes(t: float) -> bool:
        boundaries = rejection_boundaries(t, alpha, looks, plan.spending_power)[0]
        return any(c <= look for c, look in zip(boundaries, looks))

    low, high = 0.5, 1.0
    if not passes(PREDICTION_LEVEL):
        return 0.5
    while high - low > 1e-9:
        middle = (low + high) / 2
        low, high = (middle, high) if passes(middle) else (low, middle)
    return low
