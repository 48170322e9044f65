"""Training denoisers (``ancer.denoise_train``, ``certify train-denoiser``) and clean
classifiers (``certify train --sigma 0``) for denoised smoothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ancer.denoise_train import DenoiseConfig, denoising_loss
from ancer.denoisers import create_denoiser, load_denoiser
from ancer.errors import ArgumentError
from ancer.train import TrainConfig
from ancer.training_methods import make_method
from certify.cli import main as certify_main
from cli_helpers import BrightestChannel


@pytest.fixture()
def images(tmp_path):
    """48 images 8×8 whose label is their clearly brightest channel."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 48)
    x = rng.uniform(0.1, 0.4, (48, 8, 8, 3))
    x[np.arange(48), :, :, y] += 0.4
    path = tmp_path / "images.npz"
    np.savez(path, x=(x * 255).astype(np.uint8), y=y.astype(np.int64))
    return path


def _train(images, out, *extra):
    return certify_main(["train-denoiser", "--arch", "cifar_dncnn_small", "--dataset", "npz",
                         "--data", str(images), "--out", str(out), "--sigma", "0.25",
                         "--batch-size", "16", "--quiet", *extra])


def test_mse_training_lowers_the_loss_and_resumes_exactly(images, tmp_path):
    straight, resumed = tmp_path / "straight.pth.tar", tmp_path / "resumed.pth.tar"
    assert _train(images, straight, "--epochs", "3") == 0
    assert _train(images, resumed, "--epochs", "1") == 0
    assert _train(images, resumed, "--epochs", "3", "--resume") == 0
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    assert set(a) >= {"arch", "state_dict", "epoch", "optimizer", "sigma"}  # Salman et al.'s keys
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    losses = [h["loss"] for h in a["history"]]
    assert losses[-1] < losses[0] < 0.25 ** 2 * 1.05  # the identity starts at about σ²
    loaded = load_denoiser(straight)
    assert loaded.sigma == 0.25 and loaded.arch == "cifar_dncnn_small"
    assert _train(images, straight, "--epochs", "3") != 0  # no overwrite without --resume


def test_stability_objective_is_cross_entropy_against_the_clean_prediction():
    classifier = BrightestChannel().eval()
    x = torch.rand(16, 3, 8, 8)
    identity = create_denoiser("cifar_dncnn_small")
    generator = torch.Generator().manual_seed(0)
    loss, agreement = denoising_loss(identity, x, 1e-6, "stability", classifier, generator)
    target = classifier(x).argmax(1)
    assert torch.allclose(loss, F.cross_entropy(classifier(x), target), atol=1e-4)
    assert bool(agreement.all())
    loss.backward()  # the gradient reaches the denoiser, not the classifier's frozen weights
    assert any(p.grad is not None for p in identity.parameters())


def test_stability_training_runs_through_a_frozen_classifier(images, tmp_path):
    classifier = tmp_path / "clf.pt"
    torch.jit.save(torch.jit.script(BrightestChannel().eval()), classifier)
    mse = tmp_path / "mse.pth.tar"
    assert _train(images, mse, "--epochs", "1") == 0
    out = tmp_path / "stab.pth.tar"
    assert _train(images, out, "--epochs", "1", "--objective", "stability",
                  "--classifier", str(classifier), "--init", str(mse)) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["objective"] == "stability" and saved["history"][0]["agreement"] > 0.9
    assert torch.equal(torch.jit.load(str(classifier)).fc.weight, BrightestChannel().fc.weight)


def test_bad_training_input_is_one_line(images, tmp_path, capsys):
    assert _train(images, tmp_path / "s.pth.tar", "--objective", "stability") != 0
    assert "--classifier" in capsys.readouterr().err
    with pytest.raises(ArgumentError):
        DenoiseConfig(sigma=0.0)


def test_sigma_zero_trains_on_clean_inputs():
    config = TrainConfig(sigma=0.0)
    assert config.make_noise() is None
    model = BrightestChannel()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,))
    step = config.method.step_loss(model, x, y, config.make_noise(), None, 0)
    assert torch.allclose(step.loss, F.cross_entropy(model(x), y))
    assert torch.equal(step.predicted[0], model(x).argmax(1))


@pytest.mark.parametrize("method", ["consistency", "macer", "smoothadv"])
def test_sigma_zero_is_refused_by_the_noise_methods(method):
    with pytest.raises(ArgumentError, match="sigma > 0"):
        TrainConfig(sigma=0.0, method=make_method(method, 0.25))
