"""Where a model lives and what its weights are stored in, read from its tensors."""
from __future__ import annotations

from typing import Set

import torch
from torch import nn


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def model_dtypes(model: nn.Module) -> Set[torch.dtype]:
    """Every dtype among the model's floating-point parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return {tensor.dtype for tensor in tensors if tensor.is_floating_point()}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU if it has none)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")
