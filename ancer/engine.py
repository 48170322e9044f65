"""The certification engine: one object that runs the whole per-input protocol for every method.

    scales (fixed σ | DDRS σ(x) | ANCER θ(x))  →  CERTIFY (fixed n or sequential)  →  memory

- **isotropic**: the fixed σ of the config (Cohen et al. 2019, l2; Yang et al. 2020, l1).
- **dds**: one data-dependent σ(x) per input (DDRS, Alfarra et al. 2022), found by
  :func:`ancer.optimize.optimize_isotropic`.
- **ancer**: per-dimension scales θ(x) (ANCER, Eiras et al. 2022), found by
  :func:`ancer.optimize.optimize_anisotropic`, started at the fixed σ or at DDRS's σ(x).

CERTIFY is :meth:`ancer.smoothing.Smoothed.certify_batch` (Cohen et al. 2019, §3.2.2), with
fixed n or sequentially with group-sequential tests of the grid radii's thresholds
(:mod:`ancer.sequential`).
When the scales depend on the input, a certificate is sound only as the memory answers it
(:class:`ancer.memory.Memory`, Alfarra et al. 2022): the engine passes each input's own
certificate through its memory, in the order the inputs are given, and returns the answer.

Randomness: input ``idx`` draws its CERTIFY noise from ``input_generator(seed, idx)`` and its
optimizer noise from ``derive_seed(seed, "optimize", idx)``, so a certificate depends only on
(config, model, x, idx): not on which other inputs share its batch, nor on the process, shard
or resumed run that computed it.

Usage::

    certifier = Certifier(load_model("ckpt.pth.tar"), CertifyConfig(sigma=0.25, method="ancer"))
    certificate = certifier.certify(x, idx=0)
    certificate.label, certificate.region, certificate.memory.action
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ancer.denoisers import LoadedDenoiser
from ancer.denoisers.compose import compose
from ancer.errors import ArgumentError
from ancer.memory import Memory
from ancer.models import LoadedModel
from ancer.noise import Noise, noise_for_norm
from ancer.optimize import optimize_anisotropic, optimize_isotropic
from ancer.seeding import input_generator
from ancer.smoothing import Certificate, Smoothed
from ancer.stats import check_alpha
from ancer.validate import check_choice, set_int, set_number
from ancer.vocabulary import (COMPILE_CHOICES, METHODS, NORMS, OUTPUTS, PRECISIONS, THETA0,
                              is_anisotropic, uses_memory)

#: the optimizers' defaults (the authors'): iterations, learning rate, samples per step, κ
OPTIMIZER_DEFAULTS = {
    "dds": {"iterations": 100, "lr": 1e-4, "samples": 100, "kappa": None},
    "ancer": {"iterations": 100, "lr": 0.04, "samples": 100, "kappa": 2.0},
}

#: forward passes on a CPU from which ``compile="auto"`` compiles the model. On the shipped
#: ResNet-20 (2-core CPU) compiling costs about 3 s and runs about 2x faster, repaid after
#: about 5,000 passes (``benchmarks/bench_sequential.py``); the factor 10 leaves room for
#: deeper models, whose compiles take longer
CPU_COMPILE_BREAK_EVEN = 50_000

ProgressCallback = Callable[[int], None]


def _fail(field: str, problem: str, fix: str) -> ArgumentError:
    """The error of config field ``field``; in ``fix``, ``{name}`` is field ``name`` given."""
    return ArgumentError.of_field("CertifyConfig", field, problem, fix)


def _choice(field: str, value: Any, choices: Sequence[Any]) -> Any:
    """Config field ``field``: one of ``choices``."""
    return check_choice("CertifyConfig", field, value, choices)


@dataclass(frozen=True)
class CertifyConfig:
    """Everything that determines a certificate, validated once, here.

    Smoothing: ``norm`` ("l2": Gaussian noise; "l1": uniform noise of half-width λ = √3·σ),
    ``sigma`` (the noise's standard deviation; for dds/ancer the starting σ), ``method``
    ("isotropic", "dds", "ancer"), ``theta0`` (ancer: start from the fixed σ, "sigma", or from
    DDRS's σ(x), "dds").

    Scale optimizer (dds, ancer; None takes the method's default, ``OPTIMIZER_DEFAULTS``):
    ``opt_iterations``, ``opt_lr``, ``opt_samples`` (noise draws per step), ``kappa`` (ancer's
    weight of the proxy-radius term).

    CERTIFY: ``n0`` selection draws, ``n`` estimation draws (the budget, when sequential),
    ``alpha`` the failure probability of each certificate; ``sequential`` with ``radii`` (the
    grid whose certified level decides when an input stops, increasing, > 0).

    Computation (changes speed, not the certificate's meaning, except ``precision``):
    ``batch`` (noise draws per forward pass), ``precision`` ("fp32", "bf16", "fp16": the
    model is certified as evaluated in it), ``compile`` ("auto": on CUDA, and on a CPU when
    the run is long enough to repay compiling; "on"; "off"), ``cuda_graphs``, ``seed``.
    """

    sigma: float
    norm: str = "l2"
    method: str = "isotropic"
    theta0: str = "sigma"
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    sequential: bool = False
    radii: Tuple[float, ...] = ()
    opt_iterations: Optional[int] = None
    opt_lr: Optional[float] = None
    opt_samples: Optional[int] = None
    kappa: Optional[float] = None
    batch: int = 1000
    precision: str = "fp32"
    compile: str = "auto"
    cuda_graphs: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_number(self, "sigma", 0.0, strict=True, example="0.25")
        _choice("norm", self.norm, NORMS)
        _choice("method", self.method, METHODS)
        _choice("theta0", self.theta0, THETA0)
        if self.theta0 == "dds" and self.method != "ancer":
            raise _fail("theta0", "'dds' is ancer's starting point", "use it with {method}'ancer'")
        set_int(self, "n0", 1, example="100")
        set_int(self, "n", 1, example="100000")
        try:
            put("alpha", check_alpha(self.alpha))
        except ArgumentError:
            raise _fail("alpha", f"{self.alpha!r} is not in (0, 1)", "e.g. {alpha}0.001") from None
        put("sequential", bool(self.sequential))
        put("radii", self._checked_radii())
        for name, example in (("opt_iterations", "100"), ("opt_samples", "100")):
            if getattr(self, name) is not None:
                set_int(self, name, 1, example=example)
        for name, example in (("opt_lr", "0.04"), ("kappa", "2.0")):
            if getattr(self, name) is not None:
                set_number(self, name, 0.0, strict=True, example=example)
        if self.method == "isotropic" and any(getattr(self, name) is not None for name in
                                              ("opt_iterations", "opt_lr", "opt_samples", "kappa")):
            raise _fail("method", "optimizer options were given for the isotropic method, "
                        "which optimizes nothing", "use {method}'dds' or 'ancer', or drop them")
        if self.method == "dds" and self.kappa is not None:
            raise _fail("kappa", "κ weighs ancer's proxy-radius term", "drop it for {method}'dds'")
        set_int(self, "batch", 1, example="1000")
        _choice("precision", self.precision, PRECISIONS)
        _choice("compile", self.compile, COMPILE_CHOICES)
        put("cuda_graphs", bool(self.cuda_graphs))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _fail("seed", f"{self.seed!r} is not an integer", "e.g. {seed}0")

    def _checked_radii(self) -> Tuple[float, ...]:
        if not self.sequential:
            if self.radii:
                raise _fail("radii", "radii only steer sequential certification",
                            "pass {sequential}True, or drop radii")
            return ()
        try:
            radii = tuple(float(r) for r in self.radii)
        except (TypeError, ValueError):
            raise _fail("radii", f"{self.radii!r} is not a list of numbers",
                        "e.g. {radii}(0.25, 0.5, 0.75)") from None
        if not radii:
            raise _fail("radii", "sequential certification needs the radii it decides",
                        "e.g. {radii}(0.25, 0.5, 0.75)")
        if any(not math.isfinite(r) or r <= 0 for r in radii):
            raise _fail("radii", f"{radii} holds a radius that is not > 0", "give radii > 0")
        if any(b <= a for a, b in zip(radii, radii[1:])):
            raise _fail("radii", f"{radii} is not strictly increasing", "sort them, e.g. 0.25,0.5,0.75")
        return radii

    @property
    def uses_memory(self) -> bool:
        """Whether the scales depend on the input (dds, ancer), so the memory must answer."""
        return uses_memory(self.method)

    @property
    def anisotropic(self) -> bool:
        """Whether the scales are per dimension (ancer), so that regions are anisotropic."""
        return is_anisotropic(self.method)

    def optimizer(self, method: str) -> dict:
        """The options of ``method``'s optimizer ("dds" or "ancer"): the config's where
        given (for the method the config runs), else the defaults."""
        options = dict(OPTIMIZER_DEFAULTS[method])
        if method == self.method:
            for key, name in (("iterations", "opt_iterations"), ("lr", "opt_lr"),
                              ("samples", "opt_samples"), ("kappa", "kappa")):
                if getattr(self, name) is not None:
                    options[key] = getattr(self, name)
        return options

    def replace(self, **changes: Any) -> "CertifyConfig":
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)


def _warn_if_probabilities(model: nn.Module, xs: torch.Tensor, outputs: str) -> None:
    """Warn when a model said to output logits returns rows that look like probabilities
    (the optimizer's softmax would then be applied twice)."""
    if outputs != "logits":
        return
    with torch.no_grad():
        scores = model(xs[:1]).float()
    if bool((scores >= 0).all()) and torch.allclose(scores.sum(dim=1), torch.ones(1), atol=1e-3):
        warnings.warn("the model's outputs are nonnegative and sum to 1, like probabilities, but "
                      "outputs='logits' was given: the scale optimizer would apply a softmax "
                      "twice; pass outputs='probabilities'", stacklevel=3)


def _input_channels(model: nn.Module) -> Optional[int]:
    """The channels an image model takes: its first 2-d convolution's input channels (a
    TorchScript module's too); None without one (then inputs are not checked for shape)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) or getattr(module, "original_name", None) == "Conv2d":
            return int(module.in_channels)
    return None


class Certifier:
    """The certification engine: a model and a :class:`CertifyConfig`, answering one input
    (:meth:`certify`) or a batch (:meth:`certify_batch`) with final certificates.

    ``model`` is a :class:`ancer.models.LoadedModel` (its number of classes and output kind
    are read from it) or an ``nn.Module`` with ``num_classes`` given; ``outputs`` says what
    a plain module returns ("logits", "probabilities" or "log_probabilities"; only the
    optimizers use it). ``device`` moves the model there (default: where its parameters
    are). ``memory`` continues an earlier run's memory (dds, ancer); ``planned_samples``
    (forward passes the caller expects to spend) lets ``compile="auto"`` decide on a CPU.
    ``denoiser`` (a :class:`ancer.denoisers.LoadedDenoiser` or an ``nn.Module`` on [0, 1]
    images) makes the base classifier f(D(x)), denoised smoothing; precision, folding,
    compile and CUDA graphs then apply to the composition.
    """

    def __init__(
        self,
        model: Union[LoadedModel, nn.Module],
        config: CertifyConfig,
        num_classes: Optional[int] = None,
        *,
        outputs: str = "logits",
        device: Optional[Union[str, torch.device]] = None,
        memory: Optional[Memory] = None,
        planned_samples: Optional[int] = None,
        denoiser: Optional[Union[LoadedDenoiser, nn.Module]] = None,
    ) -> None:
        if not isinstance(config, CertifyConfig):
            raise ArgumentError(f"config must be an ancer.CertifyConfig, got {type(config).__name__}")
        if isinstance(model, LoadedModel):
            num_classes = model.num_classes if num_classes is None else num_classes
            outputs = model.outputs
            model = model.model
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"model must be a torch.nn.Module or an ancer LoadedModel, got "
                                f"{type(model).__name__}")
        if num_classes is None:
            raise ArgumentError("give num_classes for a plain nn.Module (or pass the LoadedModel "
                                "that ancer.load_model returns)")
        if outputs not in OUTPUTS:
            raise ArgumentError(f"outputs must be one of {', '.join(OUTPUTS)}, got {outputs!r}")
        model, self.denoiser = compose(model, denoiser, config.sigma)
        self.outputs = outputs
        self.config = config
        self.noise: Noise = noise_for_norm(config.norm, config.sigma)
        if config.sequential:
            top = self.noise.max_radius(config.n, config.alpha, sequential=True)
            if config.radii[0] > top:
                raise _fail("radii", f"no radius in {','.join(map(str, config.radii))} can be "
                            "certified", f"the largest with {{n}}{config.n} at {{alpha}}"
                            f"{config.alpha:g} is {top:.3f}: give smaller radii or a larger n")
        self.compiled = self._resolve_compile(device, model, planned_samples)
        self.smoothed = Smoothed(model, self.noise, num_classes, precision=config.precision,
                                 device=device, compile=self.compiled,
                                 cuda_graphs=config.cuda_graphs)
        self._memory: Optional[Memory] = Memory(config.norm) if config.uses_memory else None
        if memory is not None:
            self.use_memory(memory)
        self._checked_outputs = False
        self._channels = _input_channels(model)

    def _resolve_compile(self, device: Optional[Union[str, torch.device]], model: nn.Module,
                         planned_samples: Optional[int]) -> Union[bool, str]:
        """``Smoothed``'s compile argument: "auto" compiles on CUDA; on a CPU only when the
        planned forward passes reach ``CPU_COMPILE_BREAK_EVEN``; never a TorchScript model."""
        choice = self.config.compile
        if choice != "auto":
            return choice == "on"
        if isinstance(model, torch.jit.ScriptModule):  # torch.compile cannot take TorchScript
            return False
        where = torch.device(device) if device is not None else next(
            (t.device for t in list(model.parameters()) + list(model.buffers())), torch.device("cpu"))
        if where.type == "cuda":
            return "auto"
        return planned_samples is not None and planned_samples >= CPU_COMPILE_BREAK_EVEN

    @property
    def device(self) -> torch.device:
        return self.smoothed.device

    @property
    def num_classes(self) -> int:
        return self.smoothed.num_classes

    @property
    def memory(self) -> Optional[Memory]:
        """The memory that answers this engine's certificates (dds, ancer; None otherwise)."""
        return self._memory

    def use_memory(self, memory: Memory) -> None:
        """Continue ``memory`` (an earlier run's, e.g. :meth:`Memory.load`ed on resume) from
        now on, in place of this engine's own."""
        if not self.config.uses_memory:
            raise ArgumentError(f"method {self.config.method!r} uses no memory; pass none")
        if memory.norm != self.config.norm:
            raise ArgumentError(f"the memory holds {memory.norm} regions but the config certifies "
                                f"{self.config.norm}: pass a memory of this norm, or none")
        self._memory = memory

    # -- the protocol --------------------------------------------------------------------
    def certify(self, x: torch.Tensor, idx: int = 0,
                progress: Optional[ProgressCallback] = None) -> Certificate:
        """The final certificate of one input ``x`` (C×H×W) with dataset index ``idx``."""
        self._check_input(x, batch=False)
        return self.certify_batch(x.unsqueeze(0), [idx], progress=progress)[0]

    def certify_batch(self, xs: torch.Tensor, indices: Optional[Sequence[int]] = None,
                      progress: Optional[ProgressCallback] = None, *,
                      raw: bool = False) -> List[Certificate]:
        """The final certificates of the inputs ``xs`` (B×C×H×W), their noise samples packed
        into shared forward batches; ``indices`` (default 0..B−1) seed each input's noise.
        For dds and ancer each certificate is the memory's answer, in the order given.

        ``raw=True`` returns each input's own certificate, before the memory: for dds and
        ancer not sound alone. A shard of a run, which sees only its own inputs, keeps them
        so, and the merge answers them all in index order (:func:`ancer.memory.replay`)."""
        self._check_input(xs, batch=True)
        indices = self._indices(xs, indices)
        noises, thetas0 = self.scales(xs, indices)
        generators = [input_generator(self.config.seed, idx, self.device) for idx in indices]
        config = self.config
        own = self.smoothed.certify_batch(
            xs, config.n0, config.n, config.alpha, config.batch, generators=generators,
            noises=noises, progress=progress, sequential=config.sequential, radii=config.radii)
        if thetas0 is not None:
            own = [dataclasses.replace(c, start_sigma=float(t)) for c, t in zip(own, thetas0)]
        if self._memory is None or raw:
            return own
        return [self._answer(x, certificate, idx) for x, certificate, idx in zip(xs, own, indices)]

    def _answer(self, x: torch.Tensor, certificate: Certificate, idx: int) -> Certificate:
        """The memory's answer to input ``x``'s own ``certificate``: the same certificate with
        the answered class and region, and ``memory`` saying what was done (kept, shrunk,
        overridden, abstained). The memory keeps the answered region for later inputs."""
        outcome = self._memory.certify(x, certificate.label, certificate.region, key=int(idx))
        return dataclasses.replace(certificate, label=int(outcome.label), region=outcome.region,
                                   memory=outcome)

    def scales(self, xs: torch.Tensor, indices: Sequence[int]
               ) -> Tuple[Optional[List[Noise]], Optional[torch.Tensor]]:
        """Each input's smoothing noise, and (ancer) the isotropic σ its scales started from:
        (None, None) for the fixed σ (isotropic); for dds the noise of DDRS's σ(x); for ancer
        θ(x) from ``optimize_anisotropic`` started at the fixed σ or at DDRS's σ(x). The optimizers run on
        the model CERTIFY evaluates, in the config's precision, seeded by (seed, idx)."""
        config = self.config
        if not config.uses_memory:
            return None, None
        model = self.smoothed.model  # batch norm folded, on the device
        xs = xs.to(self.device, torch.float32)
        if not self._checked_outputs:
            _warn_if_probabilities(model, xs, self.outputs)
            self._checked_outputs = True
        common = dict(outputs=self.outputs, max_batch=config.batch, precision=config.precision,
                      seed=config.seed, indices=[int(i) for i in indices])
        if config.method == "dds" or config.theta0 == "dds":
            options = config.optimizer("dds")
            sigmas = optimize_isotropic(model, xs, config.sigma, config.norm,
                                        iterations=options["iterations"], lr=options["lr"],
                                        samples=options["samples"], **common).sigma
        else:
            sigmas = torch.full((len(xs),), config.sigma)
        if config.method == "dds":
            return [self.noise.with_sigma(float(s)) for s in sigmas], None
        options = config.optimizer("ancer")
        thetas = optimize_anisotropic(model, xs, sigmas, config.norm, options["iterations"],
                                      options["lr"], options["samples"], options["kappa"],
                                      **common).sigma
        return [self.noise.with_sigma(theta) for theta in thetas], sigmas

    def settings(self) -> dict:
        """What determines this engine's certificates, as plain data for results files: the
        smoothing (norm, method, σ and for l1 the half-width λ, the optimizer's options),
        CERTIFY's n0, n, alpha and sequential radii, and how the base classifier is
        evaluated (batch, precision, batch-norm folding, seed), and the denoiser in front of
        it (``denoiser``: path, kind, hash, σ, diffusion timestep; None without one). Settings
        that change speed
        only (compile, CUDA graphs) are not among them."""
        config = self.config
        optimizer = None
        if config.uses_memory:
            optimizer = {**config.optimizer(config.method),
                         "theta0": config.theta0 if config.method == "ancer" else None}
        return {
            "norm": config.norm, "method": config.method, "sigma": config.sigma,
            "half_width": self.noise.half_width_of(config.sigma), "n0": config.n0, "n": config.n,
            "alpha": config.alpha, "batch": config.batch, "sequential": config.sequential,
            "radii": list(config.radii), "precision": config.precision, "seed": config.seed,
            "fold_bn": self.smoothed.settings()["fold_bn"], "optimizer": optimizer,
            "denoiser": self.denoiser,
        }

    def _check_input(self, xs: Any, batch: bool) -> None:
        """One clear error, naming the wanted shape and range, for an input the model cannot
        take: not a float tensor of pixels, one dimension too many or too few (an input where
        a batch is wanted, or the reverse), or channels last."""
        method = "certify_batch" if batch else "certify"
        wanted = f"{'B×' if batch else ''}{self._channels or 'C'}×H×W"
        if not isinstance(xs, torch.Tensor):
            raise ArgumentError(f"{method} takes a tensor of shape {wanted}, got "
                                f"{type(xs).__name__}")
        if not xs.is_floating_point():
            raise ArgumentError(f"{method}: the input has dtype {xs.dtype}, but the model takes "
                                f"float pixels in [0, 1] of shape {wanted}: convert it, e.g. "
                                "x.float() / 255 for 8-bit images")
        shape = tuple(xs.shape)
        dims = (4 if batch else 3) if self._channels else None
        if dims is not None and len(shape) == dims + (-1 if batch else 1):
            fix = "pass x[None], or use certify(x)" if batch else "pass x[0], or use certify_batch"
            raise ArgumentError(f"{method} takes {wanted}, got shape {shape}: {fix}")
        if dims is not None and len(shape) == dims and shape[-3] != self._channels:
            fix = (": it looks like channels last (H×W×C); pass x.permute(2, 0, 1)"
                   if not batch else ": it looks like channels last (B×H×W×C); pass "
                   "xs.permute(0, 3, 1, 2)") if shape[-1] == self._channels else ""
            raise ArgumentError(f"{method} takes {wanted} (pixels in [0, 1], {self._channels} "
                                f"channels first), got shape {shape}{fix}")
        if len(shape) < (2 if batch else 1):
            raise ArgumentError(f"{method} takes {wanted}, got shape {shape}")

    @staticmethod
    def _indices(xs: torch.Tensor, indices: Optional[Sequence[int]]) -> List[int]:
        if indices is None:
            return list(range(len(xs)))
        indices = [int(i) for i in indices]
        if len(indices) != len(xs):
            raise ArgumentError(f"got {len(indices)} indices for {len(xs)} inputs; give one per input")
        return indices
