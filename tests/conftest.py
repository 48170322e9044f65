"""Shared pytest fixtures."""
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """A folder of real data (CIFAR-10 zips, an ImageNet sample, a noise-trained ResNet-110,
    Cohen et al.'s published results), named by ``$ANCER_SHARED_DATA``; the tests that need
    it skip when it is not set or absent, as in a user's clone."""
    root = os.environ.get("ANCER_SHARED_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("no real-data folder: set ANCER_SHARED_DATA to run this test")
    return Path(root)
