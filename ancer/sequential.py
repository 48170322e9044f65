"""Sequential (anytime-valid) CERTIFY: confidence sequences for p_A and an early-stopping plan.

Fixed-n CERTIFY (Cohen, Rosenfeld & Kolter 2019) draws n estimation samples for every input and
reports the one-sided Clopper-Pearson lower bound on p_A. Most inputs are decided long before n:
an input with p_A = 1 passes the top grid level after a few thousand draws, and one with
p_A < 1/2 abstains after a few hundred. Stopping as soon as the certified grid level is decided
needs a lower bound that stays valid at a data-dependent stopping time, which a fixed-n bound is
not. This module supplies such bounds and the stopping rule; it is pure NumPy/SciPy.

Confidence sequence. For draws X_1, X_2, ... ~ Bernoulli(p) with S successes and F = t - S
failures after t draws, and a prior pi on q in [0, 1], the mixture likelihood ratio

    M_t(p) = integral q^S (1 - q)^F d pi(q) / (p^S (1 - p)^F)

is a nonnegative martingale with M_0 = 1 under p (Robbins 1970), so by Ville's inequality
(Ville 1939) P(exists t: M_t(p) >= 1/alpha) <= alpha. The set {p : M_t(p) < 1/alpha} is
therefore a (1 - alpha) confidence sequence: it contains p at every t simultaneously, hence at any
stopping time, whatever the stopping rule (Howard, Ramdas, McAuliffe & Sekhon 2021,
"Time-uniform, nonparametric, nonasymptotic confidence sequences"). Since log M_t(p) is convex in
p with its minimum <= 0 at p = S/t, the set is an interval [L_t, U_t] around S/t, found with a
bracketing root finder on log M_t. With Beta(a, b) components the numerator is
B(a + S, b + F) / B(a, b) (``scipy.special.betaln``). Because only the counts (S, t) enter,
the bound can be evaluated from cumulative round counts; a betting confidence sequence
(Waudby-Smith & Ramdas 2023) would need each round's counts.

The prior ``_PRIOR`` is tuned for p_A near 1, where the certificates at radii 0.25-0.75 with
sigma = 0.25 live (Phi(1) = 0.841, Phi(2) = 0.977, Phi(3) = 0.99865): an atom at q = 1 makes an
all-success stream cost only log(1/weight) nats more than a point test, Beta(a, 1/2) components
with means 1 - 10^-k (k = 1..4) cover streams with a few failures at every scale, and a uniform
component covers p_A near 1/2. A mixture of valid priors is a valid prior, so any weights keep
the guarantee; they only move the bound's tightness between regimes.

Final look. An input that reaches the full budget n reports
max(L_n at level alpha_cs, Clopper-Pearson lower bound at n draws at level alpha_final), with
alpha_cs + alpha_final = alpha. By the union bound both statements hold together with probability
at least 1 - alpha: the confidence sequence at every look, and the fixed-n bound on the (possibly
never completed) full stream of n draws, which is only used when the stream is completed. The
default split (``FINAL_SHARE`` = 1/2) costs log 2 nats on each side. The early stops, where most
draws are saved, pay for alpha_cs: with alpha = 0.001 and n = 100,000 an all-success input stops
after 6,205 draws (5,900 with alpha_cs = 3/4 alpha, 6,725 with 1/4 alpha). The final look pays
for alpha_final only for inputs within about 0.2 standard errors of a threshold at n draws, a
narrow band of p_A: at p_A = 0.999, just above Phi(3), the final level matched fixed-n CERTIFY's
in 88% of 400 runs (80% with alpha_final = 1/4 alpha, 94% with 3/4 alpha), and in 399 of 400 or
all runs at p_A in {0.3, 0.6, 0.9, 0.98, 0.995, 0.9999, 1}.

Voracek (2024, "Treatment of Statistical Estimation Problems in Randomized Smoothing") and
Cullen, Montague & Rubinstein (2026, "Halt Fast! Early Stopping for Certified Robustness") study
sequential estimation for randomized smoothing in the same spirit.

Stopping rule. After each round the certified level is the number of levels among
(1/2, thresholds...) that the current lower bound exceeds. The input stops when the bound
exceeds the top threshold, or when the next level is futile: even an optimistic projection
cannot reach it at the budget. The projection takes an upper confidence-sequence bound U on p_A
(at level ``futility_alpha``), assumes the remaining draws succeed at rate U plus a
``futility_alpha`` normal quantile of binomial noise, and applies the final-look bound to the
projected count. Futility only decides when to stop drawing, never what is reported, so it
affects cost and certified accuracy but not soundness.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import betaln, logsumexp
from scipy.stats import norm

from ancer.errors import ArgumentError
from ancer.stats import check_alpha, check_count, clopper_pearson_lower

#: Share of alpha spent on the fixed-n Clopper-Pearson bound at the final look.
FINAL_SHARE = 0.5

# Mixing distribution of the confidence sequence: an atom at q = 1 with weight 0.3, a uniform
# Beta(1, 1) with weight 0.1 and Beta(a, 1/2) with means 1 - 10^-k, k = 1..4, with weight 0.15
# each (the weights sum to 1).
_LOG_ATOM_WEIGHT = math.log(0.3)
_BETA_A = np.array([1.0] + [0.5 * (1.0 - m) / m for m in (1e-1, 1e-2, 1e-3, 1e-4)])
_BETA_B = np.array([1.0] + [0.5] * 4)
_LOG_WEIGHTS = np.log(np.array([0.1] + [0.15] * 4))
_LOG_BETA_NORMALIZERS = betaln(_BETA_A, _BETA_B)

# Bracket ends strictly inside (0, 1) for the root finder; double precision resolves p to about
# 1e-16, far finer than any bound here needs.
_P_MIN = 1e-12
_P_MAX = math.nextafter(1.0, 0.0)


def _check_counts(successes: int, trials: int) -> tuple[int, int]:
    trials = check_count("trials", trials)
    successes = check_count("successes", successes, minimum=0)
    if successes > trials:
        raise ArgumentError(
            f"successes={successes} exceeds trials={trials}; pass the number of votes for the "
            "selected class among the estimation draws"
        )
    return successes, trials


def _log_marginal(successes: np.ndarray, failures: np.ndarray) -> np.ndarray:
    """log of the prior-mixture likelihood, log integral q^S (1 - q)^F d pi(q), elementwise."""
    components = (
        _LOG_WEIGHTS
        + betaln(_BETA_A + successes[..., None], _BETA_B + failures[..., None])
        - _LOG_BETA_NORMALIZERS
    )
    atom = np.where(failures == 0, _LOG_ATOM_WEIGHT, -np.inf)  # 1^S 0^F at q = 1
    return logsumexp(np.concatenate([components, atom[..., None]], axis=-1), axis=-1)


def log_mixture_martingale(
    successes: int | np.ndarray, trials: int | np.ndarray, p: float | np.ndarray
) -> np.ndarray:
    """log M_t(p), the log of the mixture likelihood ratio after ``successes`` in ``trials`` draws.

    Under Bernoulli(p) draws M_t(p) is a nonnegative martingale with M_0 = 1, so
    P(exists t: log M_t(p) >= log(1/alpha)) <= alpha; ``lower_confidence_sequence`` and
    ``upper_confidence_sequence`` are the ends of {p : log M_t(p) < log(1/alpha)}. The three
    arguments broadcast against each other; p lies in [0, 1] (0 log 0 is taken as 0).
    """
    successes, trials, p = np.broadcast_arrays(
        np.asarray(successes), np.asarray(trials), np.asarray(p, dtype=float)
    )
    if np.any(trials < 1) or np.any(successes < 0) or np.any(successes > trials):
        raise ArgumentError("need 0 <= successes <= trials and trials >= 1 for every element")
    if np.any((p < 0.0) | (p > 1.0)):
        raise ArgumentError("p must lie in [0, 1]")
    failures = trials - successes
    log_marginal = _log_marginal(successes, failures)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.where(successes > 0, successes * np.log(p), 0.0)
        log_q = np.where(failures > 0, failures * np.log1p(-p), 0.0)
    return log_marginal - log_p - log_q


@functools.lru_cache(maxsize=65536)
def _interval(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """The interval {p : M_t(p) < 1/alpha} as (lower, upper); counts and alpha already checked."""
    failures = trials - successes
    log_level = math.log(1.0 / alpha)
    log_marginal = float(_log_marginal(np.asarray(successes), np.asarray(failures)))

    def excess(p: float) -> float:
        value = log_marginal - log_level
        if successes:
            value -= successes * math.log(p)
        if failures:
            value -= failures * math.log1p(-p)
        return value

    mle = successes / trials
    if successes == 0 or excess(_P_MIN) <= 0.0:
        lower = 0.0
    else:
        lower = brentq(excess, _P_MIN, mle, xtol=1e-15, rtol=4 * np.finfo(float).eps)
    if failures == 0 or excess(_P_MAX) <= 0.0:
        upper = 1.0
    else:
        upper = brentq(excess, mle, _P_MAX, xtol=1e-15, rtol=4 * np.finfo(float).eps)
    return float(lower), float(upper)


def lower_confidence_sequence(successes: int, trials: int, alpha: float) -> float:
    """Anytime-valid lower bound L_t on a Bernoulli p: P(exists t: p < L_t) <= alpha.

    L_t = inf{p : M_t(p) < 1/alpha} for the mixture martingale of the module docstring; it is
    0 when there is no success and always <= successes / trials.
    """
    successes, trials = _check_counts(successes, trials)
    return _interval(successes, trials, check_alpha(alpha))[0]


def upper_confidence_sequence(successes: int, trials: int, alpha: float) -> float:
    """Anytime-valid upper bound U_t on a Bernoulli p: P(exists t: p > U_t) <= alpha.

    U_t = sup{p : M_t(p) < 1/alpha}; it is 1 when there is no failure and always
    >= successes / trials.
    """
    successes, trials = _check_counts(successes, trials)
    return _interval(successes, trials, check_alpha(alpha))[1]


def _final_look_lower(successes: int, budget: int, alpha: float, final_share: float) -> float:
    """The bound reported at the final look: the larger of the confidence sequence at
    alpha (1 - final_share) and Clopper-Pearson at alpha final_share."""
    sequence = _interval(successes, budget, alpha * (1.0 - final_share))[0]
    return max(sequence, clopper_pearson_lower(successes, budget, alpha * final_share))


def _check_share(final_share: float) -> float:
    try:
        share = float(final_share)
    except (TypeError, ValueError):
        share = math.nan
    if not 0.0 < share < 1.0:
        raise ArgumentError(
            f"final_share must lie in (0, 1), got {final_share!r}; it is the part of alpha spent "
            f"on the final Clopper-Pearson look, e.g. {FINAL_SHARE}"
        )
    return share


def max_certifiable_probability(
    budget: int, alpha: float, final_share: float = FINAL_SHARE
) -> float:
    """The largest p_lower a ``SequentialPlan`` with this budget, alpha and final_share can
    report: the final-look bound when all ``budget`` draws succeed. Thresholds above it are
    never certified."""
    budget = check_count("budget", budget)
    return _final_look_lower(budget, budget, check_alpha(alpha), _check_share(final_share))


@dataclass(frozen=True)
class Decision:
    """What to do with one input after a round."""

    stop: bool  #: True: stop drawing for this input.
    p_lower: float  #: The valid lower bound on p_A at this look (0.0 if none).


@dataclass(frozen=True)
class SequentialPlan:
    """Round sizes and stopping rule of sequential CERTIFY for one alpha, budget and grid.

    The reported ``Decision.p_lower`` is a lower bound on p_A that holds with probability at
    least 1 - alpha at whatever look the input stops (module docstring); the caller certifies
    each grid radius whose threshold it exceeds and abstains unless it exceeds 1/2.
    """

    alpha: float  #: Total failure probability of the reported bound.
    budget: int  #: n: at most this many estimation draws per input.
    thresholds: tuple[float, ...]  #: Increasing p_A levels the grid radii need, each in (1/2, 1).
    growth: float = 1.25  #: Each round is this factor larger than the previous one.
    first_round: int = 500  #: Size of the first estimation round.
    final_share: float = FINAL_SHARE  #: Part of alpha spent on the final Clopper-Pearson look.
    futility_alpha: float = 0.001  #: Level of the optimistic upper bound behind futility stops.

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        object.__setattr__(self, "budget", check_count("budget", self.budget))
        object.__setattr__(self, "first_round", check_count("first_round", self.first_round))
        object.__setattr__(self, "final_share", _check_share(self.final_share))
        try:
            object.__setattr__(self, "futility_alpha", check_alpha(self.futility_alpha))
        except ArgumentError:
            raise ArgumentError(
                f"futility_alpha must lie in (0, 1), got {self.futility_alpha!r}; it only sets how "
                "eagerly hopeless inputs stop, e.g. 0.001"
            ) from None
        try:
            growth = float(self.growth)
        except (TypeError, ValueError):
            growth = math.nan
        if not growth > 1.0 or math.isinf(growth):
            raise ArgumentError(
                f"growth must be a finite number > 1, got {self.growth!r}; rounds grow by this "
                "factor, e.g. 1.25"
            )
        try:
            thresholds = tuple(float(value) for value in self.thresholds)
        except (TypeError, ValueError):
            raise ArgumentError(
                f"thresholds must be a sequence of numbers, got {self.thresholds!r}"
            ) from None
        if not thresholds:
            raise ArgumentError("thresholds is empty; pass the p_A level of at least one radius")
        for value in thresholds:
            if not 0.5 < value < 1.0:
                raise ArgumentError(
                    f"threshold {value!r} is outside (1/2, 1); drop radius 0 (it needs only "
                    "p_lower > 1/2) and radii no p_A < 1 can certify"
                )
        if any(low >= high for low, high in zip(thresholds, thresholds[1:])):
            raise ArgumentError(
                f"thresholds must be strictly increasing, got {thresholds}; sort the radii and "
                "drop duplicates"
            )
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "growth", growth)
        object.__setattr__(self, "thresholds", thresholds)

    @property
    def levels(self) -> tuple[float, ...]:
        """The levels a lower bound can pass, in order: 1/2 (a prediction), then thresholds."""
        return (0.5,) + self.thresholds

    @property
    def sequence_alpha(self) -> float:
        """Level of the confidence sequence used at every look: alpha (1 - final_share)."""
        return self.alpha * (1.0 - self.final_share)

    def all_success_stop(self) -> int | None:
        """The fewest draws after which an all-success input passes the top threshold with the
        confidence sequence alone, or None if that takes the whole budget or more."""
        return _all_success_stop(self.budget, self.sequence_alpha, self.thresholds[-1])

    def rounds(self) -> list[int]:
        """Sizes of the estimation rounds: positive ints summing exactly to ``budget``.

        Round k has first_round * growth^k draws, except that one look is placed exactly where
        an all-success input passes the top threshold, so that the common case p_A ~ 1 draws
        nothing past its decisive point (looks within a factor sqrt(growth) or first_round / 2
        of it are dropped), and the last round runs to the budget (a look closer than
        first_round / 2 to the budget is dropped).
        """
        return list(_rounds(self))

    def decide(self, successes: int, trials: int) -> Decision:
        """Stop or continue after a round, given the cumulative votes for the selected class.

        ``trials`` is the cumulative number of estimation draws (a cumulative sum of
        ``rounds()``); at ``trials == budget`` the decision always stops and its bound includes
        the final Clopper-Pearson look.
        """
        successes, trials = _check_counts(successes, trials)
        if trials > self.budget:
            raise ArgumentError(
                f"trials={trials} exceeds the budget {self.budget}; stop drawing once decide() "
                "says stop"
            )
        if trials == self.budget:
            p_lower = _final_look_lower(successes, trials, self.alpha, self.final_share)
            return Decision(stop=True, p_lower=p_lower)
        p_lower = _interval(successes, trials, self.sequence_alpha)[0]
        passed = sum(p_lower > level for level in self.levels)
        if passed == len(self.levels):
            return Decision(stop=True, p_lower=p_lower)
        return Decision(stop=self._futile(successes, trials, self.levels[passed]), p_lower=p_lower)

    def _futile(self, successes: int, trials: int, level: float) -> bool:
        """True if even an optimistic projection to the budget cannot exceed ``level``."""
        upper = _interval(successes, trials, self.futility_alpha)[1]
        remaining = self.budget - trials
        noise = norm.isf(self.futility_alpha) * math.sqrt(remaining * upper * (1.0 - upper))
        projected = min(self.budget, math.ceil(successes + remaining * upper + noise))
        return _final_look_lower(projected, self.budget, self.alpha, self.final_share) <= level


@functools.lru_cache(maxsize=256)
def _all_success_stop(budget: int, alpha: float, top: float) -> int | None:
    if _interval(budget, budget, alpha)[0] <= top:
        return None
    low, high = 1, budget  # the all-success bound increases with t: bisect for the first pass
    while low < high:
        middle = (low + high) // 2
        if _interval(middle, middle, alpha)[0] > top:
            high = middle
        else:
            low = middle + 1
    return low


@functools.lru_cache(maxsize=256)
def _rounds(plan: SequentialPlan) -> tuple[int, ...]:
    min_gap = plan.first_round / 2
    looks, size, total = [], float(plan.first_round), 0.0
    while round(total + size) < plan.budget:
        total += size
        looks.append(round(total))
        size *= plan.growth
    anchor = plan.all_success_stop()
    if anchor is not None and anchor > plan.first_round:
        spread = math.sqrt(plan.growth)
        looks = [
            t for t in looks
            if not (anchor / spread < t < anchor * spread or abs(t - anchor) < min_gap)
        ]
        looks = sorted(looks + [anchor])
    while looks and plan.budget - looks[-1] < min_gap:
        looks.pop()
    return tuple(np.diff([0] + looks + [plan.budget]).tolist())
