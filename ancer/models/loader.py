"""The one checkpoint loader: any known format to a ready base classifier.

Like timm's ``load_checkpoint`` behind ``create_model``: :func:`load_model` reads the file
(:mod:`ancer.models.checkpoint`), recognizes its format (:mod:`ancer.models.formats`),
rebuilds ``Sequential(NormalizeLayer, net)`` as Cohen et al. 2019 do (locuslab/smoothing,
``code/architectures.py``) and loads the weights strictly.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
from torch import nn

from ancer.errors import ArgumentError, CheckpointError
from ancer.models.checkpoint import PathLike, read_checkpoint, sha256_of
from ancer.models.formats import Recognized, recognize, strip_prefixes
from ancer.models.normalize import check_dataset
from ancer.models.options import option
from ancer.models.registry import ARCHITECTURES, available_models, create_model, get_architecture

#: Side of the square inputs used to probe a model whose architecture is unknown.
_PROBE_SIZES = {"cifar10": 32, "imagenet32": 32, "imagenet": 224}


@dataclass
class LoadedModel:
    """A base classifier loaded from a checkpoint.

    Attributes
    ----------
    model : nn.Module
        In eval mode; takes inputs in [0, 1] of shape (N, C, H, W).
    arch : str or None
        Registry name of the architecture (None for TorchScript or pickled modules unless
        given).
    dataset : str or None
        ``"cifar10"``, ``"imagenet"``, ``"imagenet32"`` or None if unknown.
    num_classes : int
        Size of the model's output.
    outputs : str
        ``"logits"`` or ``"probabilities"`` (the model ends in a softmax). CERTIFY uses
        only the argmax; the scale optimizers need probabilities and apply the softmax to
        logits themselves, so this must say which the model returns.
    sigma : float or None
        The training noise level, when the checkpoint records it.
    format : str
        The recognized format (see :mod:`ancer.models.formats`).
    sha256 : str
        SHA-256 of the checkpoint file.
    path : str
        The checkpoint file.
    """

    model: nn.Module
    arch: Optional[str]
    dataset: Optional[str]
    num_classes: int
    outputs: str
    sigma: Optional[float]
    format: str
    sha256: str
    path: str


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def _matching_archs(state_dict: Dict[str, torch.Tensor], num_classes: Optional[int]) -> list:
    """Registered architectures whose keys and shapes equal ``state_dict``'s (built on
    the meta device, so this costs no memory)."""
    found = []
    for name in available_models():
        with torch.device("meta"):
            expected = create_model(name, num_classes=num_classes)[1].state_dict()
        if expected.keys() == state_dict.keys() and all(
            expected[k].shape == state_dict[k].shape for k in expected
        ):
            found.append(name)
    return found


def _first_mismatch(net: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """Describe the first key, in the network's order, that the file lacks or has with
    another shape, else the first key the network lacks; None if they fit. Missing
    ``num_batches_tracked`` buffers (checkpoints older than PyTorch 0.4.1) are allowed."""
    expected = net.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict and not key.endswith("num_batches_tracked"):
            return f"key {key!r} (shape {_shape(tensor)}) is missing from the file"
        if key in state_dict and state_dict[key].shape != tensor.shape:
            return (
                f"key {key!r} has shape {_shape(state_dict[key])} in the file but "
                f"{_shape(tensor)} in the architecture"
            )
    extra = [k for k in state_dict if k not in expected]
    if extra:
        return f"key {extra[0]!r} of the file is not in the architecture"
    return None


def _num_classes(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    fc = state_dict.get("fc.weight")
    return int(fc.shape[0]) if fc is not None and fc.dim() == 2 else None


def _build(rec: Recognized, arch: str, dataset: Optional[str], normalize: bool, path: str):
    state_dict = strip_prefixes(rec.state_dict)
    num_classes = _num_classes(state_dict)
    dataset = dataset or get_architecture(arch).dataset
    model = create_model(arch, dataset, num_classes, normalize=normalize)
    problem = _first_mismatch(model[1], state_dict)
    if problem is not None:
        guesses = _matching_archs(state_dict, num_classes)
        hint = f"; its keys and shapes fit {option('arch', repr(guesses[0]))}" if guesses else ""
        raise CheckpointError(
            f"the weights in {path!r} do not fit architecture {arch!r}: {problem} (keys "
            f"compared after removing 'module.' and '1.' prefixes){hint}"
        )
    model[1].load_state_dict(state_dict, strict=False)
    return model, dataset, model[1].fc.out_features


def _probe(model: nn.Module, dataset: Optional[str], path: str):
    """Run the model on random inputs to learn its number of classes and whether it
    ends in a softmax (outputs >= 0 summing to 1 over classes)."""
    sizes = [_PROBE_SIZES[dataset]] if dataset else [32, 224]
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    for size in sizes:
        x = torch.rand(2, 3, size, size, generator=generator).to(device)
        try:
            with torch.no_grad():
                out = model(x)
        except Exception:  # noqa: BLE001 - a user's module may raise anything here
            continue
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise CheckpointError(
                f"the model in {path!r} does not return a (batch, classes) tensor of scores"
            )
        out = out.float()
        is_prob = bool((out >= 0).all()) and torch.allclose(
            out.sum(dim=1), torch.ones(2, device=out.device), atol=1e-4
        )
        return int(out.shape[1]), "probabilities" if is_prob else "logits"
    raise CheckpointError(
        f"the model in {path!r} failed on inputs of shape (N, 3, {sizes}); pass "
        f"{option('dataset')} (cifar10, imagenet32 or imagenet) to probe it with the right "
        "input size"
    )


def load_model(
    path: PathLike,
    arch: Optional[str] = None,
    dataset: Optional[str] = None,
    trust: bool = False,
    map_location: Union[str, torch.device] = "cpu",
    normalize: Optional[bool] = None,
) -> LoadedModel:
    """Load a base classifier from a checkpoint in any known format.

    Parameters
    ----------
    path : str or Path
        The checkpoint file (formats: :mod:`ancer.models.formats`).
    arch : str, optional
        Architecture name (:func:`ancer.models.available_models`). Required when the file
        does not name one (bare state dicts, DDRS/ANCER and MACER checkpoints).
    dataset : str, optional
        ``"cifar10"``, ``"imagenet"`` or ``"imagenet32"``: the normalization to restore.
        Defaults to the architecture's.
    trust : bool
        Unpickle arbitrary Python objects (whole pickled modules). Only for files from a
        trusted source: unpickling can run code. Otherwise ``weights_only=True``.
    map_location : str or torch.device
        The device to put the model on.
    normalize : bool, optional
        Whether to restore the normalization layer in front of a state dict's network
        (not used for TorchScript and pickled modules, which hold their own). Defaults to
        True, except for MACER checkpoints, whose networks were trained on raw inputs.

    Returns
    -------
    LoadedModel
        The model in eval mode and what is known about it.

    Raises
    ------
    CheckpointError
        Missing, truncated, corrupt or unrecognized file; weights that do not fit the
        architecture (naming the first mismatching key); a file needing ``trust=True``.
    ArgumentError
        Unknown ``arch`` or ``dataset``, or an ``arch`` contradicting the file's.
    """
    if arch is not None:
        get_architecture(arch)
    if dataset is not None:
        check_dataset(dataset)
    if not isinstance(trust, bool):
        raise ArgumentError(f"trust must be True or False, got {trust!r}")
    if normalize is not None and not isinstance(normalize, bool):
        raise ArgumentError(f"normalize must be None, True or False, got {normalize!r}")
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError):
        raise ArgumentError(
            f"map_location must name a device ('cpu', 'cuda:0'...), got {map_location!r}"
        ) from None
    path = str(path)
    rec = recognize(read_checkpoint(path, trust, device), path)
    digest = sha256_of(path)

    if rec.module is not None:
        model = rec.module.eval()
        num_classes, outputs = _probe(model, dataset, path)
        return LoadedModel(
            model, arch, dataset, num_classes, outputs, rec.sigma, rec.format, digest, path
        )

    if rec.arch is not None and rec.arch in ARCHITECTURES:
        if arch is not None and arch != rec.arch:
            raise ArgumentError(f"{option('arch', repr(arch))} contradicts the file's arch "
                                f"{rec.arch!r}: drop it")
        arch = rec.arch
    if arch is None:
        state_dict = strip_prefixes(rec.state_dict)
        guesses = _matching_archs(state_dict, _num_classes(state_dict))
        named = f" (the file names {rec.arch!r}, which ancer does not know)" if rec.arch else ""
        hint = f"; its keys and shapes fit {option('arch', repr(guesses[0]))}" if guesses else ""
        raise CheckpointError(
            f"{path!r} is a {rec.format!r} checkpoint without a known architecture{named}: "
            f"pass {option('arch')}, one of {', '.join(available_models())}{hint}"
        )
    if normalize is None:
        normalize = rec.format != "macer"
    model, dataset, num_classes = _build(rec, arch, dataset, normalize, path)
    model = model.to(device).eval()
    return LoadedModel(
        model, arch, dataset, num_classes, "logits", rec.sigma, rec.format, digest, path
    )
