"""Base classifiers: architectures, the normalization layer, and checkpoint loading.

``create_model(arch)`` builds ``Sequential(NormalizeLayer, net)`` as Cohen et al. 2019
do (locuslab/smoothing); ``load_model(path)`` reads every checkpoint format the
randomized-smoothing papers released (see :mod:`ancer.models.formats`).
"""
from ancer.models.loader import LoadedModel, load_model
from ancer.models.normalize import DATASET_STATS, NormalizeLayer
from ancer.models.registry import available_models, create_model

__all__ = [
    "DATASET_STATS",
    "LoadedModel",
    "NormalizeLayer",
    "available_models",
    "create_model",
    "load_model",
]
