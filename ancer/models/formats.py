"""Recognizing which training code wrote a checkpoint, from the object it unpickles to.

The formats (``Recognized.format``):

- ``"cohen"``: ``{'arch', 'state_dict', ...}``, written by Cohen et al. 2019
  (locuslab/smoothing, ``code/train.py``) and SmoothAdv (Salman et al. 2019): the state
  dict of ``Sequential(NormalizeLayer, net)``, keys ``1.<...>`` (``1.module.<...>`` when
  the network was wrapped in DataParallel, as their ImageNet ``resnet50`` is).
- ``"ddrs"``: ``{'epoch', 'state_dict', 'optimizer_param'}`` (DDRS, Alfarra et al. 2022, and
  ANCER, Eiras et al. 2022), the same state dict without an architecture name.
- ``"macer"``: ``{'net': state_dict, 'epoch'}`` (MACER, Zhai et al. 2020, RuntianZ/macer
  ``main.py``): the bare network, trained on unnormalized inputs in [0, 1].
- ``"state_dict"``: a bare state dict, or ``{'state_dict': ...}`` without ``arch``.
- ``"torchscript"``: an archive written by ``torch.jit.save``.
- ``"module"``: a whole pickled ``nn.Module`` (read only with ``trust=True``).
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from ancer.errors import CheckpointError

#: The checkpoint formats :func:`recognize` knows, described for error messages.
KNOWN_FORMATS = (
    "{'arch', 'state_dict'} (Cohen et al., SmoothAdv); {'net': state_dict} (MACER); "
    "{'epoch', 'state_dict', 'optimizer_param'} (DDRS/ANCER, with arch=, certify --arch); a "
    "bare state dict (with arch=, certify --arch); a TorchScript archive; a whole pickled "
    "nn.Module (trust=True, certify --trust)"
)

_SIGMA_KEYS = ("sigma", "noise_sd")


@dataclass(frozen=True)
class Recognized:
    """What a checkpoint holds: its format, and either a state dict or a module."""

    format: str
    state_dict: Optional[Dict[str, torch.Tensor]] = None
    module: Optional[nn.Module] = None
    arch: Optional[str] = None
    sigma: Optional[float] = None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _sigma(obj: Mapping) -> Optional[float]:
    for key in _SIGMA_KEYS:
        value = obj.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def _parameter_names(obj: Any, limit: int = 4) -> List[str]:
    """A few tensor names found in ``obj`` or one level below, for error messages."""
    if not isinstance(obj, Mapping):
        return []
    names = [f"{k}" for k, v in obj.items() if isinstance(v, torch.Tensor)]
    for key, value in obj.items():
        if isinstance(value, Mapping):
            names += [f"{key}[{k!r}]" for k, v in value.items() if isinstance(v, torch.Tensor)]
    return names[:limit]


def describe(obj: Any) -> str:
    """One line saying what an unrecognized checkpoint object holds."""
    if not isinstance(obj, Mapping):
        return f"an object of type {type(obj).__name__}"
    keys = [repr(k) for k in list(obj)[:10]]
    more = f" (+{len(obj) - 10} more)" if len(obj) > 10 else ""
    params = _parameter_names(obj)
    found = f"a dict with top-level keys [{', '.join(keys)}{more}]"
    return found + (f" and tensors such as {params}" if params else ", holding no tensors")


def recognize(obj: Any, source: str) -> Recognized:
    """Classify the object a checkpoint unpickled to (see the module docstring).

    Raises CheckpointError listing what was found and what would work when the object
    fits no known format; ``source`` names the file in that message.
    """
    if isinstance(obj, torch.jit.ScriptModule):
        return Recognized("torchscript", module=obj)
    if isinstance(obj, nn.Module):
        return Recognized("module", module=obj)
    if isinstance(obj, Mapping):
        nested = obj.get("state_dict")
        if _is_state_dict(nested):
            if isinstance(obj.get("arch"), str):
                return Recognized("cohen", nested, arch=obj["arch"], sigma=_sigma(obj))
            fmt = "ddrs" if "optimizer_param" in obj else "state_dict"
            return Recognized(fmt, nested, sigma=_sigma(obj))
        if _is_state_dict(obj.get("net")):
            return Recognized("macer", obj["net"], sigma=_sigma(obj))
        if _is_state_dict(obj):
            return Recognized("state_dict", dict(obj))
    raise CheckpointError(
        f"unrecognized checkpoint {source!r}: found {describe(obj)}. ancer reads: "
        f"{KNOWN_FORMATS}"
    )


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The network's own state dict: drop the ``module.`` prefixes of DataParallel and
    the ``1.`` of ``Sequential(NormalizeLayer, net)``, wherever all keys share them
    (``module.``, ``1.``, ``1.module.``, ``module.1.``...)."""
    out = dict(state_dict)
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "1."):
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out
