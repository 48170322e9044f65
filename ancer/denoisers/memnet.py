"""MemNet, the other denoiser architecture of Salman et al.

Salman, Sun, Yang, Kapoor, Kolter, "Denoised Smoothing", NeurIPS 2020
(microsoft/denoised-smoothing, ``code/archs/memnet.py``; the network of Tai et al. 2017's MemNet,
ICCV 2017). Every unit is BN → ReLU → conv (no bias). A feature extractor, ``memory
blocks`` each made of ``residual blocks`` (two units plus a skip) whose outputs, with the
outputs of all earlier memory blocks, a 1×1 gate unit fuses; a reconstructor back to the
image channels; and a global skip: D(x) = x + reconstructor(...). Module names follow the
authors', so their checkpoints load as they are.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn


class BNReLUConv(nn.Sequential):
    """BN → ReLU → conv (no bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.add_module("bn", nn.BatchNorm2d(in_channels))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel, 1, padding, bias=False))


class ResidualBlock(nn.Module):
    """x + unit(unit(x))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.relu_conv1 = BNReLUConv(channels, channels)
        self.relu_conv2 = BNReLUConv(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.relu_conv2(self.relu_conv1(x))


class MemoryBlock(nn.Module):
    """Residual blocks in a chain; a 1×1 gate over all their outputs and the long-term
    memory (the outputs of the feature extractor and of earlier memory blocks)."""

    def __init__(self, channels: int, residual_blocks: int, position: int) -> None:
        super().__init__()
        self.recursive_unit = nn.ModuleList(ResidualBlock(channels) for _ in range(residual_blocks))
        self.gate_unit = BNReLUConv((residual_blocks + position) * channels, channels, 1, 0)

    def forward(self, x: Tensor, memory: List[Tensor]) -> Tensor:
        short_term = []
        for block in self.recursive_unit:
            x = block(x)
            short_term.append(x)
        return self.gate_unit(torch.cat(short_term + memory, 1))


class MemNet(nn.Module):
    """D(x) = x + reconstructor(memory blocks(feature_extractor(x)))."""

    def __init__(self, image_channels: int = 3, channels: int = 64, memory_blocks: int = 3,
                 residual_blocks: int = 6) -> None:
        super().__init__()
        self.image_channels = image_channels
        self.feature_extractor = BNReLUConv(image_channels, channels)
        self.reconstructor = BNReLUConv(channels, image_channels)
        self.dense_memory = nn.ModuleList(
            MemoryBlock(channels, residual_blocks, i + 1) for i in range(memory_blocks))

    def forward(self, x: Tensor) -> Tensor:
        out = self.feature_extractor(x)
        memory = [out]
        for block in self.dense_memory:
            out = block(out, memory)
            memory.append(out)
        return x + self.reconstructor(out)
