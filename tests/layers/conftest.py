"""Shared helpers for the layer tests (run under the TensorFlow and JAX backends)."""

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
tensorflow_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow-specific check")


def to_numpy(x):
    """A tensor (or a dict of them) of any backend as NumPy."""
    if isinstance(x, dict):
        return {key: keras.ops.convert_to_numpy(value) for key, value in x.items()}
    return keras.ops.convert_to_numpy(x)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
