"""ancer: certified robustness by randomized smoothing, isotropic and anisotropic (ANCER).

Cohen et al. 2019 (Gaussian, l2), Yang et al. 2020 (uniform, l1), Alfarra et al. 2022
(ANCER: per-input anisotropic scales; data-dependent smoothing and memory-based
certification). See DESIGN.md for the math and the sources.
"""
from ancer.certificates import CrossPolytope, Ellipsoid, L1Ball, L2Ball, Region
from ancer.errors import AncerError, ArgumentError, CheckpointError, DatasetError, ResultsError
from ancer.noise import Gaussian, Noise, Uniform, noise_for_norm
from ancer.smoothing import ABSTAIN, Certificate, Smoothed
from ancer.models import LoadedModel, create_model, load_model
from ancer.data import load_dataset
from ancer.optimize import OptimizedScales, certify_with_scales, optimize_anisotropic, optimize_isotropic
from ancer.memory import Memory, MemoryOutcome, regions_intersect

__version__ = "0.1.0"
from ancer.train import TrainConfig, TrainResult
