"""Denoised smoothing: a denoiser D in front of a classifier f, smoothed as f∘D.

Salman et al. 2020, "Denoised Smoothing: A Provable Defense for Pretrained Classifiers"
(NeurIPS; trained DnCNN/MemNet denoisers); Carlini et al. 2023, "(Certified!!) Adversarial
Robustness for Free!" (ICLR; one step of a diffusion model). Full entries: docs/design.md,
References.
"""
from ancer.denoisers.archs import DENOISER_ARCHITECTURES, create_denoiser
from ancer.denoisers.compose import Denoised
from ancer.denoisers.diffusion import OneShotDiffusion, timestep_for_sigma
from ancer.denoisers.dncnn import DnCNN
from ancer.denoisers.loader import LoadedDenoiser, load_denoiser
from ancer.denoisers.memnet import MemNet

__all__ = ["DENOISER_ARCHITECTURES", "Denoised", "DnCNN", "LoadedDenoiser", "MemNet",
           "OneShotDiffusion", "create_denoiser", "load_denoiser", "timestep_for_sigma"]
