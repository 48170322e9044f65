"""Memory-based certification (Alfarra et al. 2022): exact separation tests and the memory's rules.

The exact tests are checked against independent solvers (SLSQP on min_z max(q_1, q_2) for
ellipsoids, HiGHS ``linprog`` for cross-polytopes), against the analytic separating distance
of regions whose centers differ along one axis, and against brute-force sampling (which can
only confirm an intersection: a sampled point in both regions).
"""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize

from ancer import ArgumentError, ResultsError
from ancer.certificates import CrossPolytope, Ellipsoid, L1Ball, L2Ball
from ancer.memory import (ABSTAIN, Memory, largest_disjoint_scale, largest_inside_scale,
                          regions_intersect)


def _region(norm, center, axes):
    cls = Ellipsoid if norm == "l2" else CrossPolytope
    return cls(torch.as_tensor(center, dtype=torch.float32), torch.as_tensor(axes, dtype=torch.float64))


def _min_max_quadratic(first, second):
    """min_z max(q_1(z), q_2(z)) by SLSQP, independently of the module's dual."""
    c1, c2 = first.center.double().numpy(), second.center.double().numpy()
    a1, a2 = first.semi_axes.numpy(), second.semi_axes.numpy()
    q = [lambda z, c=c, a=a: float(np.sum(((z - c) / a) ** 2)) for c, a in ((c1, a1), (c2, a2))]
    start = np.append(0.5 * (c1 + c2), max(q[0](0.5 * (c1 + c2)), q[1](0.5 * (c1 + c2))))
    constraints = [{"type": "ineq", "fun": lambda v, f=f: v[-1] - f(v[:-1])} for f in q]
    result = minimize(lambda v: v[-1], start, constraints=constraints, method="SLSQP",
                      options={"ftol": 1e-12, "maxiter": 500})
    return float(result.fun)


def _l1_gauge_lp(region, other):
    """min over z in ``other`` of ||(z - c)/a||_1 by linprog (HiGHS): variables z, u, w."""
    c, a = region.center.double().numpy(), region.semi_axes.numpy()
    c2, b = other.center.double().numpy(), other.semi_axes.numpy()
    d = len(c)
    eye, zero = np.eye(d), np.zeros((d, d))
    cost = np.concatenate([np.zeros(d), 1 / a, np.zeros(d)])
    a_ub = np.block([[eye, -eye, zero], [-eye, -eye, zero], [eye, zero, -eye], [-eye, zero, -eye],
                     [np.zeros((1, d)), np.zeros((1, d)), (1 / b)[None]]])
    b_ub = np.concatenate([c, -c, c2, -c2, [1.0]])
    result = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * d + [(0, None)] * 2 * d, method="highs")
    assert result.status == 0
    return float(result.fun)


def _sample(region, count, generator):
    """Uniform points in an ellipsoid or cross-polytope."""
    d = region.dim
    if region.norm == "l2":
        direction = np.random.default_rng(generator).standard_normal((count, d))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        radius = np.random.default_rng(generator + 1).random((count, 1)) ** (1 / d)
        unit = direction * radius
    else:
        rng = np.random.default_rng(generator)
        exponential = rng.exponential(size=(count, d + 1))
        unit = exponential[:, :d] / exponential.sum(axis=1, keepdims=True) * rng.choice([-1, 1], size=(count, d))
    return torch.from_numpy(region.center.double().numpy() + unit * region.semi_axes.numpy())


def _random_pairs(norm, count, seed):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        d = int(rng.integers(2, 11))
        a, b = rng.uniform(0.2, 2.0, d), rng.uniform(0.2, 2.0, d)
        if rng.random() < 0.3:
            b = np.full(d, rng.uniform(0.3, 1.5))  # a ball against an ellipsoid / cross-polytope
        direction = rng.standard_normal(d)
        c1 = rng.uniform(-1, 1, d)
        c2 = c1 + direction / np.linalg.norm(direction) * rng.uniform(0.3, 3.0)
        yield _region(norm, c1, a), _region(norm, c2, b)


# -- exact tests -----------------------------------------------------------------------------
def test_ellipsoid_pairs_match_an_independent_solver_and_sampling():
    decided = {True: 0, False: 0}
    for first, second in _random_pairs("l2", 60, seed=0):
        value = _min_max_quadratic(first, second)
        claimed = regions_intersect(first, second)
        assert claimed == regions_intersect(second, first)
        if abs(value - 1.0) > 1e-4:
            assert claimed == (value <= 1.0), (value, claimed)
            decided[claimed] += 1
        inside = second.contains(_sample(first, 2000, 7))
        if inside.any():
            assert claimed
    assert decided[True] >= 10 and decided[False] >= 10


def test_cross_polytope_gauge_matches_linprog_and_sampling():
    decided = {True: 0, False: 0}
    for first, second in _random_pairs("l1", 60, seed=1):
        gauge = _l1_gauge_lp(first, second)
        claimed = regions_intersect(first, second)
        assert claimed == regions_intersect(second, first)
        if abs(gauge - 1.0) > 1e-6:
            assert claimed == (gauge <= 1.0)
            decided[claimed] += 1
        if claimed:
            assert largest_disjoint_scale(first, second) == pytest.approx(gauge, rel=1e-6)
        inside = second.contains(_sample(first, 2000, 8))
        if inside.any():
            assert claimed
    assert decided[True] >= 10 and decided[False] >= 10


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("d", [2, 5, 10])
def test_separation_along_an_axis_is_exact(norm, d):
    """Centers that differ along axis i only: by symmetry and convexity the regions meet iff
    they meet on that line, i.e. iff the distance is at most a_i + b_i."""
    rng = np.random.default_rng(d)
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    axis = d // 2
    reach = a[axis] + b[axis]
    for factor, expected in ((1 - 1e-6, True), (1 + 1e-6, False)):
        shift = np.zeros(d)
        shift[axis] = factor * reach
        center = rng.uniform(-1, 1, d)
        assert regions_intersect(_region(norm, center, a), _region(norm, center + shift, b)) == expected


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_largest_disjoint_scale_is_tight(norm):
    checked = 0
    for first, second in _random_pairs(norm, 40, seed=2):
        if not regions_intersect(first, second) or bool(second.contains(first.center)):
            continue
        scale = largest_disjoint_scale(first, second)
        assert 0 < scale < 1
        shrunk, grown = first.scaled(scale), first.scaled(scale * (1 + 1e-4))
        assert not regions_intersect(shrunk, second)
        if norm == "l2":
            assert _min_max_quadratic(shrunk, second) > 1.0 - 1e-7
            assert _min_max_quadratic(grown, second) < 1.0
        else:
            assert _l1_gauge_lp(grown, second) < 1.0 < _l1_gauge_lp(shrunk, second) * (1 + 1e-7)
        checked += 1
    assert checked >= 5


def test_largest_inside_scale_matches_closed_forms_and_containment():
    outer = L2Ball(torch.zeros(3), 2.0)
    x = torch.tensor([0.5, 0.0, 0.5])
    ball = largest_inside_scale(outer, x, torch.ones(3))
    assert ball == pytest.approx(2.0 - math.sqrt(0.5), rel=1e-8) and ball < 2.0 - math.sqrt(0.5)
    diamond = CrossPolytope(torch.zeros(3), torch.tensor([1.0, 2.0, 4.0]))
    t = largest_inside_scale(diamond, x, torch.tensor([1.0, 1.0, 1.0]))
    assert t == pytest.approx((1 - 0.5 - 0.125) / 1.0, rel=1e-8)  # (1 - ||v||_1) / max ratio
    assert largest_inside_scale(diamond, torch.tensor([3.0, 0.0, 0.0]), torch.ones(3)) == 0.0
    rng = np.random.default_rng(3)
    for _ in range(10):
        d = int(rng.integers(2, 8))
        ellipsoid = _region("l2", rng.uniform(-1, 1, d), rng.uniform(0.5, 2, d))
        inner_center = ellipsoid.center + torch.from_numpy(rng.uniform(-0.2, 0.2, d)).float()
        axes = torch.from_numpy(rng.uniform(0.2, 1, d))
        t = largest_inside_scale(ellipsoid, inner_center, axes)
        assert ellipsoid.contains_region(Ellipsoid(inner_center, axes * t))
        assert not ellipsoid.contains_region(Ellipsoid(inner_center, axes * t * (1 + 1e-6)))


def test_mixed_norms_and_spaces_are_refused():
    with pytest.raises(ArgumentError, match="different norms"):
        regions_intersect(L2Ball(torch.zeros(2), 1.0), L1Ball(torch.zeros(2), 1.0))
    with pytest.raises(ArgumentError, match="different spaces"):
        regions_intersect(L2Ball(torch.zeros(2), 1.0), L2Ball(torch.zeros(3), 1.0))


# -- the memory's rules ----------------------------------------------------------------------
def _ball(center, radius):
    return L2Ball(torch.tensor(center), radius)


def test_a_sequence_with_conflicts_follows_the_rules():
    memory = Memory("l2")
    first = memory.certify(torch.tensor([0.0, 0.0]), 0, _ball([0.0, 0.0], 1.0), key=0)
    assert (first.action, first.factor) == ("kept", 1.0)

    # An ellipsoid of class 1 reaching 0.5 into the ball: shrunk until it stops at (1, 0).
    center = torch.tensor([3.0, 0.0])
    shrunk = memory.certify(center, 1, Ellipsoid(center, torch.tensor([2.5, 1.0])), key=1)
    assert shrunk.action == "shrunk" and shrunk.label == 1
    assert shrunk.factor == pytest.approx(0.8, rel=1e-8) and shrunk.factor < 0.8
    assert not regions_intersect(shrunk.region, memory.regions[0])

    # An input inside the ball with another class: the ball decides it (DDRS: R_j - ||x - x_j||).
    x = torch.tensor([0.5, 0.0])
    overridden = memory.certify(x, 1, _ball([0.5, 0.0], 3.0), key=2)
    assert (overridden.action, overridden.label, overridden.source) == ("overridden", 0, 0)
    assert isinstance(overridden.region, L2Ball)
    assert overridden.radius == pytest.approx(0.5, rel=1e-8) and overridden.radius < 0.5
    assert memory.regions[0].contains_region(overridden.region)

    # An abstention inside the ball: answered with the ball's shape about x.
    answered = memory.certify(torch.tensor([0.0, 0.6]), ABSTAIN, None, key=3)
    assert (answered.action, answered.label) == ("overridden", 0)
    assert answered.radius == pytest.approx(0.4, rel=1e-6)  # 0.6 in float32

    # An abstention elsewhere stays one and is not stored; a same-class overlap is kept.
    assert memory.certify(torch.tensor([9.0, 9.0]), ABSTAIN, None, key=4).action == "abstained"
    same = memory.certify(torch.tensor([0.0, -1.5]), 0, _ball([0.0, -1.5], 0.9), key=5)
    assert same.action == "kept"

    # An anisotropic input inside the (shrunk) class-1 ellipsoid, certified as class 0: the
    # largest copy of its own ellipsoid inside the stored one.
    y = torch.tensor([3.5, 0.2])
    own = Ellipsoid(y, torch.tensor([0.5, 2.0]))
    decided = memory.certify(y, 0, own, key=6)
    assert (decided.action, decided.label, decided.source) == ("overridden", 1, 1)
    assert memory.regions[1].contains_region(decided.region)
    assert not memory.regions[1].contains_region(own.scaled(decided.factor * 1.001))

    assert len(memory) == 3 and memory.labels == [0, 1, 0] and memory.keys == [0, 1, 5]
    assert memory.report() == {"inputs": 7, "kept": 2, "shrunk": 1, "overridden": 3, "abstained": 1,
                               "exact_tests": memory.counts["exact_tests"], "stored": 3}


def test_stored_regions_of_different_classes_stay_disjoint():
    rng = np.random.default_rng(5)
    memory = Memory("l1")
    for index in range(40):
        x = torch.from_numpy(rng.uniform(0, 3, 3)).float()
        label = int(rng.integers(0, 3))
        if rng.random() < 0.15:
            memory.certify(x, ABSTAIN, None, key=index)
            continue
        memory.certify(x, label, CrossPolytope(x, torch.from_numpy(rng.uniform(0.2, 1.5, 3))), key=index)
    assert memory.counts["shrunk"] > 0 and memory.counts["overridden"] > 0
    for i in range(len(memory)):
        for j in range(i):
            if memory.labels[i] != memory.labels[j]:
                assert not regions_intersect(memory.regions[i], memory.regions[j])
                assert _l1_gauge_lp(memory.regions[i], memory.regions[j]) > 1.0 - 1e-7


def test_bounding_balls_filter_out_far_regions():
    memory = Memory("l2")
    for i in range(50):
        memory.certify(torch.tensor([10.0 * i, 0.0]), i % 2, _ball([10.0 * i, 0.0], 1.0))
    before = memory.counts["exact_tests"]
    memory.certify(torch.tensor([1.5, 0.0]), 1, _ball([1.5, 0.0], 1.0))
    assert memory.counts["exact_tests"] - before == 1  # only the ball at the origin


def _sequence(count, seed):
    rng = np.random.default_rng(seed)
    for index in range(count):
        x = torch.from_numpy(rng.uniform(0, 2, 3)).float()
        if rng.random() < 0.2:
            yield index, x, ABSTAIN, None
        elif rng.random() < 0.5:
            yield index, x, int(rng.integers(0, 3)), L2Ball(x, float(rng.uniform(0.1, 0.8)))
        else:
            yield index, x, int(rng.integers(0, 3)), Ellipsoid(x, torch.from_numpy(rng.uniform(0.1, 1.0, 3)))


def _summary(outcome):
    axes = None if outcome.region is None else outcome.region.semi_axes.tolist()
    return outcome.label, outcome.action, outcome.factor if outcome.region else None, axes


def test_save_and_reload_continue_identically(tmp_path):
    items = list(_sequence(30, seed=9))
    whole = Memory("l2")
    expected = [_summary(whole.certify(x, label, region, key=index)) for index, x, label, region in items]

    partial = Memory("l2")
    got = [_summary(partial.certify(x, label, region, key=index)) for index, x, label, region in items[:15]]
    path = tmp_path / "memory.pt"
    partial.save(path)
    partial.save(path)  # overwriting is atomic too
    assert [p.name for p in tmp_path.iterdir()] == ["memory.pt"]
    resumed = Memory.load(path)
    assert resumed.processed == list(range(15))
    got += [_summary(resumed.certify(x, label, region, key=index)) for index, x, label, region in items[15:]]
    assert got == expected
    assert resumed.report() == whole.report()
    assert [type(r) for r in resumed.regions] == [type(r) for r in whole.regions]
    assert whole.counts["shrunk"] + whole.counts["overridden"] > 0


def test_save_into_a_missing_folder_creates_it_and_errors_name_the_path(tmp_path):
    memory = Memory("l2")
    x = torch.zeros(3)
    memory.certify(x, 1, L2Ball(x, 0.5), key=0)
    path = tmp_path / "x" / "y" / "run.memory.pt"   # docs/python.md section 2 saves like this
    memory.save(path)
    assert Memory.load(path).processed == [0]
    (tmp_path / "file").write_text("")
    with pytest.raises(ResultsError, match=r"cannot create the folder .*file/sub of the memory "
                                           r"file .*run.memory.pt"):
        memory.save(tmp_path / "file" / "sub" / "run.memory.pt")
    with pytest.raises(IsADirectoryError, match=r"^\[Errno 21\] Is a directory: '[^']*/x'$"):
        memory.save(tmp_path / "x")


def test_unreadable_memory_files_raise_results_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a memory")
    with pytest.raises(ResultsError, match="cannot read"):
        Memory.load(bad)
    torch.save({"version": 99}, tmp_path / "old.pt")
    with pytest.raises(ResultsError, match="version"):
        Memory.load(tmp_path / "old.pt")


@pytest.mark.parametrize("call, message", [
    (lambda m: m.certify(torch.zeros(2), 0, L1Ball(torch.zeros(2), 1.0)), "keep one memory per norm"),
    (lambda m: m.certify(torch.ones(2), 0, L2Ball(torch.zeros(2), 1.0)), "centered at x"),
    (lambda m: m.certify(torch.zeros(2), ABSTAIN, L2Ball(torch.zeros(2), 1.0)), "region=None"),
    (lambda m: m.certify(torch.zeros(2), 0, None), "region=None"),
    (lambda m: m.certify(torch.zeros(2), -3, None), "label"),
])
def test_bad_calls_are_refused(call, message):
    with pytest.raises(ArgumentError, match=message):
        call(Memory("l2"))
    with pytest.raises(ArgumentError, match="norm"):
        Memory("linf")


# -- the memory's pass over own certificates made without it (a sharded run's merge) ---------
def test_replay_answers_own_certificates_as_the_memory_in_key_order():
    from ancer.memory import OwnCertificate, replay
    from ancer.noise import Gaussian

    centers = [torch.tensor([0.0, 0.0]), torch.tensor([0.5, 0.0]), torch.tensor([3.0, 0.0]),
               torch.tensor([9.0, 9.0])]
    own = [OwnCertificate(key, x, label, p, Gaussian(sigma), 0.0)
           for key, x, label, p, sigma in [(0, centers[0], 0, 0.8413, 1.2),
                                           (5, centers[1], 1, 0.9772, 1.5),
                                           (7, centers[2], 1, 0.95, 1.5),
                                           (9, centers[3], ABSTAIN, 0.3, 1.0)]]
    own = [OwnCertificate(c.key, c.x, c.label, c.p_lower, c.noise,
                          c.noise.region(c.x, c.p_lower).proxy_radius if c.label != ABSTAIN else 0.0)
           for c in own]
    memory, outcomes = replay("l2", list(reversed(own)))  # given in any order, run by key
    direct = Memory("l2")
    expected = [direct.certify(c.x, c.label, c.region(), key=c.key) for c in own]
    assert memory.processed == [0, 5, 7, 9] == direct.processed
    assert [o.summary for o in outcomes] == [o.summary for o in expected]
    assert outcomes[1].summary == "override:0" and outcomes[1].source_key == 0
    assert [o.action for o in outcomes] == ["kept", "overridden", "shrunk", "abstained"]
    assert outcomes[2].summary == f"shrunk:{outcomes[2].factor!r}"


def test_replay_refuses_a_certificate_that_is_not_its_record():
    from ancer.memory import OwnCertificate, replay
    from ancer.noise import Gaussian

    x = torch.tensor([0.0, 0.0])
    wrong_radius = OwnCertificate(3, x, 0, 0.9, Gaussian(1.0), 0.5)
    with pytest.raises(ResultsError, match="idx 3: its scales give radius"):
        replay("l2", [wrong_radius])
    below_half = OwnCertificate(4, x, 0, 0.4, Gaussian(1.0), 0.0)
    with pytest.raises(ResultsError, match="idx 4: class 0 with p_lower 0.4"):
        replay("l2", [below_half])
