"""Training base classifiers for randomized smoothing.

A smoothed classifier is only as good as its base classifier's accuracy under the
smoothing noise, so the base classifier is trained on noisy inputs:

- **Gaussian data augmentation** (Cohen et al. 2019, §3.3, and locuslab/smoothing
  ``code/train.py``; see docs/design.md, References): each training input
  becomes x + ε, ε ~ N(0, σ² I), added in [0, 1] pixel space (the model normalizes
  inside), with the cross-entropy loss;
- **uniform-noise augmentation** for l1 certificates (Yang et al. 2020, "Randomized
  smoothing of all shapes and sizes"): ε ~ U[-λ, λ]^d with λ = √3·σ (Yang et al.'s convention);
- the certified-training objectives of :mod:`ancer.training_methods`, chosen by
  ``TrainConfig.method``: consistency regularization (Jeong & Shin 2020), MACER
  (Zhai et al. 2020) and SmoothAdv (Salman et al. 2019); Gaussian (or
  uniform) augmentation is the default.

The rest is the usual recipe: SGD with momentum and weight decay, a cosine (per step) or
step (per epoch) learning-rate schedule, the standard CIFAR crop and flip
(:mod:`ancer.augment`), bf16 autocast on CUDA only. Training starts from a fresh initialization or, with
``init=``, from the weights of another checkpoint of the same architecture (fine-tuning,
or SmoothAdv's pretraining protocol). After every epoch a checkpoint in Cohen
et al.'s format is written atomically: ``{'arch', 'state_dict', 'epoch', 'sigma', 'noise',
'method', 'dataset', 'num_classes', 'config', 'history', 'optimizer', 'init'}`` (``method``:
the method's name and hyperparameters), the state dict being that of
``Sequential(NormalizeLayer, net)``, so :func:`ancer.load_model` reads it and training
resumes from it. Randomness comes from the seed and the epoch number only: a resumed run
draws what the uninterrupted run would have drawn.
"""
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from ancer.augment import random_crop_flip
from ancer.data import ArrayDataset
from ancer.atomic import save_atomically
from ancer.errors import ArgumentError, CheckpointError
from ancer.models import create_model
from ancer.models.checkpoint import read_checkpoint
from ancer.models.registry import get_architecture
from ancer.noise import FAMILIES, Noise
from ancer.seeding import derive_seed, make_generator
from ancer.training_methods import GaussianAugmentation, TrainingMethod, method_from_record
from ancer.validate import (check_bool, check_checkpoint_path, check_choice, check_int,
                            not_resumable, set_int, set_number)

PathLike = Union[str, Path]

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
        ``"gaussian"`` (Cohen et al. 2019) or ``"uniform"`` (Yang et al. 2020): a family of
        :data:`ancer.noise.FAMILIES`.
    method : TrainingMethod
        The objective and its hyperparameters (:mod:`ancer.training_methods`), e.g.
        ``Macer()`` or ``Consistency.for_sigma(0.25)``; Gaussian augmentation by default.
    epochs : int
        Number of passes over the training set.
    batch_size : int
        Inputs per step (each gives the method's number of noisy copies).
    lr, momentum, weight_decay : float
        SGD's parameters.
    schedule : str
        ``"cosine"``: lr·(1 + cos(π t / T))/2 at step t of T; ``"step"``: lr times
        ``lr_gamma`` every ``lr_step`` epochs (Cohen et al.: 30 and 0.1).
    lr_step : int
    lr_gamma : float
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
    method: TrainingMethod = field(default_factory=GaussianAugmentation)
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        set_number(self, "sigma", low=0.0)
        check_choice(owner, "noise", self.noise, sorted(FAMILIES))
        if not isinstance(self.method, TrainingMethod):
            raise ArgumentError.of_field(owner, "method", f"{self.method!r} is not a "
                                         "TrainingMethod", "give one of ancer.training_methods, "
                                         "e.g. Macer()")
        self.method.check_noise(self.noise)
        if self.sigma == 0 and not isinstance(self.method, GaussianAugmentation):
            raise ArgumentError.of_field(
                owner, "sigma", f"0 trains on clean inputs, which only the gaussian method "
                f"does, not {self.method.name}", "give a number > 0, or {method}gaussian")
        check_choice(owner, "schedule", self.schedule, SCHEDULES)
        for name in ("epochs", "batch_size", "lr_step"):
            set_int(self, name, low=1)
        set_int(self, "seed", low=0)
        set_number(self, "lr", low=0.0, strict=True)
        set_number(self, "momentum", low=0.0, high=1.0)
        set_number(self, "weight_decay", low=0.0)
        set_number(self, "lr_gamma", low=0.0, high=1.0, strict=True)
        check_bool(owner, "augment", self.augment)

    def make_noise(self) -> Optional[Noise]:
        """The training noise at ``sigma``; None for ``sigma == 0`` (clean training)."""
        return FAMILIES[self.noise](self.sigma) if self.sigma > 0 else None

    def record(self) -> Dict[str, Any]:
        """The config as a checkpoint stores it: its fields, the method as its record."""
        return {**{f: getattr(self, f) for f in self.__dataclass_fields__},
                "method": self.method.record()}


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
    terms: Dict[str, float] = field(default_factory=dict)  # each loss term's running mean


@dataclass(frozen=True)
class EpochStats:
    """One finished epoch: mean loss, accuracy under noise on the (augmented) training
    inputs, the learning rate at its start, its wall time in seconds, and the mean of each
    term of the method's loss (e.g. ``ce``, ``kl``, ``entropy``)."""

    epoch: int
    loss: float
    accuracy: float
    lr: float
    seconds: float
    terms: Dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    """The trained model (``Sequential(NormalizeLayer, net)``, in eval mode), the history
    of every epoch (those of earlier runs included when resumed) and the checkpoint."""

    model: nn.Module
    history: List[EpochStats]
    checkpoint: str


def learning_rate(config: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """The learning rate at step ``step`` (from 0) of ``steps`` in epoch ``epoch`` (from 0):
    cosine annealing to 0 over all steps (Loshchilov & Hutter 2017, without restarts) or
    a step decay per epoch (``torch.optim.lr_scheduler.StepLR``, as Cohen et al.)."""
    if config.schedule == "step":
        return config.lr * config.lr_gamma ** (epoch // config.lr_step)
    t = epoch * steps + step
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * t / (config.epochs * steps)))


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
        raise ArgumentError.of_field(
            "", "num_classes", f"{num_classes!r} is not an integer >= 2",
            "give {num_classes}N for a dataset without a num_classes attribute")
    return num_classes


def _check_device(device: Union[str, torch.device]) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ArgumentError.of_field("", "device", f"{device!r} is not a device",
                                     "give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError.of_field("", "device", "CUDA is not available here",
                                     "give {device}cpu")
    return device


def _resume_state(path: Path, arch: str, config: TrainConfig, device: torch.device) -> Dict[str, Any]:
    """The checkpoint to resume from, checked to be a run of the same arch and noise."""
    saved = read_checkpoint(path, trust=False, map_location=device)
    if not isinstance(saved, dict) or not {"arch", "state_dict", "epoch", "config", "optimizer"} <= set(saved):
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: it is not a checkpoint written by ancer.train "
            "(needs 'arch', 'state_dict', 'epoch', 'config', 'optimizer')"
        )
    before = {**saved["config"], "arch": saved["arch"]}
    for key, now in (("arch", arch), ("noise", config.noise), ("sigma", config.sigma)):
        was = before.get(key)
        if was != now:
            raise not_resumable("TrainConfig" if key != "arch" else "", key, path, repr(now),
                                repr(was), f"{{{key}}}{was}")
    was = method_from_record(saved.get("method", GaussianAugmentation().record()))
    if was != config.method:
        raise not_resumable("TrainConfig", "method", path, config.method.describe(),
                            was.describe(), "the same method and hyperparameters")
    return saved


def _init_weights(path: Path, arch: str, num_classes: int, config: TrainConfig,
                  model: nn.Module, device: torch.device) -> Dict[str, Any]:
    """The state dict of the checkpoint ``path`` to start from, checked to be of ``arch``
    with ``num_classes`` classes; warns when it was trained at another σ."""
    saved = read_checkpoint(path, trust=False, map_location=device)
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise CheckpointError(f"cannot start from {str(path)!r}: it holds no 'state_dict' "
                              "(give a checkpoint written by ancer.train or Cohen et al.'s code)")
    was = saved.get("arch")
    if was is not None and was != arch:
        raise ArgumentError.of_field("", "init", f"{str(path)!r} is a {was} checkpoint, not "
                                     f"{arch}", f"give {{arch}}{was}, or an init of {arch}")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in saved["state_dict"].items()}
    classes = saved.get("num_classes")
    if classes is not None and classes != num_classes:
        raise ArgumentError.of_field("", "init", f"{str(path)!r} has {classes} classes, the "
                                     f"training set {num_classes}", f"train on a dataset with "
                                     f"{classes} classes, or give another init")
    if shapes != theirs:
        differ = sorted(set(shapes) ^ set(theirs)) or [k for k in shapes if shapes[k] != theirs[k]]
        raise ArgumentError.of_field("", "init", f"{str(path)!r} does not fit architecture "
                                     f"{arch} with {num_classes} classes (e.g. {differ[0]})",
                                     "give an init of that architecture and class count")
    sigma = saved.get("sigma")
    if sigma is not None and not math.isclose(float(sigma), config.sigma):
        warnings.warn(f"init {str(path)!r} was trained at sigma {sigma}, training now at sigma "
                      f"{config.sigma}", stacklevel=3)
    return saved["state_dict"]


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
    init: Optional[PathLike] = None,
    until: Optional[int] = None,
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
    init : str or Path, optional
        Start from this checkpoint's weights (same architecture and number of classes,
        else an ArgumentError; a warning when it was trained at another σ) with a fresh
        optimizer: fine-tuning. Ignored when resuming an existing ``checkpoint``.
    until : int, optional
        Stop after this epoch (from 1, at most ``config.epochs``); the schedule is still
        that of ``config.epochs`` epochs, and ``resume`` continues from there.
    workers : int
        ``num_workers`` of the DataLoader.
    callback : callable, optional
        Called with a :class:`Progress` after every step (e.g. to draw a progress bar).

    Returns
    -------
    TrainResult
    """
    if not isinstance(config, TrainConfig):
        raise ArgumentError.of_field("", "config", f"a {type(config).__name__}, not a "
                                     "TrainConfig", "give {config}TrainConfig(...)")
    check_int("", "workers", workers, low=0)
    if len(train_set) < config.batch_size:
        raise ArgumentError.of_field(
            "TrainConfig", "batch_size", f"{config.batch_size} is more than the training set's "
            f"{len(train_set)} items", f"give at most {{batch_size}}{len(train_set)}")
    num_classes = _num_classes(train_set, num_classes)
    device = _check_device(device)
    if until is not None:
        check_int("", "until", until, low=1)
        until = min(until, config.epochs)
    checkpoint = Path(checkpoint)
    check_checkpoint_path(checkpoint, resume)

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
        init = saved.get("init")
    elif init is not None:
        model.load_state_dict(_init_weights(Path(init), arch, num_classes, config, model, device))
        init = str(init)
    noise = config.make_noise()
    dataset = dataset if dataset is not None else get_architecture(arch).dataset

    for epoch in range(start, until if until is not None else config.epochs):
        history.append(_train_epoch(model, optimizer, train_set, noise, config, epoch, device, workers, callback))
        save_checkpoint(checkpoint, {
            "arch": arch,
            "state_dict": model.state_dict(),
            "epoch": epoch + 1,
            "sigma": config.sigma,
            "noise": config.noise,
            "method": config.method.record(),
            "dataset": dataset,
            "num_classes": num_classes,
            "config": config.record(),
            "history": [asdict(h) for h in history],
            "optimizer": optimizer.state_dict(),
            "init": init,
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
    totals: Dict[str, float] = {}
    first_lr = learning_rate(config, epoch, 0, steps)
    for step, (x, y) in enumerate(loader):
        lr = learning_rate(config, epoch, step, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = x.to(device, non_blocking=True).float()
        y = y.to(device, non_blocking=True).long()
        if config.augment:
            x = random_crop_flip(x, 4, generator)
        loss, terms, predicted = config.method.step_loss(model, x, y, noise, generator, epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(y)
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + float(value) * len(y)
        seen += len(y)
        correct += int((predicted == y).sum())
        predictions += predicted.numel()
        if callback is not None:
            callback(Progress(epoch + 1, config.epochs, step + 1, steps, total_loss / seen,
                              correct / predictions, lr, {k: v / seen for k, v in totals.items()}))
    return EpochStats(epoch + 1, total_loss / seen, correct / predictions, first_lr,
                      time.perf_counter() - start, {k: v / seen for k, v in totals.items()})
