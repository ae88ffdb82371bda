"""Shared test setup: src on the path, one thread, deterministic, the real shared/data."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED_DATA = ROOT.parent / "shared" / "data"

import torch  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def shared_data() -> Path:
    """The real ground-truth files (../shared/data beside the clone)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} not found: the tests need ../shared/ beside the clone")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
