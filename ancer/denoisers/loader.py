"""``load_denoiser``: the denoisers users hold, as ready ``nn.Module``s on [0, 1] images.

- **Salman et al.'s checkpoints** (microsoft/denoised-smoothing, ``train_denoiser.py``):
  ``{'arch', 'state_dict', 'epoch', 'optimizer'}`` with ``arch`` one of
  :data:`ancer.denoisers.archs.DENOISER_ARCHITECTURES`; the ImageNet ones were saved from
  ``DataParallel`` (``module.`` prefixes, stripped here). ``certify train-denoiser`` writes
  the same layout (plus ``sigma`` and its training record).
- **A diffusers folder** (``pip install -e ".[diffusion]"``): an ε-prediction
  ``UNet2DModel`` with its scheduler, either flat (``config.json``, the weights,
  ``scheduler_config.json``) or as a pipeline (``unet/`` and ``scheduler/``), e.g. the DDPM
  CIFAR-10 32×32 model; run one-shot at the σ given (:class:`OneShotDiffusion`).
- **TorchScript** archives holding a denoiser (images in [0, 1] to images in [0, 1]).

OpenAI's improved-/guided-diffusion checkpoints are state dicts of their own UNet class,
which cannot be rebuilt without their code: load the network with it and pass it to
:class:`OneShotDiffusion` (mind their timestep rescaling for 4000-step schedules).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ancer.denoisers.archs import DENOISER_ARCHITECTURES, create_denoiser
from ancer.denoisers.compose import freeze
from ancer.denoisers.diffusion import OneShotDiffusion
from ancer.errors import ArgumentError, CheckpointError
from ancer.models.checkpoint import read_checkpoint, sha256_of
from ancer.models.formats import strip_prefixes
from ancer.models.registry import available_models

PathLike = Union[str, Path]
#: the denoiser kinds load_denoiser recognizes
KINDS = ("dncnn", "memnet", "diffusion", "torchscript", "module")
DIFFUSION_EXTRA = 'pip install -e ".[diffusion]" (or pip install diffusers)'


@dataclass
class LoadedDenoiser:
    """A denoiser and what is known about it (recorded with every run that uses it).

    ``module`` maps images on [0, 1] to images of the same shape, in eval mode; ``kind`` is
    one of :data:`KINDS`; ``arch`` the architecture name when known; ``sha256`` the file's
    hash (a folder's: of its files' names and bytes); ``sigma`` the training noise when
    recorded (for diffusion: the σ its timestep was chosen for); ``timestep`` diffusion's t*
    (None for other kinds)."""

    module: nn.Module
    kind: str
    arch: Optional[str]
    path: str
    sha256: str
    sigma: Optional[float] = None
    timestep: Optional[int] = None

    def describe(self) -> Dict[str, Any]:
        """What a results file records about the denoiser."""
        return {"path": self.path, "kind": self.kind, "arch": self.arch, "sha256": self.sha256,
                "sigma": self.sigma, "timestep": self.timestep}


def folder_sha256(folder: PathLike) -> str:
    """SHA-256 over a folder's files: each relative path and its bytes' digest, sorted."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        digest.update(sha256_of(file).encode())
    return digest.hexdigest()


def load_denoiser(path: PathLike, sigma: Optional[float] = None, *,
                  map_location: Union[str, torch.device] = "cpu",
                  trust: bool = False) -> LoadedDenoiser:
    """Load a denoiser from a checkpoint file or a diffusers folder (see the module's
    docstring). ``sigma`` is the smoothing noise on [0, 1] images: required for a diffusion
    model (it fixes t*), ignored by the others. ``trust`` as in :func:`ancer.load_model`.

    Raises CheckpointError for a missing or unrecognized file (a classifier checkpoint, an
    unknown architecture, weights that do not fit) and ArgumentError for a σ the diffusion
    schedule cannot reach or a missing ``[diffusion]`` extra."""
    device = torch.device(map_location)
    where = Path(path)
    if where.is_dir():
        return _load_diffusers(where, sigma, device)
    loaded = read_checkpoint(where, trust, device)
    digest = sha256_of(where)
    if isinstance(loaded, torch.jit.ScriptModule):
        return LoadedDenoiser(freeze(loaded), "torchscript", None, str(where), digest)
    if isinstance(loaded, nn.Module):  # a whole pickled module (trust=True)
        return LoadedDenoiser(freeze(loaded.to(device)), "module", None, str(where), digest)
    module, arch = _from_state(loaded, where)
    kind = "memnet" if "memnet" in arch else "dncnn"
    recorded = loaded.get("sigma") if isinstance(loaded, dict) else None
    return LoadedDenoiser(freeze(module.to(device)), kind, arch, str(where), digest,
                          sigma=None if recorded is None else float(recorded))


def _from_state(loaded: Any, path: Path) -> Tuple[nn.Module, str]:
    """The network of a ``{'arch', 'state_dict'}`` checkpoint, its weights loaded strictly."""
    if not isinstance(loaded, dict) or "state_dict" not in loaded:
        keys = list(loaded)[:3] if isinstance(loaded, dict) else type(loaded).__name__
        if isinstance(loaded, dict) and any(str(k).startswith("input_blocks.") for k in loaded):
            raise CheckpointError(
                f"{path} looks like an OpenAI improved-/guided-diffusion UNet, which needs "
                "OpenAI's code to rebuild: load it there and wrap it with "
                "ancer.denoisers.OneShotDiffusion(unet, alphas_cumprod, sigma), or convert it "
                "to a diffusers folder")
        raise CheckpointError(f"{path} is not a denoiser checkpoint (expected Salman et al.'s "
                              f"{{'arch', 'state_dict'}}, a diffusers folder or TorchScript; "
                              f"found {keys})")
    arch = loaded.get("arch")
    if arch not in DENOISER_ARCHITECTURES:
        if arch in available_models():
            raise CheckpointError(f"{path} is a classifier checkpoint (arch {arch!r}), not a "
                                  "denoiser: give it as --model, and a denoiser as --denoiser")
        raise CheckpointError(f"{path}: unknown denoiser architecture {arch!r}; known: "
                              f"{', '.join(DENOISER_ARCHITECTURES)}")
    module = create_denoiser(arch)
    state = strip_prefixes(loaded["state_dict"])
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise CheckpointError(f"{path}: the weights do not fit architecture {arch!r} ({first})") \
            from None
    return module, arch


def _find(folder: Path, name: str, subfolder: str) -> Optional[Path]:
    """``folder/name`` or ``folder/subfolder/name`` (diffusers' flat and pipeline layouts)."""
    for candidate in (folder / name, folder / subfolder / name):
        if candidate.is_file():
            return candidate
    return None


def _load_diffusers(folder: Path, sigma: Optional[float], device: torch.device) -> LoadedDenoiser:
    """One-shot diffusion from a diffusers ``UNet2DModel`` folder and its scheduler."""
    unet_config = _find(folder, "config.json", "unet")
    scheduler_config = _find(folder, "scheduler_config.json", "scheduler")
    if unet_config is None:
        raise CheckpointError(f"{folder} is a folder without a diffusers UNet (no config.json "
                              "or unet/config.json): give a diffusers UNet2DModel folder")
    if scheduler_config is None:
        raise CheckpointError(f"{folder} holds a UNet but no scheduler (no "
                              "scheduler_config.json or scheduler/scheduler_config.json): copy "
                              "the model's scheduler config beside it")
    if sigma is None:
        raise ArgumentError("a diffusion denoiser runs at the timestep of the smoothing noise: "
                            "give sigma (--sigma)")
    try:
        import diffusers
    except ImportError:
        raise ArgumentError(f"a diffusion denoiser needs the [diffusion] extra: "
                            f"{DIFFUSION_EXTRA}") from None
    settings = json.loads(scheduler_config.read_text())
    prediction = settings.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise CheckpointError(f"{scheduler_config}: prediction_type {prediction!r}; one-shot "
                              "denoising needs an epsilon-prediction model")
    scheduler_class = getattr(diffusers, str(settings.get("_class_name")), None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise CheckpointError(f"{scheduler_config}: unknown scheduler class "
                              f"{settings.get('_class_name')!r}")
    scheduler = scheduler_class.from_config(settings)
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise CheckpointError(f"{scheduler_config}: scheduler {settings['_class_name']} has no "
                              "alphas_cumprod (a DDPM/DDIM-style schedule is needed)")
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(unet_config.parent))
    except (OSError, ValueError, EnvironmentError) as error:
        raise CheckpointError(f"{unet_config.parent}: not a loadable UNet2DModel ({error})") \
            from None
    channels = int(unet.config.in_channels)
    module = OneShotDiffusion(freeze(unet), torch.as_tensor(alphas_cumprod), float(sigma),
                              image_channels=channels)
    return LoadedDenoiser(freeze(module.to(device)), "diffusion", "UNet2DModel", str(folder),
                          folder_sha256(folder), sigma=float(sigma), timestep=module.timestep)
