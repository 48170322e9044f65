"""Everything a certification run needs, loaded and checked before any file is written.

The command line's files and selection (:class:`RunSpec`) and the engine's config fields
(by name) become a :class:`Job`: the device, the model (:func:`ancer.models.load_model`),
the dataset (``--data``, or for a CIFAR-10 model the test images shipped with the package),
the :class:`ancer.engine.Certifier`, and the settings recorded beside the results. A missing
``--sigma`` is taken from the checkpoint when it records its training noise; each such
default is reported in one line (``Job.notes``).
"""

from __future__ import annotations

import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import ancer
from ancer.data import ImageDataset, load_dataset
from ancer.denoisers import load_denoiser
from ancer.engine import Certifier, CertifyConfig
from ancer.errors import ArgumentError, DatasetError
from ancer.models import LoadedModel, load_model
from ancer.sequential import max_certifiable_probability
from certify.demo import SAMPLE as SHIPPED_CIFAR10
from certify.distributed import Launch


#: the checkpoint's normalization dataset -> the reader of its test set
_READERS_OF = {"cifar10": "cifar10", "imagenet": "imagenet"}


@dataclass(frozen=True)
class RunSpec:
    """What a command-line run adds to the engine's config: the files and the selection.

    ``data`` None certifies the CIFAR-10 test images shipped with the package (CIFAR-10
    models only); ``inputs_per_batch`` None fills one forward batch with the group's n0
    selection draws; ``shard`` is (i, k) or None."""

    model: str
    out: Path
    denoiser: Optional[str] = None
    data: Optional[str] = None
    dataset: Optional[str] = None
    synsets: Optional[str] = None
    skip: int = 1
    max: Optional[int] = None
    device: Optional[str] = None
    inputs_per_batch: Optional[int] = None
    shard: Optional[tuple[int, int]] = None
    quiet: bool = False


@dataclass
class Job:
    """Everything one run needs, loaded and validated; make one with :func:`prepare`."""

    spec: RunSpec
    config: CertifyConfig
    loaded: LoadedModel
    dataset: ImageDataset
    certifier: Certifier
    settings: dict[str, Any]
    info: dict[str, Any]
    notes: list[str]

    @property
    def group_size(self) -> int:
        return self.settings["inputs_per_batch"]


def resolve_device(requested: Optional[str], launch: Launch) -> torch.device:
    """``--device`` (default cuda if available, else cpu); under torchrun plain ``cuda``
    means this rank's GPU, cuda:LOCAL_RANK."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ArgumentError(f"--device {requested}: this machine has no CUDA GPU (or this "
                                "PyTorch build lacks CUDA); use --device cpu")
        if requested == "cuda":
            requested = f"cuda:{launch.local_rank}"
        if torch.device(requested).index >= torch.cuda.device_count():
            raise ArgumentError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s) "
                                "here; give cuda:0 ... or cuda")
        # the current device too, so that nothing (streams, contexts) lands on cuda:0
        torch.cuda.set_device(torch.device(requested))
    return torch.device(requested)


def _data_source(spec: RunSpec, loaded: LoadedModel, notes: list[str]) -> tuple[str, str]:
    """(dataset kind, path): ``--data``/``--dataset``, or without ``--data`` the shipped
    CIFAR-10 test images for a CIFAR-10 model."""
    if spec.data is None:
        if loaded.dataset == "cifar10" and spec.dataset in (None, "cifar10", "npz"):
            if not SHIPPED_CIFAR10.is_file():
                raise ArgumentError(f"no --data, and the shipped CIFAR-10 images are missing "
                                    f"({SHIPPED_CIFAR10}): pass --data cifar-10-batches-py")
            notes.append(f"no --data given: certifying the {_count_shipped()} CIFAR-10 test "
                         "images shipped with ancer (--data DIR for your own)")
            return "npz", str(SHIPPED_CIFAR10)
        known = loaded.dataset or "unknown"
        raise ArgumentError(f"give the dataset with --data (the checkpoint's dataset is {known}: "
                            "--data imagenet/val for ImageNet class folders, "
                            "--data cifar-10-batches-py for CIFAR-10, or an .npz of x, y)")
    if spec.dataset is not None:
        return spec.dataset, spec.data
    if str(spec.data).endswith(".npz"):
        return "npz", spec.data
    if loaded.dataset in _READERS_OF:
        return _READERS_OF[loaded.dataset], spec.data
    raise ArgumentError("the checkpoint does not say which dataset it was trained on: "
                        "pass --dataset cifar10|imagenet|folder|npz")


def _count_shipped() -> int:
    with np.load(SHIPPED_CIFAR10) as sample:
        return len(sample["y"])


#: the flag of each config field, for messages of a command-line run
FLAGS = {"sigma": "--sigma", "norm": "--norm", "method": "--method", "theta0": "--theta0",
         "n0": "--n0", "n": "--n", "alpha": "--alpha", "sequential": "--sequential",
         "radii": "--radii", "opt_iterations": "--opt-iterations", "opt_lr": "--opt-lr",
         "opt_samples": "--opt-samples", "kappa": "--kappa", "batch": "--batch",
         "precision": "--precision", "compile": "--compile", "cuda_graphs": "--cuda-graphs",
         "seed": "--seed"}


def make_config(fields: dict[str, Any]) -> CertifyConfig:
    """The engine's config from the run's flags (by config field name); an invalid field's
    message names its flag."""
    try:
        return CertifyConfig(**fields)
    except ArgumentError as error:
        text = str(error)
        for name, flag in sorted(FLAGS.items(), key=lambda item: -len(item[0])):
            text = text.replace(f"CertifyConfig.{name}:", f"{flag}:").replace(f"{name}=", f"{flag} ")
        raise ArgumentError(text) from None


def prepare(spec: RunSpec, fields: dict[str, Any], launch: Launch) -> Job:
    """Load and check everything a run needs, before any file is written. ``fields`` are
    the config's fields from the flags; a missing ``sigma`` is taken from the checkpoint
    when it records its training noise level (and a note says so), and sequential radii
    default to σ, 2σ, 3σ (p_A of Φ(1), Φ(2), Φ(3) for l2)."""
    notes: list[str] = []
    device = resolve_device(spec.device, launch)
    loaded = load_model(spec.model, map_location=device)
    if fields.get("sigma") is None and spec.denoiser is not None:
        fields = {**fields, "sigma": _denoiser_sigma(spec.denoiser, notes)}
    if fields.get("sigma") is None:
        if loaded.sigma is None:
            raise ArgumentError(f"give the noise level with --sigma S (e.g. --sigma 0.25): "
                                f"{spec.model} does not record the σ it was trained with")
        fields = {**fields, "sigma": float(loaded.sigma)}
        notes.append(f"no --sigma given: using σ = {loaded.sigma:g}, recorded in the checkpoint "
                     "as its training noise")
    if fields.get("sequential") and fields.get("radii") is None:
        sigma = float(fields["sigma"])
        fields = {**fields, "radii": (sigma, 2 * sigma, 3 * sigma)}
    config = make_config(fields)
    kind, data = _data_source(spec, loaded, notes)
    extra = dataset_options(kind, loaded.num_classes, spec.synsets)
    dataset = load_dataset(kind, data, skip=spec.skip, max=spec.max, **extra)
    if len(dataset) == 0:
        raise DatasetError(f"--data {data} with --skip {spec.skip} --max {spec.max} "
                           "selects no input: check --max")
    if dataset.num_classes > loaded.num_classes:
        raise ArgumentError(f"the dataset has {dataset.num_classes} classes but the model "
                            f"outputs {loaded.num_classes}: check --model and --data")
    planned = len(dataset) * (config.n0 + config.n)
    denoiser = None if spec.denoiser is None else load_denoiser(
        spec.denoiser, config.sigma, map_location=device)
    certifier = Certifier(loaded, config, device=device, planned_samples=planned,
                          denoiser=denoiser)
    if config.sequential:
        check_reachable(certifier)
    evaluation = certifier.smoothed.settings()
    settings = {
        "model_sha256": loaded.sha256, "arch": loaded.arch, "dataset": kind,
        "data": str(Path(data).resolve()), **extra, "norm": config.norm, "method": config.method,
        "sigma": config.sigma, "half_width": certifier.noise.half_width_of(config.sigma),
        "n0": config.n0, "n": config.n, "alpha": config.alpha, "batch": config.batch,
        "sequential": config.sequential, "radii": list(config.radii),
        "skip": spec.skip, "max": spec.max, "precision": config.precision, "seed": config.seed,
        "device_type": device.type, "fold_bn": evaluation["fold_bn"],
        # enough inputs to fill one forward batch with their n0 selection draws
        "inputs_per_batch": spec.inputs_per_batch or max(1, config.batch // config.n0),
        "denoiser": None if denoiser is None else {
            **denoiser.describe(), "path": str(Path(denoiser.path).resolve())},
        "optimizer": None if not config.uses_memory else {
            **config.optimizer(config.method), "theta0": (
                config.theta0 if config.method == "ancer" else None)},
    }
    info = {
        "versions": {"ancer": ancer.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "command": sys.argv, "device": _device_name(device), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rank": launch.rank,
        "world_size": launch.world_size,
        # how the forward pass was run: results agree at float rounding, so not a setting
        "acceleration": {"compile": config.compile, "cuda_graphs": config.cuda_graphs,
                         "compile_resolved": certifier.compiled},
    }
    return Job(spec, config, loaded, dataset, certifier, settings, info, notes)


def _denoiser_sigma(path: str, notes: list[str]) -> Optional[float]:
    """The σ a denoiser checkpoint records as its training noise, for a run without
    ``--sigma`` (a note says so); None when it records none (a diffusion folder never does)."""
    recorded = load_denoiser(path).sigma if Path(path).is_file() else None
    if recorded is None:
        return None
    notes.append(f"no --sigma given: using σ = {recorded:g}, recorded in the denoiser "
                 "checkpoint as its training noise")
    return recorded


def check_reachable(certifier: Certifier) -> None:
    """Refuse sequential radii of which none can be certified within n draws."""
    config = certifier.config
    best = max_certifiable_probability(config.n, config.alpha)
    top = certifier.noise.scale * certifier.noise.radius_factor(best) if best > 0.5 else 0.0
    if config.radii[0] > top:
        raise ArgumentError(f"--radii: no radius in {','.join(map(str, config.radii))} can be "
                            f"certified with --n {config.n} at --alpha {config.alpha:g} (the "
                            f"largest is {top:.3f}): give smaller radii or a larger --n")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def dataset_options(kind: str, num_classes: int, synsets: Optional[str]) -> dict[str, Any]:
    """The reader's options beyond the path, as recorded in the settings: the model's number
    of classes for an npz file, the synset list (absolute path) for ImageNet."""
    if kind == "npz":
        return {"num_classes": num_classes}
    if kind == "imagenet" and synsets is not None:
        return {"synsets": str(Path(synsets).resolve())}
    return {}
