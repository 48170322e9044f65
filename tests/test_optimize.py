"""Per-input scale optimization (DDRS, ANCER) and certification with the optimized scales.

Soundness is checked on closed forms: a linear two-class model f(x) = [w·x + b >= 0] smoothed
with any symmetric per-dimension noise decides by the sign of w·x + b, so a certified region
is wrong iff its label differs or it reaches past the hyperplane: the largest w·δ over the
ellipsoid with semi-axes a is ||a ⊙ w||_2, over the cross-polytope max_i |w_i a_i|. With
scales chosen per input from draws independent of the certification's, that happens with
probability at most alpha per input.
"""
import math

import pytest
import torch
from scipy.stats import binom, norm

from ancer import ArgumentError, Gaussian, Smoothed, Uniform
from ancer.certificates import CrossPolytope, Ellipsoid, L2Ball
from ancer.optimize import (OptimizedScales, certify_with_scales, optimize_anisotropic,
                            optimize_isotropic, proxy_gap)
from ancer.seeding import input_generator

SHAPE = (1, 2, 3)  # a tiny "image": C×H×W with d = 6


class Linear(torch.nn.Module):
    """Logits (-T·z, T·z) with z = w·x + b: class 1 iff w·x + b >= 0."""

    def __init__(self, w: torch.Tensor, b: float = 0.0, temperature: float = 1.0):
        super().__init__()
        self.linear = torch.nn.Linear(w.numel(), 1)
        with torch.no_grad():
            self.linear.weight.copy_(w.flatten()[None])
            self.linear.bias.fill_(b)
        self.temperature = temperature

    def forward(self, x):
        z = self.temperature * self.linear(x.flatten(1))
        return torch.cat([-z, z], dim=1)


class Constant(torch.nn.Module):
    """Returns the same class scores for every input (0·x keeps the graph connected)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.nn.Parameter(torch.as_tensor(scores, dtype=torch.float32))

    def forward(self, x):
        return self.scores.expand(len(x), -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


class LinearProbabilities(torch.nn.Module):
    """Probabilities (1/2 − c·w·x, 1/2 + c·w·x): the mean over noisy copies is linear in θ."""

    def __init__(self, w: torch.Tensor, c: float):
        super().__init__()
        self.register_buffer("w", w.flatten())
        self.c = c

    def forward(self, x):
        z = self.c * (x.flatten(1) @ self.w)
        return torch.stack([0.5 - z, 0.5 + z], dim=1)


def _linear_inputs(w, b, margins):
    """Inputs in [0, 1] with w·x + b = margin each: a base point moved along w."""
    base = torch.full((w.numel(),), 0.5)
    z0 = float(w @ base) + b
    direction = w / float(w @ w)
    return torch.stack([base + (m - z0) * direction for m in margins]).view(-1, *SHAPE)


# -- the objective and its mechanics ----------------------------------------------------------
def test_proxy_gap_uses_the_top_two_and_passes_gradients():
    p = torch.tensor([[0.2, 0.7, 0.1]], requires_grad=True)
    gap_l2 = proxy_gap(p, "l2")
    assert gap_l2.item() == pytest.approx(norm.ppf(0.7) - norm.ppf(0.2), rel=1e-5)
    (grad,) = torch.autograd.grad(gap_l2.sum(), p)
    assert grad[0, 1] > 0 and grad[0, 0] < 0 and grad[0, 2] == 0
    assert proxy_gap(p, "l1").item() == pytest.approx(0.5)
    clamped = proxy_gap(torch.tensor([[1.0, 0.0]]), "l2").item()
    assert clamped == pytest.approx(norm.ppf(0.999) - norm.ppf(0.001), rel=1e-5)


#: per norm: the gap of the constant probabilities (0.7, 0.2, 0.1), the authors' θ per unit
#: of σ (θ = λ = √3·σ for l1), and DDRS's radius factor (θ/2·gap for l2, θ·gap for l1)
CONSTANT_CASES = [("l2", norm.ppf(0.7) - norm.ppf(0.2), 1.0, 0.5), ("l1", 0.5, math.sqrt(3), 1.0)]


@pytest.mark.parametrize("norm_name, gap, unit, factor", CONSTANT_CASES)
def test_objective_and_first_steps_follow_the_paper(norm_name, gap, unit, factor):
    """With constant probabilities (0.7, 0.2, 0.1) and θ the authors' parameter (σ for l2,
    the half-width λ = √3·σ for l1): the ANCER objective at θ0 is (1 + κ)·gap·θ0, and Adam's
    first step moves every θ_i up by lr (all gradients are positive); DDRS's objective is
    factor·gap·θ0 and its first step θ0 + lr·factor·gap."""
    model = Constant(torch.tensor([0.7, 0.2, 0.1]).log())
    xs = torch.rand(3, *SHAPE)
    result = optimize_anisotropic(model, xs, 0.25, norm_name, iterations=1, lr=0.04, samples=4, kappa=2.0)
    assert result.objective.shape == (1, 3)
    assert torch.allclose(result.objective, torch.full((1, 3), 3 * gap * 0.25 * unit), rtol=1e-5)
    assert torch.allclose(result.sigma, torch.full((3, *SHAPE), (0.25 * unit + 0.04) / unit), rtol=1e-5)
    sigma0 = torch.tensor([0.2, 0.3, 0.4])
    iso = optimize_isotropic(model, xs, sigma0, norm_name, iterations=1, lr=0.01, samples=4)
    assert iso.sigma.shape == (3,)
    assert torch.allclose(iso.objective[0], factor * gap * sigma0 * unit, rtol=1e-5)
    assert torch.allclose(iso.sigma, (sigma0 * unit + 0.01 * factor * gap) / unit, rtol=1e-5)


@pytest.mark.parametrize("norm_name, family", [("l2", Gaussian), ("l1", Uniform)])
def test_one_isotropic_step_is_gradient_ascent_on_the_authors_radius(norm_name, family):
    """On probabilities 1/2 ± z̄ with z̄ = c·w·(x + θ·ε̄) (ε̄ the mean standard draw), DDRS's
    radius is R(θ) = θ/2·(Φ⁻¹(p1) − Φ⁻¹(p2)) = θ·Φ⁻¹(1/2 + z̄) for l2 (θ = σ) and
    R(θ) = θ·(p1 − p2) = 2θ·z̄ for l1 (θ = λ = √3·σ): one step is θ + lr·R'(θ), returned
    as σ."""
    w = torch.tensor([1.0, -0.5, 0.25, 0.8, -0.3, 0.6])
    c, samples, sigma0, lr = 0.3, 16, 0.2, 0.1
    xs = _linear_inputs(w, 0.0, [0.5])
    eps = family(1.0).draw_standard_(torch.empty(samples, *SHAPE), torch.Generator().manual_seed(9))
    drift = float(w.double() @ eps.flatten(1).double().mean(dim=0))
    theta0 = sigma0 if norm_name == "l2" else math.sqrt(3) * sigma0
    z = c * (0.5 + theta0 * drift)
    if norm_name == "l2":
        radius = theta0 * norm.ppf(0.5 + z)
        slope = norm.ppf(0.5 + z) + theta0 * c * drift / norm.pdf(norm.ppf(0.5 + z))
    else:
        radius = 2 * theta0 * z
        slope = 2 * c * (0.5 + 2 * theta0 * drift)
    result = optimize_isotropic(LinearProbabilities(w, c), xs, sigma0, norm_name, iterations=1, lr=lr,
                                samples=samples, outputs="probabilities",
                                generators=[torch.Generator().manual_seed(9)])
    assert result.objective[0, 0].item() == pytest.approx(radius, rel=1e-5)
    theta1 = theta0 + lr * slope
    expected = theta1 if norm_name == "l2" else theta1 / math.sqrt(3)
    assert result.sigma[0].item() == pytest.approx(expected, rel=1e-5)


def test_logits_and_probabilities_give_the_same_scales():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
    probabilities = torch.nn.Sequential(net, torch.nn.Softmax(dim=1))
    logs = torch.nn.Sequential(net, torch.nn.LogSoftmax(dim=1))
    xs = torch.rand(2, *SHAPE)
    kwargs = dict(iterations=5, samples=8, seed=3)
    a = optimize_anisotropic(net, xs, 0.3, "l2", outputs="logits", **kwargs)
    b = optimize_anisotropic(probabilities, xs, 0.3, "l2", outputs="probabilities", **kwargs)
    c = optimize_anisotropic(logs, xs, 0.3, "l2", outputs="log_probabilities", **kwargs)
    assert torch.allclose(a.sigma, b.sigma, atol=1e-5) and torch.allclose(a.sigma, c.sigma, atol=1e-5)


def test_batching_and_chunking_do_not_change_an_inputs_scales():
    """Input i's noise comes from its own generator: optimizing it alone, in a batch, or with
    its samples split over several checkpointed forward chunks gives the same scales."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    xs = torch.rand(5, *SHAPE)
    sigma0 = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    kwargs = dict(iterations=4, samples=12, seed=7)
    batched = optimize_anisotropic(model, xs, sigma0, "l1", max_batch=1000, **kwargs)
    grouped = optimize_anisotropic(model, xs, sigma0, "l1", max_batch=25, **kwargs)
    chunked = optimize_anisotropic(model, xs, sigma0, "l1", max_batch=5, **kwargs)
    alone = torch.cat([
        optimize_anisotropic(model, xs[i:i + 1], sigma0[i:i + 1], "l1", indices=[i], **kwargs).sigma
        for i in range(5)
    ])
    assert torch.equal(batched.sigma, grouped.sigma)
    assert torch.equal(batched.sigma, alone)
    assert torch.allclose(batched.sigma, chunked.sigma, atol=1e-5)
    iso = optimize_isotropic(model, xs, sigma0, "l2", max_batch=1000, lr=0.01, **kwargs)
    iso_alone = torch.cat([
        optimize_isotropic(model, xs[i:i + 1], sigma0[i], "l2", indices=[i], lr=0.01, **kwargs).sigma
        for i in range(5)
    ])
    assert torch.equal(iso.sigma, iso_alone)


def test_seed_repeats_and_generators_are_used():
    model = Linear(torch.randn(6), 0.1)
    xs = torch.rand(2, *SHAPE)
    first = optimize_anisotropic(model, xs, 0.3, "l2", iterations=3, samples=8, seed=5)
    again = optimize_anisotropic(model, xs, 0.3, "l2", iterations=3, samples=8, seed=5)
    other = optimize_anisotropic(model, xs, 0.3, "l2", iterations=3, samples=8, seed=6)
    assert torch.equal(first.sigma, again.sigma) and not torch.equal(first.sigma, other.sigma)
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    mine = optimize_anisotropic(model, xs, 0.3, "l2", iterations=3, samples=8, generators=generators)
    assert not torch.equal(mine.sigma, first.sigma)


def test_model_is_frozen_and_restored_and_progress_counts_every_draw():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4),
                                torch.nn.Linear(4, 3))
    model.train()
    model[3].weight.requires_grad_(False)
    seen = []
    optimize_anisotropic(model, torch.rand(3, *SHAPE), 0.2, "l2", iterations=2, samples=5, max_batch=10,
                         progress=seen.append)
    optimize_isotropic(model, torch.rand(3, *SHAPE), 0.2, "l1", iterations=2, samples=5)
    assert all(parameter.grad is None for parameter in model.parameters())
    assert [parameter.requires_grad for parameter in model.parameters()] == [True, True, True, True, False, True]
    assert model.training
    assert sum(seen) == 2 * 3 * 5


@pytest.mark.parametrize("norm_name, unit", [("l2", 1.0), ("l1", math.sqrt(3))])
def test_projection_keeps_theta_above_the_isotropic_scale(norm_name, unit):
    """A weight that dominates one dimension makes the objective push that θ down: the
    projection holds it at θ_iso, and every θ_i stays >= θ_iso, with θ the authors'
    parameter (σ for l2, λ = √3·σ for l1); the returned σ stays >= σ_iso exactly."""
    w = torch.tensor([8.0, 0.5, 0.5, 0.5, 0.5, 0.5])
    model = Linear(w, temperature=2.0)
    xs = _linear_inputs(w, 0.0, [1.0, 1.2, 1.5])
    sigma0 = torch.tensor([0.15, 0.15, 0.2])
    result = optimize_anisotropic(model, xs, sigma0, norm_name, iterations=30, samples=32)
    lower = sigma0.view(3, 1, 1, 1).expand_as(result.sigma)
    theta, theta_iso = result.sigma.flatten(1) * unit, lower.flatten(1) * unit
    assert (result.sigma >= lower).all()
    assert torch.allclose(theta[:, 0], theta_iso[:, 0], rtol=1e-6, atol=0)
    assert (theta[:, 1:] > theta_iso[:, 1:] * (1 + 1e-3)).all()


def test_isotropic_sigma_grows_where_the_gap_saturates_and_stays_positive():
    model = Constant([5.0, -5.0])  # p1 > 0.999: gap is clamped, d(σ/2·gap)/dσ = gap/2 > 0
    result = optimize_isotropic(model, torch.rand(2, *SHAPE), 0.1, "l2", iterations=10, lr=0.01, samples=4)
    assert (result.sigma > 0.1).all()
    shrinking = optimize_isotropic(Constant([0.0, 0.0]), torch.rand(2, *SHAPE), 0.1, "l1",
                                   iterations=3, lr=1.0, samples=4, min_sigma=0.05)
    assert (shrinking.sigma >= 0.05).all()


@pytest.mark.parametrize("bad, message", [
    (dict(norm="linf"), "norm"),
    (dict(outputs="scores"), "outputs"),
    (dict(theta0=0.0), "initial scale"),
    (dict(theta0=torch.ones(3)), "one value per input"),
    (dict(iterations=0), "iterations"),
    (dict(lr=-1.0), "lr"),
    (dict(indices=[1]), "indices"),
    (dict(precision="fp64"), "precision"),
])
def test_arguments_are_validated(bad, message):
    args = dict(norm="l2", theta0=0.25, iterations=1, samples=2)
    args.update(bad)
    with pytest.raises(ArgumentError, match=message):
        optimize_anisotropic(Linear(torch.ones(6)), torch.rand(2, *SHAPE), args.pop("theta0"), args.pop("norm"),
                             **args)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_search_runs_the_model_in_it_and_still_finds_the_anisotropy(precision, dtype):
    """precision="bf16"/"fp16" evaluates the model under that autocast (seen in its output
    dtype) while θ and the objective stay fp32 (fp16 with a loss scale); on weights that
    ignore all but one dimension the search grows θ where the model does not look, as the
    fp32 search does."""
    dtypes = []

    class Recording(Linear):
        def forward(self, x):
            scores = super().forward(x)
            dtypes.append(scores.dtype)
            return scores

    w = torch.tensor([4.0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    xs = _linear_inputs(w, 0.0, [1.0, 1.5])
    kwargs = dict(iterations=30, samples=32, seed=2)
    low = optimize_anisotropic(Recording(w, temperature=2.0), xs, 0.2, "l2", precision=precision, **kwargs)
    assert set(dtypes) == {dtype}
    fp32 = optimize_anisotropic(Linear(w, temperature=2.0), xs, 0.2, "l2", **kwargs)
    for result in (low, fp32):
        assert result.sigma.dtype == torch.float32 and result.objective.dtype == torch.float32
        flat = result.sigma.flatten(1)
        assert (flat[:, 0] == 0.2).all() and (flat[:, 1:] > 0.3).all()
    # the same certified volume to within 10% per dimension (geometric mean of θ)
    log_mean = lambda result: result.sigma.log().flatten(1).mean(dim=1)  # noqa: E731
    assert torch.allclose(log_mean(low), log_mean(fp32), atol=0.1)


# -- certification with the optimized scales -------------------------------------------------
def test_certify_with_scales_gives_ellipsoids_cross_polytopes_and_balls():
    w = torch.tensor([2.0, -1.0, 0.5, 0.0, 1.0, 0.3])
    model = Linear(w)
    xs = _linear_inputs(w, 0.0, [1.0, 1.2])
    theta = torch.full((2, *SHAPE), 0.2)
    theta[:, 0, 0, 0] = 0.1
    gens = lambda: [input_generator(0, i) for i in range(2)]  # noqa: E731
    l2 = certify_with_scales(Smoothed(model, Gaussian(0.2), 2), xs, theta, 16, 200, 0.01, generators=gens())
    l1 = certify_with_scales(Smoothed(model, Uniform(0.2), 2), xs,
                             OptimizedScales(theta, "l1", torch.zeros(1, 2)), 16, 200, 0.01, generators=gens())
    iso = certify_with_scales(Smoothed(model, Gaussian(0.2), 2), xs, torch.tensor([0.2, 0.3]), 16, 200, 0.01)
    for certificate in l2:
        assert isinstance(certificate.region, Ellipsoid) and certificate.label == 1
        factor = norm.ppf(certificate.p_lower)
        assert torch.allclose(certificate.region.semi_axes, theta[0].double() * factor, rtol=1e-6)
        assert certificate.proxy_radius == pytest.approx(0.1 * factor, rel=1e-6)
        assert certificate.volume_radius < certificate.region.bounding_radius
        assert math.isfinite(certificate.log_volume)
    for certificate in l1:
        assert isinstance(certificate.region, CrossPolytope) and certificate.label == 1
        expected = math.sqrt(3) * theta[0].double() * 2 * (certificate.p_lower - 0.5)
        assert torch.allclose(certificate.region.semi_axes, expected, rtol=1e-6)
    assert all(isinstance(certificate.region, L2Ball) for certificate in iso)
    noises = OptimizedScales(theta, "l1", torch.zeros(1, 2)).noises()
    assert all(isinstance(noise, Uniform) and torch.equal(noise.sigma, theta[0]) for noise in noises)
    with pytest.raises(ArgumentError, match="optimized for l1"):
        certify_with_scales(Smoothed(model, Gaussian(0.2), 2), xs, OptimizedScales(theta, "l1", torch.zeros(1, 2)),
                            16, 100, 0.01)
    with pytest.raises(ArgumentError, match="per input"):
        certify_with_scales(Smoothed(model, Gaussian(0.2), 2), xs, theta[:1], 16, 100, 0.01)


def _violations(norm_name, trials, alpha, seed):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(6, generator=generator) * torch.tensor([3.0, 0.2, 1.0, 0.05, 2.0, 0.5])
    margins = (torch.rand(trials, generator=generator) * 1.2 + 0.1) * torch.where(
        torch.rand(trials, generator=generator) < 0.5, -1.0, 1.0)
    model = Linear(w, temperature=3.0)
    xs = _linear_inputs(w, 0.0, margins)
    scales = optimize_anisotropic(model, xs, 0.4, norm_name, iterations=12, samples=32, seed=seed)
    noise = Gaussian(0.4) if norm_name == "l2" else Uniform(0.4)
    certificates = certify_with_scales(Smoothed(model, noise, 2), xs, scales, 32, 300, alpha,
                                       generators=[input_generator(seed, i) for i in range(trials)])
    wrong = certified = 0
    for margin, certificate in zip(margins.tolist(), certificates):
        if certificate.abstained:
            continue
        certified += 1
        reach_axes = certificate.region.semi_axes.flatten() * w.double()
        reach = reach_axes.norm() if norm_name == "l2" else reach_axes.abs().max()
        wrong += certificate.label != int(margin > 0) or float(reach) >= abs(margin)
    return wrong, certified


@pytest.mark.filterwarnings("ignore::ancer.smoothing.InputRangeWarning")
@pytest.mark.parametrize("norm_name", ["l2", "l1"])
def test_optimized_regions_stay_inside_the_decision_boundary(norm_name):
    trials, alpha = 240, 0.1
    wrong, certified = _violations(norm_name, trials, alpha, seed=11)
    assert certified > trials // 2
    assert wrong <= binom.ppf(0.999, trials, alpha)


def test_anisotropy_pays_where_the_weights_are_uneven():
    """Weights 1 in two dimensions and 1e-3 in the other fourteen: ANCER grows θ where the
    model does not care, so the certified ellipsoid has a far larger volume than the
    isotropic ball, and contains it."""
    shape = (1, 4, 4)
    w = torch.full((16,), 1e-3)
    w[:2] = 1.0
    model = Linear(w, temperature=3.0)
    x = torch.zeros(16)
    x[:2] = 0.5
    xs = x.view(1, *shape).repeat(2, 1, 1, 1)
    iso_scales = optimize_isotropic(model, xs, 0.1, "l2", iterations=5, lr=1e-3, samples=32)
    scales = optimize_anisotropic(model, xs, iso_scales.sigma, "l2", iterations=60, samples=32)
    assert (scales.objective[-1] > scales.objective[0]).all()
    smoothed = Smoothed(model, Gaussian(0.1), 2)
    generators = lambda: [input_generator(4, i) for i in range(2)]  # noqa: E731
    isotropic = certify_with_scales(smoothed, xs, iso_scales, 32, 1000, 0.001, generators=generators())
    anisotropic = certify_with_scales(smoothed, xs, scales, 32, 1000, 0.001, generators=generators())
    for iso, aniso in zip(isotropic, anisotropic):
        assert iso.label == aniso.label == 1
        assert aniso.log_volume > iso.log_volume + 10
        assert aniso.region.contains_region(iso.region)
