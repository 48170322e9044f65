"""The denoiser architectures by name.

Salman et al.'s five names (microsoft/denoised-smoothing, ``code/architectures.py``:
``DENOISERS_ARCHITECTURES``) with their sizes, and ancer's own small CIFAR-10 DnCNN
(``cifar_dncnn_small``: 6 convolutions of 32 maps instead of 17 of 64, about 1/20 of the
cost; the shipped denoiser, sized to train on a CPU). The ImageNet ones are the CIFAR-10
networks; the authors wrap them in ``DataParallel``, so their state dicts carry ``module.``
prefixes, which the loader strips.
"""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from ancer.denoisers.dncnn import DnCNN
from ancer.denoisers.memnet import MemNet
from ancer.errors import ArgumentError

DENOISER_ARCHITECTURES: Dict[str, Callable[[], nn.Module]] = {
    "cifar_dncnn": lambda: DnCNN(depth=17, channels=64),
    "cifar_dncnn_wide": lambda: DnCNN(depth=17, channels=128),
    "memnet": lambda: MemNet(channels=64, memory_blocks=3, residual_blocks=6),
    "imagenet_dncnn": lambda: DnCNN(depth=17, channels=64),
    "imagenet_memnet": lambda: MemNet(channels=64, memory_blocks=3, residual_blocks=6),
    "cifar_dncnn_small": lambda: DnCNN(depth=6, channels=32),
}


def create_denoiser(arch: str) -> nn.Module:
    """A freshly initialized denoiser of architecture ``arch`` (DnCNN: the identity)."""
    if arch not in DENOISER_ARCHITECTURES:
        raise ArgumentError(f"unknown denoiser architecture {arch!r}; give one of "
                            f"{', '.join(DENOISER_ARCHITECTURES)}")
    return DENOISER_ARCHITECTURES[arch]()
