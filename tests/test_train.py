"""Tests of noise-augmented training (ancer.train, ancer.augment, certify train) and of
the shipped demo assets."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ancer import load_model
from ancer.augment import random_crop_flip
from ancer.data import ArrayDataset
from ancer.errors import ArgumentError, CheckpointError
from ancer.models import registry
from ancer.train import TrainConfig, learning_rate, preload, save_checkpoint, train
from ancer.training_methods import Consistency
from certify import train_cli
from certify.cli import main as certify_main

ASSETS = Path(__file__).resolve().parents[1] / "certify" / "assets"
TINY = "tiny_test_net"


class _TinyNet(nn.Module):
    """conv-BN-ReLU, global average pooling, ``fc`` (named as in the registry's nets)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture(autouse=True)
def tiny_arch(monkeypatch):
    """A tiny registered architecture, so that training tests take a second."""
    monkeypatch.setitem(registry.ARCHITECTURES, TINY,
                        registry.Architecture(_TinyNet, "cifar10", "tiny test network"))


def _colors(n: int = 96, classes: int = 3, size: int = 16) -> ArrayDataset:
    """Class c: noise with channel c brighter (separable after average pooling)."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % classes
    x = torch.rand(n, 3, size, size, generator=g) * 0.5
    x[torch.arange(n), y] += 0.4
    return ArrayDataset("colors", x.mul(255).round().to(torch.uint8), y, classes)


def _config(**kw) -> TrainConfig:
    base = dict(sigma=0.25, epochs=3, batch_size=16, lr=0.05, schedule="step", lr_step=2)
    return TrainConfig(**{**base, **kw})


def test_training_lowers_the_loss_and_the_checkpoint_loads_back(tmp_path):
    data = _colors()
    result = train(TINY, data, tmp_path / "m.pth.tar", _config(epochs=4))
    losses = [h.loss for h in result.history]
    assert [h.epoch for h in result.history] == [1, 2, 3, 4]
    assert losses[-1] < 0.7 * losses[0]
    assert result.history[-1].accuracy > 0.8

    loaded = load_model(tmp_path / "m.pth.tar")
    assert (loaded.arch, loaded.sigma, loaded.num_classes, loaded.format) == (TINY, 0.25, 3, "cohen")
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        assert torch.equal(loaded.model(x).argmax(1), result.model(x).argmax(1))
        torch.testing.assert_close(loaded.model(x), result.model(x))


def test_checkpoint_has_cohen_keys(tmp_path):
    train(TINY, _colors(), tmp_path / "m.pth.tar", _config(epochs=1))
    saved = torch.load(tmp_path / "m.pth.tar", weights_only=True)
    assert {"arch", "state_dict", "epoch", "sigma", "optimizer"} <= set(saved)
    assert saved["epoch"] == 1 and saved["noise"] == "gaussian"
    assert all(key.startswith("1.") for key in saved["state_dict"])


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    data = _colors()
    straight = train(TINY, data, tmp_path / "a.pth.tar", _config(epochs=3))
    train(TINY, data, tmp_path / "b.pth.tar", _config(epochs=1))
    resumed = train(TINY, data, tmp_path / "b.pth.tar", _config(epochs=3), resume=True)
    assert [h.epoch for h in resumed.history] == [1, 2, 3]
    assert torch.load(tmp_path / "b.pth.tar", weights_only=True)["epoch"] == 3
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    data = _colors()
    first = train(TINY, data, tmp_path / "m.pth.tar", _config(epochs=1))
    again = train(TINY, data, tmp_path / "m.pth.tar", _config(epochs=1), resume=True)
    assert again.history == first.history


def test_existing_checkpoint_is_not_overwritten_without_resume(tmp_path):
    (tmp_path / "m.pth.tar").write_bytes(b"precious")
    with pytest.raises(ArgumentError, match="resume"):
        train(TINY, _colors(), tmp_path / "m.pth.tar", _config(epochs=1))
    assert (tmp_path / "m.pth.tar").read_bytes() == b"precious"


def test_resume_refuses_another_sigma_or_a_foreign_file(tmp_path):
    train(TINY, _colors(), tmp_path / "m.pth.tar", _config(epochs=1))
    with pytest.raises(ArgumentError, match="sigma"):
        train(TINY, _colors(), tmp_path / "m.pth.tar", _config(sigma=0.5), resume=True)
    torch.save({"net": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint written by ancer.train"):
        train(TINY, _colors(), tmp_path / "other.pth", _config(), resume=True)
    (tmp_path / "cut.pth").write_bytes((tmp_path / "m.pth.tar").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        train(TINY, _colors(), tmp_path / "cut.pth", _config(), resume=True)


@pytest.mark.parametrize("options", [dict(noise="uniform"), dict(method=Consistency(lbd=1.0)),
                                     dict(schedule="cosine", augment=False)])
def test_noise_and_regularization_options_run(tmp_path, options):
    result = train(TINY, _colors(), tmp_path / "m.pth.tar", _config(epochs=2, **options))
    assert all(math.isfinite(h.loss) for h in result.history)
    assert result.history[-1].loss < result.history[0].loss
    assert load_model(tmp_path / "m.pth.tar").sigma == 0.25


def test_learning_rate_schedules():
    cosine = _config(schedule="cosine", epochs=10, lr=0.1)
    assert learning_rate(cosine, 0, 0, 100) == pytest.approx(0.1)
    assert learning_rate(cosine, 5, 0, 100) == pytest.approx(0.05)
    assert learning_rate(cosine, 9, 99, 100) < 1e-4
    step = _config(schedule="step", epochs=90, lr=0.1, lr_step=30, lr_gamma=0.1)
    assert [learning_rate(step, e, 0, 10) for e in (0, 29, 30, 89)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.001])


@pytest.mark.parametrize("bad", [dict(sigma=-0.1), dict(sigma=float("nan")), dict(noise="laplace"),
                                 dict(epochs=0), dict(batch_size=1.5), dict(schedule="linear"),
                                 dict(momentum=1.5), dict(method="macer"), dict(augment="yes")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ArgumentError):
        _config(**bad)


def test_train_rejects_bad_arguments(tmp_path):
    with pytest.raises(ArgumentError, match="batch_size"):
        train(TINY, _colors(8), tmp_path / "m.pth.tar", _config(batch_size=16))
    with pytest.raises(ArgumentError, match="folder"):
        train(TINY, _colors(), tmp_path / "missing" / "m.pth.tar", _config())
    with pytest.raises(ArgumentError, match="device"):
        train(TINY, _colors(), tmp_path / "m.pth.tar", _config(), device="gpu0")
    with pytest.raises(ArgumentError, match="num_classes"):
        train(TINY, [(torch.zeros(3, 8, 8), 0)] * 16, tmp_path / "m.pth.tar", _config())


def test_random_crop_flip_shifts_and_mirrors():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(0))
    for a, b in zip(out, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    for a, p in zip(out, padded):
        windows = [p[:, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(a, w) or torch.equal(a, w.flip(-1)) for w in windows)
    with pytest.raises(ArgumentError):
        random_crop_flip(x[0])


def test_preload_keeps_8bit_images_as_uint8_and_others_as_float():
    data = _colors(12)
    held = preload(data.subset(indices=[0, 5, 7]))
    assert held.images.dtype == torch.uint8 and held.num_classes == 3
    assert torch.equal(held[1][0], data[5][0]) and held[1][1] == data[5][1]
    floats = [(torch.full((3, 4, 4), 0.123), 1), (torch.zeros(3, 4, 4), 0)]
    assert preload(floats).images.dtype == torch.float32
    with pytest.raises(ArgumentError, match="shapes"):
        preload([(torch.zeros(3, 4, 4), 0), (torch.zeros(3, 5, 5), 1)])


def test_save_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "m.pth.tar"
    save_checkpoint(path, {"epoch": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"epoch": 2, "bad": lambda: 0})  # cannot be pickled
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth.tar"]


def test_certify_train_command(tmp_path, capsys):
    data = _colors(48)
    x = data.images.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "d.npz", x=x, y=data.labels.numpy())
    args = ["--arch", TINY, "--dataset", "npz", "--data", str(tmp_path / "d.npz"),
            "--sigma", "0.5", "--noise", "uniform", "--epochs", "2", "--batch-size", "16",
            "--schedule", "cosine", "--preload", "--out", str(tmp_path / "m.pth.tar")]
    assert certify_main(["train", *args]) == 0
    assert "trained tiny_test_net for 2 epochs" in capsys.readouterr().out
    assert load_model(tmp_path / "m.pth.tar").sigma == 0.5
    assert certify_main(["train", *args, "--resume", "--epochs", "3", "--quiet"]) == 0
    assert certify_main(["train", *args, "--sigma", "-1"]) == 2  # one-line error, no traceback
    assert "certify: error:" in capsys.readouterr().err
    assert torch.load(tmp_path / "m.pth.tar", weights_only=True)["epoch"] == 3


def test_certify_train_help_gives_every_flag_a_description_and_its_default(capsys):
    assert certify_main(["train", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    for action in train_cli.parser()._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings[0]} has no description"
        assert ("required)" if action.required else "(default") in action.help, action.help
        if action.default not in (None, False):
            assert f"(default {action.default}" in shown, action.option_strings[0]


def _npz_args(tmp_path, items: int = 48) -> list:
    """``certify train`` on an npz file of ``items`` colour images, one epoch into m.pth.tar."""
    data = _colors(items)
    np.savez(tmp_path / "d.npz", x=data.images.permute(0, 2, 3, 1).numpy(), y=data.labels.numpy())
    return ["train", "--arch", TINY, "--dataset", "npz", "--data", str(tmp_path / "d.npz"),
            "--sigma", "0.5", "--epochs", "1", "--batch-size", "16", "--quiet",
            "--out", str(tmp_path / "m.pth.tar")]


@pytest.mark.parametrize("extra, says", [
    (["--batch-size", "64"], "fewer than --batch-size 64; lower --batch-size"),
    (["--lr-gamma", "2"], "--lr-gamma must be"),
    (["--sigma", "-1"], "--sigma must be"),
    (["--workers", "-1"], "--workers must be"),
    (["--threads", "0"], "--threads"),
])
def test_certify_train_errors_name_the_flags(tmp_path, capsys, extra, says):
    assert certify_main(_npz_args(tmp_path) + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("certify: error: ") and says in err, err
    assert "_" not in err.replace(str(tmp_path), "").replace("tiny_test_net", ""), err


def test_certify_train_asks_for_resume_and_the_same_sigma_in_flags(tmp_path, capsys):
    args = _npz_args(tmp_path)
    assert certify_main(args) == 0
    capsys.readouterr()
    assert certify_main(args) == 2
    assert "pass --resume to continue that run, or choose another --out" in capsys.readouterr().err
    assert certify_main(args + ["--resume", "--sigma", "0.25"]) == 2
    assert "trained with --sigma 0.5, not 0.25" in capsys.readouterr().err
    with pytest.raises(ArgumentError, match=r"pass resume=True"):  # Python keeps its own words
        train(TINY, _colors(), tmp_path / "m.pth.tar", _config(epochs=1))


@pytest.mark.skipif(not (ASSETS / "cifar10_resnet20_sigma0.25.pth.tar").exists()
                    or not (ASSETS / "cifar10_test_sample.npz").exists(),
                    reason="the shipped demo assets are not built (scripts/make_demo_assets.py)")
def test_shipped_model_and_sample():
    loaded = load_model(ASSETS / "cifar10_resnet20_sigma0.25.pth.tar")
    assert (loaded.arch, loaded.sigma, loaded.num_classes) == ("cifar_resnet20", 0.25, 10)
    assert (ASSETS / "cifar10_resnet20_sigma0.25.pth.tar").stat().st_size < 3_000_000
    with np.load(ASSETS / "cifar10_test_sample.npz") as f:
        x, y = f["x"], f["y"]
    assert x.dtype == np.uint8 and x.shape == (100, 32, 32, 3)
    assert y.shape == (100,) and set(np.unique(y)) <= set(range(10))
    images = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    noisy = images + 0.25 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        accuracy = (loaded.model(noisy).argmax(1) == torch.from_numpy(y).long()).float().mean()
    assert accuracy > 0.4  # chance is 0.1
