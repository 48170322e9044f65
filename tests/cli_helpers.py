"""Helpers shared by the tests that run the ``certify`` command in-process.

The tiny run: a TorchScript model (``load_model`` needs no architecture for it) whose class
is the brightest channel of a 3×8×8 image, and a 24-image npz whose labels are that channel,
a few images made ambiguous so that some inputs abstain.
"""
from pathlib import Path

import numpy as np
import torch
from torch import nn

from certify.cli import main
from ancer.results import read_results

N_INPUTS = 24


class BrightestChannel(nn.Module):
    """Logits 20·(mean of each channel after a 3×3 identity convolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            for c in range(3):
                self.conv.weight[c, c, 1, 1] = 1.0
            self.fc.weight.copy_(20 * torch.eye(3))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def make_files(root: Path) -> dict:
    """Write the tiny model (``tiny.pt``) and dataset (``data.npz``) into ``root``."""
    model = root / "tiny.pt"
    torch.jit.save(torch.jit.script(BrightestChannel().eval()), model)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, N_INPUTS)
    x = rng.uniform(0.2, 0.5, (N_INPUTS, 8, 8, 3))
    x[np.arange(N_INPUTS), :, :, y] += rng.uniform(0.0, 0.3, N_INPUTS)[:, None, None]
    data = root / "data.npz"
    np.savez(data, x=(x * 255).astype(np.uint8), y=y.astype(np.int64))
    return {"model": model, "data": data}


class Energy(nn.Module):
    """Logits ±40·(mean((x − 0.5)²) − 0.09): class 1 iff the image is far from mid-grey.
    Under noise of standard deviation σ that mean grows by about σ², so the smoothed class
    flips from 0 to 1 as σ grows, and inputs whose data-dependent σ differ get overlapping
    regions of different classes: the memory shrinks and overrides on purpose."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = ((x - 0.5) ** 2).mean(dim=(1, 2, 3))
        return torch.stack([40 * (0.09 - energy), 40 * (energy - 0.09)], dim=1)


def make_energy_files(root: Path, count: int = 12) -> dict:
    """Write the energy model (``energy.pt``) and ``count`` inputs (``energy.npz``): one ±1
    pattern scaled by growing amplitudes, so that neighbours are close, labelled with the
    class at σ = 0.25."""
    model = root / "energy.pt"
    torch.jit.save(torch.jit.script(Energy().eval()), model)
    pattern = np.random.default_rng(0).choice([-1.0, 1.0], (8, 8, 3))
    amplitude = np.linspace(0.12, 0.2, count)[:, None, None, None]
    x = np.clip(np.round(127.5 + 255 * amplitude * pattern), 0, 255).astype(np.uint8)
    energy = ((x / 255 - 0.5) ** 2).mean(axis=(1, 2, 3))
    data = root / "energy.npz"
    np.savez(data, x=x, y=(energy + 0.25**2 > 0.09).astype(np.int64))
    return {"model": model, "data": data}


def dataset_tensors(data: Path) -> tuple:
    """The npz's images as float tensors N×C×H×W in [0, 1], and its labels."""
    arrays = np.load(data)
    xs = torch.from_numpy(arrays["x"]).permute(0, 3, 1, 2).contiguous().float() / 255
    return xs, arrays["y"]


def certify(*argv: str) -> int:
    """Run ``certify ARGV...`` in this process; its exit status."""
    return main(list(argv))


def rows_without_time(path: Path) -> list[tuple[str, ...]]:
    """The rows of a results file as text fields, less the ``time`` column (which differs
    between otherwise identical runs)."""
    table = read_results(path)
    keep = [i for i, name in enumerate(table.header) if name != "time"]
    return [tuple(line.split("\t")[i] for i in keep) for line in table.lines]
