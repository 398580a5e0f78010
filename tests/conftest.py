"""Shared pytest fixtures: the real NIfTI files that nibabel ships for its own tests."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel
import pytest

NIBABEL_DATA = Path(os.path.dirname(nibabel.__file__)) / "tests" / "data"


@pytest.fixture(scope="session")
def nibabel_data() -> Path:
    """The folder of nibabel's test data (anatomical.nii, functional.nii, ...)."""
    if not (NIBABEL_DATA / "anatomical.nii").is_file():
        pytest.skip(f"nibabel's test data is not installed at {NIBABEL_DATA}")
    return NIBABEL_DATA
