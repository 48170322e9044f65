"""Shared pytest fixtures."""
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder ``../shared/data`` beside the checkout (or ``$ANCER_SHARED_DATA``);
    skips the test when it is absent, as it is in a user's clone."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    root = Path(os.environ.get("ANCER_SHARED_DATA") or default)
    if not root.is_dir():
        pytest.skip(f"shared data folder {root} is absent")
    return root
