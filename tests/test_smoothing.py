"""The smoothed classifier against closed forms.

A linear two-class model f(x) = [w·x + b >= 0] smoothed with Gaussian noise N(0, diag(θ)²) has
P(f(x + ε) = 1) = Φ((w·x + b) / ||θ ⊙ w||_2), and its decision boundary lies at l2 distance
|w·x + b| / ||w||_2 and l1 distance |w·x + b| / ||w||_∞. A certificate is wrong when its label
is not the smoothed classifier's or its region reaches past the boundary; that may happen with
probability at most alpha.
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

from ancer import ABSTAIN, ArgumentError, Gaussian, Smoothed, Uniform
from ancer.certificates import CrossPolytope, Ellipsoid, L1Ball, L2Ball
from ancer.seeding import input_generator
from ancer.smoothing import InputRangeWarning
from ancer.stats import clopper_pearson_lower
from linear_models import Linear, inputs_at_margins


# The linear models take vectors whose coordinates may leave [0, 1]: that is not a mistake here.
vector_inputs = pytest.mark.filterwarnings("ignore::ancer.smoothing.InputRangeWarning")


def _max_allowed_violations(trials, alpha):
    return int(binom.ppf(0.999, trials, alpha))


@vector_inputs
def test_isotropic_l2_is_sound_over_many_trials():
    torch.manual_seed(0)
    d, sigma, alpha, trials = 8, 0.5, 0.05, 300
    w, b = torch.randn(d), 0.1
    # exact p_A between 0.55 and 0.99, both classes
    p = torch.linspace(0.55, 0.99, trials)
    signs = torch.where(torch.arange(trials) % 2 == 0, 1.0, -1.0)
    margins = torch.as_tensor(norm.ppf(p), dtype=torch.float32) * sigma * float(w.norm()) * signs
    xs = inputs_at_margins(w, b, margins)
    smoothed = Smoothed(Linear(w, b), Gaussian(sigma), 2)
    gens = [input_generator(1, i) for i in range(trials)]
    certs = smoothed.certify_batch(xs, n0=50, n=5000, alpha=alpha, batch_size=50_000, generators=gens)
    violations = 0
    for margin, cert in zip(margins.tolist(), certs):
        assert isinstance(cert.region, (L2Ball, type(None)))
        if cert.abstained:
            continue
        true_label = int(margin >= 0)
        distance = abs(margin) / float(w.norm())
        violations += cert.label != true_label or cert.radius > distance
    assert violations <= _max_allowed_violations(trials, alpha)
    assert sum(not c.abstained for c in certs) > trials * 0.8


@vector_inputs
def test_isotropic_l2_radius_is_tight_at_n_100000():
    torch.manual_seed(1)
    d, sigma, alpha, n = 6, 0.25, 0.001, 100_000
    w, b = torch.randn(d), -0.2
    p_true = 0.9
    x = inputs_at_margins(w, b, [norm.ppf(p_true) * sigma * float(w.norm())])[0]
    cert = Smoothed(Linear(w, b), Gaussian(sigma), 2).certify(
        x, 100, n, alpha, batch_size=25_000, generator=torch.Generator().manual_seed(3))
    assert cert.label == 1 and isinstance(cert.region, L2Ball)
    expected = sigma * norm.ppf(clopper_pearson_lower(round(p_true * n), n, alpha))
    assert cert.radius == pytest.approx(expected, rel=0.03)
    assert cert.radius < sigma * norm.ppf(p_true)  # below the exact distance to the boundary
    assert cert.counts.sum() == n and cert.selection_counts.sum() == 100
    assert cert.region.contains(x[None]).item()


@vector_inputs
def test_anisotropic_l2_ellipsoid_is_sound_and_tight():
    torch.manual_seed(2)
    d, alpha, trials = 10, 0.05, 200
    w, b = torch.randn(d), 0.05
    theta = torch.rand(d) * 0.8 + 0.2
    scale = float((theta * w).norm())
    p = torch.linspace(0.6, 0.98, trials)
    margins = torch.as_tensor(norm.ppf(p), dtype=torch.float32) * scale
    xs = inputs_at_margins(w, b, margins)
    noise = Gaussian(theta)
    smoothed = Smoothed(Linear(w, b), Gaussian(0.5), 2)
    gens = [input_generator(2, i) for i in range(trials)]
    certs = smoothed.certify_batch(xs, 50, 5000, alpha, 50_000, generators=gens, noises=[noise] * trials)
    violations, ratios = 0, []
    for margin, prob, cert in zip(margins.tolist(), p.tolist(), certs):
        if cert.abstained:
            continue
        assert isinstance(cert.region, Ellipsoid)
        assert torch.allclose(cert.region.semi_axes, theta.double() * norm.ppf(cert.p_lower), rtol=1e-6)
        # the farthest the ellipsoid reaches along w, against the margin
        reach = float((cert.region.semi_axes * w.double()).norm())
        violations += cert.label != 1 or reach > margin
        ratios.append(reach / margin)
    assert violations <= _max_allowed_violations(trials, alpha)
    assert np.median(ratios) > 0.85  # the certificate gets close to the boundary


@vector_inputs
def test_isotropic_l1_uniform_is_sound_and_exact_for_an_axis_aligned_boundary():
    # f(x) = [x_1 - 0.5 + t >= 0]: under U[-λ, λ], p = (t + λ)/(2λ) and the l1 distance is |t|,
    # so the certified radius 2λ(p_A - 1/2) approaches the distance itself.
    d, sigma, alpha, trials = 5, 0.4, 0.05, 200
    lam = math.sqrt(3) * sigma
    w = torch.zeros(d)
    w[0] = 1.0
    p = torch.linspace(0.6, 0.99, trials)
    margins = (2 * p - 1) * lam
    xs = inputs_at_margins(w, -0.5, margins)
    noise = Uniform(sigma)
    assert noise.half_width == pytest.approx(lam)
    smoothed = Smoothed(Linear(w, -0.5), noise, 2)
    gens = [input_generator(3, i) for i in range(trials)]
    certs = smoothed.certify_batch(xs, 50, 5000, alpha, 50_000, generators=gens)
    violations, ratios = 0, []
    for margin, cert in zip(margins.tolist(), certs):
        if cert.abstained:
            continue
        assert isinstance(cert.region, L1Ball)
        violations += cert.label != 1 or cert.radius > margin
        ratios.append(cert.radius / margin)
    assert violations <= _max_allowed_violations(trials, alpha)
    assert np.median(ratios) > 0.9


@vector_inputs
def test_anisotropic_l1_cross_polytope_is_sound():
    torch.manual_seed(4)
    d, alpha, trials = 6, 0.05, 200
    w, b = torch.randn(d), 0.0
    sigma = torch.rand(d) * 0.5 + 0.1
    lam = math.sqrt(3) * sigma
    margins = torch.linspace(0.3, 1.5, trials) * float((w * lam).abs().max())
    xs = inputs_at_margins(w, b, margins)
    noise = Uniform(sigma)
    certs = Smoothed(Linear(w, b), noise, 2).certify_batch(
        xs, 50, 5000, alpha, 50_000, generators=[input_generator(4, i) for i in range(trials)])
    violations = certified = 0
    for margin, cert in zip(margins.tolist(), certs):
        if cert.abstained:
            continue
        certified += 1
        assert isinstance(cert.region, CrossPolytope)
        # the farthest a cross-polytope reaches along w: max_i |w_i a_i|
        reach = float((cert.region.semi_axes * w.double()).abs().max())
        violations += cert.label != 1 or reach > margin
    assert violations <= _max_allowed_violations(trials, alpha)
    assert certified > trials // 2


def test_predict_abstains_on_an_even_split_and_answers_a_clear_majority():
    w = torch.zeros(3)
    w[0] = 1.0
    model = Linear(w, -0.5)
    smoothed = Smoothed(model, Gaussian(0.25), 2)
    even = torch.tensor([0.5, 0.2, 0.7])
    answers = [smoothed.predict(even, 1000, 0.01, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    assert answers.count(ABSTAIN) >= 18
    clear = torch.tensor([0.9, 0.2, 0.7])
    assert smoothed.predict(clear, 1000, 0.001, generator=torch.Generator().manual_seed(0)) == 1
    assert smoothed.predict(1 - clear, 1000, 0.001, generator=torch.Generator().manual_seed(0)) == 0


def test_packing_several_inputs_does_not_change_any_certificate():
    torch.manual_seed(5)
    w, b = torch.randn(4), 0.0
    xs = torch.rand(5, 4)
    smoothed = Smoothed(Linear(w, b), Gaussian(0.5), 2)
    packed = smoothed.certify_batch(xs, 30, 250, 0.01, batch_size=100,
                                    generators=[input_generator(9, i) for i in range(5)])
    for i, cert in enumerate(packed):
        alone = smoothed.certify(xs[i], 30, 250, 0.01, batch_size=100, generator=input_generator(9, i))
        assert np.array_equal(cert.counts, alone.counts)
        assert np.array_equal(cert.selection_counts, alone.selection_counts)
        assert cert.p_lower == alone.p_lower and cert.label == alone.label


def test_same_seed_repeats_and_other_seed_differs():
    w = torch.randn(4)
    x = torch.full((4,), 0.5)
    smoothed = Smoothed(Linear(w, 0.0), Gaussian(1.0), 2)
    first = smoothed.certify(x, 10, 500, 0.01, generator=input_generator(0, 7))
    again = smoothed.certify(x, 10, 500, 0.01, generator=input_generator(0, 7))
    other = smoothed.certify(x, 10, 500, 0.01, generator=input_generator(1, 7))
    assert np.array_equal(first.counts, again.counts)
    assert not np.array_equal(first.counts, other.counts)


class TinyCNN(torch.nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_image_model_certificate_reports_its_precision_and_region():
    torch.manual_seed(6)
    x = torch.rand(3, 8, 8)
    for precision in ["fp32", "bf16"]:
        smoothed = Smoothed(TinyCNN(), Gaussian(0.1), 10, precision=precision)
        cert = smoothed.certify(x, 20, 200, 0.1, batch_size=64, generator=torch.Generator().manual_seed(0))
        assert cert.precision == precision
        assert cert.counts.sum() == 200
        if not cert.abstained:
            assert cert.region.center.shape == x.shape
    theta = torch.full((3, 8, 8), 0.1)
    theta[0] = 0.3
    cert = Smoothed(TinyCNN(), Gaussian(0.1), 10, channels_last=True).certify(
        x, 20, 200, 0.2, batch_size=64, noise=Gaussian(theta))
    assert cert.abstained or isinstance(cert.region, Ellipsoid)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: Gaussian(0.0), "sigma"),
        (lambda: Gaussian(-1), "sigma"),
        (lambda: Gaussian(torch.tensor([0.1, float("nan")])), "finite"),
        (lambda: Uniform(0.5, half_width=1.0), "either"),
        (lambda: Smoothed(TinyCNN(), Gaussian(0.1), 10).certify(torch.rand(3, 8, 8), 10, 10, 1.5), "alpha"),
        (lambda: Smoothed(TinyCNN(), Gaussian(0.1), 10).certify(torch.rand(3, 8, 8), 0, 10, 0.1), "n0"),
        (lambda: Smoothed(TinyCNN(), Gaussian(0.1), 10).certify(torch.rand(3, 8, 8), 10, 0, 0.1), "n "),
        (lambda: Smoothed(TinyCNN(), Gaussian(0.1), 10).certify(torch.rand(1, 3, 8, 8), 10, 10, 0.1), "certify_batch"),
        (lambda: Smoothed(TinyCNN(), Gaussian(0.1), 7).certify(torch.rand(3, 8, 8), 10, 10, 0.1), "num_classes"),
        (lambda: Smoothed(TinyCNN(), Gaussian(torch.ones(2, 8, 8)), 10).certify(torch.rand(3, 8, 8), 10, 10, 0.1), "broadcast"),
        (lambda: Smoothed(TinyCNN(), Gaussian(0.1), 10, precision="fp8"), "precision"),
    ],
)
def test_bad_input_gets_one_clear_error(call, words):
    with pytest.raises(ArgumentError, match=words):
        call()


def test_inputs_outside_the_unit_range_warn():
    smoothed = Smoothed(TinyCNN(), Gaussian(0.1), 10)
    with pytest.warns(InputRangeWarning, match=r"\[0, 1\]"):
        smoothed.certify(torch.rand(3, 8, 8) * 255, 10, 10, 0.1)
