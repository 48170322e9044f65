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
from ancer.data import ImageDataset, class_names, load_dataset
from ancer.denoisers import load_denoiser
from ancer.devices import device_name, resolve_device
from ancer.engine import Certifier, CertifyConfig
from ancer.errors import ArgumentError, DatasetError
from ancer.models import LoadedModel, load_model
from ancer.runs import group_size
from ancer.vocabulary import default_radii
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
    out: str
    arch: Optional[str] = None
    trust: bool = False
    norm_stats: Optional[str] = None
    normalize: Optional[bool] = None
    labels_sorted: bool = False
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
    progress_every: float = 60.0
    any_classes: bool = False


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


def prepare(spec: RunSpec, fields: dict[str, Any], launch: Launch) -> Job:
    """Load and check everything a run needs, before any file is written. ``fields`` are
    the config's fields from the flags; a missing ``sigma`` is taken from the checkpoint
    when it records its training noise level (and a note says so), and sequential radii
    default to σ, 2σ, 3σ (p_A of Φ(1), Φ(2), Φ(3) for l2)."""
    notes: list[str] = []
    device = resolve_device(spec.device, launch.local_rank)
    loaded = load_model(spec.model, arch=spec.arch, dataset=spec.norm_stats, trust=spec.trust,
                        normalize=spec.normalize, map_location=device)
    if fields.get("sigma") is None and spec.denoiser is not None:
        fields = {**fields, "sigma": _denoiser_sigma(spec.denoiser, notes)}
    config = CertifyConfig(**_with_defaults(fields, loaded, spec.model, notes))
    kind, data = _data_source(spec, loaded, notes)
    extra = dataset_options(kind, loaded.num_classes, spec.synsets)
    if kind == "folder":
        extra.update(folder_options(loaded, spec, data))
    dataset = load_dataset(kind, data, skip=spec.skip, max=spec.max, **extra)
    if len(dataset) == 0:
        raise DatasetError(f"--data {data} with --skip {spec.skip} --max {spec.max} "
                           "selects no input: check --max")
    _check_classes(kind, data, dataset, loaded, spec.any_classes)
    planned = len(dataset) * (config.n0 + config.n)
    denoiser = None if spec.denoiser is None else load_denoiser(
        str(Path(spec.denoiser).resolve()), config.sigma, map_location=device)
    certifier = Certifier(loaded, config, device=device, planned_samples=planned,
                          denoiser=denoiser)
    settings = {
        "model_sha256": loaded.sha256, "arch": loaded.arch, **model_options(spec), "dataset": kind,
        "data": str(Path(data).resolve()), **extra, **certifier.settings(),
        "skip": spec.skip, "max": spec.max, "device_type": device.type,
        "inputs_per_batch": spec.inputs_per_batch or group_size(config),
    }
    info = {
        "versions": {"ancer": ancer.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "command": sys.argv, "device": device_name(device), "host": socket.gethostname(),
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


def _with_defaults(fields: dict[str, Any], loaded: LoadedModel, model: str,
                   notes: list[str]) -> dict[str, Any]:
    """The config's fields with the checkpoint's σ when ``sigma`` is None (a note says so;
    another σ than the recorded one gets a note too), and the default sequential radii."""
    recorded = loaded.sigma
    if fields.get("sigma") is None:
        if recorded is None:
            raise ArgumentError(f"give the noise level with --sigma S (e.g. --sigma 0.25): "
                                f"{model} does not record the σ it was trained with")
        fields = {**fields, "sigma": float(recorded)}
        notes.append(f"no --sigma given: using σ = {recorded:g}, recorded in the checkpoint "
                     "as its training noise")
    elif recorded is not None and float(fields["sigma"]) != float(recorded):
        notes.append(f"note: certifying at σ = {float(fields['sigma']):g}, but the checkpoint "
                     f"records training at σ = {float(recorded):g} (a smoothed classifier is "
                     "usually certified at its training σ)")
    if fields.get("sequential") and fields.get("radii") is None:
        fields = {**fields, "radii": default_radii(float(fields["sigma"]))}
    return fields


def folder_options(loaded: LoadedModel, spec: RunSpec, data: str) -> dict[str, Any]:
    """The folder reader's options: the model's class names, so that each class folder is
    labelled by its name, or ``labels_sorted`` when --labels-sorted vouches for the order."""
    if spec.labels_sorted:
        return {"labels_sorted": True}
    classes = class_names(loaded.dataset, spec.synsets, data)
    if classes is None:
        load_dataset("folder", data)  # a folder in the wrong layout is told first
        raise ArgumentError(f"--dataset folder: the model's class names are unknown, so the class "
                            f"folders of {data} cannot be labelled by name: give the ImageNet "
                            "synset list with --synsets FILE, or, if the folders in sorted order "
                            "are the model's labels 0, 1, ..., say so with --labels-sorted")
    return {"classes": classes}


def model_options(spec: RunSpec) -> dict[str, Any]:
    """The loader's options that change the model (--norm-stats, --normalize), as recorded in
    the settings: only those given, so that runs without them keep their settings."""
    given = {"norm_stats": spec.norm_stats, "normalize": spec.normalize}
    return {name: value for name, value in given.items() if value is not None}


def _check_classes(kind: str, data: str, dataset: ImageDataset, loaded: LoadedModel,
                   any_classes: bool) -> None:
    """Refuse a dataset whose classes are not the model's: labels the model cannot output,
    or (unless ``any_classes``) a dataset whose number of classes is known and differs,
    such as a 1000-class model on CIFAR-10, whose predictions would be compared with labels
    of another meaning."""
    if dataset.num_classes > loaded.num_classes:
        raise ArgumentError(f"the dataset has {dataset.num_classes} classes but the model "
                            f"outputs {loaded.num_classes}: check --model and --data")
    if kind == "npz":
        with np.load(data) as arrays:
            classes = int(arrays["y"].max()) + 1 if arrays["y"].size else 0
    elif kind in _READERS_OF.values():
        classes = dataset.num_classes
    else:
        return
    if classes != loaded.num_classes and not any_classes:
        known = (f"its labels go up to {classes - 1}" if kind == "npz"
                 else f"{dataset.name} has {classes} classes")
        raise ArgumentError(f"--model outputs {loaded.num_classes} classes but --data "
                            f"{data}: {known}; give the data the model was trained for, or "
                            "--any-classes if its labels are the model's class indices")


def dataset_options(kind: str, num_classes: int, synsets: Optional[str]) -> dict[str, Any]:
    """The reader's options beyond the path, as recorded in the settings: the model's number
    of classes for an npz file, the synset list (absolute path) for ImageNet."""
    if kind == "npz":
        return {"num_classes": num_classes}
    if kind == "imagenet" and synsets is not None:
        return {"synsets": str(Path(synsets).resolve())}
    return {}
