"""Reproducible randomness derived from a run's seed and an input's index.

A certificate must not depend on which process, shard or resumed run computed it, so every
input draws its noise from its own generator, seeded from (seed, idx) through a hash.
"""
from __future__ import annotations

import hashlib
from typing import Union

import torch


def derive_seed(seed: int, *keys: Union[int, str]) -> int:
    """A 63-bit seed determined by ``seed`` and ``keys`` (BLAKE2b of their decimal text)."""
    text = ":".join(str(part) for part in (int(seed), *keys))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_generator(seed: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int(seed))
    return generator


def input_generator(seed: int, idx: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """The generator of input ``idx`` in a run seeded with ``seed``."""
    return make_generator(derive_seed(seed, "input", idx), device)
