"""The names every part of ancer shares, each defined once: methods, norms, precisions, bound
names, the memory's actions and the default radius grid. The command line's choices and help
text are derived from them; the defaults of a run are :class:`ancer.engine.CertifyConfig`'s.
"""
from __future__ import annotations

from typing import Tuple

#: the certification methods: a fixed σ (Cohen et al. 2019), a data-dependent σ(x) (DDRS),
#: per-dimension scales θ(x) (ANCER)
METHODS = ("isotropic", "dds", "ancer")
#: the methods whose scales depend on the input: sound only through the memory
MEMORY_METHODS = frozenset({"dds", "ancer"})
#: the methods whose scales are per dimension, so that a region is anisotropic
ANISOTROPIC_METHODS = frozenset({"ancer"})
#: ancer's starting scales: the fixed σ, or DDRS's σ(x)
THETA0 = ("sigma", "dds")
#: the threat models: l2 (Gaussian noise), l1 (uniform noise)
NORMS = ("l2", "l1")
#: the precisions the base classifier can be evaluated in
PRECISIONS = ("fp32", "bf16", "fp16")
#: torch.compile: on CUDA and on long CPU runs, always, never
COMPILE_CHOICES = ("auto", "on", "off")
#: what a plain module returns (only the scale optimizers use it)
OUTPUTS = ("logits", "probabilities", "log_probabilities")

#: how p_lower was computed: fixed-n CERTIFY, or sequential CERTIFY's grid threshold
CLOPPER_PEARSON = "clopper-pearson"
GROUP_SEQUENTIAL = "group-sequential"
BOUNDS = (CLOPPER_PEARSON, GROUP_SEQUENTIAL)

#: the memory's answers (:class:`ancer.memory.Memory`)
KEPT, SHRUNK, OVERRIDDEN, ABSTAINED = "kept", "shrunk", "overridden", "abstained"
MEMORY_ACTIONS = (KEPT, SHRUNK, OVERRIDDEN, ABSTAINED)

def uses_memory(method: str) -> bool:
    """Whether ``method``'s scales depend on the input, so that only the memory's answers
    are sound (dds, ancer)."""
    return method in MEMORY_METHODS


def is_anisotropic(method: str) -> bool:
    """Whether ``method`` certifies with per-dimension scales (ancer)."""
    return method in ANISOTROPIC_METHODS


#: the default grid of sequential certification, in multiples of σ
DEFAULT_RADII_IN_SIGMAS = (1, 2, 3)


def default_radii(sigma: float) -> Tuple[float, ...]:
    """The default radii of sequential certification: σ, 2σ, 3σ (p_A of Φ(1), Φ(2), Φ(3) for
    Gaussian noise)."""
    return tuple(k * float(sigma) for k in DEFAULT_RADII_IN_SIGMAS)
