"""Group-sequential tests of the sequential CERTIFY plan: soundness under optional stopping
(also with adversarial stopping rules), exactness of the boundaries against a brute-force
recursion, structure of looks/rounds/boundaries, cost of the stopping rule, the largest
certifiable probability, and input validation."""
import functools

import numpy as np
import pytest
from scipy.stats import binom, norm

from ancer.errors import ArgumentError
from ancer.sequential import (
    PREDICTION_LEVEL,
    Decision,
    SequentialPlan,
    look_times,
    max_certifiable_probability,
    rejection_boundaries,
)
from ancer.stats import clopper_pearson_lower

GRID = tuple(float(v) for v in norm.cdf([1.0, 2.0, 3.0]))  # sigma = 0.25, radii 0.25/0.5/0.75


def _binomial_bound(runs: int, alpha: float) -> int:
    """Largest miss count that a bound with miss rate <= alpha exceeds with probability < 1e-6."""
    return int(binom.isf(1e-6, runs, alpha))


def _is_miss(plan: SequentialPlan, level: int, p: float) -> bool:
    """A claimed level is wrong when its value is not below the true p."""
    return level >= 1 and p <= plan.levels[level - 1]


def _streams(plan: SequentialPlan, p: float, runs: int, rng: np.random.Generator) -> np.ndarray:
    """Cumulative successes of ``runs`` Bernoulli(p) streams at each look, drawn round by round."""
    rounds = plan.rounds()
    return np.cumsum(rng.binomial(rounds, p, size=(runs, len(rounds))), axis=1)


def _run(plan: SequentialPlan, p: float, rng: np.random.Generator) -> tuple[Decision, int]:
    """Draw rounds of a Bernoulli(p) stream until decide() stops (carrying the level); return
    the last decision and the draws used."""
    successes = trials = level = 0
    for size in plan.rounds():
        successes += int(rng.binomial(size, p))
        trials += size
        decision = plan.decide(successes, trials, level)
        level = decision.level
        if decision.stop:
            return decision, trials
    raise AssertionError("decide() did not stop at the budget")


def _brute_force(threshold: float, looks, boundaries) -> tuple[list[float], list[float]]:
    """Independent exact recursion: full-length laws of S_j (np.convolve of whole binomial
    pmfs, no FFT, no windows, no trimming). Returns, per look j, the probability under p =
    ``threshold`` of crossing at some look <= j, and the same with c_j lowered by one."""
    mass, previous, crossed = np.ones(1), 0, 0.0
    cumulative, lowered = [], []
    for look, boundary in zip(looks, boundaries):
        draws = look - previous
        previous = look
        mass = np.convolve(mass, binom.pmf(np.arange(draws + 1), draws, threshold))
        assert len(mass) == look + 1
        lowered.append(crossed + float(mass[boundary - 1:].sum()))
        crossed += float(mass[boundary:].sum())
        cumulative.append(crossed)
        mass[boundary:] = 0.0  # paths that rejected stop here
    return cumulative, lowered


# Soundness under optional stopping ---------------------------------------------------------

SIM_ALPHA, SIM_BUDGET, SIM_THRESHOLDS = 0.1, 4000, (0.6, 0.8, 0.95)
AT_THRESHOLD = (PREDICTION_LEVEL,) + SIM_THRESHOLDS  # p = a level: the worst case of its test
# Also p just above each level (where stopping as soon as a bound passes is most tempting),
# below and near 1/2, between levels and near 1.
SIM_PS = AT_THRESHOLD + (0.45, 0.505, 0.605, 0.7, 0.805, 0.9, 0.955, 0.99)
SCHEDULES = {"default": (1.25, 500), "coarse": (2.0, 100), "fine": (1.2, 50)}

# Stopping rules: the plan's own, and adversarial ones that ignore decide()'s `stop`. Each gets
# the per-look levels of a stream (decide() at every look, level carried) and the plan's stops.
STOPPING_RULES = {
    "plan": lambda levels, stops: levels[stops.index(True)],
    "to the budget": lambda levels, stops: levels[-1],
    "first increase": lambda levels, stops: next((lv for lv in levels if lv > 0), levels[-1]),
    "last look before the budget": lambda levels, stops: levels[-2] if len(levels) > 1
    else levels[-1],
}


@pytest.mark.parametrize(
    "schedule, spending_power",
    [("default", 0.5), ("default", 1.0), ("coarse", 1.0), ("fine", 0.5), ("fine", 2.0)],
)
def test_claimed_level_is_valid_under_any_stopping_rule(schedule, spending_power):
    growth, first_round = SCHEDULES[schedule]
    plan = SequentialPlan(SIM_ALPHA, SIM_BUDGET, SIM_THRESHOLDS, growth=growth,
                          first_round=first_round, spending_power=spending_power)
    looks = plan.looks()
    # decide() is deterministic in its arguments; memoizing it only avoids recomputing the
    # futility rule for streams that share a count at a look.
    decide = functools.lru_cache(maxsize=None)(plan.decide)
    runs = 500
    bound = _binomial_bound(runs, SIM_ALPHA)
    rng = np.random.default_rng(round(1000 * growth + 10 * first_round + spending_power))
    total = dict.fromkeys(STOPPING_RULES, 0)
    for p in SIM_PS:
        counts = _streams(plan, p, runs, rng)
        misses = dict.fromkeys(STOPPING_RULES, 0)
        for row in counts:
            level, levels, stops = 0, [], []
            for successes, trials in zip(row, looks):
                decision = decide(int(successes), trials, level)
                assert decision.level >= level  # a rejection is final
                assert decision.p_lower == (plan.levels[decision.level - 1]
                                            if decision.level else 0.0)
                level = decision.level
                levels.append(level)
                stops.append(decision.stop)
            assert stops[-1]  # decide() always stops at the budget
            for name, rule in STOPPING_RULES.items():
                misses[name] += _is_miss(plan, rule(levels, stops), p)
        if p in AT_THRESHOLD:
            # Running to the budget claims the highest level ever passed: at p = levels[k]
            # it misses exactly when the test of levels[k] crossed its boundary at some look.
            k = plan.levels.index(p)
            crossed = np.any(counts >= np.array(plan.boundaries(k)), axis=1)
            assert misses["to the budget"] == int(crossed.sum())
            for name, count in misses.items():
                assert count <= bound, (name, p, count, bound)
        else:
            assert max(misses.values()) <= bound
        assert max(misses.values()) == misses["to the budget"]  # the level only grows
        for name in total:
            total[name] += misses[name]
    for name, count in total.items():
        assert count <= _binomial_bound(runs * len(SIM_PS), SIM_ALPHA), (name, count)
    # The check is not vacuous: at the thresholds the tests do reject about alpha of the time.
    assert total["to the budget"] >= runs * len(AT_THRESHOLD) * SIM_ALPHA / 3


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_naive_clopper_pearson_under_optional_stopping_is_caught_by_the_same_check(schedule):
    # Applying the fixed-n Clopper-Pearson bound at every look and stopping as soon as it passes
    # the level inflates the miss rate above alpha; the binomial check used above flags that,
    # while the plan's boundaries pass it on the very same streams.
    growth, first_round = SCHEDULES[schedule]
    plan = SequentialPlan(SIM_ALPHA, SIM_BUDGET, SIM_THRESHOLDS, growth=growth,
                          first_round=first_round)
    looks = plan.looks()
    lower = functools.lru_cache(maxsize=None)(clopper_pearson_lower)
    runs = 400
    rng = np.random.default_rng(7 + first_round)
    naive_total = plan_total = 0
    for k, p in enumerate(AT_THRESHOLD):
        counts = _streams(plan, p, runs, rng)
        naive = sum(any(lower(int(s), n, SIM_ALPHA) > p for s, n in zip(row, looks))
                    for row in counts)
        sequential = int(np.any(counts >= np.array(plan.boundaries(k)), axis=1).sum())
        assert sequential <= _binomial_bound(runs, SIM_ALPHA)
        if schedule == "fine":  # 16 looks: every single level is caught
            assert naive > _binomial_bound(runs, SIM_ALPHA), (p, naive)
        naive_total += naive
        plan_total += sequential
    total_bound = _binomial_bound(runs * len(AT_THRESHOLD), SIM_ALPHA)
    assert naive_total > total_bound
    assert plan_total <= total_bound


# Exactness of the boundaries -----------------------------------------------------------------

EXACT_THRESHOLDS = (PREDICTION_LEVEL, 0.84, 0.977, 0.9987)


@pytest.mark.parametrize("threshold", EXACT_THRESHOLDS)
@pytest.mark.parametrize("spending_power", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(
    "budget, alpha, schedule",
    [(3000, 0.05, "default"), (10_000, 0.001, "default"), (10_000, 0.01, "coarse")],
)
def test_rejection_boundaries_match_a_brute_force_recursion(
    threshold, spending_power, budget, alpha, schedule
):
    growth, first_round = SCHEDULES[schedule]
    looks = look_times(budget, first_round, growth)
    boundaries, level = rejection_boundaries(threshold, alpha, looks, spending_power)
    assert len(boundaries) == len(looks)
    assert all(1 <= c <= look + 1 for c, look in zip(boundaries, looks))
    cumulative, lowered = _brute_force(threshold, looks, boundaries)
    assert level == pytest.approx(cumulative[-1], rel=0, abs=1e-12)
    assert level <= alpha
    for look, spent, spent_lowered in zip(looks, cumulative, lowered):
        allowed = alpha * (look / budget) ** spending_power
        assert spent <= allowed  # the spending function is respected at every look
        assert spent_lowered > allowed  # c_j - 1 would overspend: the boundary is the tightest


def test_tightness_covers_every_kind_of_boundary():
    # The parametrized check above covers looks that cannot reject (c_j = n_j + 1: even n_j
    # successes would overspend); this case of it also has all-success-only boundaries (c_j =
    # n_j) and interior ones, and each is the smallest count that keeps to the spending.
    alpha, looks = 0.001, look_times(10_000, 500, 1.25)
    boundaries, _ = rejection_boundaries(0.9987, alpha, looks, 0.5)
    kinds = {"none" if c == n + 1 else "all" if c == n else "interior"
             for c, n in zip(boundaries, looks)}
    assert kinds == {"none", "all", "interior"}
    cumulative, lowered = _brute_force(0.9987, looks, boundaries)
    for look, spent, spent_lowered in zip(looks, cumulative, lowered):
        allowed = alpha * (look / looks[-1]) ** 0.5
        assert spent <= allowed < spent_lowered
    interior, _ = rejection_boundaries(0.84, alpha, looks, 0.5)
    assert all(c < n for c, n in zip(interior, looks))


@pytest.mark.parametrize("threshold", [0.6, 0.9])
def test_rejection_probability_grows_with_p_and_stays_below_the_level(threshold):
    # P_p(reject H: p <= t) <= P_t(reject) <= alpha for every p <= t, exactly (brute force).
    looks = look_times(3000, 100, 2.0)
    boundaries, level = rejection_boundaries(threshold, 0.05, looks, 0.5)
    powers = [_brute_force(p, looks, boundaries)[0][-1]
              for p in np.linspace(0.5, threshold, 6)]
    assert all(a <= b for a, b in zip(powers, powers[1:]))
    assert powers[-1] == pytest.approx(level, rel=0, abs=1e-12)
    assert powers[0] < level / 10


@pytest.mark.parametrize("spending_power", [0.5, 1.0])
@pytest.mark.parametrize("threshold", AT_THRESHOLD)
@pytest.mark.parametrize("schedule", ["default", "fine"])
def test_monte_carlo_crossing_rate_matches_the_computed_level(schedule, threshold,
                                                              spending_power):
    growth, first_round = SCHEDULES[schedule]
    plan = SequentialPlan(SIM_ALPHA, SIM_BUDGET, SIM_THRESHOLDS, growth=growth,
                          first_round=first_round, spending_power=spending_power)
    k = plan.levels.index(threshold)
    _, level = rejection_boundaries(threshold, SIM_ALPHA, plan.looks(), spending_power)
    assert SIM_ALPHA / 2 < level <= SIM_ALPHA
    streams = 20_000
    rng = np.random.default_rng(round(threshold * 1e4) + first_round)
    counts = _streams(plan, threshold, streams, rng)
    crossed = int(np.any(counts >= np.array(plan.boundaries(k)), axis=1).sum())
    assert binom.ppf(5e-7, streams, level) <= crossed <= binom.isf(5e-7, streams, level)


# Structure -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "growth, first_round, budget",
    [
        (1.25, 500, 100_000), (1.5, 500, 100_000), (2.0, 1000, 7000), (1.1, 300, 1000),
        (1.25, 500, 1), (1.25, 500, 499), (1.25, 500, 700), (1.25, 500, 800), (3.0, 1, 10_000),
        (1.01, 7, 3000),
    ],
)
def test_looks_and_rounds_partition_the_budget(growth, first_round, budget):
    plan = SequentialPlan(0.001, budget, GRID, growth=growth, first_round=first_round)
    looks = plan.looks()
    base = look_times(budget, first_round, growth)
    extra = set(looks) - set(base)  # at most the one all-success anchor, which displaces
    assert len(extra) <= 1          # only the looks near it
    for look in set(base) - set(looks):
        anchor = extra.pop() if len(extra) else None
        assert anchor is not None and (anchor / growth ** 0.5 < look < anchor * growth ** 0.5
                                       or abs(look - anchor) < first_round / 2)
        extra.add(anchor)
    assert looks[-1] == budget
    assert all(a < b for a, b in zip(looks, looks[1:]))
    assert looks[0] == min(first_round, budget) or looks == (budget,)
    rounds = plan.rounds()
    assert sum(rounds) == budget
    assert all(isinstance(size, int) and size >= 1 for size in rounds)
    assert min(rounds) >= min(budget, first_round / 2)
    assert list(np.cumsum(rounds)) == list(looks)
    again = SequentialPlan(0.001, budget, GRID, growth=growth, first_round=first_round)
    assert rounds == again.rounds()


def test_boundaries_are_nondecreasing_in_the_threshold():
    thresholds = tuple(float(t) for t in np.linspace(0.55, 0.995, 10))
    plan = SequentialPlan(0.01, 20_000, thresholds)
    looks = plan.looks()
    table = np.array([plan.boundaries(k) for k in range(len(plan.levels))])
    assert np.all(np.diff(table, axis=0) >= 0)
    assert np.any(np.diff(table, axis=0) > 0, axis=0).all()  # and they do move
    assert np.all(table <= np.array(looks) + 1)


def test_decide_counts_the_boundaries_reached():
    # From level 0, decide() claims the number of levels whose boundary the count reaches.
    plan = SequentialPlan(0.01, 5000, GRID, growth=1.5, first_round=300)
    looks = plan.looks()
    table = np.array([plan.boundaries(k) for k in range(len(plan.levels))])
    for j, look in enumerate(looks):
        edges = np.unique(np.concatenate([table[:, j] - 1, table[:, j]]))
        for successes in [0, look // 2] + [int(s) for s in edges if 0 <= s <= look] + [look]:
            decision = plan.decide(successes, look)
            assert decision.level == int(np.sum(successes >= table[:, j]))


def test_a_level_passed_earlier_is_kept():
    plan = SequentialPlan(0.001, 100_000, GRID)
    looks = plan.looks()
    first = plan.decide(looks[0], looks[0])  # 500 of 500: passes Phi(2), not Phi(3)
    assert first.level == 3 and first.p_lower == GRID[1]
    # A later look whose count is below every boundary keeps the level already passed.
    assert looks[0] < plan.boundaries(0)[1]
    later = plan.decide(looks[0], looks[1], first.level)
    assert later.level == first.level and later.p_lower == GRID[1]
    assert later.stop  # Phi(3) is now out of reach
    # And a level passed earlier is not lost at the budget either.
    assert plan.decide(0, plan.budget, 2) == Decision(stop=True, level=2, p_lower=GRID[0])
    assert plan.decide(0, plan.budget, 0) == Decision(stop=True, level=0, p_lower=0.0)


def test_decide_always_stops_at_the_budget():
    plan = SequentialPlan(0.001, 10_000, GRID)
    top = len(plan.levels)
    for successes in (0, 3000, 5000, 5100, 8600, 9800, 9990, 10_000):
        for level in range(top + 1):
            decision = plan.decide(successes, 10_000, level)
            assert decision.stop and decision.level >= level
    assert plan.decide(10_000, 10_000).level == top
    # Before the budget a borderline input keeps drawing.
    assert plan.decide(425, 500) == Decision(stop=False, level=1, p_lower=PREDICTION_LEVEL)


def test_decide_rejects_trials_that_are_not_looks_and_bad_levels():
    plan = SequentialPlan(0.001, 10_000, GRID)
    looks = plan.looks()
    for trials in (looks[0] - 1, looks[0] + 1, looks[1] - 1, 10_001):
        with pytest.raises(ArgumentError, match="not a look"):
            plan.decide(0, trials)
    for level in (-1, len(plan.levels) + 1):
        with pytest.raises(ArgumentError, match="level"):
            plan.decide(0, looks[0], level)


# Cost ---------------------------------------------------------------------------------------

def test_clear_inputs_stop_long_before_the_budget():
    alpha = 0.001
    plan = SequentialPlan(alpha, 100_000, GRID)
    looks, top = plan.looks(), len(plan.levels)
    rng = np.random.default_rng(3)
    # p_A = 1: stops at the first look where n_j successes reach the top boundary.
    expected = next(look for look, c in zip(looks, plan.boundaries(top - 1)) if look >= c)
    decision, draws = _run(plan, 1.0, rng)
    assert decision == Decision(stop=True, level=top, p_lower=GRID[-1])
    assert draws == expected <= 6_200  # the anchor look: a fixed-n test needs 5,114
    # No earlier look could have stopped: there t^n_j alone exceeds the spending alpha (n_j/n)^rho.
    before = looks[looks.index(draws) - 1]
    assert GRID[-1] ** before > alpha * (before / plan.budget) ** plan.spending_power
    # p_A = 0.3: abstains after the first round (futility).
    for _ in range(20):
        decision, draws = _run(plan, 0.3, rng)
        assert draws == looks[0] and decision == Decision(stop=True, level=0, p_lower=0.0)
    # p_A = 0.9: certifies Phi(1), gives up on Phi(2) within a few thousand draws.
    for _ in range(20):
        decision, draws = _run(plan, 0.9, rng)
        assert decision.level == 2 and decision.p_lower == GRID[0] and draws <= 3_000
    # p_A = 0.99999: certifies Phi(3) early.
    for _ in range(10):
        decision, draws = _run(plan, 0.99999, rng)
        assert decision.level == top and draws <= 10_000


# Largest certifiable probability -------------------------------------------------------------

@pytest.mark.parametrize("budget, alpha", [(100, 0.001), (3000, 0.1), (10_000, 0.001)])
def test_max_certifiable_probability_is_the_all_success_limit(budget, alpha):
    value = max_certifiable_probability(budget, alpha)
    # Any level-alpha test that rejects an all-success stream of n_j <= n draws has
    # t^n_j <= alpha, so t <= alpha^(1/n); the plan gets within the bisection's tolerance.
    assert alpha ** (1 / budget) - 3e-9 <= value <= alpha ** (1 / budget)
    below = SequentialPlan(alpha, budget, (value - 1e-8,))
    above = SequentialPlan(alpha, budget, (value + 1e-8,))
    levels = {}
    for name, plan in (("below", below), ("above", above)):
        level = 0
        for trials in plan.looks():
            level = plan.decide(trials, trials, level).level
        levels[name] = level
        assert plan.decide(budget, budget).level == level
    assert levels == {"below": 2, "above": 1}
    assert all(c > look for c, look in zip(above.boundaries(1), above.looks()))


def test_max_certifiable_probability_without_any_certificate():
    # With 5 draws at alpha = 0.001 not even a prediction can pass (0.5^5 > alpha).
    assert max_certifiable_probability(5, 0.001) == 0.5
    plan = SequentialPlan(0.001, 5, ())
    assert plan.boundaries(0) == (6,)
    assert plan.decide(5, 5) == Decision(stop=True, level=0, p_lower=0.0)


# Bad input ---------------------------------------------------------------------------------------

NAN = float("nan")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.0), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=NAN), "alpha"),
        (dict(budget=0), "budget"),
        (dict(budget=10.5), "budget"),
        (dict(growth=1.0), "growth"),
        (dict(growth=0.5), "growth"),
        (dict(growth=float("inf")), "growth"),
        (dict(growth=NAN), "growth"),
        (dict(growth="fast"), "growth"),
        (dict(first_round=0), "first_round"),
        (dict(first_round=2.5), "first_round"),
        (dict(spending_power=0.0), "spending_power"),
        (dict(spending_power=-1.0), "spending_power"),
        (dict(spending_power=NAN), "spending_power"),
        (dict(spending_power=float("inf")), "spending_power"),
        (dict(futility=0.0), "futility"),
        (dict(futility=1.0), "futility"),
        (dict(futility=NAN), "futility"),
        (dict(thresholds=(0.5, 0.8)), "threshold"),
        (dict(thresholds=(0.4,)), "threshold"),
        (dict(thresholds=(0.8, 1.0)), "threshold"),
        (dict(thresholds=(NAN,)), "threshold"),
        (dict(thresholds=(0.9, 0.8)), "thresholds must be strictly increasing"),
        (dict(thresholds=(0.8, 0.8)), "thresholds must be strictly increasing"),
        (dict(thresholds=("a",)), "thresholds"),
        (dict(thresholds=(None,)), "thresholds"),
        (dict(thresholds=0.8), "thresholds"),
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
        plan.decide(501, 500)
    with pytest.raises(ArgumentError, match="successes"):
        plan.decide(-1, 500)
    with pytest.raises(ArgumentError, match="successes"):
        plan.decide(1.5, 500)
    with pytest.raises(ArgumentError, match="trials"):
        plan.decide(0, 0)
    with pytest.raises(ArgumentError, match="budget"):
        max_certifiable_probability(0, 0.01)
    with pytest.raises(ArgumentError, match="alpha"):
        max_certifiable_probability(100, 0.0)


@pytest.mark.parametrize("alpha", [1e-6, 1e-9, 1e-12, 1e-15])
@pytest.mark.parametrize("threshold", [0.6, 0.8413, 0.99])
def test_boundaries_keep_their_level_at_tiny_alpha(alpha, threshold):
    # The boundaries, checked by the independent full-length recursion, keep to the spending
    # at every look and are the tightest that do, however small alpha is: the computation is
    # exact up to relative rounding, which the safety margin covers (an FFT's absolute
    # round-off, about 1e-16 of the total mass, moves boundaries both ways at alpha = 1e-15).
    looks = look_times(10_000, 500, 1.25)
    boundaries, level = rejection_boundaries(threshold, alpha, looks, 0.5)
    cumulative, lowered = _brute_force(threshold, looks, boundaries)
    assert level == pytest.approx(cumulative[-1], rel=1e-6)
    for look, spent, spent_lowered in zip(looks, cumulative, lowered):
        allowed = alpha * (look / looks[-1]) ** 0.5
        assert spent <= allowed < spent_lowered * (1 + 1e-6)
