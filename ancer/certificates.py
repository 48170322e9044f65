"""Certified regions: l2 ball, l1 ball, axis-aligned ellipsoid, generalized cross-polytope.

A certificate says that the smoothed classifier's prediction is constant on a region around
the input. Isotropic Gaussian smoothing certifies an l2 ball (Cohen et al. 2019, Thm 1),
isotropic uniform smoothing an l1 ball (Yang et al. 2020); their anisotropic versions
certify an axis-aligned ellipsoid {δ : ||δ / a||_2 <= 1} and a generalized cross-polytope
{δ : ||δ / a||_1 <= 1} (ANCER, Eiras et al. 2022; see docs/design.md, References), where a
holds the semi-axes. To compare regions of different shapes each reports

- ``proxy_radius`` = min_i a_i, the radius of the largest l_p ball inside;
- ``volume_radius`` = (Π a_i)^(1/d), the radius of the l_p ball of equal volume, computed as
  exp(mean(log a));
- ``log_volume``: ellipsoid (d/2) log π - lgamma(d/2 + 1) + Σ log a_i; cross-polytope
  d log 2 - lgamma(d + 1) + Σ log a_i. Always in logs: d is 3072 (CIFAR-10) or 150,528
  (ImageNet), where the volume itself under- or overflows.
"""
from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch

from ancer.errors import ArgumentError

Scale = Union[float, torch.Tensor]


def _as_center(center: torch.Tensor) -> torch.Tensor:
    """The region's own copy of ``center``, on the CPU (floating point)."""
    if not isinstance(center, torch.Tensor):
        center = torch.as_tensor(center)
    center = center.detach().to("cpu", copy=True)
    if not center.is_floating_point():
        center = center.float()
    if center.numel() == 0:
        raise ArgumentError("a region's center must have at least one dimension")
    return center


def _as_semi_axes(semi_axes: Scale, center: torch.Tensor) -> torch.Tensor:
    """The region's own float64 copy of ``semi_axes``, broadcast to the center's shape (a
    scalar stays one stored number)."""
    if isinstance(semi_axes, torch.Tensor):
        axes = semi_axes.detach().to("cpu", torch.float64, copy=True)
    else:
        axes = torch.tensor(semi_axes, dtype=torch.float64)
    try:
        axes = torch.broadcast_to(axes, center.shape)
    except RuntimeError:
        raise ArgumentError(
            f"semi-axes of shape {tuple(axes.shape)} do not broadcast to the center's shape "
            f"{tuple(center.shape)}; give one semi-axis per input dimension or a scalar"
        ) from None
    if not torch.isfinite(axes).all() or (axes < 0).any():
        raise ArgumentError("semi-axes must be finite and >= 0")
    return axes


class Region:
    """An axis-aligned region {center + δ : ||δ / semi_axes||_p <= 1} (p = 2 or 1).

    Subclasses fix the norm. Regions live on the host: they are results, not computation.
    A region holds its own copies of the center and semi-axes, so changing the tensors it
    was built from afterwards does not change it.
    """

    norm: str = ""

    def __init__(self, center: torch.Tensor, semi_axes: Scale) -> None:
        self.center = _as_center(center)
        self.semi_axes = _as_semi_axes(semi_axes, self.center)

    # -- sizes ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """The dimension d of the input space."""
        return self.center.numel()

    @property
    def proxy_radius(self) -> float:
        """Radius of the largest l_p ball inside the region: min_i a_i."""
        return float(self.semi_axes.min())

    @property
    def bounding_radius(self) -> float:
        """Radius of the smallest l2 ball around the center that holds the region: max_i a_i
        (for both shapes: the farthest points are the ends of the longest axis)."""
        return float(self.semi_axes.max())

    @property
    def volume_radius(self) -> float:
        """Radius of the l_p ball of the same volume: the geometric mean exp(mean(log a))."""
        return float(torch.exp(torch.log(self.semi_axes).mean()))

    @property
    def log_volume(self) -> float:
        """Natural log of the region's volume (-inf if a semi-axis is 0)."""
        return self._log_unit_ball(self.dim) + float(torch.log(self.semi_axes).sum())

    @staticmethod
    def _log_unit_ball(d: int) -> float:
        raise NotImplementedError

    # -- membership ----------------------------------------------------------------------
    def _normalized_norm(self, offsets: torch.Tensor) -> torch.Tensor:
        """||offset / a||_p over the trailing (center-shaped) dimensions."""
        raise NotImplementedError

    def contains(self, points: torch.Tensor) -> torch.Tensor:
        """Whether each point lies in the region. ``points`` has shape (..., *center.shape);
        returns a bool tensor of shape (...)."""
        points = torch.as_tensor(points).detach().to("cpu", torch.float64)
        if tuple(points.shape[points.dim() - self.center.dim():]) != tuple(self.center.shape):
            raise ArgumentError(
                f"points of shape {tuple(points.shape)} do not end in the center's shape "
                f"{tuple(self.center.shape)}"
            )
        offsets = points - self.center.to(torch.float64)
        return self._normalized_norm(offsets) <= 1.0

    def contains_region(self, other: "Region") -> bool:
        """Whether ``other`` (a region of the same norm) lies entirely inside this one."""
        if not isinstance(other, Region) or other.norm != self.norm:
            raise ArgumentError(
                f"contains_region compares regions of the same norm; got {self.norm} and "
                f"{getattr(other, 'norm', type(other).__name__)}"
            )
        if other.center.shape != self.center.shape:
            raise ArgumentError(
                f"regions live in different spaces: {tuple(self.center.shape)} and "
                f"{tuple(other.center.shape)}"
            )
        shift = ((other.center - self.center).to(torch.float64) / self.semi_axes).flatten()
        ratio = (other.semi_axes / self.semi_axes).flatten()
        return self.max_normalized_norm(shift.numpy(), ratio.numpy()) <= 1.0 + 1e-12

    @staticmethod
    def max_normalized_norm(shift: np.ndarray, ratio: np.ndarray) -> float:
        """max over u in the unit p-ball of ||shift + ratio * u||_p: for a region of this
        norm with center c' and semi-axes a', given shift = (c' − c)/a and ratio = a'/a in
        this region's normalized coordinates, the gauge of its farthest point (<= 1 iff it
        lies inside this region)."""
        raise NotImplementedError

    def scaled(self, factor: float) -> "Region":
        """The same shape about the same center, every semi-axis multiplied by ``factor``."""
        if not factor >= 0:
            raise ArgumentError(f"a region can only be scaled by a factor >= 0, got {factor}")
        return _anisotropic_class[self.norm](self.center, self.semi_axes * factor)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, proxy_radius={self.proxy_radius:.6g}, "
            f"volume_radius={self.volume_radius:.6g}, log_volume={self.log_volume:.6g})"
        )


class Ellipsoid(Region):
    """Axis-aligned ellipsoid {x : ||(x - center) / a||_2 <= 1}: what diagonal Gaussian
    smoothing N(0, diag(θ)²) certifies, with a = θ Φ⁻¹(p_A) (ANCER, Eiras et al. 2022)."""

    norm = "l2"

    @staticmethod
    def _log_unit_ball(d: int) -> float:
        return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)

    def _normalized_norm(self, offsets: torch.Tensor) -> torch.Tensor:
        scaled = offsets / self.semi_axes
        return scaled.flatten(start_dim=scaled.dim() - self.center.dim()).norm(dim=-1)

    @staticmethod
    def max_normalized_norm(shift: np.ndarray, ratio: np.ndarray) -> float:
        """max_{||u||_2 <= 1} ||v + D u||_2 with v = shift, D = diag(ratio).

        A trust-region problem solved exactly: the maximizer satisfies u_i = d_i v_i /
        (μ - d_i²) with μ >= max d_i² and ||u|| = 1 (Moré & Sorensen 1983); μ is found by
        bisection on the decreasing secular function, and the "hard case" (v = 0 on the
        longest axes) puts the rest of u's norm on a longest axis.
        """
        d2 = ratio**2
        top = float(d2.max())
        weight = (ratio * shift) ** 2  # d_i² v_i²
        on_top = d2 >= top * (1 - 1e-12)
        if not np.any(weight[on_top] > 0):
            # Hard case: the secular equation may have no root above max d².
            rest = ~on_top
            u_rest = np.zeros_like(shift)
            u_rest[rest] = ratio[rest] * shift[rest] / (top - d2[rest])
            used = float(np.sum(u_rest**2))
            if used <= 1.0:
                value = float(np.sum((shift[rest] + ratio[rest] * u_rest[rest]) ** 2))
                return math.sqrt(value + float(np.sum(shift[on_top] ** 2)) + top * (1 - used))
        lo, hi = top, top + math.sqrt(float(weight.sum())) + 1e-300
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if np.sum(weight / (mid - d2) ** 2) > 1.0:
                lo = mid
            else:
                hi = mid
        u = ratio * shift / (hi - d2)
        return float(np.linalg.norm(shift + ratio * u))


class _Ball:
    """Mixin for a region whose semi-axes all equal one ``radius``."""

    def __init__(self, center: torch.Tensor, radius: float) -> None:
        super().__init__(center, float(radius))
        self.radius = float(radius)

    @property
    def log_volume(self) -> float:
        """log vol(unit ball) + d log R, exact even where the semi-axes' sum would round."""
        if self.radius == 0.0:
            return -math.inf
        return self._log_unit_ball(self.dim) + self.dim * math.log(self.radius)


class L2Ball(_Ball, Ellipsoid):
    """l2 ball of radius R: what isotropic Gaussian smoothing certifies, R = σ Φ⁻¹(p_A)
    (Cohen et al. 2019, Thm 1)."""


class CrossPolytope(Region):
    """Generalized cross-polytope {x : ||(x - center) / a||_1 <= 1}: what per-dimension
    uniform smoothing U[-λ_i, λ_i] certifies, with a = 2 λ (p_A - 1/2) (ANCER, Eiras et
    al. 2022, generalizing Yang et al. 2020)."""

    norm = "l1"

    @staticmethod
    def _log_unit_ball(d: int) -> float:
        return d * math.log(2.0) - math.lgamma(d + 1.0)

    def _normalized_norm(self, offsets: torch.Tensor) -> torch.Tensor:
        scaled = (offsets / self.semi_axes).abs()
        return scaled.flatten(start_dim=scaled.dim() - self.center.dim()).sum(dim=-1)

    @staticmethod
    def max_normalized_norm(shift: np.ndarray, ratio: np.ndarray) -> float:
        """max over the vertices v ± d_i e_i of the other polytope (a convex function on a
        polytope peaks at a vertex): ||v||_1 - |v_i| + |v_i| + d_i = ||v||_1 + d_i when the
        sign agrees with v_i, so the maximum is ||v||_1 + max_i d_i."""
        return float(np.abs(shift).sum() + ratio.max())


class L1Ball(_Ball, CrossPolytope):
    """l1 ball of radius R: what isotropic uniform smoothing U[-λ, λ]^d certifies,
    R = 2 λ (p_A - 1/2) (Yang et al. 2020)."""


_anisotropic_class = {"l2": Ellipsoid, "l1": CrossPolytope}
_ball_class = {"l2": L2Ball, "l1": L1Ball}


def make_region(norm: str, center: torch.Tensor, semi_axes: Scale) -> Region:
    """The region of ``norm`` ("l2" or "l1") with the given semi-axes: a ball when they are one
    number, else an ellipsoid or cross-polytope."""
    if norm not in _ball_class:
        raise ArgumentError(f"norm must be 'l2' or 'l1', got {norm!r}")
    if isinstance(semi_axes, torch.Tensor) and semi_axes.numel() > 1:
        return _anisotropic_class[norm](center, semi_axes)
    return _ball_class[norm](center, float(semi_axes))
