"""Clopper-Pearson bounds and PREDICT's test against statsmodels and scipy."""
import numpy as np
import pytest
from scipy.stats import binomtest
from statsmodels.stats.proportion import proportion_confint

from ancer.errors import ArgumentError
from ancer.stats import (
    clopper_pearson_lower,
    clopper_pearson_upper,
    predict_decides,
    predict_test_pvalue,
)


@pytest.mark.parametrize("n", [1, 7, 100, 1000, 100_000])
@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05, 0.3])
def test_lower_bound_matches_statsmodels_on_a_grid(n, alpha):
    for k in np.unique(np.linspace(0, n, 13).astype(int)):
        expected_low, expected_high = proportion_confint(k, n, alpha=2 * alpha, method="beta")
        assert clopper_pearson_lower(int(k), n, alpha) == pytest.approx(expected_low, abs=1e-12)
        assert clopper_pearson_upper(int(k), n, alpha) == pytest.approx(expected_high, abs=1e-12)


def test_lower_bound_edge_cases():
    assert clopper_pearson_lower(0, 10, 0.01) == 0.0
    # k = n: beta.ppf(alpha, n, 1) = alpha^(1/n), strictly below 1.
    assert clopper_pearson_lower(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100))
    assert clopper_pearson_upper(100, 100, 0.001) == 1.0


def test_lower_bound_covers_the_truth_at_rate_alpha():
    rng = np.random.default_rng(0)
    p, n, alpha, trials = 0.7, 200, 0.1, 4000
    ks = rng.binomial(n, p, size=trials)
    misses = sum(clopper_pearson_lower(int(k), n, alpha) > p for k in ks)
    assert misses / trials <= alpha  # Clopper-Pearson is conservative
    assert misses / trials > alpha / 4  # ...but not vacuous


@pytest.mark.parametrize(
    "call",
    [
        lambda: clopper_pearson_lower(5, 10, 0.0),
        lambda: clopper_pearson_lower(5, 10, 1.0),
        lambda: clopper_pearson_lower(5, 10, float("nan")),
        lambda: clopper_pearson_lower(11, 10, 0.01),
        lambda: clopper_pearson_lower(-1, 10, 0.01),
        lambda: clopper_pearson_lower(1, 0, 0.01),
        lambda: clopper_pearson_lower(1.5, 10, 0.01),
        lambda: predict_test_pvalue(-3, 4),
    ],
)
def test_bad_arguments_raise_argument_error(call):
    with pytest.raises(ArgumentError):
        call()


def test_predict_test_matches_scipy_binomtest():
    for a, b in [(10, 0), (60, 40), (500, 480), (3, 2)]:
        assert predict_test_pvalue(a, b) == pytest.approx(binomtest(a, a + b, 0.5).pvalue)
    assert predict_test_pvalue(0, 0) == 1.0
    assert not predict_decides(50, 50, 0.001)
    assert predict_decides(90, 10, 0.001)
