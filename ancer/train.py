"""Training base classifiers for randomized smoothing.

A smoothed classifier is only as good as its base classifier's accuracy under the
smoothing noise, so the base classifier is trained on noisy inputs:

- **Gaussian data augmentation** (Cohen et al. 2019, §3.3, and locuslab/smoothing
  ``code/train.py``; see docs/design.md, References): each training input
  becomes x + ε, ε ~ N(0, σ² I), added in [0, 1] pixel space (the model normalizes
  inside), with the cross-entropy loss;
- **uniform-noise augmentation** for l1 certificates (Yang et al. 2020, "Randomized
  smoothing of all shapes and sizes"): ε ~ U[-λ, λ]^d with λ = √3·σ (Yang et al.'s convention);
- optional **consistency regularization** (Jeong & Shin 2020, "Consistency regularization
  for certified robustness of smoothed classifiers"; in the spirit of the stability
  training Yang et al. use): two noisy copies of each input, the mean of their
  cross-entropies plus ``consistency`` times the mean KL divergence from the copies'
  average prediction to each copy's prediction. Jeong & Shin's entropy term (η) is not
  included. Off by default (``consistency=0``).

The rest is the usual recipe: SGD with momentum and weight decay, a cosine (per step) or
step (per epoch) learning-rate schedule, the standard CIFAR crop and flip
(:mod:`ancer.augment`), bf16 autocast on CUDA only. After every epoch a checkpoint in Cohen
et al.'s format is written atomically: ``{'arch', 'state_dict', 'epoch', 'sigma', 'noise',
'dataset', 'num_classes', 'config', 'history', 'optimizer'}``, the state dict being that of
``Sequential(NormalizeLayer, net)``, so :func:`ancer.load_model` reads it and training
resumes from it. Randomness comes from the seed and the epoch number only: a resumed run
draws what the uninterrupted run would have drawn.
"""
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ancer.augment import random_crop_flip
from ancer.data import ArrayDataset
from ancer.atomic import save_atomically
from ancer.errors import ArgumentError, CheckpointError
from ancer.models import create_model
from ancer.models.checkpoint import read_checkpoint
from ancer.models.registry import get_architecture
from ancer.noise import Gaussian, Noise, Uniform
from ancer.seeding import derive_seed, make_generator

PathLike = Union[str, Path]

#: The training noises by name: Gaussian (l2, Cohen et al.) and uniform (l1, Yang et al.).
NOISES = {"gaussian": Gaussian, "uniform": Uniform}
#: The learning-rate schedules.
SCHEDULES = ("cosine", "step")


@dataclass(frozen=True)
class TrainConfig:
    """The hyperparameters of a training run, validated on creation.

    Attributes
    ----------
    sigma : float
        Standard deviation of the training noise (for uniform noise λ = √3·σ); 0 trains
        on clean inputs (a classifier for denoised smoothing).
    noise : str
        ``"gaussian"`` (Cohen et al. 2019) or ``"uniform"`` (Yang et al. 2020).
    epochs : int
        Number of passes over the training set.
    batch_size : int
        Inputs per step (each gives two noisy copies when ``consistency > 0``).
    lr, momentum, weight_decay : float
        SGD's parameters.
    schedule : str
        ``"cosine"``: lr·(1 + cos(π t / T))/2 at step t of T; ``"step"``: lr times
        ``lr_gamma`` every ``lr_step`` epochs (Cohen et al.: 30 and 0.1).
    lr_step : int
    lr_gamma : float
    consistency : float
        Weight λ of the consistency term (Jeong & Shin 2020); 0 turns it off.
    augment : bool
        Random crop (zero padding 4) and horizontal flip, the standard CIFAR augmentation.
    seed : int
        The source of every random choice (initialization, order, crops, noise).
    """

    sigma: float
    noise: str = "gaussian"
    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    lr_step: int = 30
    lr_gamma: float = 0.1
    consistency: float = 0.0
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_number("sigma", self.sigma, low=0.0)
        if self.noise not in NOISES:
            raise ArgumentError(f"noise must be one of {sorted(NOISES)}, got {self.noise!r}")
        if self.schedule not in SCHEDULES:
            raise ArgumentError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        for name in ("epochs", "batch_size", "lr_step"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("seed", self.seed, low=0)
        _check_number("lr", self.lr, low=0.0, strict=True)
        _check_number("momentum", self.momentum, low=0.0, high=1.0)
        _check_number("weight_decay", self.weight_decay, low=0.0)
        _check_number("lr_gamma", self.lr_gamma, low=0.0, high=1.0, strict=True)
        _check_number("consistency", self.consistency, low=0.0)
        if not isinstance(self.augment, bool):
            raise ArgumentError(f"augment must be True or False, got {self.augment!r}")

    def make_noise(self) -> Optional[Noise]:
        """The training noise at ``sigma``; None for ``sigma == 0`` (clean training)."""
        return NOISES[self.noise](self.sigma) if self.sigma > 0 else None


@dataclass(frozen=True)
class Progress:
    """Where training stands after a step: running means over the epoch so far."""

    epoch: int  # from 1
    epochs: int
    step: int  # from 1
    steps: int
    loss: float
    accuracy: float  # on the noisy training inputs
    lr: float


@dataclass(frozen=True)
class EpochStats:
    """One finished epoch: mean loss, accuracy under noise on the (augmented) training
    inputs, the learning rate at its start, and its wall time in seconds."""

    epoch: int
    loss: float
    accuracy: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    """The trained model (``Sequential(NormalizeLayer, net)``, in eval mode), the history
    of every epoch (those of earlier runs included when resumed) and the checkpoint."""

    model: nn.Module
    history: List[EpochStats]
    checkpoint: str


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ArgumentError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_number(
    name: str, value: Any, low: float, high: float = math.inf, strict: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if strict else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if strict else f">= {low}"
        bound += f" and <= {high}" if math.isfinite(high) else ""
        raise ArgumentError(f"{name} must be a finite number {bound}, got {value!r}")


def learning_rate(config: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """The learning rate at step ``step`` (from 0) of ``steps`` in epoch ``epoch`` (from 0):
    cosine annealing to 0 over all steps (Loshchilov & Hutter 2017, without restarts) or
    a step decay per epoch (``torch.optim.lr_scheduler.StepLR``, as Cohen et al.)."""
    if config.schedule == "step":
        return config.lr * config.lr_gamma ** (epoch // config.lr_step)
    t = epoch * steps + step
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * t / (config.epochs * steps)))


def noisy_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    noise: Optional[Noise],
    consistency: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The training loss on noisy copies of a batch, and the predictions on them.

    With ``consistency == 0``: cross-entropy of ``model(x + ε)`` (Gaussian data
    augmentation, Cohen et al. 2019; uniform, Yang et al. 2020). Otherwise two copies
    x + ε₁, x + ε₂ and (Jeong & Shin 2020, without the entropy term)
    ``mean_i CE(f(x + ε_i), y) + consistency · mean_i KL(p̄ ‖ p_i)`` with p_i the softmax of
    copy i and p̄ their mean.

    Returns ``(loss, predicted)``: the scalar loss and the predicted classes of every
    noisy copy, shape (copies, N), for the accuracy under noise.
    """
    copies = 2 if consistency > 0 else 1
    if noise is None:  # clean training (sigma = 0)
        noisy = x.expand(copies, *x.shape)
    else:
        noisy = noise.perturb_(torch.empty((copies, *x.shape), device=x.device, dtype=x.dtype), x, generator)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        logits = model(noisy.flatten(0, 1))
    logits = logits.float().view(copies, len(x), -1)
    loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(copies))
    if consistency > 0:
        log_p = F.log_softmax(logits, dim=-1)
        log_mean = torch.logsumexp(log_p, dim=0) - math.log(copies)
        kl = (log_mean.exp() * (log_mean - log_p)).sum(-1).mean()
        loss = loss + consistency * kl
    return loss, logits.argmax(-1)


def save_checkpoint(path: PathLike, checkpoint: Dict[str, Any]) -> None:
    """Write ``checkpoint`` with ``torch.save`` atomically: to a temporary file in the same
    folder, flushed to disk, then renamed over ``path`` (``os.replace``), so that ``path``
    always holds a complete checkpoint even if the process is killed."""
    save_atomically(path, checkpoint)


def preload(dataset: Sequence) -> ArrayDataset:
    """Decode every item of ``dataset`` once and hold them in memory, so that training
    epochs decode nothing: as uint8 (a quarter of the memory) when every image is exactly
    k/255 (images read from 8-bit files), else as float32. Items must share one shape.
    Keeps ``dataset.num_classes`` and ``dataset.classes`` when present."""
    if len(dataset) == 0:
        raise ArgumentError("cannot preload an empty dataset")
    images, labels, exact = [], [], True
    for i in range(len(dataset)):
        x, label = dataset[i]
        if exact:
            q = x.mul(255).round_().to(torch.uint8)
            exact = torch.equal(q.float().div_(255), x)
            x = q if exact else x
        images.append(x)
        labels.append(int(label))
    if not exact:  # an image is not 8-bit: keep every one as float
        images = [dataset[i][0] for i in range(len(dataset))]
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) != 1:
        raise ArgumentError(
            f"the dataset's images have {len(shapes)} different shapes (e.g. {sorted(shapes)[:2]}); "
            "training batches need one shape: resize or crop them first"
        )
    images = torch.stack(images)
    labels = torch.tensor(labels, dtype=torch.int64)
    num_classes = getattr(dataset, "num_classes", None) or int(labels.max()) + 1
    return ArrayDataset(getattr(dataset, "name", "preloaded"), images, labels, num_classes,
                        getattr(dataset, "classes", None))


def _num_classes(train_set: Sequence, num_classes: Optional[int]) -> int:
    if num_classes is None:
        num_classes = getattr(train_set, "num_classes", None)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ArgumentError(
            f"num_classes must be an integer >= 2, got {num_classes!r}: pass num_classes= "
            "for a dataset without a num_classes attribute"
        )
    return num_classes


def _check_device(device: Union[str, torch.device]) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ArgumentError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("device is cuda but CUDA is not available here; use device='cpu'")
    return device


def _resume_state(path: Path, arch: str, config: TrainConfig, device: torch.device) -> Dict[str, Any]:
    """The checkpoint to resume from, checked to be a run of the same arch and noise."""
    saved = read_checkpoint(path, trust=False, map_location=device)
    if not isinstance(saved, dict) or not {"arch", "state_dict", "epoch", "config", "optimizer"} <= set(saved):
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: it is not a checkpoint written by ancer.train "
            "(needs 'arch', 'state_dict', 'epoch', 'config', 'optimizer')"
        )
    before = saved["config"]
    for key, now in (("arch", arch), ("noise", config.noise), ("sigma", config.sigma)):
        was = saved["arch"] if key == "arch" else before.get(key)
        if was != now:
            raise ArgumentError(
                f"cannot resume {str(path)!r}: it was trained with {key}={was!r}, not {now!r}; "
                "use the same settings or another checkpoint path"
            )
    return saved


def train(
    arch: str,
    train_set: Sequence,
    checkpoint: PathLike,
    config: TrainConfig,
    *,
    dataset: Optional[str] = None,
    num_classes: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    resume: bool = False,
    workers: int = 0,
    callback: Optional[Callable[[Progress], None]] = None,
) -> TrainResult:
    """Train ``create_model(arch, dataset, num_classes)`` on noisy inputs (see the module
    docstring), writing ``checkpoint`` after every epoch.

    Parameters
    ----------
    arch : str
        An architecture of :func:`ancer.models.available_models`.
    train_set : sequence of (x, label)
        Any dataset with ``__len__`` and ``__getitem__`` giving ``x`` float C×H×W in
        [0, 1] (all of one shape) and an integer label, e.g. from
        :func:`ancer.data.load_dataset`. Small datasets are best held in memory
        (:class:`ancer.data.ArrayDataset`) so that no image is decoded twice.
    checkpoint : str or Path
        Where the checkpoint is written (atomically, after every epoch).
    config : TrainConfig
        The hyperparameters.
    dataset : str, optional
        The normalization statistics (``"cifar10"``, ``"imagenet"``...); defaults to the
        architecture's.
    num_classes : int, optional
        Defaults to ``train_set.num_classes``.
    device : str or torch.device
        Where to train; bf16 autocast is used on CUDA.
    resume : bool
        Continue from ``checkpoint`` if it exists (from the epoch after its last one, up to
        ``config.epochs``); start afresh if it does not. Without ``resume`` an existing
        ``checkpoint`` is an error, so that no finished run is overwritten by mistake.
    workers : int
        ``num_workers`` of the DataLoader.
    callback : callable, optional
        Called with a :class:`Progress` after every step (e.g. to draw a progress bar).

    Returns
    -------
    TrainResult
    """
    if not isinstance(config, TrainConfig):
        raise ArgumentError(f"config must be a TrainConfig, got {type(config).__name__}")
    _check_int("workers", workers, low=0)
    if len(train_set) < config.batch_size:
        raise ArgumentError(
            f"the training set has {len(train_set)} items, fewer than batch_size="
            f"{config.batch_size}; lower batch_size"
        )
    num_classes = _num_classes(train_set, num_classes)
    device = _check_device(device)
    checkpoint = Path(checkpoint)
    if checkpoint.exists() and not resume:
        raise ArgumentError(
            f"checkpoint {str(checkpoint)!r} exists; pass resume=True to continue "
            "that run, or choose another checkpoint path"
        )
    if not checkpoint.parent.is_dir():
        raise ArgumentError(f"the checkpoint's folder {str(checkpoint.parent)!r} does not exist; "
                            "create it or choose another checkpoint path")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init"))
        model = create_model(arch, dataset=dataset, num_classes=num_classes).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    start, history = 0, []
    if resume and checkpoint.exists():
        saved = _resume_state(checkpoint, arch, config, device)
        model.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        start, history = saved["epoch"], [EpochStats(**h) for h in saved.get("history", [])]
    noise = config.make_noise()
    dataset = dataset if dataset is not None else get_architecture(arch).dataset

    for epoch in range(start, config.epochs):
        history.append(_train_epoch(model, optimizer, train_set, noise, config, epoch, device, workers, callback))
        save_checkpoint(checkpoint, {
            "arch": arch,
            "state_dict": model.state_dict(),
            "epoch": epoch + 1,
            "sigma": config.sigma,
            "noise": config.noise,
            "dataset": dataset,
            "num_classes": num_classes,
            "config": asdict(config),
            "history": [asdict(h) for h in history],
            "optimizer": optimizer.state_dict(),
        })
    return TrainResult(model.eval(), history, str(checkpoint))


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_set: Sequence,
    noise: Noise,
    config: TrainConfig,
    epoch: int,
    device: torch.device,
    workers: int,
    callback: Optional[Callable[[Progress], None]],
) -> EpochStats:
    """One pass over ``train_set`` in an order, with crops and noise, drawn from
    (seed, epoch) alone."""
    seed = derive_seed(config.seed, "epoch", epoch)
    loader = DataLoader(
        train_set, batch_size=config.batch_size, shuffle=True, drop_last=True,
        num_workers=workers, generator=make_generator(seed), pin_memory=device.type == "cuda",
    )
    generator = make_generator(derive_seed(seed, "draws"), device)
    steps = len(loader)
    model.train()
    start = time.perf_counter()
    total_loss, seen, correct, predictions = 0.0, 0, 0, 0
    first_lr = learning_rate(config, epoch, 0, steps)
    for step, (x, y) in enumerate(loader):
        lr = learning_rate(config, epoch, step, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = x.to(device, non_blocking=True).float()
        y = y.to(device, non_blocking=True).long()
        if config.augment:
            x = random_crop_flip(x, 4, generator)
        loss, predicted = noisy_loss(model, x, y, noise, config.consistency, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(y)
        seen += len(y)
        correct += int((predicted == y).sum())
        predictions += predicted.numel()
        if callback is not None:
            callback(Progress(epoch + 1, config.epochs, step + 1, steps, total_loss / seen,
                              correct / predictions, lr))
    return EpochStats(epoch + 1, total_loss / seen, correct / predictions, first_lr,
                      time.perf_counter() - start)
