"""The fast path computes the same smoothed classifier as the plain reference loop.

- batch norm folded into convolutions gives the same logits (1e-5) and leaves the user's model
  untouched;
- the fast path's votes (BN folded, channels_last, packed and padded batches) follow the
  same distribution as Cohen et al.'s loop (``ancer.reference``) on a model whose votes
  under noise are genuinely random; the same test rejects a 15% change of σ, so it has power;
- padding counts only the real rows; certificates name the precision they certify;
- compile and CUDA graphs fall back cleanly on the CPU; where a C++ compiler is present,
  the compiled model really runs (no fallback) and votes as the eager one does.
"""
import shutil
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import chi2
from torch import nn

from ancer.accelerate import AccelerationWarning, BatchRunner
from ancer.folding import FoldingWarning, fold_batchnorm
from ancer.noise import Gaussian
from ancer.reference import reference_certify, reference_sample_counts
from ancer.seeding import input_generator
from ancer.smoothing import Smoothed

SIGMA = 0.25
NUM_CLASSES = 3


def noisy_cnn() -> nn.Module:
    """A small CNN with batch norm (affine and not, conv with and without bias) and random
    running statistics, so that folding is not trivial; at σ = 0.25 its top class under
    noise has probability about 0.45-0.95 on uniform random inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(128, NUM_CLASSES),
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.2, 2.0)
                if module.affine:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.3, 0.3)
    return model.eval()


def inputs(count: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# -- batch norm folding ----------------------------------------------------------------------
def test_folded_model_gives_the_same_logits_and_leaves_the_original_alone():
    model = noisy_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert model.training and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = inputs(16)
    with torch.no_grad():
        assert torch.allclose(folded(x), model.eval()(x), rtol=0, atol=1e-5)


def test_folding_a_cifar_resnet_matches_to_float_rounding():
    from ancer.models import create_model

    model = create_model("cifar_resnet20").eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.2)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = inputs(4)
    with torch.no_grad():
        expected, actual = model(x), folded(x)
    assert (actual - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))


def test_an_untraceable_model_runs_unfolded_with_a_warning():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y.flatten(1) if x.sum() > 0 else -y.flatten(1)  # data-dependent: fx cannot trace

    with pytest.warns(FoldingWarning, match="not folded"):
        smoothed = Smoothed(Branchy(), Gaussian(0.1), 12)
    assert any(isinstance(m, nn.BatchNorm2d) for m in smoothed.model.modules())


def test_smoothed_with_folding_does_not_modify_the_users_model():
    model = noisy_cnn().train()
    smoothed = Smoothed(model, Gaussian(SIGMA), NUM_CLASSES)
    assert smoothed.model is not model and model.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in smoothed.model.modules())


# -- the same distribution as the reference loop ---------------------------------------------
def top_class_statistic(reference: np.ndarray, fast: np.ndarray) -> tuple:
    """Sum over inputs of the squared two-proportion z statistic of the top class's frequency
    (top class: argmax of the pooled votes), and the degrees of freedom (one per input whose
    pooled frequency is strictly between 0 and 1). Under equal distributions, ~ χ²(dof)."""
    statistic, dof = 0.0, 0
    for ref, new in zip(reference, fast):
        top = int(np.argmax(ref + new))
        k1, n1, k2, n2 = ref[top], ref.sum(), new[top], new.sum()
        pooled = (k1 + k2) / (n1 + n2)
        if 0 < pooled < 1:
            statistic += (k1 / n1 - k2 / n2) ** 2 / (pooled * (1 - pooled) * (1 / n1 + 1 / n2))
            dof += 1
    return statistic, dof


def fast_counts(xs: torch.Tensor, sigma: float, draws: int) -> np.ndarray:
    """The fast path's votes: BN folded, channels_last, several inputs packed per batch, the
    last batch padded (batch 384 does not divide the draws)."""
    smoothed = Smoothed(noisy_cnn(), Gaussian(sigma), NUM_CLASSES, channels_last=True, pad_batches=True)
    generators = [input_generator(7, i) for i in range(len(xs))]
    return smoothed.sample_counts(xs, draws, batch_size=384, generators=generators)


@pytest.fixture(scope="module")
def reference_votes():
    xs, model = inputs(40), noisy_cnn()
    torch.manual_seed(123)
    return xs, np.stack([reference_sample_counts(model, x, 1000, SIGMA, NUM_CLASSES, 500) for x in xs])


def test_fast_path_votes_follow_the_reference_distribution(reference_votes):
    xs, reference = reference_votes
    top_frequency = reference.max(axis=1) / reference.sum(axis=1)
    assert 0.5 < top_frequency.mean() < 0.8 and top_frequency.min() < 0.6  # votes are random
    fast = fast_counts(xs, SIGMA, 1000)
    assert (fast.sum(axis=1) == 1000).all()
    statistic, dof = top_class_statistic(reference, fast)
    assert dof >= 35
    assert chi2.sf(statistic, dof) > 1e-3, (statistic, dof)


def test_the_distribution_test_detects_a_fifteen_percent_change_of_sigma(reference_votes):
    xs, reference = reference_votes
    statistic, dof = top_class_statistic(reference, fast_counts(xs, SIGMA * 1.15, 1000))
    assert chi2.sf(statistic, dof) < 1e-3, (statistic, dof)


def test_reference_certify_agrees_with_smoothed_certify_on_a_clear_input():
    model, x = noisy_cnn(), inputs(40)[14]  # top class with probability ~0.93 at σ = 0.25
    torch.manual_seed(0)
    label, radius = reference_certify(model, x, 100, 2000, 0.001, SIGMA, NUM_CLASSES, 500)
    cert = Smoothed(model, Gaussian(SIGMA), NUM_CLASSES).certify(
        x, 100, 2000, 0.001, batch_size=500, generator=torch.Generator().manual_seed(0))
    assert label == cert.label != -1
    assert abs(radius - cert.radius) < 0.1


# -- padding, precision, fallbacks -----------------------------------------------------------
class Recording(nn.Module):
    """A linear classifier that records the batch sizes and the dtype it computes in."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, NUM_CLASSES)
        self.batches, self.dtypes = [], []

    def forward(self, x):
        scores = self.linear(x.flatten(1))
        self.batches.append(len(x))
        self.dtypes.append(scores.dtype)
        return scores


def test_padding_keeps_one_shape_and_counts_only_the_real_rows():
    xs = inputs(3)
    padded_model = Recording()
    padded = Smoothed(padded_model, Gaussian(0.5), NUM_CLASSES, pad_batches=True)
    plain = Smoothed(Recording(), Gaussian(0.5), NUM_CLASSES, pad_batches=False)
    plain.model.load_state_dict(padded_model.state_dict())
    counts = [s.sample_counts(xs, 150, batch_size=64, generators=[input_generator(1, i) for i in range(3)])
              for s in (padded, plain)]
    assert set(padded_model.batches) == {64}
    assert 22 in plain.model.batches  # 150 = 2 * 64 + 22: the partial chunks, packed, unpadded
    assert (counts[0].sum(axis=1) == 150).all()
    assert np.array_equal(counts[0], counts[1])


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_certificate_names_the_precision_the_model_was_evaluated_in(precision, dtype):
    model = Recording()
    cert = Smoothed(model, Gaussian(0.5), NUM_CLASSES, precision=precision).certify(
        inputs(1)[0], 10, 100, 0.1, batch_size=50)
    assert cert.precision == precision
    assert set(model.dtypes) == {dtype}


def test_compile_is_off_by_default_on_the_cpu_and_a_failed_compile_falls_back(monkeypatch):
    smoothed = Smoothed(noisy_cnn(), Gaussian(SIGMA), NUM_CLASSES)
    assert not smoothed.runner.compile and not smoothed.runner.pad_batches

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    xs, generators = inputs(2), [input_generator(3, i) for i in range(2)]
    compiled = Smoothed(noisy_cnn(), Gaussian(SIGMA), NUM_CLASSES, compile=True)
    assert compiled.runner.pad_batches
    with pytest.warns(AccelerationWarning, match="uncompiled"):
        counts = compiled.sample_counts(xs, 300, batch_size=128, generators=generators)
    assert not compiled.runner.is_compiled
    expected = smoothed.sample_counts(xs, 300, batch_size=128, generators=[input_generator(3, i) for i in range(2)])
    assert np.array_equal(counts, expected)


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_model_votes_as_the_eager_model_on_the_same_noise():
    """compile=True on the CPU (inductor): the compile succeeds (an AccelerationWarning would
    mean the eager fallback ran), partial batches are padded, and on the same noise the
    votes match eager evaluation except where the top two scores tie to float rounding."""
    xs = inputs(3)
    compiled = Smoothed(noisy_cnn(), Gaussian(SIGMA), NUM_CLASSES, compile=True)
    eager = Smoothed(noisy_cnn(), Gaussian(SIGMA), NUM_CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccelerationWarning)
        fast = compiled.sample_counts(xs, 700, batch_size=256, generators=[input_generator(5, i) for i in range(3)])
    assert compiled.runner.is_compiled and compiled.runner.pad_batches
    plain = eager.sample_counts(xs, 700, batch_size=256, generators=[input_generator(5, i) for i in range(3)])
    assert (fast.sum(axis=1) == 700).all()
    assert np.abs(fast - plain).sum() <= 4, (fast, plain)


def test_cuda_graphs_on_the_cpu_warn_and_are_ignored():
    with pytest.warns(AccelerationWarning, match="CUDA"):
        runner = BatchRunner(noisy_cnn(), NUM_CLASSES, torch.device("cpu"), cuda_graphs=True)
    assert not runner.cuda_graphs


def test_automatic_batch_size_on_the_cpu_is_1000():
    smoothed = Smoothed(noisy_cnn(), Gaussian(SIGMA), NUM_CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cert = smoothed.certify(inputs(1)[0], 10, 1500, 0.1)
    assert smoothed._batch_sizes == {(3, 8, 8): 1000} and cert.counts.sum() == 1500
