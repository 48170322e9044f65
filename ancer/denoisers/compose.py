"""The base classifier of denoised smoothing: f(D(x)).

Salman et al. 2020 (NeurIPS) smooth f∘D, a denoiser D in front of a classifier f: the
smoothed classifier g(x) = argmax_c P(f(D(x + δ)) = c) is Cohen et al.'s construction with
f∘D as its base classifier, so every certificate about g holds as for any base classifier
(the noise δ is drawn on the input, before D). Both parts take and return images on the
classifier's input scale ([0, 1]); the classifier keeps its own normalization layer.

The composition is one ``nn.Module``, so whatever the engine does to the base classifier
(precision, batch-norm folding, ``torch.compile``, CUDA graphs, the scale optimizers'
gradients) applies to the whole of f∘D.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

from torch import Tensor, fx, nn

from ancer.errors import ArgumentError

if TYPE_CHECKING:
    from ancer.denoisers.loader import LoadedDenoiser


def checked_denoised(denoised: Tensor, noisy: Tensor) -> Tensor:
    """``denoised`` when its shape is the input's; ArgumentError otherwise."""
    if denoised.shape != noisy.shape:
        raise ArgumentError(f"the denoiser returned shape {tuple(denoised.shape)} for an input of "
                            f"shape {tuple(noisy.shape)}: a denoiser must return an image of its "
                            "input's shape (check --denoiser)")
    return denoised


# a leaf of torch.fx graphs, so that the check survives batch-norm folding's tracing
fx.wrap("checked_denoised")


class Denoised(nn.Module):
    """f(D(x)): ``classifier`` applied to ``denoiser``'s output."""

    def __init__(self, denoiser: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        if not isinstance(denoiser, nn.Module) or not isinstance(classifier, nn.Module):
            raise ArgumentError("a denoiser and a classifier must both be torch.nn.Modules")
        self.denoiser = denoiser
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(checked_denoised(self.denoiser(x), x))


def compose(classifier: nn.Module, denoiser: Optional[Union[nn.Module, "LoadedDenoiser"]],
            sigma: float) -> Tuple[nn.Module, Optional[Dict[str, Any]]]:
    """The base classifier f∘D for a certification at noise ``sigma``, and what the run
    records about D (None, and ``classifier`` itself, without a denoiser). A diffusion
    denoiser must have been loaded for this ``sigma``: its timestep depends on it."""
    if denoiser is None:
        return classifier, None
    from ancer.denoisers.loader import LoadedDenoiser  # the loader imports this module

    if isinstance(denoiser, LoadedDenoiser):
        if denoiser.kind == "diffusion" and not math.isclose(denoiser.sigma, sigma):
            raise ArgumentError(f"the diffusion denoiser was loaded for sigma {denoiser.sigma:g} "
                                f"(timestep {denoiser.timestep}) but the run certifies sigma "
                                f"{sigma:g}: load it with sigma={sigma:g}")
        return Denoised(denoiser.module, classifier), denoiser.describe()
    if not isinstance(denoiser, nn.Module):
        raise ArgumentError(f"denoiser must be an nn.Module or a LoadedDenoiser, got "
                            f"{type(denoiser).__name__}")
    return Denoised(denoiser, classifier), {"kind": "module", "class": type(denoiser).__name__}


def freeze(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with no parameter requiring gradients (the scale optimizers
    differentiate with respect to the input, not the weights)."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


