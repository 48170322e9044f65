"""Regions: volumes against closed forms, membership and inclusion against brute force."""
import math

import numpy as np
import pytest
import torch

from ancer.certificates import CrossPolytope, Ellipsoid, L1Ball, L2Ball, make_region
from ancer.errors import ArgumentError


def test_log_volumes_match_closed_forms_in_small_dimension():
    c2, c3 = torch.zeros(2), torch.zeros(3)
    assert math.exp(Ellipsoid(c2, torch.tensor([2.0, 0.5])).log_volume) == pytest.approx(math.pi * 1.0)
    assert math.exp(Ellipsoid(c3, torch.tensor([1.0, 2.0, 3.0])).log_volume) == pytest.approx(4 / 3 * math.pi * 6)
    assert math.exp(L2Ball(c3, 2.0).log_volume) == pytest.approx(4 / 3 * math.pi * 8)
    # The l1 ball in 2-D is a square of diagonal 2a: area 2 a b; in 3-D an octahedron (4/3) abc.
    assert math.exp(CrossPolytope(c2, torch.tensor([2.0, 0.5])).log_volume) == pytest.approx(2.0)
    assert math.exp(CrossPolytope(c3, torch.tensor([1.0, 2.0, 3.0])).log_volume) == pytest.approx(8.0)
    assert math.exp(L1Ball(c3, 2.0).log_volume) == pytest.approx(4 / 3 * 8)


@pytest.mark.parametrize("cls", [Ellipsoid, CrossPolytope])
def test_log_volume_stays_finite_at_imagenet_dimension(cls):
    d = 3 * 224 * 224
    axes = torch.full((3, 224, 224), 0.5)
    axes[0] = 0.25
    region = cls(torch.zeros(3, 224, 224), axes)
    assert math.isfinite(region.log_volume)
    ball = make_region(cls.norm, torch.zeros(3, 224, 224), 0.25)
    assert math.isfinite(ball.log_volume)
    # Same shape, semi-axes doubled: log-volume grows by d log 2.
    assert region.scaled(2.0).log_volume - region.log_volume == pytest.approx(d * math.log(2), rel=1e-9)
    assert region.proxy_radius == pytest.approx(0.25)
    assert region.volume_radius == pytest.approx(math.exp((math.log(0.25) + 2 * math.log(0.5)) / 3), rel=1e-6)


def test_balls_are_regions_with_equal_axes():
    ball = make_region("l2", torch.zeros(4), 0.3)
    assert isinstance(ball, L2Ball) and ball.radius == pytest.approx(0.3)
    assert ball.proxy_radius == ball.volume_radius == pytest.approx(0.3)
    assert isinstance(make_region("l1", torch.zeros(4), torch.full((4,), 0.3)), CrossPolytope)
    with pytest.raises(ArgumentError):
        make_region("linf", torch.zeros(4), 0.3)


def test_contains_matches_the_definition():
    region = Ellipsoid(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.5]))
    points = torch.tensor([[2.9, 0.0], [3.1, 0.0], [1.0, 0.49], [1.0, 0.51], [2.0, 0.45]])
    assert region.contains(points).tolist() == [True, False, True, False, False]
    poly = CrossPolytope(torch.zeros(2), torch.tensor([2.0, 1.0]))
    assert poly.contains(torch.tensor([[1.0, 0.49], [1.0, 0.51]])).tolist() == [True, False]


def _random_region(cls, rng, d):
    center = torch.tensor(rng.normal(0, 0.5, d))
    axes = torch.tensor(rng.uniform(0.2, 2.0, d))
    return cls(center, axes)


def _boundary_points(region, rng, count):
    """Points on the boundary of ``region`` (dense in low dimension)."""
    d = region.dim
    directions = rng.normal(size=(count, d))
    if region.norm == "l2":
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    else:
        directions /= np.abs(directions).sum(axis=1, keepdims=True)
        vertices = np.concatenate([np.eye(d), -np.eye(d)])
        directions = np.concatenate([directions, vertices])
    return region.center.numpy() + directions * region.semi_axes.numpy()


@pytest.mark.parametrize("cls", [Ellipsoid, CrossPolytope])
@pytest.mark.parametrize("d", [2, 3])
def test_contains_region_agrees_with_brute_force(cls, d):
    rng = np.random.default_rng(d)
    checked = 0
    for _ in range(300):
        outer, inner = _random_region(cls, rng, d), _random_region(cls, rng, d)
        inner = inner.scaled(float(rng.uniform(0.05, 0.6)))
        points = torch.tensor(_boundary_points(inner, rng, 20000))
        norms = outer._normalized_norm(points - outer.center.double())
        sampled_max = float(norms.max())
        if abs(sampled_max - 1.0) < 0.02:
            continue  # too close to call by sampling
        checked += 1
        assert outer.contains_region(inner) == (sampled_max <= 1.0)
    assert checked > 150


@pytest.mark.parametrize("cls", [Ellipsoid, CrossPolytope])
def test_exact_inclusion_value_equals_the_sampled_maximum(cls):
    rng = np.random.default_rng(7)
    for _ in range(30):
        outer, inner = _random_region(cls, rng, 2), _random_region(cls, rng, 2)
        shift = ((inner.center - outer.center) / outer.semi_axes).numpy()
        ratio = (inner.semi_axes / outer.semi_axes).numpy()
        exact = cls.max_normalized_norm(shift, ratio)
        points = torch.tensor(_boundary_points(inner, rng, 200000))
        sampled = float(outer._normalized_norm(points - outer.center.double()).max())
        assert sampled <= exact + 1e-9
        assert sampled == pytest.approx(exact, rel=2e-3)


def test_concentric_inclusion_and_its_hard_case():
    center = torch.zeros(5)
    iso = L2Ball(center, 0.5)
    aniso = Ellipsoid(center, torch.tensor([0.5, 0.6, 0.9, 2.0, 0.5]))
    assert aniso.contains_region(iso) and not iso.contains_region(aniso)
    shifted = center.clone()
    shifted[2] = 0.1
    assert L1Ball(center, 0.5).contains_region(L1Ball(shifted, 0.35))
    assert not L1Ball(center, 0.5).contains_region(L1Ball(shifted, 0.45))


def test_bad_regions_are_refused():
    with pytest.raises(ArgumentError):
        Ellipsoid(torch.zeros(3), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ArgumentError):
        Ellipsoid(torch.zeros(3), torch.ones(4))
    with pytest.raises(ArgumentError):
        L2Ball(torch.zeros(3), 1.0).contains_region(L1Ball(torch.zeros(3), 1.0))
    with pytest.raises(ArgumentError):
        L2Ball(torch.zeros(3), 1.0).contains(torch.zeros(2, 4))
