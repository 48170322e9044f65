"""ancer: certified robustness by randomized smoothing, isotropic and anisotropic (ANCER).

Cohen et al. 2019 (Gaussian, l2), Yang et al. 2020 (uniform, l1), Alfarra et al. 2022 (DDRS:
data-dependent smoothing and memory-based certification), Eiras et al. 2022 (ANCER:
per-input anisotropic scales). The math is in docs/design.md, and its sources in that
file's References.
"""
from ancer.certificates import CrossPolytope, Ellipsoid, L1Ball, L2Ball, Region
from ancer.data import load_dataset
from ancer.denoisers import LoadedDenoiser, load_denoiser
from ancer.engine import Certifier, CertifyConfig
from ancer.errors import AncerError, ArgumentError, CheckpointError, DatasetError, ResultsError
from ancer.labels import ABSTAIN
from ancer.memory import Memory, MemoryOutcome, regions_intersect
from ancer.models import LoadedModel, create_model, load_model
from ancer.noise import Gaussian, Noise, Uniform, noise_for_norm
from ancer.optimize import OptimizedScales, certify_with_scales, optimize_anisotropic, optimize_isotropic
from ancer.runs import certify_dataset
from ancer.smoothing import Certificate, Smoothed
from ancer.train import TrainConfig, TrainResult

__version__ = "0.1.0"

__all__ = [
    "ABSTAIN", "AncerError", "ArgumentError", "Certificate", "Certifier", "CertifyConfig", "CheckpointError", "CrossPolytope",
    "DatasetError", "Ellipsoid", "Gaussian", "L1Ball", "L2Ball", "LoadedDenoiser", "LoadedModel", "Memory",
    "MemoryOutcome", "Noise", "OptimizedScales", "Region", "ResultsError", "Smoothed",
    "TrainConfig", "TrainResult", "Uniform", "certify_dataset", "certify_with_scales", "create_model",
    "load_dataset", "load_denoiser", "load_model", "noise_for_norm", "optimize_anisotropic", "optimize_isotropic",
    "regions_intersect",
]
