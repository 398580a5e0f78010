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


@pytest.fixture
def xla_room():
    """Room in keras-nii's XLA compile table for a test that checks what gets compiled.

    The table is bounded per process (``keras_nii.ops.xla.table_size``); tests
    run before this one may have used it up.
    """
    from keras_nii.ops import xla

    before = xla.table_size()
    xla.set_table_size(xla.compiled_programs() + 16)
    yield xla
    xla.set_table_size(max(before, xla.compiled_programs()))
