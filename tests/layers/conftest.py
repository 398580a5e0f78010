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


def compiled(fn):
    """``fn`` compiled with XLA by the current backend."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    return fn


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
