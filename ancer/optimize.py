"""Per-input smoothing scales: data-dependent isotropic scales (DDRS) and anisotropic ones (ANCER).

Both maximize a differentiable estimate of the certified region's size around one input x,
from a Monte-Carlo mean of the base classifier's class probabilities under reparameterized
noise x + θ⊙ε (ε drawn fresh at every step):

    p̄(θ) = (1/M) Σ_m softmax(f(x + θ⊙ε_m)),   p1 ≥ p2 the top two entries of p̄,
    gap(θ) = Φ⁻¹(p1) − Φ⁻¹(p2)  (l2, p clamped to [0.001, 0.999])  or  p1 − p2  (l1).

The variable θ is the authors' parameter of the noise: the standard deviation σ of the
Gaussian (l2), ε ~ N(0, I), and the half-width λ = √3·σ of the uniform U[−λ, λ] (l1),
ε ~ U[−1, 1]. The optimizers take and return standard deviations, as the rest of ancer does,
and move θ in between, so the learning rate, the objective's scale and the projection are
the authors' (in half-width units for l1).

- **DDRS** (Alfarra et al. 2022, as in the authors' ddsmoothing-python 1.0; see
  docs/design.md, References): one scalar θ per input; plain gradient ascent
  θ ← θ + lr·∂R/∂θ on the radius estimate R(θ) = θ/2·gap(θ) (l2) or θ·gap(θ) (l1), which is
  Cohen et al.'s σΦ⁻¹(p_A) or Yang et al.'s 2λ(p_A − 1/2) when p2 = 1 − p1.
- **ANCER** (Eiras et al. 2022, as in the authors' ancer-python 1.0.0): one θ_i per input
  dimension, initialized at the isotropic θ_iso; Adam
  maximizes gap(θ)·(Π θ_i)^(1/d) + κ·gap(θ)·min_i θ_i, the geometric mean taken as
  exp(mean(log θ)); after every step θ ← max(θ, θ_iso) elementwise, so the region contains
  the isotropic one (at equal p_A).

Unlike the authors' code, which takes one input (or one batch held whole in memory) at a
time, every input's samples are packed into shared forward batches of at most ``max_batch``
rows; one input's noise comes from its own generator, so its scales do not depend on which
inputs share its batches. The model's parameters are frozen during the optimization (no
gradient accumulates in them) and the model runs in eval mode; both are restored after.

Any scales are sound to certify with: the certificate's math holds for every θ, so the
parametrization of the search changes only how good the scales are. A certificate computed
with scales that depend on x is sound only together with the memory-based check of
``ancer.memory`` (Alfarra et al. 2022). The optimizer's noise is drawn from generators keyed
apart from the certification's (``derive_seed(seed, "optimize", idx)``), so that CERTIFY's
estimate of p_A stays independent of the draws that chose θ.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ancer.accelerate import autocast, check_precision
from ancer.devices import model_device
from ancer.errors import ArgumentError
from ancer.noise import NOISES, Noise
from ancer.seeding import derive_seed, make_generator
from ancer.smoothing import Certificate, ProgressCallback, Smoothed
from ancer.stats import check_count

#: what the model returns: raw scores (softmax applied), probabilities, or log-probabilities
OUTPUTS = ("logits", "probabilities", "log_probabilities")

#: the clamp of the top-two probabilities before Φ⁻¹ in the l2 gap (the authors' released code)
PROBABILITY_CLAMP = (0.001, 0.999)

#: the factor c of DDRS's radius estimate c·θ·gap(θ): 1/2 for l2, 1 for l1 (Alfarra et al. 2022)
RADIUS_FACTORS = {"l2": 0.5, "l1": 1.0}

Scale = Union[float, torch.Tensor]


@dataclass
class OptimizedScales:
    """The result of an optimization.

    ``sigma`` holds the per-input standard deviations on the host, float32: shape (B,) for
    isotropic scales (DDRS), (B, *input_shape) for anisotropic ones (ANCER). For l1 the
    uniform half-widths are √3·sigma. ``objective`` is the objective of every input at every
    step, shape (iterations, B), evaluated at the scales before that step's update, in the
    authors' units (θ = σ for l2, θ = λ = √3·σ for l1).
    """

    sigma: torch.Tensor
    norm: str
    objective: torch.Tensor

    def noises(self) -> List[Noise]:
        """One smoothing noise per input, with that input's scales."""
        return [NOISES[self.norm](sigma) for sigma in self.sigma]


# -- the objective ---------------------------------------------------------------------------
def proxy_gap(probabilities: torch.Tensor, norm: str) -> torch.Tensor:
    """gap = Φ⁻¹(p1) − Φ⁻¹(p2) (l2; p clamped to [0.001, 0.999]) or p1 − p2 (l1), where p1,
    p2 are the two largest entries of each row of ``probabilities`` (B, classes). The top two
    are taken by sorting, so the gradient flows through p1 and p2 (ANCER, Eiras et al. 2022)."""
    top = torch.topk(probabilities, 2, dim=1).values
    if norm == "l2":
        top = torch.special.ndtri(top.clamp(*PROBABILITY_CLAMP))
    return top[:, 0] - top[:, 1]


def to_theta(sigma: Scale, norm: str) -> Scale:
    """The authors' noise parameter θ for standard deviation σ: θ = σ (Gaussian, l2) or the
    half-width θ = λ = √3·σ (uniform, l1)."""
    return NOISES[norm].scale_from_sigma(sigma)


def isotropic_objective(theta: torch.Tensor, gap: torch.Tensor, norm: str) -> torch.Tensor:
    """DDRS (Alfarra et al. 2022): the radius estimate R = θ/2·gap (l2, θ = σ) or
    R = θ·gap (l1, θ = λ the half-width) per input (θ of shape (B,))."""
    return RADIUS_FACTORS[norm] * theta * gap


def anisotropic_objective(theta: torch.Tensor, gap: torch.Tensor, kappa: float = 2.0) -> torch.Tensor:
    """ANCER (Eiras et al. 2022): gap·exp(mean(log θ)) + κ·gap·min_i θ_i per input
    (θ of shape (B, *input_shape): σ_i for l2, the half-widths λ_i for l1), the volume radius
    of the region plus κ times its proxy radius, up to the factor that turns the gap into R;
    the gap enters without DDRS's 1/2, as in the authors' code."""
    flat = theta.flatten(1)
    return gap * torch.exp(torch.log(flat).mean(dim=1)) + kappa * gap * flat.min(dim=1).values


# -- the public optimizers -------------------------------------------------------------------
def optimize_isotropic(
    model: nn.Module,
    xs: torch.Tensor,
    sigma0: Scale,
    norm: str,
    *,
    iterations: int = 100,
    lr: float = 0.0001,
    samples: int = 100,
    min_sigma: float = 1e-4,
    outputs: str = "logits",
    max_batch: int = 1000,
    precision: str = "fp32",
    seed: int = 0,
    indices: Optional[Sequence[int]] = None,
    generators: Optional[Sequence[torch.Generator]] = None,
    progress: Optional[ProgressCallback] = None,
) -> OptimizedScales:
    """Data-dependent isotropic scale per input (DDRS, Alfarra et al. 2022).

    In the authors' parameter θ (θ = σ for l2; θ = λ = √3·σ, the uniform half-width, for l1),
    plain gradient ascent on the radius estimate R(θ) = θ/2·gap(θ) (l2) or θ·gap(θ) (l1):

        θ ← max(θ + lr·∂R/∂θ, θ_min),   θ_min = ``min_sigma`` (l2) or √3·``min_sigma`` (l1),

    for ``iterations`` steps with ``samples`` fresh noise draws per input and step. ``lr`` is
    in θ's units; the floor ``min_sigma`` is ancer's (the authors' ascent has none) and keeps
    the noise non-degenerate.

    ``xs``: inputs (B, *input_shape) in the model's input space; ``sigma0``: the starting
    standard deviation, a float or one per input (B,); ``norm``: "l2" (Gaussian) or "l1"
    (uniform, λ = √3σ); ``outputs``: what the model returns ("logits": softmax is applied;
    "probabilities"; "log_probabilities": exp is applied). Each forward batch holds at most
    ``max_batch`` noisy inputs. ``precision`` ("fp32", "bf16", "fp16") runs the model's
    forward and backward passes under that autocast, as ``Smoothed`` does; the objective and
    θ stay in fp32. Any scales are sound to certify with (the certificate's math holds for
    every σ), so the parametrization and the precision of the search change only how good
    the scales are, never the guarantee; scales chosen per input need ``ancer.memory``.
    Input i's noise comes from ``generators[i]`` if given, else from a
    generator seeded by ``derive_seed(seed, "optimize", indices[i])`` (``indices`` defaults
    to 0..B-1; pass dataset indices so that a resumed or sharded job draws the same noise).
    ``progress`` is called with the number of noisy inputs evaluated after each group of
    inputs (iterations·B·samples in all).
    Returns the scales as ``OptimizedScales`` with ``sigma`` (standard deviations θ/√3 for
    l1, never below ``min_sigma``) of shape (B,).
    """
    min_sigma = _check_positive("min_sigma", min_sigma)
    lr = _check_positive("lr", lr)
    problem = _Problem.build(model, xs, sigma0, norm, iterations, samples, outputs, max_batch,
                             precision, seed, indices, generators, progress, per_dimension=False)
    min_theta = to_theta(min_sigma, problem.norm)

    def ascend(theta: torch.Tensor, grad: torch.Tensor) -> None:
        theta.add_(grad, alpha=lr).clamp_(min=min_theta)

    return problem.run(partial(isotropic_objective, norm=problem.norm), ascend,
                       torch.tensor(min_sigma))


def optimize_anisotropic(
    model: nn.Module,
    xs: torch.Tensor,
    theta0: Scale,
    norm: str,
    iterations: int = 100,
    lr: float = 0.04,
    samples: int = 100,
    kappa: float = 2.0,
    *,
    outputs: str = "logits",
    max_batch: int = 1000,
    precision: str = "fp32",
    seed: int = 0,
    indices: Optional[Sequence[int]] = None,
    generators: Optional[Sequence[torch.Generator]] = None,
    progress: Optional[ProgressCallback] = None,
) -> OptimizedScales:
    """ANCER (Eiras et al. 2022): per-dimension scales per input.

    ``theta0`` is the isotropic standard deviation σ_iso to start from (a float, or one per
    input (B,), e.g. ``optimize_isotropic(...).sigma``). The search runs in the authors'
    parameter θ: θ = σ for l2 and the uniform half-width θ = λ = √3·σ for l1. θ starts at
    θ_iso (every dimension), and Adam (``lr``, in θ's units) maximizes

        gap(θ)·exp(mean(log θ)) + κ·gap(θ)·min_i θ_i

    for ``iterations`` steps with ``samples`` fresh noise draws per input and step, and after
    every step projects θ ← max(θ, θ_iso) elementwise. Adam acts elementwise, so one Adam
    over the whole batch is exactly one Adam per input. The defaults (100 iterations,
    lr 0.04, 100 samples, κ = 2) are the paper's. The other arguments are those of
    :func:`optimize_isotropic`; as there, any scales are sound to certify with, and scales
    chosen per input need ``ancer.memory``. Returns ``OptimizedScales`` with ``sigma`` (the
    standard deviations θ/√3 for l1, never below σ_iso) of shape (B, *input_shape).
    """
    lr = _check_positive("lr", lr)
    kappa = _check_positive("kappa", kappa, allow_zero=True)
    problem = _Problem.build(model, xs, theta0, norm, iterations, samples, outputs, max_batch,
                             precision, seed, indices, generators, progress, per_dimension=True)
    lower = problem.theta.detach().clone()
    adam = torch.optim.Adam([problem.theta], lr=lr, maximize=True)

    def adam_step(theta: torch.Tensor, grad: torch.Tensor) -> None:
        theta.grad = grad
        adam.step()
        torch.maximum(theta, lower, out=theta)  # projection onto θ >= θ_iso

    sigma_iso = problem.sigma0.view(-1, *[1] * (problem.theta.dim() - 1))
    return problem.run(partial(anisotropic_objective, kappa=kappa), adam_step, sigma_iso)


def certify_with_scales(
    smoothed: Smoothed,
    xs: torch.Tensor,
    scales: Union[OptimizedScales, torch.Tensor],
    n0: int,
    n: int,
    alpha: float,
    batch_size: Optional[int] = None,
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
    progress: Optional[ProgressCallback] = None,
) -> List[Certificate]:
    """CERTIFY every input of ``xs`` with its own scales, through ``Smoothed.certify_batch``.

    Input i is smoothed with ``smoothed.noise.with_sigma(scales[i])``: per-dimension scales
    certify an ellipsoid (Gaussian, l2) or a generalized cross-polytope (uniform, l1) with
    semi-axes θ_i·Φ⁻¹(p_A) or λ_i·2(p_A − 1/2) (ANCER); per-input scalars certify a ball
    (DDRS). Each certificate reports the label, p_lower, the proxy radius (min semi-axis),
    the volume radius and the log-volume. Pass generators independent of the optimizer's
    (the default seeding keeps them apart). Sound for input-dependent scales only together
    with ``ancer.memory.Memory``.
    """
    if not isinstance(smoothed, Smoothed):
        raise ArgumentError(f"smoothed must be an ancer.smoothing.Smoothed, got {type(smoothed).__name__}")
    if isinstance(scales, OptimizedScales):
        if scales.norm != smoothed.noise.norm:
            raise ArgumentError(
                f"the scales were optimized for {scales.norm} but the smoothed classifier's noise "
                f"certifies {smoothed.noise.norm}; optimize with norm={smoothed.noise.norm!r}"
            )
        scales = scales.sigma
    if not isinstance(scales, torch.Tensor) or len(scales) != len(xs):
        raise ArgumentError(
            f"give one scale (B,) or one scale tensor (B, *input_shape) per input: got "
            f"{type(scales).__name__} of length {len(scales) if hasattr(scales, '__len__') else '?'} "
            f"for {len(xs)} inputs"
        )
    noises = [smoothed.noise.with_sigma(scale) for scale in scales]
    return smoothed.certify_batch(xs, n0, n, alpha, batch_size, generators=generators,
                                  noises=noises, progress=progress)


# -- the shared engine -----------------------------------------------------------------------
#: a power of two that multiplies the objective before the fp16 backward pass and divides its
#: gradient after (exact in floating point), so that small gradients do not flush to zero
LOSS_SCALES = {"fp16": 2.0 ** 8}

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Update = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class _Problem:
    """One optimization over a batch of inputs: the validated arguments, the starting standard
    deviations ``sigma0`` (B,) on the host, and the state θ in the authors' units (σ for l2,
    the half-width λ = √3·σ for l1)."""

    model: nn.Module
    xs: torch.Tensor
    sigma0: torch.Tensor
    theta: torch.Tensor
    norm: str
    iterations: int
    samples: int
    outputs: str
    max_batch: int
    precision: str
    generators: List[torch.Generator]
    progress: Optional[ProgressCallback]

    @classmethod
    def build(cls, model, xs, scale0, norm, iterations, samples, outputs, max_batch, precision, seed,
              indices, generators, progress, per_dimension: bool) -> "_Problem":
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if norm not in NOISES:
            raise ArgumentError(f"norm must be one of {', '.join(map(repr, NOISES))}, got {norm!r}")
        if outputs not in OUTPUTS:
            raise ArgumentError(
                f"outputs must be one of {OUTPUTS}, got {outputs!r}: say whether the model returns "
                "logits (softmax is applied) or probabilities"
            )
        iterations = check_count("iterations", iterations)
        samples = check_count("samples", samples)
        max_batch = check_count("max_batch", max_batch)
        check_precision(precision)
        device = model_device(model)
        xs = _check_inputs(xs).to(device=device, dtype=torch.float32)  # lower precision: autocast only
        sigma0 = _initial_scales(scale0, len(xs))
        shape = (len(xs), *xs.shape[1:]) if per_dimension else (len(xs),)
        theta = to_theta(sigma0, norm).view(-1, *[1] * (len(shape) - 1)).expand(shape).to(device).clone()
        generators = _generators(len(xs), device, seed, indices, generators)
        return cls(model, xs, sigma0, theta.requires_grad_(True), norm, iterations, samples, outputs,
                   max_batch, precision, generators, progress)

    def run(self, objective: Objective, update: Update, floor: torch.Tensor) -> OptimizedScales:
        """``iterations`` steps of: per group of inputs, the mean probabilities, the gap, the
        objective and its gradient in θ; then one ``update`` of θ for the whole batch. The
        result is σ = θ/√3 (l1) or θ (l2), at least ``floor`` (the update's lower bound in σ,
        broadcast to θ's shape), which only undoes the rounding of the conversion."""
        trace = torch.empty(self.iterations, len(self.xs), device=self.xs.device)
        loss_scale = LOSS_SCALES.get(self.precision, 1.0)
        noise = NOISES[self.norm](1.0)  # for its standard draws ε
        with _frozen(self.model):
            for step in range(self.iterations):
                grad = torch.zeros_like(self.theta)
                for start, stop in _groups(len(self.xs), self.samples, self.max_batch):
                    theta = self.theta.detach()[start:stop].requires_grad_(True)
                    mean = self._mean_probabilities(noise, theta, start, stop)
                    value = objective(theta, proxy_gap(mean, self.norm))
                    (scaled,) = torch.autograd.grad(value.sum() * loss_scale, theta)
                    grad[start:stop] = scaled / loss_scale
                    trace[step, start:stop] = value.detach()
                with torch.no_grad():
                    update(self.theta, grad)
        sigma = self.theta.detach().to("cpu", torch.float32) / to_theta(1.0, self.norm)
        return OptimizedScales(sigma=torch.maximum(sigma, floor), norm=self.norm, objective=trace.cpu())

    def _mean_probabilities(self, noise: Noise, theta: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """p̄ for inputs start..stop-1: (k, classes). ε is drawn per input from its own
        generator, all ``samples`` draws at once; the forward runs in chunks of at most
        ``max_batch`` rows, recomputed in the backward pass when an input's samples need more
        than one chunk (activation checkpointing), so activations stay within one chunk's
        (the input's ε, samples × d, is held whole)."""
        x = self.xs[start:stop]
        eps = torch.empty((len(x), self.samples, *x.shape[1:]), device=x.device, dtype=x.dtype)
        for row, generator in zip(eps, self.generators[start:stop]):
            noise.draw_standard_(row, generator)
        per_draw = theta.view(len(x), 1, *theta.shape[1:], *[1] * (x.dim() - theta.dim()))
        if len(x) * self.samples <= self.max_batch:
            total = self._probability_sum(x, per_draw, eps)
        else:  # one input whose samples exceed a forward batch
            total = sum(
                checkpoint(self._probability_sum, x, per_draw, eps[:, low:low + self.max_batch],
                           use_reentrant=False)
                for low in range(0, self.samples, self.max_batch)
            )
        if self.progress is not None:
            self.progress(len(x) * self.samples)
        return total / self.samples

    def _probability_sum(self, x: torch.Tensor, theta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Σ_m of the class probabilities at x + θ⊙ε_m over the draws in ``eps`` (θ is the
        noise's multiplier of a standard draw: σ, or the half-width λ)."""
        noisy = (x.unsqueeze(1) + theta * eps).flatten(0, 1).to(x.dtype)
        with autocast(noisy.device, self.precision):
            scores = self.model(noisy)
        if scores.dim() != 2 or scores.shape[0] != len(noisy) or scores.shape[1] < 2:
            raise ArgumentError(
                f"the model returned scores of shape {tuple(scores.shape)} for a batch of "
                f"{len(noisy)}; it must return (batch, classes) with at least 2 classes"
            )
        return _to_probabilities(scores.float(), self.outputs).view(len(x), -1, scores.shape[1]).sum(dim=1)


# -- helpers ---------------------------------------------------------------------------------
def _to_probabilities(scores: torch.Tensor, outputs: str) -> torch.Tensor:
    if outputs == "logits":
        return torch.softmax(scores, dim=1)
    if outputs == "log_probabilities":
        return scores.exp()
    return scores


def _groups(num_inputs: int, samples: int, max_batch: int) -> Iterator[tuple]:
    """Ranges [start, stop) of whole inputs whose samples fit in one forward batch (at least
    one input per range)."""
    per_group = max(1, max_batch // samples)
    for start in range(0, num_inputs, per_group):
        yield start, min(start + per_group, num_inputs)


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and requires_grad=False on every parameter, both restored on exit: the
    optimization differentiates with respect to θ only."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    training = model.training
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(training)


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ArgumentError(f"{name} must be a number, got {value!r}") from None
    if not (value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ArgumentError(f"{name} must be finite and {bound}, got {value!r}")
    return value


def _check_inputs(xs: torch.Tensor) -> torch.Tensor:
    if not isinstance(xs, torch.Tensor) or xs.dim() < 2 or len(xs) == 0:
        shape = tuple(xs.shape) if isinstance(xs, torch.Tensor) else type(xs).__name__
        raise ArgumentError(f"inputs must be a non-empty batch tensor (B, *input_shape), got {shape}")
    if not xs.is_floating_point() or not torch.isfinite(xs).all():
        raise ArgumentError("inputs must be finite floating-point values")
    return xs.detach()


def _initial_scales(scale0: Scale, batch: int) -> torch.Tensor:
    """The starting σ per input, (B,) float32: from a float or a tensor of 1 or B entries."""
    scale = torch.as_tensor(scale0.detach() if isinstance(scale0, torch.Tensor) else scale0,
                            dtype=torch.float32).cpu()
    if scale.numel() == 1:
        scale = scale.reshape(1).expand(batch)
    if scale.shape != (batch,):
        raise ArgumentError(
            f"the initial scale must be a float or one value per input (shape ({batch},)), got "
            f"shape {tuple(scale.shape)}; for ANCER pass the isotropic σ, e.g. "
            "optimize_isotropic(...).sigma"
        )
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ArgumentError("every initial scale must be finite and > 0 (e.g. sigma0=0.25)")
    return scale


def _generators(batch: int, device: torch.device, seed: int, indices: Optional[Sequence[int]],
                generators: Optional[Sequence[torch.Generator]]) -> List[torch.Generator]:
    if generators is not None:
        if indices is not None:
            raise ArgumentError("give either generators or indices (with seed), not both")
        if len(generators) != batch:
            raise ArgumentError(f"got {len(generators)} generators for {batch} inputs; give one per input")
        for generator in generators:
            if not isinstance(generator, torch.Generator) or generator.device.type != device.type:
                raise ArgumentError(
                    f"every generator must be a torch.Generator on the model's device ({device}); "
                    "create it with ancer.seeding.make_generator(seed, device)"
                )
        return list(generators)
    indices = range(batch) if indices is None else list(indices)
    if len(indices) != batch:
        raise ArgumentError(f"got {len(indices)} indices for {batch} inputs; give one per input")
    return [make_generator(derive_seed(seed, "optimize", int(index)), device) for index in indices]
