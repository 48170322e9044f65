"""Statistics of the Monte-Carlo votes: Clopper-Pearson bounds and PREDICT's binomial test.

The smoothed classifier g(x) = argmax_c P(f(x + eps) = c) is only known through counts of
the base classifier's votes; these functions turn counts into statements that hold with
probability at least 1 - alpha (Cohen et al. 2019, §3.2; see docs/design.md, References).
Pure NumPy/SciPy: no torch here.
"""
from __future__ import annotations

import math

from scipy.stats import beta, binomtest

from ancer.errors import ArgumentError


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float if it lies in the open interval (0, 1), else raise."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ArgumentError(f"alpha must be a number in (0, 1), got {alpha!r}") from None
    if not 0.0 < value < 1.0 or math.isnan(value):
        raise ArgumentError(
            f"alpha must lie in (0, 1), got {alpha!r}; it is the probability that a certificate "
            "is wrong, e.g. 0.001 as in Cohen et al."
        )
    return value


def check_count(name: str, value: int, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``, else raise."""
    try:
        valid = not isinstance(value, bool) and int(value) == value and value >= minimum
    except (TypeError, ValueError, OverflowError):  # None, "a", nan, inf
        valid = False
    if not valid:
        raise ArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_successes(k: int, n: int) -> tuple[int, int]:
    n = check_count("n", n)
    k = check_count("k", k, minimum=0)
    if k > n:
        raise ArgumentError(f"the number of successes k={k} exceeds the number of trials n={n}")
    return k, n


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion.

    With k successes in n trials, returns the p_lo such that P(p < p_lo) <= alpha:
    ``beta.ppf(alpha, k, n - k + 1)``, and 0 when k = 0 (Clopper & Pearson 1934). This is
    ``statsmodels.stats.proportion.proportion_confint(k, n, alpha=2 * alpha,
    method="beta")[0]``, the bound Cohen et al.'s CERTIFY uses for p_A.
    """
    k, n = _check_successes(k, n)
    alpha = check_alpha(alpha)
    if k == 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound: ``beta.ppf(1 - alpha, k + 1, n - k)``,
    and 1 when k = n."""
    k, n = _check_successes(k, n)
    alpha = check_alpha(alpha)
    if k == n:
        return 1.0
    return float(beta.ppf(1.0 - alpha, k + 1, n - k))


def predict_test_pvalue(count_a: int, count_b: int) -> float:
    """Two-sided binomial-test p-value of ``count_a`` successes in ``count_a + count_b``
    trials at p = 1/2 (PREDICT, Cohen et al. 2019, §3.2.1). 1.0 when both are 0."""
    count_a = check_count("count_a", count_a, minimum=0)
    count_b = check_count("count_b", count_b, minimum=0)
    if count_a + count_b == 0:
        return 1.0
    return float(binomtest(count_a, count_a + count_b, p=0.5).pvalue)


def predict_decides(count_a: int, count_b: int, alpha: float) -> bool:
    """PREDICT answers the top class iff its binomial test against the runner-up rejects
    p = 1/2 at level alpha; it is then wrong with probability at most alpha (Cohen et al.
    2019, Prop. 1)."""
    return predict_test_pvalue(count_a, count_b) <= check_alpha(alpha)


def certifies(p_lower: float) -> bool:
    """CERTIFY answers its selected class iff the lower bound on its probability exceeds
    1/2 (Cohen et al. 2019, Algorithm 1): then no other class can have more; else it abstains."""
    return p_lower > 0.5
