"""The plain reference: CERTIFY as Cohen et al.'s ``code/core.py`` (locuslab/smoothing) writes it.

Kept, unoptimized on purpose, as the baseline that ``Smoothed`` is measured against: tests
check that the fast path's votes follow the same distribution as these, and benchmarks
time both in one run. Each batch repeats the input (``x.repeat``), draws fp32 Gaussian
noise with ``torch.randn_like`` from the global generator, runs the model, and copies the
predictions to the host to count them. Isotropic Gaussian noise only, as in the original.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint
from torch import nn

from ancer.labels import ABSTAIN


def reference_sample_counts(
    model: nn.Module, x: torch.Tensor, num: int, sigma: float, num_classes: int, batch_size: int
) -> np.ndarray:
    """``Smooth._sample_noise``: votes of ``model`` on ``num`` copies of ``x`` (one input,
    e.g. C×H×W, on the model's device) plus N(0, σ²) noise, counted on the host per batch."""
    with torch.no_grad():
        counts = np.zeros(num_classes, dtype=int)
        remaining = num
        for _ in range(math.ceil(num / batch_size)):
            this_batch_size = min(batch_size, remaining)
            remaining -= this_batch_size
            batch = x.repeat((this_batch_size,) + (1,) * x.dim())
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
        return counts


def reference_certify(
    model: nn.Module, x: torch.Tensor, n0: int, n: int, alpha: float, sigma: float,
    num_classes: int, batch_size: int,
) -> Tuple[int, float]:
    """``Smooth.certify``: (predicted class, l2 radius), or (ABSTAIN, 0.0)."""
    model.eval()
    selection = reference_sample_counts(model, x, n0, sigma, num_classes, batch_size)
    candidate = int(selection.argmax())
    estimation = reference_sample_counts(model, x, n, sigma, num_classes, batch_size)
    p_lower = proportion_confint(int(estimation[candidate]), n, alpha=2 * alpha, method="beta")[0]
    if p_lower < 0.5:
        return ABSTAIN, 0.0
    return candidate, sigma * float(norm.ppf(p_lower))
