"""The normalization layer that every model starts with, and the datasets' statistics.

As in Cohen et al. 2019 (code: locuslab/smoothing, ``code/datasets.py``), models take
inputs in [0, 1] and normalize inside, so that noise is added in pixel space. The layer holds no state: checkpoints of ``Sequential(NormalizeLayer,
net)`` have only ``1.<...>`` keys.
"""
from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from ancer.errors import ArgumentError

#: Per-channel (mean, std) of each dataset, as in locuslab/smoothing ``datasets.py``;
#: ImageNet32 (SmoothAdv, Salman et al. 2019) reuses CIFAR-10's statistics.
DATASET_STATS: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet32": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}

#: Number of classes of each dataset.
DATASET_CLASSES: Dict[str, int] = {"cifar10": 10, "imagenet": 1000, "imagenet32": 1000}


def check_dataset(dataset: str) -> str:
    """Return ``dataset`` if it is a known dataset name, else raise ArgumentError."""
    if dataset not in DATASET_STATS:
        raise ArgumentError(
            f"unknown dataset {dataset!r}; expected one of {sorted(DATASET_STATS)}"
        )
    return dataset


class NormalizeLayer(nn.Module):
    """Subtract a per-channel mean and divide by a per-channel standard deviation.

    The same computation as Cohen et al.'s ``NormalizeLayer`` (locuslab/smoothing,
    ``code/datasets.py``). The statistics are non-persistent buffers: they follow the
    module across devices but are not part of its state dict.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise ArgumentError(
                f"mean and std must have the same positive length, got {len(mean)} and {len(std)}"
            )
        if min(std) <= 0:
            raise ArgumentError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    @classmethod
    def for_dataset(cls, dataset: str) -> "NormalizeLayer":
        """The layer with ``dataset``'s statistics (see :data:`DATASET_STATS`)."""
        mean, std = DATASET_STATS[check_dataset(dataset)]
        return cls(mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize a batch ``x`` of shape (N, C, H, W) with values in [0, 1]."""
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
