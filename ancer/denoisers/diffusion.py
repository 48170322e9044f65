"""One-shot denoising with a diffusion model, after Carlini et al.

Carlini, Tramèr, Dvijotham, Rice, Sun, Kolter, "(Certified!!) Adversarial Robustness for
Free!", ICLR 2023 (ethz-spylab/diffusion_denoised_smoothing, ``cifar10/certify.py`` and
``cifar10/DRM.py``). An ε-prediction diffusion model is trained on images in [−1, 1] with
x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε. The smoothed input x + δ, δ ~ N(0, σ²I) on [0, 1] images, is
2(x + δ) − 1 = x₀ + 2δ on the model's scale: noise of standard deviation 2σ. Hence

- t* is the first timestep with (1 − ᾱ_t)/ᾱ_t ≥ (2σ)² (the authors step t up until
  √(1 − ᾱ_t)/√ᾱ_t reaches 2σ);
- x_t = √ᾱ_t*·(2(x + δ) − 1), which the model reads as a sample at t* (its noise
  √ᾱ_t*·2σ is at most the √(1 − ᾱ_t*) the model expects);
- x̂₀ = (x_t − √(1 − ᾱ_t*)·ε_θ(x_t, t*))/√ᾱ_t*, clipped to [−1, 1] as the authors' sampler
  does (``clip_denoised=True``), and returned on [0, 1] as (x̂₀ + 1)/2.

For an exact ε_θ (the conditional mean of ε), x̂₀ is the posterior mean E[x₀ | x_t]
(Tweedie's formula). A model that learns its variance (improved-diffusion's
``learn_sigma``) outputs 2C channels; ε is the first C.

The timestep is fixed by the config's σ, so D is one fixed function and f∘D an ordinary
base classifier: the certificate is sound whatever σ(x) or θ(x) dds and ancer then use.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ancer.errors import ArgumentError


def noise_ratio(alphas_cumprod: Tensor) -> Tensor:
    """(1 − ᾱ_t)/ᾱ_t for every t: the variance of the noise relative to the signal."""
    alphas = alphas_cumprod.double()
    return (1 - alphas) / alphas


def timestep_for_sigma(alphas_cumprod: Tensor, sigma: float) -> int:
    """t*: the first t with (1 − ᾱ_t)/ᾱ_t ≥ (2σ)², for noise σ on [0, 1] images (2σ on the
    model's [−1, 1] scale). Raises ArgumentError when σ is beyond the schedule's last t."""
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ArgumentError(f"sigma must be a number > 0, got {sigma!r}")
    ratios = noise_ratio(alphas_cumprod)
    reached = torch.nonzero(ratios >= (2 * sigma) ** 2)
    if len(reached) == 0:
        top = math.sqrt(float(ratios[-1])) / 2
        raise ArgumentError(f"sigma {sigma:g} is beyond the diffusion schedule's range (its last "
                            f"timestep holds noise sigma {top:.4g} on [0, 1] images): give "
                            f"--sigma <= {top:.4g}")
    return int(reached[0])


def _epsilon(output: Any, channels: int) -> Tensor:
    """ε from an ε-model's output: a tensor, a diffusers output (``.sample``) or a tuple;
    the first ``channels`` channels (a learned-variance model returns 2C)."""
    if hasattr(output, "sample"):
        output = output.sample
    elif isinstance(output, (tuple, list)):
        output = output[0]
    return output[:, :channels]


class OneShotDiffusion(nn.Module):
    """D(x) = (x̂₀ + 1)/2 with x̂₀ the one-step estimate of an ε-prediction model at t*.

    ``eps_model(x_t, t)`` takes a batch on [−1, 1] scale and a batch of integer timesteps;
    ``alphas_cumprod`` is its schedule's ᾱ_0 … ᾱ_{T−1}; ``sigma`` the smoothing noise on
    [0, 1] images. ``clip`` clips x̂₀ to [−1, 1] (default True, as the authors).
    """

    def __init__(self, eps_model: nn.Module, alphas_cumprod: Tensor, sigma: float,
                 image_channels: int = 3, clip: bool = True) -> None:
        super().__init__()
        self.eps_model = eps_model
        self.timestep = timestep_for_sigma(alphas_cumprod, sigma)
        alpha = float(alphas_cumprod[self.timestep])
        self.signal = math.sqrt(alpha)          # √ᾱ_t*
        self.noise = math.sqrt(1.0 - alpha)     # √(1 − ᾱ_t*)
        self.image_channels = image_channels
        self.clip = clip

    def forward(self, x: Tensor) -> Tensor:
        x_t = self.signal * (2 * x - 1)
        t = torch.full((x.shape[0],), self.timestep, dtype=torch.long, device=x.device)
        eps = _epsilon(self.eps_model(x_t, t), self.image_channels)
        x0 = (x_t - self.noise * eps.to(x_t.dtype)) / self.signal
        if self.clip:
            x0 = x0.clamp(-1.0, 1.0)
        return (x0 + 1) / 2
