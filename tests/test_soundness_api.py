"""What is certified is what runs: float32 inputs and noise about the exact x whatever the
weights' dtype, noises and regions that own their tensors, fp32 without TF32, and the
inverse of the radius formulas (Cohen et al. 2019, Thm 1; Yang et al. 2020; ANCER)."""
import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from scipy.stats import norm
from torch import nn

import ancer
from ancer import ABSTAIN, ArgumentError, Gaussian, Smoothed, Uniform
from ancer.accelerate import strict_fp32
from ancer.certificates import CrossPolytope, Ellipsoid, L2Ball
from ancer.labels import ABSTAIN as LABELS_ABSTAIN

SHAPE = (3, 4, 4)
NUM_CLASSES = 3


class Probe(nn.Module):
    """A linear classifier that records each batch it is given (before any cast) and the
    TF32 settings in force during its forward pass."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(math.prod(SHAPE), NUM_CLASSES).to(dtype)
        self.inputs, self.flags = [], []

    def forward(self, x):
        self.inputs.append(x.clone())
        self.flags.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                           torch.get_float32_matmul_precision()))
        return self.linear(x.flatten(1))


@pytest.fixture
def tf32_on():
    """TF32 allowed everywhere, as a user might set it; the original settings restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    yield (True, True, "high")
    torch.set_float32_matmul_precision(saved[2])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]


def current_flags():
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


# -- low-precision weights -------------------------------------------------------------------
@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_low_precision_weights_require_their_precision(dtype, name):
    with pytest.raises(ArgumentError, match=f"precision='{name}'.*model.float"):
        Smoothed(Probe(dtype), Gaussian(0.25), NUM_CLASSES)
    other = "fp16" if name == "bf16" else "bf16"
    with pytest.raises(ArgumentError, match=f"precision='{name}'"):
        Smoothed(Probe(dtype), Gaussian(0.25), NUM_CLASSES, precision=other)


def test_float64_weights_are_refused_with_the_fix():
    with pytest.raises(ArgumentError, match="float64.*model.float"):
        Smoothed(Probe(torch.float64), Gaussian(0.25), NUM_CLASSES)


def test_bf16_weights_see_fp32_noise_about_the_exact_x():
    """x = 0.7 is not a bf16 number (it rounds to 0.69921875): the model must receive
    x + σε formed in fp32 from the same generator, and the region must be centred on x."""
    x = torch.full(SHAPE, 0.7)
    assert torch.bfloat16 != x.dtype and float(x.to(torch.bfloat16)[0, 0, 0]) == 0.69921875
    model = Probe(torch.bfloat16)
    smoothed = Smoothed(model, Gaussian(0.1), NUM_CLASSES, precision="bf16")
    smoothed.sample_counts(x[None], 64, batch_size=64, generators=[torch.Generator().manual_seed(3)])
    expected = torch.empty(64, *SHAPE).normal_(generator=torch.Generator().manual_seed(3)) * 0.1 + x
    seen = smoothed.model.inputs[-1]
    assert seen.dtype == torch.float32
    assert torch.equal(seen, expected)

    cert = smoothed.certify(x, 16, 200, 0.1, batch_size=100, generator=torch.Generator().manual_seed(4))
    assert cert.precision == "bf16" and smoothed.settings()["precision"] == "bf16"
    assert smoothed.settings()["weights"] == "bfloat16"
    assert all(batch.dtype == torch.float32 for batch in smoothed.model.inputs)
    if not cert.abstained:
        assert cert.region.center.dtype == torch.float32 and torch.equal(cert.region.center, x)


def test_fp32_weights_in_bf16_precision_keep_fp32_inputs():
    model = Probe()
    smoothed = Smoothed(model, Gaussian(0.1), NUM_CLASSES, precision="bf16")
    smoothed.sample_counts(torch.rand(1, *SHAPE), 10, batch_size=10)
    assert smoothed.model.inputs[-1].dtype == torch.float32


# -- noises and regions own their tensors ----------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda theta: Gaussian(theta),
    lambda theta: Uniform(theta),
    lambda theta: Uniform(half_width=theta),
])
def test_mutating_the_callers_scale_tensor_changes_nothing(make):
    theta = torch.full(SHAPE, 0.05)
    theta[0] = 0.08
    x = torch.full(SHAPE, 0.5)
    noise = make(theta)
    smoothed = Smoothed(Probe(), noise, NUM_CLASSES)

    def certify():
        return smoothed.certify(x, 20, 300, 0.01, batch_size=100, generator=torch.Generator().manual_seed(9))

    first = certify()
    assert not first.abstained
    axes = first.region.semi_axes.clone()
    theta.mul_(10)
    assert torch.equal(first.region.semi_axes, axes)
    second = certify()
    assert torch.equal(second.region.semi_axes, axes)
    assert (first.counts == second.counts).all() and first.p_lower == second.p_lower
    # the region comes from the very scale the noise is sampled with
    factor = noise.radius_factor(first.p_lower)
    assert torch.equal(first.region.semi_axes, noise.scale_on(torch.device("cpu")).double() * factor)


def test_a_noise_copies_its_scale_as_float32_on_the_cpu():
    theta = torch.full(SHAPE, 0.25, dtype=torch.float64)
    noise = Gaussian(theta)
    assert noise.sigma.dtype == torch.float32 and noise.sigma.data_ptr() != theta.data_ptr()
    noise.scale.mul_(2)  # a returned scale is a copy too
    assert float(noise.scale.max()) == 0.25


def test_a_certificates_region_keeps_its_center_when_the_input_changes():
    x = torch.full(SHAPE, 0.5)
    cert = Smoothed(Probe(), Gaussian(0.05), NUM_CLASSES).certify(
        x, 20, 300, 0.01, batch_size=100, generator=torch.Generator().manual_seed(2))
    assert not cert.abstained
    x.add_(0.25)
    assert torch.equal(cert.region.center, torch.full(SHAPE, 0.5))


@pytest.mark.parametrize("cls", [Ellipsoid, CrossPolytope])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_regions_copy_their_center_and_semi_axes(cls, dtype):
    center, axes = torch.zeros(SHAPE, dtype=dtype), torch.full(SHAPE, 0.5, dtype=dtype)
    region = cls(center, axes)
    center.add_(1.0)
    axes.mul_(10.0)
    assert torch.equal(region.center, torch.zeros(SHAPE, dtype=dtype))
    assert torch.equal(region.semi_axes, torch.full(SHAPE, 0.5, dtype=torch.float64))
    ball = L2Ball(center, 0.3)
    center.add_(1.0)
    assert float(ball.center.max()) == 1.0


# -- fp32 means fp32 -------------------------------------------------------------------------
def test_fp32_turns_tf32_off_for_the_forward_passes_and_restores_the_settings(tf32_on):
    smoothed = Smoothed(Probe(), Gaussian(0.1), NUM_CLASSES)
    smoothed.certify(torch.rand(SHAPE), 10, 100, 0.1, batch_size=50)
    assert set(smoothed.model.flags) == {(False, False, "highest")}
    assert current_flags() == tf32_on


def test_low_precision_leaves_the_tf32_settings_alone(tf32_on):
    smoothed = Smoothed(Probe(), Gaussian(0.1), NUM_CLASSES, precision="bf16")
    smoothed.certify(torch.rand(SHAPE), 10, 100, 0.1, batch_size=50)
    assert set(smoothed.model.flags) == {tf32_on}
    assert current_flags() == tf32_on


def test_strict_fp32_restores_the_settings_after_an_error(tf32_on):
    with pytest.raises(RuntimeError, match="inside"):
        with strict_fp32():
            assert current_flags() == (False, False, "highest")
            raise RuntimeError("inside")
    assert current_flags() == tf32_on


def test_settings_name_how_the_model_ran():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, NUM_CLASSES)).eval()
    settings = Smoothed(model, Gaussian(0.1), NUM_CLASSES).settings()
    assert settings["precision"] == "fp32" and settings["fold_bn"] and settings["folded_batchnorms"] == 1
    assert settings["compile"] is False and settings["channels_last"] is False
    assert Smoothed(model, Gaussian(0.1), NUM_CLASSES, fold_bn=False).settings()["fold_bn"] is False


# -- the certificate -------------------------------------------------------------------------
def test_certificate_records_samples_and_bound_and_is_frozen():
    cert = Smoothed(Probe(), Gaussian(0.1), NUM_CLASSES).certify(torch.rand(SHAPE), 12, 100, 0.1, batch_size=50)
    assert cert.samples == 112 and cert.bound == "clopper-pearson" and cert.memory is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cert.label = 0
    replaced = dataclasses.replace(cert, label=ABSTAIN, region=None)
    assert replaced.abstained and replaced.radius == 0.0 and replaced.samples == 112


# -- probability_for_radius ------------------------------------------------------------------
def _noises():
    theta = torch.linspace(0.1, 0.6, math.prod(SHAPE)).reshape(SHAPE)
    return [Gaussian(0.25), Gaussian(theta), Uniform(0.25), Uniform(theta)]


@pytest.mark.parametrize("noise", _noises(), ids=["l2-iso", "l2-aniso", "l1-iso", "l1-aniso"])
def test_probability_for_radius_inverts_the_regions_proxy_radius(noise):
    center = torch.zeros(SHAPE)
    smallest = noise.scale if noise.isotropic else float(noise.scale.min())
    for radius in (0.01, 0.05, 0.15):
        p = noise.probability_for_radius(radius)
        closed = norm.cdf(radius / smallest) if noise.norm == "l2" else 0.5 + radius / (2 * smallest)
        assert p == pytest.approx(closed, rel=1e-12)
        assert 0.5 < p < 1
        assert noise.region(center, p).proxy_radius == pytest.approx(radius, rel=1e-9)
        assert noise.region(center, p * (1 - 1e-6)).proxy_radius < radius
    assert noise.probability_for_radius(0.0) == 0.5
    with pytest.raises(ArgumentError, match="radius"):
        noise.probability_for_radius(-0.1)


def test_probability_for_radius_may_be_unreachable():
    assert Uniform(half_width=0.5).probability_for_radius(0.6) > 1.0
    assert Gaussian(0.25).probability_for_radius(10.0) == 1.0


# -- layering --------------------------------------------------------------------------------
def test_one_abstain_label_and_memory_does_not_import_smoothing():
    from ancer import results

    assert ancer.ABSTAIN is LABELS_ABSTAIN is results.ABSTAIN == -1
    source = Path(ancer.memory.__file__).read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert "ancer.smoothing" not in imported
