"""The certification engine: one object that runs the whole per-input protocol for every method.

    scales (fixed σ | DDRS σ(x) | ANCER θ(x))  →  CERTIFY (fixed n or sequential)  →  memory

- **isotropic**: the fixed σ of the config (Cohen et al. 2019, l2; Yang et al. 2020, l1).
- **dds**: one data-dependent σ(x) per input (Alfarra et al., "Data Dependent Randomized
  Smoothing", UAI 2022), found by :func:`ancer.optimize.optimize_isotropic`.
- **ancer**: per-dimension scales θ(x) (Alfarra et al., "ANCER: Anisotropic Certification via
  Sample-wise Volume Maximization", TMLR 2022, arXiv 2107.04570), found by
  :func:`ancer.optimize.optimize_anisotropic`, started at the fixed σ or at DDRS's σ(x).

CERTIFY is :meth:`ancer.smoothing.Smoothed.certify_batch` (Cohen et al. 2019, Alg. 1), with
fixed n or sequentially with group-sequential tests of the grid radii's thresholds
(:mod:`ancer.sequential`).
When the scales depend on the input, a certificate is sound only as the memory answers it
(:class:`ancer.memory.Memory`, Alfarra et al. 2022, §3.5): the engine passes each input's own
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

#: the methods, and those whose scales depend on the input (certified through the memory)
METHODS = ("isotropic", "dds", "ancer")
MEMORY_METHODS = frozenset({"dds", "ancer"})
NORMS = ("l2", "l1")
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_CHOICES = ("auto", "on", "off")
OUTPUTS = ("logits", "probabilities", "log_probabilities")

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
    return ArgumentError(f"CertifyConfig.{field}: {problem}; {fix}")


def _positive_number(field: str, value: Any, example: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _fail(field, f"{value!r} is not a number", f"give a number > 0, e.g. {example}") from None
    if not math.isfinite(number) or number <= 0:
        raise _fail(field, f"{value!r} is not > 0", f"give a number > 0, e.g. {example}")
    return number


def _count(field: str, value: Any, example: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or value < minimum:
        raise _fail(field, f"{value!r} is not an integer >= {minimum}", f"e.g. {example}")
    return int(value)


def _choice(field: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise _fail(field, f"{value!r} is not a choice", f"give one of {', '.join(map(repr, choices))}")
    return value


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
        put("sigma", _positive_number("sigma", self.sigma, "sigma=0.25"))
        _choice("norm", self.norm, NORMS)
        _choice("method", self.method, METHODS)
        _choice("theta0", self.theta0, ("sigma", "dds"))
        if self.theta0 == "dds" and self.method != "ancer":
            raise _fail("theta0", "'dds' is ancer's starting point", "use it with method='ancer'")
        put("n0", _count("n0", self.n0, "n0=100"))
        put("n", _count("n", self.n, "n=100000"))
        try:
            put("alpha", check_alpha(self.alpha))
        except ArgumentError:
            raise _fail("alpha", f"{self.alpha!r} is not in (0, 1)", "e.g. alpha=0.001") from None
        put("sequential", bool(self.sequential))
        put("radii", self._checked_radii())
        for name, example in (("opt_iterations", "100"), ("opt_samples", "100")):
            if getattr(self, name) is not None:
                put(name, _count(name, getattr(self, name), f"{name}={example}"))
        for name, example in (("opt_lr", "0.04"), ("kappa", "2.0")):
            if getattr(self, name) is not None:
                put(name, _positive_number(name, getattr(self, name), f"{name}={example}"))
        if self.method == "isotropic" and any(getattr(self, name) is not None for name in
                                              ("opt_iterations", "opt_lr", "opt_samples", "kappa")):
            raise _fail("method", "optimizer options were given for the isotropic method, "
                        "which optimizes nothing", "use method='dds' or 'ancer', or drop them")
        if self.method == "dds" and self.kappa is not None:
            raise _fail("kappa", "κ weighs ancer's proxy-radius term", "drop it for method='dds'")
        put("batch", _count("batch", self.batch, "batch=1000"))
        _choice("precision", self.precision, PRECISIONS)
        _choice("compile", self.compile, COMPILE_CHOICES)
        put("cuda_graphs", bool(self.cuda_graphs))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _fail("seed", f"{self.seed!r} is not an integer", "e.g. seed=0")

    def _checked_radii(self) -> Tuple[float, ...]:
        if not self.sequential:
            if self.radii:
                raise _fail("radii", "radii only steer sequential certification",
                            "pass sequential=True, or drop radii")
            return ()
        try:
            radii = tuple(float(r) for r in self.radii)
        except (TypeError, ValueError):
            raise _fail("radii", f"{self.radii!r} is not a list of numbers",
                        "e.g. radii=(0.25, 0.5, 0.75)") from None
        if not radii:
            raise _fail("radii", "sequential certification needs the radii it decides",
                        "e.g. radii=(0.25, 0.5, 0.75)")
        if any(not math.isfinite(r) or r <= 0 for r in radii):
            raise _fail("radii", f"{radii} holds a radius that is not > 0", "give radii > 0")
        if any(b <= a for a, b in zip(radii, radii[1:])):
            raise _fail("radii", f"{radii} is not strictly increasing", "sort them, e.g. 0.25,0.5,0.75")
        return radii

    @property
    def uses_memory(self) -> bool:
        """Whether the scales depend on the input (dds, ancer), so the memory must answer."""
        return self.method in MEMORY_METHODS

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
        self.compiled = self._resolve_compile(device, model, planned_samples)
        self.smoothed = Smoothed(model, self.noise, num_classes, precision=config.precision,
                                 device=device, compile=self.compiled,
                                 cuda_graphs=config.cuda_graphs)
        if memory is not None and memory.norm != config.norm:
            raise ArgumentError(f"the memory holds {memory.norm} regions but the config certifies "
                                f"{config.norm}: pass a memory of this norm, or none")
        self.memory: Optional[Memory] = (memory if memory is not None else Memory(config.norm)) \
            if config.uses_memory else None
        self._checked_outputs = False

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

    # -- the protocol --------------------------------------------------------------------
    def certify(self, x: torch.Tensor, idx: int = 0,
                progress: Optional[ProgressCallback] = None) -> Certificate:
        """The final certificate of one input ``x`` (C×H×W) with dataset index ``idx``."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ArgumentError(f"x must be one input tensor (e.g. C×H×W), got {type(x).__name__}")
        return self.certify_batch(x.unsqueeze(0), [idx], progress=progress)[0]

    def certify_batch(self, xs: torch.Tensor, indices: Optional[Sequence[int]] = None,
                      progress: Optional[ProgressCallback] = None) -> List[Certificate]:
        """The final certificates of the inputs ``xs`` (B×C×H×W), their noise samples packed
        into shared forward batches; ``indices`` (default 0..B−1) seed each input's noise.
        For dds and ancer each certificate is the memory's answer, in the order given."""
        indices = self._indices(xs, indices)
        own = self.own_certificates(xs, indices, progress)
        if self.memory is None:
            return own
        return [self.answer(x, certificate, idx) for x, certificate, idx in zip(xs, own, indices)]

    def own_certificates(self, xs: torch.Tensor, indices: Sequence[int],
                         progress: Optional[ProgressCallback] = None) -> List[Certificate]:
        """Each input's own certificate with its own scales, before the memory. For dds and
        ancer this is not sound alone: pass it through :meth:`answer` (a sharded run keeps
        these raw and replays the memory over all inputs at the merge)."""
        indices = self._indices(xs, indices)
        noises, thetas0 = self.scales(xs, indices)
        generators = [input_generator(self.config.seed, idx, self.device) for idx in indices]
        config = self.config
        sequential = {"sequential": True, "radii": config.radii} if config.sequential else {}
        certificates = self.smoothed.certify_batch(
            xs, config.n0, config.n, config.alpha, config.batch, generators=generators,
            noises=noises, progress=progress, **sequential)
        if thetas0 is None:
            return certificates
        return [dataclasses.replace(c, start_sigma=float(t)) for c, t in zip(certificates, thetas0)]

    def answer(self, x: torch.Tensor, certificate: Certificate, idx: int) -> Certificate:
        """The memory's answer to input ``x``'s own ``certificate``: the same certificate with
        the answered class and region, and ``memory`` saying what was done (kept, shrunk,
        overridden, abstained). The memory keeps the answered region for later inputs."""
        if self.memory is None:
            return certificate
        outcome = self.memory.certify(x, certificate.label, certificate.region, key=int(idx))
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
        """The config as plain data, and under ``evaluation`` how the base classifier is
        evaluated (precision, batch-norm folding, compile, ...), for results files."""
        settings = dataclasses.asdict(self.config)
        settings["radii"] = list(self.config.radii)
        settings["evaluation"] = self.smoothed.settings()
        settings["denoiser"] = self.denoiser
        return settings

    @staticmethod
    def _indices(xs: torch.Tensor, indices: Optional[Sequence[int]]) -> List[int]:
        if not isinstance(xs, torch.Tensor) or xs.dim() < 2:
            raise ArgumentError("xs must be a batch tensor of shape (B, C, H, W); for one input "
                                "use certify(x, idx)")
        if indices is None:
            return list(range(len(xs)))
        indices = [int(i) for i in indices]
        if len(indices) != len(xs):
            raise ArgumentError(f"got {len(indices)} indices for {len(xs)} inputs; give one per input")
        return indices
