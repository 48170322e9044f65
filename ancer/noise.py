"""Noise distributions for randomized smoothing: Gaussian (certifies l2) and uniform (l1).

One base class for every noise, as in Yang et al.'s ``src/noises/noises.py`` (tonyduan/rs4a):
a noise is a standard draw ε (N(0, 1) or U[-1, 1]) times a scale, and knows the region it
certifies from a lower bound p_A on the top class's probability.

``sigma`` is the noise's standard deviation for both families. For uniform noise the
half-width is λ = √3·σ (Yang et al.'s convention); ANCER's scripts use λ = σ/√3 instead, so
``describe()`` records both σ and λ. A scale is a float (isotropic) or a tensor that
broadcasts to the input's C×H×W (anisotropic: one scale per dimension).

A noise owns its scales: a tensor is copied on construction (float32, on the CPU), and the
factor that multiplies ε is computed once, rounded to float32, and used both to draw the
noise and to build the certified region, so that a region always describes the noise that
was actually sampled (changing the caller's tensor afterwards changes neither).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Optional, Union

import torch
from scipy.stats import norm as standard_normal

from ancer.certificates import Region, make_region
from ancer.errors import ArgumentError

Scale = Union[float, torch.Tensor]


def _as_float32(scale: Scale) -> Scale:
    """A float rounded to the nearest float32 (what a float32 tensor multiplied by it uses),
    or a tensor converted to float32."""
    if isinstance(scale, torch.Tensor):
        return scale.to(torch.float32)
    return float(torch.tensor(scale, dtype=torch.float32))


def _check_sigma(sigma: Scale, name: str = "sigma") -> Scale:
    """``sigma`` as a positive float, or as a positive float32 CPU tensor of the noise's own
    (a copy: the caller's tensor is never referenced)."""
    if isinstance(sigma, torch.Tensor):
        if sigma.numel() == 1:
            return _check_sigma(float(sigma), name)
        sigma = sigma.detach().to("cpu", torch.float32, copy=True)
        if not torch.isfinite(sigma).all() or (sigma <= 0).any():
            raise ArgumentError(
                f"every entry of the {name} tensor must be finite and > 0; "
                f"found min {float(sigma.min()):.4g} (clamp it, e.g. sigma.clamp(min=1e-6))"
            )
        return sigma
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise ArgumentError(f"{name} must be a positive number or tensor, got {sigma!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ArgumentError(f"{name} must be finite and > 0, got {sigma!r} (e.g. --sigma 0.25)")
    return value


class Noise(ABC):
    """Additive noise x + scale·ε with ε drawn from a fixed standard distribution."""

    #: the norm of the regions this noise certifies
    norm: str = ""
    #: the name used in results files
    family: str = ""

    def __init__(self, sigma: Scale) -> None:
        self.sigma = _check_sigma(sigma)
        self._scale = _as_float32(self.scale_from_sigma(self.sigma))
        self._device_scales: dict = {}

    # -- scales --------------------------------------------------------------------------
    @property
    def isotropic(self) -> bool:
        """True when one scale serves every dimension."""
        return not isinstance(self.sigma, torch.Tensor)

    @staticmethod
    @abstractmethod
    def scale_from_sigma(sigma: Scale) -> Scale:
        """The factor that multiplies a standard draw ε for noise of standard deviation σ
        (differentiable, for reparameterized sampling)."""

    @property
    def scale(self) -> Scale:
        """The factor that multiplies a standard draw, σ (Gaussian) or λ = √3·σ (uniform),
        rounded to float32: the value both sampling and ``region`` use. A tensor is returned
        as a copy."""
        return self._scale if self.isotropic else self._scale.clone()

    def scale_on(self, device: torch.device) -> Scale:
        """The scale as a float, or as a float32 tensor cached on ``device`` (so the sampling
        loop copies nothing from the host); the same values as ``scale``."""
        if self.isotropic:
            return self._scale
        device = torch.device(device)
        if device not in self._device_scales:
            self._device_scales[device] = self._scale.to(device, copy=True)
        return self._device_scales[device]

    def check_input_shape(self, shape: torch.Size) -> None:
        """Raise unless the scale broadcasts to one input of ``shape`` (C×H×W)."""
        if self.isotropic:
            return
        try:
            broadcast = torch.broadcast_shapes(self.sigma.shape, shape)
        except RuntimeError:
            broadcast = None
        if broadcast != tuple(shape):
            raise ArgumentError(
                f"the scale tensor of shape {tuple(self.sigma.shape)} does not broadcast to the "
                f"input's shape {tuple(shape)}; give one scale per input dimension (C×H×W)"
            )

    def with_sigma(self, sigma: Scale) -> "Noise":
        """The same family with another standard deviation (float or per-dimension tensor)."""
        return type(self)(sigma)

    # -- sampling ------------------------------------------------------------------------
    @abstractmethod
    def draw_standard_(self, out: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Fill ``out`` in place with standard draws ε (unit scale)."""

    def perturb_(
        self, out: torch.Tensor, x: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Fill ``out`` (shape (m, *x.shape), preallocated on the device) in place with
        x + scale·ε, drawn, scaled and added in ``out``'s dtype (float32 when certifying):
        m noisy copies of ``x``. No new device memory is allocated."""
        self.draw_standard_(out, generator)
        out.mul_(self.scale_on(out.device))
        return out.add_(x)

    # -- certification -------------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def radius_factor(p_lower: float) -> float:
        """R such that the certified region has semi-axes scale·R, for p_lower > 1/2."""

    @staticmethod
    @abstractmethod
    def probability_for_factor(factor: float) -> float:
        """The inverse of ``radius_factor``: the p_A at which the semi-axes are scale·factor."""

    def region(self, center: torch.Tensor, p_lower: float) -> Region:
        """The region certified around ``center`` when the top class has probability at
        least ``p_lower`` > 1/2 under this noise: semi-axes scale·R(p_lower), with the very
        scale the noise is sampled with."""
        if not p_lower > 0.5:
            raise ArgumentError(f"a region is certified only for p_lower > 1/2, got {p_lower}")
        factor = self.radius_factor(p_lower)
        if self.isotropic:
            return make_region(self.norm, center, self._scale * factor)
        return make_region(self.norm, center, self._scale.to(torch.float64) * factor)

    def probability_for_radius(self, radius: float) -> float:
        """The smallest p_A whose certified region has proxy radius (min semi-axis; the
        radius itself for a ball) at least ``radius`` >= 0: p_A = R⁻¹(radius / min_i s_i)
        with R = ``radius_factor`` and s the scale, i.e. Φ(radius / min θ) for Gaussian
        noise (Cohen et al. 2019, Thm 1; ANCER) and 1/2 + radius / (2 min λ) for uniform
        noise (Yang et al. 2020). The inverse of ``region(x, p).proxy_radius`` in p; a value
        >= 1 means no p_A reaches ``radius``."""
        radius = float(radius)
        if not (math.isfinite(radius) and radius >= 0.0):
            raise ArgumentError(f"radius must be finite and >= 0, got {radius!r}")
        smallest = self._scale if self.isotropic else float(self._scale.min())
        p = self.probability_for_factor(radius / smallest)
        while p < 1.0 and smallest * self.radius_factor(p) < radius:  # float rounding
            p = math.nextafter(p, 2.0)
        return p

    def describe(self) -> dict:
        """Plain-data description for results files: family, norm, σ and λ (isotropic), or
        their summary statistics (anisotropic)."""
        if self.isotropic:
            return {"family": self.family, "norm": self.norm, "sigma": self.sigma,
                    "half_width": self.half_width_of(self.sigma)}
        sigma = self.sigma
        return {"family": self.family, "norm": self.norm, "sigma": "anisotropic",
                "sigma_min": float(sigma.min()), "sigma_mean": float(sigma.mean()),
                "sigma_max": float(sigma.max())}

    def half_width_of(self, sigma: float) -> Optional[float]:
        """The half-width λ of the uniform distribution with this σ; None for other noises."""
        return None

    def __repr__(self) -> str:
        sigma = self.sigma if self.isotropic else f"tensor{tuple(self.sigma.shape)}"
        return f"{type(self).__name__}(sigma={sigma})"


class Gaussian(Noise):
    """Gaussian noise N(0, σ²) per dimension; certifies l2 balls, R = σ Φ⁻¹(p_A) (Cohen et
    al. 2019, Thm 1), or ellipsoids with semi-axes θ_i Φ⁻¹(p_A) for per-dimension θ (ANCER)."""

    norm = "l2"
    family = "gaussian"

    @staticmethod
    def scale_from_sigma(sigma: Scale) -> Scale:
        return sigma

    def draw_standard_(self, out: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return out.normal_(generator=generator)

    @staticmethod
    def radius_factor(p_lower: float) -> float:
        """Φ⁻¹(p_lower)."""
        return float(standard_normal.ppf(p_lower))

    @staticmethod
    def probability_for_factor(factor: float) -> float:
        """Φ(factor)."""
        return float(standard_normal.cdf(factor))


class Uniform(Noise):
    """Uniform noise U[-λ, λ] per dimension, λ = √3·σ; certifies l1 balls, R = 2λ(p_A - 1/2)
    (Yang et al. 2020), or generalized cross-polytopes with semi-axes 2λ_i(p_A - 1/2) (ANCER).

    Give either ``sigma`` (standard deviation) or ``half_width`` (λ), not both.
    """

    norm = "l1"
    family = "uniform"

    def __init__(self, sigma: Optional[Scale] = None, *, half_width: Optional[Scale] = None) -> None:
        if (sigma is None) == (half_width is None):
            raise ArgumentError("give Uniform either sigma (standard deviation) or half_width (λ)")
        if half_width is not None:
            sigma = _check_sigma(half_width, "half_width") / math.sqrt(3.0)
        super().__init__(sigma)

    @property
    def half_width(self) -> Scale:
        """λ = √3·σ."""
        return self.scale

    def half_width_of(self, sigma: float) -> float:
        return math.sqrt(3.0) * sigma

    @staticmethod
    def scale_from_sigma(sigma: Scale) -> Scale:
        return math.sqrt(3.0) * sigma

    def draw_standard_(self, out: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return out.uniform_(-1.0, 1.0, generator=generator)

    @staticmethod
    def radius_factor(p_lower: float) -> float:
        """2 (p_lower − 1/2)."""
        return 2.0 * (p_lower - 0.5)

    @staticmethod
    def probability_for_factor(factor: float) -> float:
        """1/2 + factor / 2."""
        return 0.5 + 0.5 * factor


NOISES = {"l2": Gaussian, "l1": Uniform}
#: The same noises by family name ("gaussian", "uniform"), as training names them.
FAMILIES = {cls.family: cls for cls in NOISES.values()}


def noise_for_norm(norm: str, sigma: Scale) -> Noise:
    """The noise that certifies ``norm``: Gaussian for "l2", uniform for "l1"."""
    if norm not in NOISES:
        raise ArgumentError(f"norm must be 'l2' or 'l1', got {norm!r}")
    return NOISES[norm](sigma)
