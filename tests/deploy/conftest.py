"""Fixtures of the deploy tests: indexes of generated photos (see helpers.py)."""

import pytest

from .helpers import DCAL, build_index


@pytest.fixture(scope="session")
def dalg_index(tmp_path_factory):
    """A retrieval (DALG) index of 8 photos."""
    return build_index(tmp_path_factory.mktemp("dalg"))


@pytest.fixture(scope="session")
def reid_index(tmp_path_factory):
    """A Re-ID (DCAL, pair-wise attention) index of 8 photos, square at 32 px."""
    return build_index(tmp_path_factory.mktemp("reid"), DCAL, "reid", {"task": "reid"})
