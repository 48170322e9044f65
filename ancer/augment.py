"""Data augmentation on batches of image tensors, without torchvision.

The standard CIFAR augmentation (He et al. 2016, §4.2; the training transform of Cohen et
al. 2019, locuslab/smoothing ``code/datasets.py``): pad each side by 4 pixels with zeros,
take a random crop of the original size, flip horizontally with probability 1/2. Done on
a whole batch at once, on the batch's device, from an explicit generator.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ancer.errors import ArgumentError


def random_crop_flip(
    x: torch.Tensor, padding: int = 4, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Randomly crop (after zero padding by ``padding``) and horizontally flip each image.

    Parameters
    ----------
    x : Tensor
        A batch N×C×H×W.
    padding : int
        Pixels of zero padding on each side; the crop offset is uniform in
        [0, 2·padding] along each axis, independently per image.
    generator : torch.Generator, optional
        On ``x``'s device; the source of the crops and flips.

    Returns
    -------
    Tensor
        A new batch of the same shape.
    """
    if x.dim() != 4:
        raise ArgumentError(f"expected a batch N×C×H×W, got shape {tuple(x.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ArgumentError(f"padding must be an integer >= 0, got {padding!r}")
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=x.device, generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=x.device, generator=generator)
    flip = torch.rand(n, 1, 1, device=x.device, generator=generator) < 0.5
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    cols = torch.where(flip, w - 1 - cols, cols)
    rows = top + torch.arange(h, device=x.device).view(1, h, 1)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    # advanced indexing on dims 0, 2, 3 puts the indexed dims first: N×H×W×C
    out = padded.permute(0, 2, 3, 1)[batch, rows, left + cols]
    return out.permute(0, 3, 1, 2).contiguous()
