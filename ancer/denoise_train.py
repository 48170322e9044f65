"""Training a denoiser for denoised smoothing (Salman et al. 2020).

Salman, Sun, Yang, Kapoor, Kolter, "Denoised Smoothing: A Provable Defense for Pretrained
Classifiers", NeurIPS 2020; defaults as the authors' ``code/train_denoiser.py``
(microsoft/denoised-smoothing): Adam, learning rate 1e-3, weight decay 1e-4, batch 256, a
step decay by 0.1 every 30 epochs, the random crop and flip of CIFAR-10 training, noise
δ ~ N(0, σ²I) on [0, 1] images. Two objectives:

- ``mse``: mean over pixels of (D(x + δ) − x)² (their ``denoising`` objective);
- ``stability``: CE(f(D(x + δ)), argmax f(x)) through a frozen classifier f, whose clean
  prediction is the label (their ``stability`` objective). The authors report it both from
  scratch ("Stab") and fine-tuning an MSE-trained denoiser ("Stab+MSE", their
  ``--pretrained-denoiser``; ``code/analyze.py``); ``init`` here does the latter.

The checkpoint has the authors' layout, ``{'arch', 'state_dict', 'epoch', 'optimizer'}``,
plus ``sigma``, ``objective``, ``config`` and ``history``; it is written atomically after
every epoch, and ``resume`` continues from its last finished epoch. Every random choice
(order, crops, noise) derives from (seed, epoch), so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ancer.augment import random_crop_flip
from ancer.denoisers.archs import DENOISER_ARCHITECTURES, create_denoiser
from ancer.denoisers.compose import freeze
from ancer.denoisers.loader import load_denoiser
from ancer.errors import ArgumentError, CheckpointError
from ancer.models.checkpoint import read_checkpoint
from ancer.seeding import derive_seed, make_generator
from ancer.train import save_checkpoint
from ancer.validate import (check_bool, check_checkpoint_path, check_choice, not_resumable,
                            set_int, set_number)

OBJECTIVES = ("mse", "stability")


@dataclass(frozen=True)
class DenoiseConfig:
    """The hyperparameters of a denoiser's training, validated on creation (defaults: the
    authors')."""

    sigma: float
    objective: str = "mse"
    epochs: int = 90
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lr_step: int = 30
    lr_gamma: float = 0.1
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "DenoiseConfig"
        for name in ("sigma", "lr"):
            set_number(self, name, low=0.0, strict=True)
        check_choice(owner, "objective", self.objective, OBJECTIVES)
        for name in ("epochs", "batch_size", "lr_step"):
            set_int(self, name, low=1)
        set_number(self, "weight_decay", low=0.0)
        set_number(self, "lr_gamma", low=0.0, high=1.0, strict=True)
        check_bool(owner, "augment", self.augment)
        set_int(self, "seed", low=0)

    def learning_rate(self, epoch: int) -> float:
        """The step schedule of epoch ``epoch`` (from 0): lr · gamma^(epoch // lr_step)."""
        return self.lr * self.lr_gamma ** (epoch // self.lr_step)


@dataclass(frozen=True)
class DenoiseProgress:
    """Where training stands after a step: running means over the epoch so far;
    ``agreement`` (stability) the fraction of noisy inputs where f(D(x + δ)) = f(x)."""

    epoch: int  # from 1
    epochs: int
    step: int  # from 1
    steps: int
    loss: float
    agreement: Optional[float]
    lr: float


@dataclass(frozen=True)
class DenoiseEpoch:
    """One finished epoch: its mean loss, agreement (stability, else None), learning rate
    and wall time in seconds."""

    epoch: int
    loss: float
    agreement: Optional[float]
    lr: float
    seconds: float


@dataclass
class DenoiseResult:
    """The trained denoiser (eval mode), every epoch's record, and the checkpoint."""

    denoiser: nn.Module
    history: List[DenoiseEpoch]
    checkpoint: str


def denoising_loss(denoiser: nn.Module, x: torch.Tensor, sigma: float, objective: str,
                   classifier: Optional[nn.Module] = None,
                   generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The objective on one batch of clean images ``x``, and (stability) whether each noisy
    input keeps the clean prediction: mse, mean (D(x + δ) − x)²; stability,
    CE(f(D(x + δ)), argmax f(x)) with f frozen."""
    noisy = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    denoised = denoiser(noisy)
    if objective == "mse":
        return F.mse_loss(denoised, x), None
    with torch.no_grad():
        target = classifier(x).argmax(1)
    logits = classifier(denoised)
    return F.cross_entropy(logits, target), logits.argmax(1) == target


def train_denoiser(
    arch: str,
    train_set: Sequence,
    checkpoint: Union[str, Path],
    config: DenoiseConfig,
    *,
    classifier: Optional[nn.Module] = None,
    init: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device] = "cpu",
    resume: bool = False,
    workers: int = 0,
    callback: Optional[Callable[[DenoiseProgress], None]] = None,
) -> DenoiseResult:
    """Train ``create_denoiser(arch)`` (or the denoiser of checkpoint ``init``) on
    ``train_set`` (items (x, label), x C×H×W in [0, 1]) with ``config``'s objective,
    writing ``checkpoint`` after every epoch. ``classifier`` (an ``nn.Module`` on [0, 1]
    images, e.g. ``load_model(...).model``) is required by the stability objective and is
    kept frozen. ``resume`` continues from ``checkpoint`` when it exists; without it an
    existing ``checkpoint`` is an error."""
    if not isinstance(config, DenoiseConfig):
        raise ArgumentError.of_field("", "config", f"a {type(config).__name__}, not a "
                                     "DenoiseConfig", "give {config}DenoiseConfig(...)")
    if arch not in DENOISER_ARCHITECTURES:
        create_denoiser(arch)  # raises the unknown-architecture error
    if config.objective == "stability" and classifier is None:
        raise ArgumentError.of_field("", "classifier", "the stability objective needs the "
                                     "frozen classifier", "give {classifier}CKPT")
    if len(train_set) < config.batch_size:
        raise ArgumentError.of_field(
            "DenoiseConfig", "batch_size", f"{config.batch_size} is more than the training "
            f"set's {len(train_set)} items", f"give at most {{batch_size}}{len(train_set)}")
    device = torch.device(device)
    checkpoint = Path(checkpoint)
    check_checkpoint_path(checkpoint, resume)
    if classifier is not None:
        classifier = freeze(classifier.to(device))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init"))
        denoiser = create_denoiser(arch)
    if init is not None:
        start_from = load_denoiser(init)
        if start_from.arch != arch:
            raise ArgumentError.of_field("", "init", f"{str(init)!r} is a {start_from.arch} "
                                         f"denoiser, not {arch}",
                                         f"give {{arch}}{start_from.arch}, or an init of {arch}")
        denoiser.load_state_dict(start_from.module.state_dict())
    denoiser = denoiser.to(device)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    start, history = 0, []
    if resume and checkpoint.exists():
        saved = _resume_state(checkpoint, arch, config, device)
        denoiser.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        start, history = saved["epoch"], [DenoiseEpoch(**h) for h in saved["history"]]

    for epoch in range(start, config.epochs):
        history.append(_epoch(denoiser, optimizer, train_set, classifier, config, epoch, device,
                              workers, callback))
        save_checkpoint(checkpoint, {
            "arch": arch, "state_dict": denoiser.state_dict(), "epoch": epoch + 1,
            "sigma": config.sigma, "objective": config.objective, "config": asdict(config),
            "history": [asdict(h) for h in history], "optimizer": optimizer.state_dict(),
        })
    return DenoiseResult(denoiser.eval(), history, str(checkpoint))


def _resume_state(path: Path, arch: str, config: DenoiseConfig,
                  device: torch.device) -> Dict[str, Any]:
    """The checkpoint to resume from, checked to be a run of the same arch, σ and objective."""
    saved = read_checkpoint(path, trust=False, map_location=device)
    needed = {"arch", "state_dict", "epoch", "config", "optimizer", "history"}
    if not isinstance(saved, dict) or not needed <= set(saved):
        raise CheckpointError(f"cannot resume from {str(path)!r}: it is not a checkpoint written "
                              f"by train_denoiser (needs {', '.join(sorted(needed))})")
    for key, now in (("arch", arch), ("sigma", config.sigma), ("objective", config.objective)):
        was = saved["arch"] if key == "arch" else saved["config"].get(key)
        if was != now:
            raise not_resumable("DenoiseConfig" if key != "arch" else "", key, path, repr(now),
                                repr(was), f"{{{key}}}{was}")
    return saved


def _epoch(denoiser: nn.Module, optimizer: torch.optim.Optimizer, train_set: Sequence,
           classifier: Optional[nn.Module], config: DenoiseConfig, epoch: int,
           device: torch.device, workers: int,
           callback: Optional[Callable[[DenoiseProgress], None]]) -> DenoiseEpoch:
    """One pass over ``train_set`` in an order, with crops and noise, drawn from
    (seed, epoch) alone."""
    seed = derive_seed(config.seed, "epoch", epoch)
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, generator=make_generator(seed),
                        pin_memory=device.type == "cuda")
    generator = make_generator(derive_seed(seed, "draws"), device)
    lr = config.learning_rate(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    denoiser.train()
    start = time.perf_counter()
    total, seen, agreed = 0.0, 0, 0
    for step, (x, _) in enumerate(loader):
        x = x.to(device, non_blocking=True).float()
        if config.augment:
            x = random_crop_flip(x, 4, generator)
        loss, agreement = denoising_loss(denoiser, x, config.sigma, config.objective,
                                         classifier, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(x)
        seen += len(x)
        agreed += 0 if agreement is None else int(agreement.sum())
        if callback is not None:
            callback(DenoiseProgress(epoch + 1, config.epochs, step + 1, len(loader),
                                     total / seen, agreed / seen if agreement is not None else None,
                                     lr))
    return DenoiseEpoch(epoch + 1, total / seen,
                        agreed / seen if config.objective == "stability" else None, lr,
                        time.perf_counter() - start)
