"""DnCNN, the residual denoiser that Salman et al. put in front of a classifier.

Salman, Sun, Yang, Kapoor, Kolter, "Denoised Smoothing: A Provable Defense for Pretrained
Classifiers", NeurIPS 2020 (microsoft/denoised-smoothing, ``code/archs/dncnn.py``, itself
a modification of the DnCNN of cszn/DnCNN). On images in [0, 1] the network predicts the
noise R(x) and returns D(x) = x − R(x), where R is

    conv3×3(C→K) + ReLU,  (depth − 2) × [conv3×3(K→K, no bias) + BN + ReLU],  conv3×3(K→C, no bias).

The modules keep the authors' names (``dncnn.<i>``) and their batch-norm constants (ε = 1e-4,
momentum 0.95), so their checkpoints load as they are. Initialization as theirs: orthogonal
convolutions, zero biases, BN weight 1 and bias 0, and the last convolution's weight zero,
so an untrained DnCNN is exactly the identity (R ≡ 0).
"""
from __future__ import annotations

from torch import Tensor, nn

#: the authors' batch-norm constants (code/archs/dncnn.py)
BN_EPS = 1e-4
BN_MOMENTUM = 0.95


class DnCNN(nn.Module):
    """D(x) = x − R(x), R a plain stack of ``depth`` 3×3 convolutions of ``channels`` maps."""

    def __init__(self, depth: int = 17, channels: int = 64, image_channels: int = 3) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"a DnCNN has at least 2 convolutions, got depth={depth}")
        self.image_channels = image_channels
        layers: list[nn.Module] = [nn.Conv2d(image_channels, channels, 3, padding=1, bias=True),
                                   nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(channels, image_channels, 3, padding=1, bias=False))
        self.dncnn = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialization; the last convolution is zero (D is the identity)."""
        convolutions = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        for conv in convolutions:
            nn.init.orthogonal_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        for bn in (m for m in self.modules() if isinstance(m, nn.BatchNorm2d)):
            nn.init.ones_(bn.weight)
            nn.init.zeros_(bn.bias)
        nn.init.zeros_(convolutions[-1].weight)

    def forward(self, x: Tensor) -> Tensor:
        return x - self.dncnn(x)
