"""Denoised smoothing (``ancer.denoisers``): f(D(x)) as the base classifier.

- An untrained DnCNN is exactly the identity (Salman et al.'s initialization: last
  convolution zero), so its rows equal the rows without a denoiser, through the command
  line and the engine, for every method.
- Salman et al.'s checkpoint layout (``{'arch', 'state_dict'}``, ``module.`` prefixes) loads
  to the same function; bad denoisers get one clear error.
- One-shot diffusion (Carlini et al.): t* and the [0, 1] ↔ [−1, 1] scaling against closed
  forms; with the exact ε of point-mass and Gaussian data it returns the posterior mean.
- The composition stays sound on a linear classifier: an affine denoiser in front of a
  linear classifier is a linear classifier, whose certificates are known in closed form.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from scipy.stats import binom

from ancer import ABSTAIN, ArgumentError, CheckpointError, Certifier, CertifyConfig
from ancer.denoisers import (DnCNN, MemNet, OneShotDiffusion, create_denoiser, load_denoiser,
                             timestep_for_sigma)
from ancer.denoisers.diffusion import noise_ratio
from ancer.train import save_checkpoint
from cli_helpers import certify, dataset_tensors, make_files, rows_without_time
from linear_models import Linear, inputs_at_margins


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("denoisers"))


def _ddpm_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """ᾱ_t of DDPM's linear schedule, β from 1e-4 to 0.02 (Ho et al. 2020)."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, steps, dtype=torch.float64), 0)


# -- DnCNN and the checkpoint layout ---------------------------------------------------------

def test_untrained_dncnn_gives_the_rows_of_no_denoiser(files, tmp_path):
    denoiser = tmp_path / "dncnn.pth.tar"
    save_checkpoint(denoiser, {"arch": "cifar_dncnn_small",
                               "state_dict": create_denoiser("cifar_dncnn_small").state_dict()})
    flags = ["--model", str(files["model"]), "--data", str(files["data"]), "--sigma", "0.3",
             "--n0", "30", "--n", "200", "--batch", "200", "--max", "6", "--quiet"]
    assert certify(*flags, "--out", str(tmp_path / "plain.tsv")) == 0
    assert certify(*flags, "--denoiser", str(denoiser), "--out", str(tmp_path / "d.tsv")) == 0
    assert rows_without_time(tmp_path / "d.tsv") == rows_without_time(tmp_path / "plain.tsv")


@pytest.mark.parametrize("method", ["dds", "ancer"])
def test_untrained_dncnn_gives_the_certificates_of_no_denoiser_for_optimized_scales(files, method):
    """The optimizers differentiate through D: with D = identity every step is the same."""
    model = torch.jit.load(str(files["model"]))
    xs, _ = dataset_tensors(files["data"])
    config = CertifyConfig(sigma=0.3, method=method, n0=30, n=200, batch=200,
                           opt_iterations=3, opt_samples=16)
    plain = Certifier(model, config, 3).certify_batch(xs[:4])
    denoised = Certifier(model, config, 3, denoiser=DnCNN(depth=4, channels=8)).certify_batch(xs[:4])
    for a, b in zip(plain, denoised):
        assert a.label == b.label and np.array_equal(a.counts, b.counts)
        assert torch.equal(torch.as_tensor(a.noise.sigma), torch.as_tensor(b.noise.sigma))


def test_salman_layout_with_dataparallel_prefixes_loads_the_same_function(tmp_path):
    torch.manual_seed(0)
    for arch, net in (("imagenet_dncnn", create_denoiser("imagenet_dncnn")),
                      ("memnet", create_denoiser("memnet"))):
        for module in net.modules():  # move off the identity, and give BN statistics
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        net.eval()
        state = {f"module.{k}": v for k, v in net.state_dict().items()}
        path = tmp_path / f"{arch}.pth.tar"
        torch.save({"epoch": 90, "arch": arch, "state_dict": state, "optimizer": {}}, path)
        loaded = load_denoiser(path)
        x = torch.rand(1, 3, 8, 8)
        assert loaded.arch == arch and loaded.kind == ("memnet" if arch == "memnet" else "dncnn")
        assert torch.allclose(loaded.module(x), net(x), atol=1e-6)
        assert not torch.equal(loaded.module(x), x)
    assert isinstance(create_denoiser("cifar_dncnn_wide"), DnCNN)
    assert isinstance(create_denoiser("imagenet_memnet"), MemNet)


def test_torchscript_denoiser_and_its_settings(files, tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(DnCNN(depth=3, channels=4).eval()), path)
    loaded = load_denoiser(path)
    engine = Certifier(torch.jit.load(str(files["model"])), CertifyConfig(sigma=0.3, n=100),
                       3, denoiser=loaded)
    recorded = engine.settings()["denoiser"]
    assert recorded["kind"] == "torchscript" and len(recorded["sha256"]) == 64


def test_bad_denoisers_get_one_line(files, tmp_path):
    classifier = tmp_path / "clf.pth.tar"
    save_checkpoint(classifier, {"arch": "cifar_resnet20", "state_dict": {}})
    with pytest.raises(CheckpointError, match="classifier checkpoint.*--model"):
        load_denoiser(classifier)
    unknown = tmp_path / "unknown.pth.tar"
    save_checkpoint(unknown, {"arch": "unet9000", "state_dict": {}})
    with pytest.raises(CheckpointError, match="unknown denoiser architecture 'unet9000'"):
        load_denoiser(unknown)
    wrong = tmp_path / "wrong.pth.tar"
    save_checkpoint(wrong, {"arch": "cifar_dncnn", "state_dict": DnCNN(3, 8).state_dict()})
    with pytest.raises(CheckpointError, match="do not fit architecture 'cifar_dncnn'"):
        load_denoiser(wrong)
    shrinking = torch.nn.AvgPool2d(2)
    engine = Certifier(torch.jit.load(str(files["model"])), CertifyConfig(sigma=0.3, n=100), 3,
                       denoiser=shrinking)
    with pytest.raises(ArgumentError, match=r"returned shape \(.*\) for an input of shape"):
        engine.certify(torch.rand(3, 8, 8))


def test_cli_bad_denoiser_is_one_line(files, tmp_path, capsys):
    code = certify("--model", str(files["model"]), "--data", str(files["data"]), "--sigma",
                   "0.3", "--denoiser", str(files["model"]), "--n", "100", "--quiet",
                   "--out", str(tmp_path / "r.tsv"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("certify: error: ")
    assert "returned shape" in err[0]


# -- one-shot diffusion ----------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_timestep_is_the_first_reaching_twice_sigma(sigma):
    alphas = _ddpm_alphas_cumprod()
    t = timestep_for_sigma(alphas, sigma)
    ratio = lambda i: (1 - float(alphas[i])) / float(alphas[i])  # noqa: E731
    assert ratio(t) >= (2 * sigma) ** 2 > ratio(t - 1)
    # the model's x_t then carries noise √ᾱ·2σ, at most and nearly its √(1 − ᾱ)
    carried = math.sqrt(float(alphas[t])) * 2 * sigma / math.sqrt(1 - float(alphas[t]))
    assert math.sqrt(ratio(t - 1) / ratio(t)) < carried <= 1.0


def test_sigma_beyond_the_schedule_is_refused():
    alphas = _ddpm_alphas_cumprod()
    top = math.sqrt(float(noise_ratio(alphas)[-1])) / 2
    assert timestep_for_sigma(alphas, top * 0.999) == len(alphas) - 1
    with pytest.raises(ArgumentError, match="beyond the diffusion schedule's range"):
        timestep_for_sigma(alphas, top * 1.01)


class PointMassEpsilon(torch.nn.Module):
    """The exact ε for data that is the single image c (on [−1, 1]): (x_t − √ᾱ c)/√(1 − ᾱ)."""

    def __init__(self, c: torch.Tensor, alphas: torch.Tensor, learned_variance: bool = False):
        super().__init__()
        self.c, self.alphas, self.learned_variance = c, alphas, learned_variance

    def forward(self, x_t, t):
        a = self.alphas[t].float().view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * self.c) / (1 - a).sqrt()
        return torch.cat([eps, torch.randn_like(eps)], 1) if self.learned_variance else eps


class GaussianEpsilon(torch.nn.Module):
    """The exact ε = E[ε | x_t] for data x₀ ~ N(μ, s²I): √(1 − ᾱ)(x_t − √ᾱ μ)/(ᾱ s² + 1 − ᾱ)."""

    def __init__(self, mu: float, s: float, alphas: torch.Tensor):
        super().__init__()
        self.mu, self.s, self.alphas = mu, s, alphas

    def forward(self, x_t, t):
        a = self.alphas[t].double().view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x_t.double() - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)
        return eps.float()


@pytest.mark.parametrize("learned_variance", [False, True])
def test_point_mass_data_denoises_to_the_point(learned_variance):
    alphas = _ddpm_alphas_cumprod()
    c = torch.rand(1, 3, 8, 8) * 1.6 - 0.8
    denoiser = OneShotDiffusion(PointMassEpsilon(c, alphas, learned_variance), alphas, 0.25)
    x = (c + 1) / 2 + 0.25 * torch.randn(5, 3, 8, 8)  # noisy inputs on [0, 1]
    assert torch.allclose(denoiser(x), ((c + 1) / 2).expand(5, -1, -1, -1), atol=1e-4)


def test_gaussian_data_denoises_to_the_posterior_mean():
    """x₀ ~ N(μ, s²) on [−1, 1]; given x_t = √ᾱ(2y − 1), E[x₀ | x_t] = μ + √ᾱ s²(x_t −
    √ᾱ μ)/(ᾱ s² + 1 − ᾱ); returned on [0, 1] as (E + 1)/2 (unclipped)."""
    alphas, mu, s, sigma = _ddpm_alphas_cumprod(), 0.1, 0.3, 0.25
    denoiser = OneShotDiffusion(GaussianEpsilon(mu, s, alphas), alphas, sigma, clip=False)
    a = float(alphas[denoiser.timestep])
    y = torch.rand(4, 3, 8, 8)
    x_t = math.sqrt(a) * (2 * y.double() - 1)
    posterior_mean = mu + math.sqrt(a) * s ** 2 * (x_t - math.sqrt(a) * mu) / (a * s ** 2 + 1 - a)
    assert torch.allclose(denoiser(y).double(), (posterior_mean + 1) / 2, atol=1e-5)
    # and it is the posterior mean: Monte Carlo over x₀ ~ N(μ, s²), y = (x₀ + 1)/2 + σ·noise
    torch.manual_seed(0)
    x0 = mu + s * torch.randn(200_000, 1, 1, 1)
    y = (x0 + 1) / 2 + sigma * torch.randn_like(x0)
    slope = torch.linalg.lstsq(torch.cat([denoiser(y).flatten()[:, None], torch.ones(len(y), 1)], 1),
                               ((x0 + 1) / 2).flatten()[:, None]).solution
    assert abs(float(slope[0]) - 1) < 0.02 and abs(float(slope[1])) < 0.01  # E[x₀ | D(y)] = D(y)


def test_diffusers_folders_load_both_layouts(tmp_path, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=6, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    flat, pipeline = tmp_path / "flat", tmp_path / "pipeline"
    unet.save_pretrained(flat)
    scheduler.save_config(flat)
    unet.save_pretrained(pipeline / "unet")
    scheduler.save_config(pipeline / "scheduler")
    x = torch.rand(2, 3, 8, 8)
    t = timestep_for_sigma(scheduler.alphas_cumprod, 0.25)
    a = float(scheduler.alphas_cumprod[t])
    x_t = math.sqrt(a) * (2 * x - 1)
    with torch.no_grad():
        eps = unet(x_t, torch.full((2,), t)).sample[:, :3]
    expected = ((x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1) / 2 + 0.5
    for folder in (flat, pipeline):
        loaded = load_denoiser(folder, 0.25)
        assert loaded.kind == "diffusion" and loaded.timestep == t
        with torch.no_grad():
            assert torch.allclose(loaded.module(x), expected, atol=1e-5)
    with pytest.raises(ArgumentError, match="loaded for sigma 0.25"):
        Certifier(torch.nn.Flatten(), CertifyConfig(sigma=0.5, n=100), 10, denoiser=loaded)
    (flat / "scheduler_config.json").unlink()
    with pytest.raises(CheckpointError, match="no scheduler"):
        load_denoiser(flat, 0.25)
    with pytest.raises(ArgumentError, match="beyond the diffusion schedule's range"):
        load_denoiser(pipeline, 100.0)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ArgumentError, match=r"\[diffusion\] extra"):
        load_denoiser(pipeline, 0.25)


# -- soundness on a linear classifier --------------------------------------------------------

class Affine(torch.nn.Module):
    """D(x) = a ⊙ x + c, so that w·D(x) + b = (a ⊙ w)·x + (w·c + b): a linear classifier."""

    def __init__(self, a: torch.Tensor, c: torch.Tensor):
        super().__init__()
        self.a, self.c = a, c

    def forward(self, x):
        return x * self.a + self.c


@pytest.mark.parametrize("norm,method,sequential", [("l2", "isotropic", False),
                                                    ("l1", "isotropic", False),
                                                    ("l2", "ancer", False),
                                                    ("l2", "isotropic", True)])
def test_composition_is_sound_on_a_linear_classifier(norm, method, sequential):
    torch.manual_seed(1)
    d, alpha, trials = 6, 0.05, 60
    w, b = torch.randn(d), 0.1
    a, c = torch.rand(d) + 0.5, 0.1 * torch.randn(d)
    w_total, b_total = a * w, float(w @ c) + b
    margins = torch.linspace(-1.0, 1.0, trials) * float(w_total.norm())
    xs = inputs_at_margins(w_total, b_total, margins)
    extra = dict(opt_iterations=3, opt_samples=16) if method == "ancer" else {}
    if sequential:
        extra.update(sequential=True, radii=(0.1, 0.2, 0.4))
    config = CertifyConfig(sigma=0.3, norm=norm, method=method, n0=50, n=1000, alpha=alpha,
                           batch=2000, seed=2, **extra)
    denoised = Certifier(Linear(w, b), config, 2, denoiser=Affine(a, c)).certify_batch(xs)
    direct = Certifier(Linear(w_total, b_total), config, 2).certify_batch(xs)
    dual = float(w_total.norm()) if norm == "l2" else float(w_total.abs().max())
    violations = answered = 0
    for margin, cert in zip(margins.tolist(), denoised):
        if cert.label == ABSTAIN:
            continue
        answered += 1
        violations += cert.label != int(margin >= 0) or cert.radius > abs(margin) / dual
    assert violations <= binom.ppf(0.999, trials, alpha)
    assert answered > trials // 3
    # the same noise through f∘D and through the equivalent linear classifier: same votes,
    # up to inputs within float rounding of the boundary
    same = sum(x.label == y.label and np.array_equal(x.counts, y.counts)
               for x, y in zip(denoised, direct))
    assert same >= trials - 2
