"""The architecture registry: one entry point that builds every known network.

Like timm's ``create_model``: a name picks an architecture; the result is
``Sequential(NormalizeLayer, net)`` exactly as Cohen et al. 2019 build their base
classifiers (locuslab/smoothing, ``code/architectures.py``: ``get_architecture``), so a
state dict's keys are ``1.<...>`` and inputs are in [0, 1].
"""
from dataclasses import dataclass
from typing import Callable, List, Optional

from torch import nn

from ancer.errors import ArgumentError
from ancer.models.cifar_resnet import CifarResNet
from ancer.models.normalize import DATASET_CLASSES, NormalizeLayer, check_dataset
from ancer.models.resnet import resnet18, resnet50
from ancer.models.wide_resnet import WideResNet


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: its builder ``build(num_classes)`` and the dataset it
    is made for (which sets the default normalization and number of classes)."""

    build: Callable[[int], nn.Module]
    dataset: str
    description: str


#: Every known architecture. The names are those of the checkpoints' ``arch`` field
#: (Cohen et al.: ``cifar_resnet20``, ``cifar_resnet110``, ``resnet50``; SmoothAdv:
#: ``imagenet32_resnet110``).
ARCHITECTURES = {
    "cifar_resnet20": Architecture(
        lambda k: CifarResNet(20, k), "cifar10", "CIFAR ResNet-20 (He et al. 2016)"
    ),
    "cifar_resnet56": Architecture(
        lambda k: CifarResNet(56, k), "cifar10", "CIFAR ResNet-56 (He et al. 2016)"
    ),
    "cifar_resnet110": Architecture(
        lambda k: CifarResNet(110, k), "cifar10", "CIFAR ResNet-110 (He et al. 2016)"
    ),
    "imagenet32_resnet110": Architecture(
        lambda k: CifarResNet(110, k), "imagenet32", "CIFAR ResNet-110 on ImageNet32 (SmoothAdv)"
    ),
    "wrn40_2": Architecture(
        lambda k: WideResNet(40, 2, k), "cifar10", "WideResNet-40-2 (Zagoruyko & Komodakis 2016)"
    ),
    "resnet18": Architecture(resnet18, "imagenet", "ResNet-18, torchvision layout"),
    "resnet50": Architecture(resnet50, "imagenet", "ResNet-50, torchvision layout"),
}


def available_models() -> List[str]:
    """The names :func:`create_model` accepts, sorted."""
    return sorted(ARCHITECTURES)


def get_architecture(arch: str) -> Architecture:
    """The registry entry of ``arch``; ArgumentError naming the known ones otherwise."""
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ArgumentError(f"unknown architecture {arch!r}; known: {', '.join(available_models())}")
    return ARCHITECTURES[arch]


def create_model(
    arch: str,
    dataset: Optional[str] = None,
    num_classes: Optional[int] = None,
    normalize: bool = True,
) -> nn.Sequential:
    """Build ``Sequential(NormalizeLayer, net)`` with freshly initialized weights.

    Parameters
    ----------
    arch : str
        A name from :func:`available_models`.
    dataset : str, optional
        ``"cifar10"``, ``"imagenet"`` or ``"imagenet32"``: sets the normalization
        statistics and the default ``num_classes``. Defaults to the architecture's.
    num_classes : int, optional
        Size of the output layer. Defaults to the dataset's.
    normalize : bool
        If False, the first layer is ``nn.Identity`` (for networks trained on raw [0, 1]
        inputs, such as MACER's); the keys stay ``1.<...>``.

    Returns
    -------
    nn.Sequential
        In training mode, giving logits for inputs in [0, 1].
    """
    spec = get_architecture(arch)
    dataset = spec.dataset if dataset is None else check_dataset(dataset)
    if num_classes is None:
        num_classes = DATASET_CLASSES[dataset]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ArgumentError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    first = NormalizeLayer.for_dataset(dataset) if normalize else nn.Identity()
    return nn.Sequential(first, spec.build(num_classes))
