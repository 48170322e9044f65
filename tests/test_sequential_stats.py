"""Confidence sequences and the sequential CERTIFY plan: coverage under optional stopping,
sanity of the bounds and rounds, cost of the stopping rule, and input validation."""
import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from ancer.errors import ArgumentError
from ancer.sequential import (
    Decision,
    SequentialPlan,
    log_mixture_martingale,
    lower_confidence_sequence,
    max_certifiable_probability,
    upper_confidence_sequence,
)
from ancer.stats import clopper_pearson_lower

GRID = tuple(float(v) for v in norm.cdf([1.0, 2.0, 3.0]))  # sigma = 0.25, radii 0.25/0.5/0.75


def _binomial_bound(runs: int, alpha: float) -> int:
    """Largest miss count that a bound with miss rate <= alpha exceeds with probability < 1e-6."""
    return int(binom.isf(1e-6, runs, alpha))


def _run(plan: SequentialPlan, p: float, rng: np.random.Generator) -> tuple[Decision, int, list]:
    """Draw rounds of a Bernoulli(p) stream until decide() stops; return the last decision,
    the draws used and every (p_lower, trials) along the way."""
    successes = trials = 0
    looks = []
    for size in plan.rounds():
        successes += int(rng.binomial(size, p))
        trials += size
        decision = plan.decide(successes, trials)
        looks.append(decision.p_lower)
        if decision.stop:
            return decision, trials, looks
    raise AssertionError("decide() did not stop at the budget")


# Coverage under optional stopping ------------------------------------------------------------

TEST_THRESHOLDS = (0.6, 0.8, 0.95)
# p just above each level (where stopping as soon as the bound passes is most tempting), near
# 1/2, between levels and near 1.
TEST_PS = (0.49, 0.505, 0.605, 0.7, 0.805, 0.9, 0.955, 0.99)


@pytest.mark.parametrize(
    "growth, first_round", [(1.25, 500), (2.0, 100), (1.2, 50)], ids=["default", "coarse", "fine"]
)
def test_reported_bound_covers_at_the_stopping_time_and_at_every_look(growth, first_round):
    alpha, runs_per_p = 0.1, 150
    plan = SequentialPlan(alpha, 4000, TEST_THRESHOLDS, growth=growth, first_round=first_round)
    rng = np.random.default_rng(1234 + first_round)
    stop_misses = look_misses = 0
    for p in TEST_PS:
        for _ in range(runs_per_p):
            decision, _, looks = _run(plan, p, rng)
            stop_misses += decision.p_lower > p
            look_misses += any(bound > p for bound in looks)
    runs = runs_per_p * len(TEST_PS)
    assert stop_misses <= _binomial_bound(runs, alpha)
    assert look_misses <= _binomial_bound(runs, alpha)


def test_naive_clopper_pearson_under_optional_stopping_is_caught_by_the_same_check():
    # Stopping as soon as a fixed-n bound passes p inflates its miss rate far above alpha; the
    # binomial check used above must flag that, or it would have no power.
    alpha, runs, p, looks = 0.1, 300, 0.9, np.arange(100, 4001, 100)
    rng = np.random.default_rng(7)
    counts = np.cumsum(rng.binomial(100, p, size=(runs, len(looks))), axis=1)
    misses = sum(
        any(clopper_pearson_lower(int(k), int(t), alpha) > p for k, t in zip(row, looks))
        for row in counts
    )
    assert misses > _binomial_bound(runs, alpha)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99, 0.999])
def test_mixture_martingale_crosses_one_over_alpha_at_rate_below_alpha(p):
    # Ville's inequality for the martingale behind both bounds, at every look of long streams.
    alpha, streams, step, looks = 0.1, 2000, 100, 200
    rng = np.random.default_rng(int(p * 1e4))
    counts = np.cumsum(rng.binomial(step, p, size=(streams, looks)), axis=1)
    trials = step * np.arange(1, looks + 1)
    log_m = log_mixture_martingale(counts, trials, p)
    crossed = np.any(log_m >= math.log(1 / alpha), axis=1)
    assert crossed.sum() <= _binomial_bound(streams, alpha)


@pytest.mark.parametrize("successes, trials", [(1, 10), (37, 50), (900, 1000), (4990, 5000)])
def test_bounds_are_the_ends_of_the_martingale_level_set(successes, trials):
    alpha = 0.01
    lower = lower_confidence_sequence(successes, trials, alpha)
    upper = upper_confidence_sequence(successes, trials, alpha)
    level = math.log(1 / alpha)
    assert log_mixture_martingale(successes, trials, lower) == pytest.approx(level, abs=1e-6)
    assert log_mixture_martingale(successes, trials, upper) == pytest.approx(level, abs=1e-6)
    inside = np.linspace(lower, upper, 50)[1:-1]
    assert np.all(log_mixture_martingale(successes, trials, inside) < level)


# Sanity ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("trials", [1, 9, 100, 2500, 100_000])
@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.3])
def test_bounds_bracket_the_empirical_rate(trials, alpha):
    for successes in np.unique(np.linspace(0, trials, 9).astype(int)):
        lower = lower_confidence_sequence(int(successes), trials, alpha)
        upper = upper_confidence_sequence(int(successes), trials, alpha)
        assert 0.0 <= lower <= successes / trials <= upper <= 1.0
        assert lower < upper
    assert lower_confidence_sequence(0, trials, alpha) == 0.0
    assert upper_confidence_sequence(trials, trials, alpha) == 1.0


def test_bounds_tighten_with_data_and_with_larger_alpha():
    lengths = (10, 100, 1000, 10_000, 100_000)
    all_success = [lower_confidence_sequence(t, t, 0.001) for t in lengths]
    assert all(a < b for a, b in zip(all_success, all_success[1:]))
    assert lower_confidence_sequence(900, 1000, 0.01) < lower_confidence_sequence(900, 1000, 0.1)
    assert upper_confidence_sequence(900, 1000, 0.01) > upper_confidence_sequence(900, 1000, 0.1)
    # A time-uniform bound pays for uniformity: it is below the fixed-n bound at the same level.
    fixed_n = clopper_pearson_lower(9000, 10_000, 0.001)
    assert lower_confidence_sequence(9000, 10_000, 0.001) < fixed_n


@pytest.mark.parametrize(
    "growth, first_round, budget",
    [
        (1.25, 500, 100_000), (1.5, 500, 100_000), (2.0, 1000, 7000), (1.1, 300, 1000),
        (1.25, 500, 1), (1.25, 500, 499), (3.0, 1, 10_000),
    ],
)
def test_rounds_are_positive_and_sum_to_the_budget(growth, first_round, budget):
    plan = SequentialPlan(0.001, budget, GRID, growth=growth, first_round=first_round)
    rounds = plan.rounds()
    assert sum(rounds) == budget
    assert all(isinstance(size, int) and size >= 1 for size in rounds)
    if budget >= first_round:
        assert min(rounds) >= first_round / 2
    again = SequentialPlan(0.001, budget, GRID, growth=growth, first_round=first_round)
    assert rounds == again.rounds()


def test_rounds_include_the_all_success_decisive_look():
    plan = SequentialPlan(0.001, 100_000, GRID)
    stop = plan.all_success_stop()
    assert stop in np.cumsum(plan.rounds())
    assert lower_confidence_sequence(stop, stop, plan.sequence_alpha) > GRID[-1]
    assert lower_confidence_sequence(stop - 1, stop - 1, plan.sequence_alpha) <= GRID[-1]


def test_decide_stops_at_the_budget_and_uses_the_final_look():
    plan = SequentialPlan(0.001, 10_000, GRID)
    for successes in (0, 5000, 9800, 9990, 10_000):
        decision = plan.decide(successes, 10_000)
        assert decision.stop
        if successes:
            assert decision.p_lower >= clopper_pearson_lower(successes, 10_000, 0.0005)
        assert decision.p_lower >= lower_confidence_sequence(successes, 10_000, 0.0005)
    assert plan.decide(10_000, 10_000).p_lower == max_certifiable_probability(10_000, 0.001)
    assert plan.decide(0, 10_000) == Decision(stop=True, p_lower=0.0)


def test_max_certifiable_probability_is_the_all_success_final_look():
    for budget in (100, 10_000, 100_000):
        value = max_certifiable_probability(budget, 0.001)
        assert value == pytest.approx(0.0005 ** (1 / budget), rel=1e-12)
        assert value == SequentialPlan(0.001, budget, GRID).decide(budget, budget).p_lower


def test_unreachable_top_threshold_stops_at_the_first_look():
    # With 1000 draws no all-success stream can certify Phi(3): the plan gives up after the
    # first round, reporting the level it already has.
    plan = SequentialPlan(0.001, 1000, GRID)
    assert max_certifiable_probability(1000, 0.001) < GRID[-1]
    first = plan.rounds()[0]
    decision = plan.decide(first, first)
    assert decision.stop and GRID[0] < decision.p_lower < GRID[-1]


# Cost --------------------------------------------------------------------------------------------

def test_clear_inputs_stop_long_before_the_budget():
    plan = SequentialPlan(0.001, 100_000, GRID)
    rng = np.random.default_rng(3)
    # p_A = 1: exactly at the all-success decisive look (6205 draws, measured), certifying Phi(3).
    decision, draws, _ = _run(plan, 1.0, rng)
    assert draws == plan.all_success_stop() <= 6300
    assert decision.p_lower > GRID[-1]
    # p_A = 0.2: abstains after the first round of 500 draws.
    for _ in range(20):
        decision, draws, _ = _run(plan, 0.2, rng)
        assert draws == 500 and decision.p_lower < 0.5
    # p_A = 0.995: certifies Phi(2) and gives up on Phi(3) within 10,000 draws (about 4,000).
    for _ in range(20):
        decision, draws, _ = _run(plan, 0.995, rng)
        assert draws <= 10_000 and GRID[1] < decision.p_lower < GRID[2]


# Bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(budget=0), "budget"),
        (dict(budget=10.5), "budget"),
        (dict(thresholds=()), "thresholds"),
        (dict(thresholds=(0.9, 0.8)), "strictly increasing"),
        (dict(thresholds=(0.8, 0.8)), "strictly increasing"),
        (dict(thresholds=(0.5, 0.8)), "outside"),
        (dict(thresholds=(0.8, 1.0)), "outside"),
        (dict(thresholds=("a",)), "thresholds"),
        (dict(growth=1.0), "growth"),
        (dict(growth=float("inf")), "growth"),
        (dict(first_round=0), "first_round"),
        (dict(final_share=1.0), "final_share"),
        (dict(futility_alpha=0.0), "futility_alpha"),
    ],
)
def test_invalid_plan_fields_raise(kwargs, message):
    fields = dict(alpha=0.001, budget=1000, thresholds=GRID)
    fields.update(kwargs)
    with pytest.raises(ArgumentError, match=message):
        SequentialPlan(**fields)


def test_invalid_counts_raise():
    plan = SequentialPlan(0.001, 1000, GRID)
    with pytest.raises(ArgumentError, match="exceeds trials"):
        plan.decide(11, 10)
    with pytest.raises(ArgumentError, match="exceeds the budget"):
        plan.decide(5, 1001)
    with pytest.raises(ArgumentError, match="trials"):
        lower_confidence_sequence(0, 0, 0.1)
    with pytest.raises(ArgumentError, match="alpha"):
        upper_confidence_sequence(1, 2, 0.0)
    with pytest.raises(ArgumentError, match="final_share"):
        max_certifiable_probability(100, 0.01, final_share=0.0)
