"""Where a model lives and what its weights are stored in, read from its tensors; the
device a run asks for."""
from __future__ import annotations

import platform
from typing import Optional, Set

import torch
from torch import nn

from ancer.errors import ArgumentError


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


def resolve_device(requested: Optional[str], local_rank: int = 0) -> torch.device:
    """The device ``requested`` ("cpu", "cuda" or "cuda:N"; None: cuda if available, else
    the CPU), made the current CUDA device; plain "cuda" means GPU ``local_rank`` (a
    process's own GPU under torchrun). ArgumentError naming ``device`` when it is absent."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ArgumentError.of_field("", "device", f"{requested!r} asks for a GPU, but this "
                                         "machine has no CUDA GPU (or this PyTorch build lacks CUDA)", "use {device}cpu")
        if requested == "cuda":
            requested = f"cuda:{local_rank}"
        if torch.device(requested).index >= torch.cuda.device_count():
            raise ArgumentError.of_field("", "device", f"{requested!r}: only "
                                         f"{torch.cuda.device_count()} GPU(s) here",
                                         "give cuda:0 ... or cuda")
        # the current device too, so that nothing (streams, contexts) lands on cuda:0
        torch.cuda.set_device(torch.device(requested))
    return torch.device(requested)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's processor (or machine) name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
