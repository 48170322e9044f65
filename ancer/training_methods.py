"""The training objectives of base classifiers for randomized smoothing, as policy objects.

Each method is a small frozen dataclass holding its hyperparameters (validated on creation)
that :class:`ancer.train.TrainConfig` receives; its :meth:`~TrainingMethod.step_loss` turns
a batch into the loss to minimize, the value of each of its terms (for the progress bar and
the history) and the predictions on the noisy copies (for the accuracy under noise).

Notation: δ_1..δ_m i.i.d. draws of the training noise, p_i = softmax(f(x + δ_i)) and
p̄ = (1/m) Σ_i p_i. Every default is the authors' CIFAR-10 setting, checked against their
released code (repositories named per class; for consistency's λ see
:data:`CONSISTENCY_LAMBDA`); the papers:

- Cohen, Rosenfeld & Kolter, "Certified adversarial robustness via randomized smoothing",
  ICML 2019 (locuslab/smoothing);
- Yang, Duan, Hu, Salman, Razenshteyn & Li, "Randomized smoothing of all shapes and
  sizes", ICML 2020 (tonyduan/rs4a);
- Jeong & Shin, "Consistency regularization for certified robustness of smoothed
  classifiers", NeurIPS 2020 (jh-jeong/smoothing-consistency);
- Zhai, Dan, He, Zhang, Gong, Ravikumar, Hsieh & Wang, "MACER: attack-free and scalable
  robust training via maximizing certified radius", ICLR 2020 (RuntianZ/macer);
- Salman, Yang, Li, Zhang, Zhang, Razenshteyn & Bubeck, "Provably robust deep learning via
  adversarially trained smoothed classifiers", NeurIPS 2019
  (Hadisalman/smoothing-adversarial).

Uniform noise (l1 certificates) is accepted where the literature gives the method a
uniform-noise form, all three from Yang et al.'s released code (tonyduan/rs4a
``src/train.py``, ``src/attacks.py``), which trains with any of its noises: Gaussian
augmentation; consistency (their ``--stability`` training penalizes the KL divergence
between the predictions on two noisy copies, the same kind of term); SmoothAdv (their
``--adversarial`` training attacks the soft smoothed classifier under the training noise,
in the l1 ball with ``--adv 1``). MACER's robustness term is the Gaussian l2 radius
(σ/2)(Φ⁻¹(p_A) − Φ⁻¹(p_B)); neither its paper nor a follow-up we checked gives a
uniform-noise form, so it refuses uniform noise.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Dict, NamedTuple, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from ancer.errors import ArgumentError
from ancer.validate import check_bool, set_int, set_number
from ancer.noise import Noise


class StepLoss(NamedTuple):
    """The loss of one batch, the value of each of its terms (detached), and the predicted
    class of every noisy copy, shape (copies, N)."""

    loss: torch.Tensor
    terms: Dict[str, torch.Tensor]
    predicted: torch.Tensor


def _logits(model: nn.Module, noisy: torch.Tensor) -> torch.Tensor:
    """``model`` on copies × N inputs, as float logits of shape (copies, N, classes) (bf16
    autocast on CUDA)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=noisy.device.type == "cuda"):
        logits = model(noisy.flatten(0, 1))
    return logits.float().view(*noisy.shape[:2], -1)


def _draws(noise: Optional[Noise], x: torch.Tensor, copies: int,
           generator: Optional[torch.Generator]) -> torch.Tensor:
    """``copies`` noise draws for each input of ``x``, shape (copies, *x.shape); zeros when
    ``noise`` is None (clean training, σ = 0)."""
    if noise is None:
        return torch.zeros((copies, *x.shape), device=x.device, dtype=x.dtype)
    out = torch.empty((copies, *x.shape), device=x.device, dtype=x.dtype)
    return noise.perturb_(out, torch.zeros_like(x), generator)


@dataclass(frozen=True)
class TrainingMethod:
    """A training objective with its hyperparameters. Subclasses set :attr:`name`,
    :attr:`uniform` (whether the method has a uniform-noise form) and implement
    :meth:`step_loss`; their fields are the hyperparameters."""

    name: ClassVar[str]
    uniform: ClassVar[bool]

    @classmethod
    def for_sigma(cls, sigma: float, **overrides: Any) -> "TrainingMethod":
        """The method with the authors' defaults at noise level ``sigma`` (where the
        paper's setting depends on σ), and ``overrides`` on top."""
        return cls(**overrides)

    def check_noise(self, noise: str) -> None:
        """Refuse a noise the method has no form for."""
        if noise == "uniform" and not self.uniform:
            others = " or ".join(name for name, cls in METHODS.items() if cls.uniform)
            raise ArgumentError.of_field(
                "TrainConfig", "method", f"{self.name} is defined for Gaussian smoothing (l2) "
                "only", f"use {{noise}}gaussian, or {{method}}{others} for l1")

    @classmethod
    def default_text(cls, name: str) -> str:
        """The default of hyperparameter ``name``, as help texts state it."""
        return str(next(f.default for f in fields(cls) if f.name == name))

    def record(self) -> Dict[str, Any]:
        """The method's name and hyperparameters, for a checkpoint."""
        return {"name": self.name, **asdict(self)}

    def describe(self) -> str:
        """``name with field=value, ...``: the method in one phrase, for messages."""
        values = ", ".join(f"{k}={v}" for k, v in asdict(self).items())
        return self.name + (f" with {values}" if values else "")

    def step_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: Noise,
                  generator: Optional[torch.Generator], epoch: int) -> StepLoss:
        """The loss of a batch ``x`` (in [0, 1]) with labels ``y``; ``epoch`` counts from 0."""
        raise NotImplementedError


@dataclass(frozen=True)
class GaussianAugmentation(TrainingMethod):
    """Noise augmentation: CE(f(x + δ), y) with one draw per input. Gaussian noise is
    Cohen et al. 2019's (§3.3; locuslab/smoothing ``code/train.py``), uniform noise
    Yang et al. 2020's for l1. No hyperparameters."""

    name: ClassVar[str] = "gaussian"
    uniform: ClassVar[bool] = True

    def step_loss(self, model, x, y, noise, generator, epoch):
        logits = _logits(model, x + _draws(noise, x, 1, generator))
        ce = F.cross_entropy(logits[0], y)
        return StepLoss(ce, {"ce": ce.detach()}, logits.argmax(-1))


#: λ on CIFAR-10 by σ for Jeong & Shin 2020's consistency. The certification logs they
#: release for Gaussian + consistency (jh-jeong/smoothing-consistency
#: ``data/certify/cifar10/consistency/cohen/num_2/lbd_*/eta_0.5``) hold runs at λ = 10 and
#: 20 for σ = 0.25, λ = 10 for σ = 0.5 and λ = 5 and 10 for σ = 1.0; their script's default
#: is 10 (``code/train_consistency.py --lbd``). ancer takes 20 at σ ≤ 0.25 and 10 above,
#: two of those runs; which λ their paper's tables report we did not check against the paper.
CONSISTENCY_LAMBDA = ((0.25, 20.0), (math.inf, 10.0))


@dataclass(frozen=True)
class Consistency(TrainingMethod):
    """Consistency regularization (Jeong & Shin 2020; their ``code/consistency.py``,
    ``loss='default'``, which its docstring says reproduces the paper's values): with m noisy
    copies of each input,

        mean_i CE(f(x + δ_i), y) + λ · mean_i KL(p̄ ‖ p_i) + η · H(p̄),

    each term averaged over the batch; H(p̄) = −Σ_c p̄_c log p̄_c (p̄ clamped at 1e-20 inside
    the log, as the authors' ``code/consistency.py``). Defaults from their repository: m = 2
    (``--num-noise-vec 2`` in their README's and EXPERIMENTS.MD's commands), η = 0.5
    (``--eta``), λ = 20 at σ ≤ 0.25 and 10 above (:data:`CONSISTENCY_LAMBDA`). The authors
    split a batch of B inputs (B = 256 by default) into m chunks of B/m, so a step sees B
    noisy inputs; here a step takes ``batch_size`` inputs × m copies (batch_size = B/m
    reproduces their step).

    Uniform noise is accepted: the objective uses the noise only through its samples, and
    Yang et al. 2020 train uniform-noise models with a KL stability term of this kind.
    """

    copies: int = 2
    lbd: float = 10.0
    eta: float = 0.5

    name: ClassVar[str] = "consistency"
    uniform: ClassVar[bool] = True

    def __post_init__(self) -> None:
        set_int(self, "copies", low=2)
        set_number(self, "lbd", low=0.0)
        set_number(self, "eta", low=0.0)

    @classmethod
    def for_sigma(cls, sigma, **overrides):
        overrides.setdefault("lbd", next(lbd for top, lbd in CONSISTENCY_LAMBDA if sigma <= top))
        return cls(**overrides)

    @classmethod
    def default_text(cls, name):
        if name != "lbd":
            return super().default_text(name)
        return ", ".join(f"{lbd:g} at sigma <= {top:g}" if math.isfinite(top) else
                         f"{lbd:g} above" for top, lbd in CONSISTENCY_LAMBDA)

    def step_loss(self, model, x, y, noise, generator, epoch):
        logits = _logits(model, x + _draws(noise, x, self.copies, generator))
        terms = consistency_terms(logits, y)
        loss = terms["ce"] + self.lbd * terms["kl"] + self.eta * terms["entropy"]
        return StepLoss(loss, {k: v.detach() for k, v in terms.items()}, logits.argmax(-1))


def consistency_terms(logits: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The three terms of :class:`Consistency` from logits of shape (m, N, classes):
    ``ce`` = mean CE over copies and inputs, ``kl`` = mean over inputs of
    (1/m) Σ_i KL(p̄ ‖ p_i), ``entropy`` = mean over inputs of H(p̄)."""
    copies = len(logits)
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(copies))
    log_p = F.log_softmax(logits, dim=-1)
    mean = log_p.exp().mean(0)
    log_mean = torch.log(mean.clamp(min=1e-20))
    kl = (mean * (log_mean - log_p)).sum(-1).mean()
    entropy = -(mean * log_mean).sum(-1).mean()
    return {"ce": ce, "kl": kl, "entropy": entropy}


@dataclass(frozen=True)
class Macer(TrainingMethod):
    """MACER (Zhai et al. 2020, Algorithm 1; RuntianZ/macer ``macer.py``):
    with k noise draws per input, the soft smoothed outputs p̄ = mean_i softmax(f(x + δ_i))
    and q = mean_i softmax(β·f(x + δ_i)), the loss of a batch of N inputs is

        (1/N) Σ_x −log(p̄_y + 1e-10) + λ · (1/N) Σ_{x ∈ S} (σ/2) · (γ − ξ(x)),

    ξ = Φ⁻¹(q_top) − Φ⁻¹(q_second) (the soft classifier's top two classes), where S holds
    the inputs whose top class under q is y and whose ξ is finite and ≤ γ (the hinge): the
    authors drop the NaN/inf terms, and inputs outside S add nothing (but still count in N).
    Defaults are the authors' code's for CIFAR-10: k = 16, β = 16, γ = 8, λ = 12
    (``main.py``; σ = 0.25 in their README's example). The paper also lists other λ for other
    σ, which we did not verify against the paper; pass ``lbd`` for those. The authors' code
    keeps λ fixed from the first epoch (Jeong & Shin's reproduction adds a ``--deferred``
    option, λ = 0 until the first learning-rate drop, not offered here). Their optimizer (lr
    0.01, batch 64, weight decay 5e-4, 440 epochs) is TrainConfig's to set.

    Gaussian noise only: the hinge is on the Gaussian l2 radius.
    """

    draws: int = 16
    beta: float = 16.0
    gamma: float = 8.0
    lbd: float = 12.0

    name: ClassVar[str] = "macer"
    uniform: ClassVar[bool] = False

    def __post_init__(self) -> None:
        set_int(self, "draws", low=1)
        set_number(self, "beta", low=0.0)
        set_number(self, "gamma", low=0.0)
        set_number(self, "lbd", low=0.0)

    def step_loss(self, model, x, y, noise, generator, epoch):
        logits = _logits(model, x + _draws(noise, x, self.draws, generator))
        terms = macer_terms(logits, y, float(noise.sigma), self.beta, self.gamma)
        loss = terms["ce"] + self.lbd * terms["hinge"]
        return StepLoss(loss, {k: v.detach() for k, v in terms.items()}, logits.argmax(-1))


def macer_terms(logits: torch.Tensor, y: torch.Tensor, sigma: float, beta: float,
                gamma: float) -> Dict[str, torch.Tensor]:
    """The two terms of :class:`Macer` from logits of shape (k, N, classes): ``ce``, the
    mean of −log(p̄_y + 1e-10), and ``hinge``, (1/N) Σ_{x ∈ S} (σ/2)(γ − ξ(x))."""
    soft = F.softmax(logits, dim=-1).mean(0)
    ce = F.nll_loss(torch.log(soft + 1e-10), y)
    q = F.softmax(beta * logits, dim=-1).mean(0)
    top2, classes = q.topk(2, dim=-1)
    with torch.no_grad():  # S, chosen first: an infinite ξ outside S would make NaN gradients
        gap = torch.special.ndtri(top2[:, 0]) - torch.special.ndtri(top2[:, 1])
        kept = (classes[:, 0] == y) & torch.isfinite(gap) & (gap <= gamma)
    xi = torch.special.ndtri(top2[kept, 0]) - torch.special.ndtri(top2[kept, 1])
    hinge = (gamma - xi).sum() * sigma / 2 / len(y)
    return {"ce": ce, "hinge": hinge}


@dataclass(frozen=True)
class SmoothAdv(TrainingMethod):
    """SmoothAdv with PGD (Salman et al. 2019; Hadisalman/smoothing-adversarial
    ``code/attacks.py`` ``PGD_L2._attack_mutlinoise``, ``code/train_pgd.py``).

    For each input, m noise draws δ_1..δ_m are fixed, and ``steps`` steps of PGD from
    x' = x maximize the soft smoothed classifier's loss −log mean_i softmax(f(x' + δ_i))_y
    in the ε_t ball of the norm the noise certifies (see :func:`smooth_pgd`; the model in
    eval mode meanwhile). The radius warms up linearly, ε_t = min(ε, (t + 1)·ε/warmup) at
    epoch t (from 0) of the run. The model is then trained with CE on every adversarial copy
    x' + δ_i when ``multi_noise`` (the authors' ``--train-multi-noise``), else on x' + δ_1
    only.

    Defaults are the authors' README command for CIFAR-10: 10 steps, ε = 64/256 (their
    ``--epsilon`` is divided by 256), m = 2 with multi-noise training, a 10-epoch warm-up
    (their fine-tuning command leaves ``--warmup`` at its default, 1). Their batch of B
    inputs is split into m chunks of B/m; batch_size = B/m reproduces their step. DDN is not
    implemented. With uniform noise the attack is Yang et al. 2020's l1 PGD (see
    :func:`smooth_pgd`), the rest unchanged.
    """

    epsilon: float = 0.25
    steps: int = 10
    copies: int = 2
    multi_noise: bool = True
    warmup: int = 10

    name: ClassVar[str] = "smoothadv"
    uniform: ClassVar[bool] = True

    def __post_init__(self) -> None:
        set_number(self, "epsilon", low=0.0)
        set_int(self, "steps", low=1)
        set_int(self, "copies", low=1)
        set_int(self, "warmup", low=1)
        check_bool(type(self).__name__, "multi_noise", self.multi_noise)

    def radius(self, epoch: int) -> float:
        """ε_t at epoch ``epoch`` (from 0): the linear warm-up."""
        return min(self.epsilon, (epoch + 1) * self.epsilon / self.warmup)

    def step_loss(self, model, x, y, noise, generator, epoch):
        draws = _draws(noise, x, self.copies, generator)
        adversarial = smooth_pgd(model, x, y, draws, self.radius(epoch), self.steps, noise.norm)
        if not self.multi_noise:
            draws = draws[:1]
        logits = _logits(model, adversarial + draws)
        ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(draws)))
        return StepLoss(ce, {"ce": ce.detach()}, logits.argmax(-1))


def smoothed_nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 draws: torch.Tensor) -> torch.Tensor:
    """Per input, −log mean_i softmax(f(x + δ_i))_y (clamped at 1e-20 inside the log), for
    ``draws`` of shape (m, *x.shape)."""
    soft = F.softmax(_logits(model, x + draws), dim=-1).mean(0)
    return -torch.log(soft.gather(1, y[:, None]).squeeze(1).clamp(min=1e-20))


def smooth_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: torch.Tensor,
               epsilon: float, steps: int, norm: str = "l2") -> torch.Tensor:
    """SmoothAdv's PGD on the soft smoothed classifier (see :class:`SmoothAdv`): the
    adversarial inputs x' with ‖x' − x‖ ≤ ``epsilon`` and x' in [0, 1], detached, after
    ``steps`` steps of size α = 2ε/steps from x' = x.

    - ``norm="l2"`` (Salman et al. 2019, ``PGD_L2``): x' moves by α along the per-input
      l2-normalized gradient, is clipped to [0, 1], and x' − x is scaled back into the ball.
    - ``norm="l1"`` (Yang et al. 2020, rs4a ``pgd_attack_smooth`` with ``adv=1``): the
      step keeps the gradient's largest 1/16 of entries by magnitude, takes their signs and
      normalizes them to l1 length α; x' − x is projected onto the l1 ball by sorting (Duchi
      et al. 2008; rs4a ``project_onto_ball``) and x' clipped to [0, 1].

    The model runs in eval mode during the attack and is put back in its previous mode."""
    if norm not in ("l2", "l1"):
        raise ArgumentError(f"norm must be 'l2' or 'l1', got {norm!r}")
    if epsilon == 0:
        return x.detach()
    was_training = model.training
    model.eval()
    step_size = 2 * epsilon / steps
    x = x.detach()
    adversarial = x.clone()
    shape = (-1, *[1] * (x.dim() - 1))
    try:
        for _ in range(steps):
            adversarial.requires_grad_(True)
            loss = smoothed_nll(model, adversarial, y, draws).sum()
            grad, = torch.autograd.grad(loss, [adversarial])
            adversarial = adversarial.detach()
            if norm == "l2":
                direction = grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(shape)
                moved = (adversarial + step_size * direction).clamp(0, 1)
                adversarial = x + (moved - x).renorm(p=2, dim=0, maxnorm=epsilon)
            else:
                direction = _sparse_sign(grad)
                moved = adversarial + step_size * direction - x
                adversarial = (x + project_l1_ball(moved, epsilon)).clamp(0, 1)
    finally:
        model.train(was_training)
    return adversarial.detach()


def _sparse_sign(grad: torch.Tensor) -> torch.Tensor:
    """Per input, the signs of the largest 1/16 of the gradient's entries by magnitude (the
    others 0), scaled to l1 norm 1 (Yang et al.'s l1 ascent direction)."""
    flat = grad.flatten(1)
    k = max(1, flat.shape[1] * 15 // 16)
    threshold = flat.abs().kthvalue(k, dim=1, keepdim=True).values
    signs = torch.where(flat.abs() >= threshold, flat.sign(), torch.zeros_like(flat))
    return (signs / signs.abs().sum(1, keepdim=True).clamp(min=1)).view_as(grad)


def project_l1_ball(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Each input's v (first dimension indexes inputs) projected onto {‖w‖₁ ≤ radius} in l2
    distance, by sorting (Duchi et al. 2008): w = sign(v)·max(|v| − θ, 0) with θ from
    the largest ρ whose sorted magnitude exceeds (Σ_{j≤ρ} μ_j − radius)/ρ; inputs already
    inside are kept."""
    flat = v.flatten(1)
    magnitude = flat.abs()
    mu = magnitude.sort(dim=1, descending=True).values
    cumulative = mu.cumsum(1)
    ranks = torch.arange(1, flat.shape[1] + 1, device=v.device, dtype=v.dtype)
    rho = (mu * ranks > cumulative - radius).sum(1, keepdim=True).clamp(min=1)
    theta = (cumulative.gather(1, rho - 1) - radius) / rho.to(v.dtype)
    projected = flat.sign() * (magnitude - theta).clamp(min=0)
    inside = magnitude.sum(1, keepdim=True) <= radius
    return torch.where(inside, flat, projected).view_as(v)


#: The training methods by name.
METHODS: Dict[str, Type[TrainingMethod]] = {
    cls.name: cls for cls in (GaussianAugmentation, Consistency, Macer, SmoothAdv)}


def method_from_record(record: Dict[str, Any]) -> TrainingMethod:
    """The method a checkpoint's :meth:`TrainingMethod.record` describes."""
    record = dict(record)
    cls = METHODS.get(record.pop("name", None))
    if cls is None:
        raise ArgumentError(f"unknown training method record {record!r}")
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in record.items() if k in names})


def make_method(name: str, sigma: float, **overrides: Any) -> TrainingMethod:
    """The method ``name`` with its defaults at ``sigma`` and ``overrides``; an unknown name,
    or a hyperparameter the method does not have, is an ArgumentError naming it."""
    cls = METHODS.get(name)
    if cls is None:
        raise ArgumentError.of_field("", "method", f"{name!r} is not a training method",
                                     f"give one of {', '.join(METHODS)}")
    names = {f.name for f in fields(cls)}
    for key in overrides:
        if key not in names:
            users = [m for m, c in METHODS.items() if key in {f.name for f in fields(c)}]
            raise ArgumentError.of_field(
                "", key, f"a hyperparameter of {' and '.join(users) or 'no method'}, not of "
                f"{name}", f"drop it, or give {{method}}{' or '.join(users)}")
    return cls.for_sigma(sigma, **overrides)
