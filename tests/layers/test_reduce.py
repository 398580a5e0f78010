"""keras_nii.ops.reduce: per-row sums, minima and maxima, folded or not."""

import numpy as np
import pytest

from keras_nii.ops.reduce import PARTS, reduce_rows, reduce_volumes
from keras_nii.ops.xla import tensorflow_xla_on_cpu
from tests.layers.conftest import compiled, tensorflow_only, to_numpy

NUMPY = {"sum": np.sum, "min": np.min, "max": np.max}

# row lengths: shorter than PARTS, a multiple of it, and with a remainder of
# every kind (the remainder's voxels hold the extremes in some rows below)
LENGTHS = [1, PARTS - 1, PARTS, PARTS + 5, 960, 1001]


def _rows(rng, n, channels):
    shape = (3, n) if channels is None else (3, n, channels)
    x = rng.normal(50, 20, size=shape).astype("float32")
    # extremes in the last voxel (the remainder when n % PARTS) and the first
    x[0, -1] = 1e4
    x[1, -1] = -1e4
    x[2, 0] = -5e3
    return x


@pytest.mark.parametrize("kind", ["sum", "min", "max"])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("channels", [None, 3])
def test_reduce_rows_matches_numpy_eager_and_compiled(rng, kind, n, channels):
    x = _rows(rng, n, channels)
    expected = NUMPY[kind](x.astype("float64"), axis=1, keepdims=True)
    for fn in (lambda t: reduce_rows(t, kind), compiled(lambda t: reduce_rows(t, kind))):
        out = to_numpy(fn(x))
        assert out.shape == expected.shape
        if kind == "sum":
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-2)
        else:
            # min and max pick a voxel: exact
            np.testing.assert_array_equal(out, expected.astype("float32"))


def test_reduce_rows_rejects_an_unknown_kind(rng):
    with pytest.raises(ValueError, match="kind"):
        reduce_rows(_rows(rng, 16, None), "mean")


@tensorflow_only
def test_the_fold_is_taken_only_under_xla_on_cpu():
    import tensorflow as tf

    seen = []

    def probe(t):
        seen.append(tensorflow_xla_on_cpu())
        return t

    x = tf.zeros((1, 8))
    probe(x)
    tf.function(probe)(x)
    tf.function(probe, jit_compile=True)(x)
    # only XLA compiling for the CPU folds (not measured on a GPU: not used there)
    assert seen == [False, False, not tf.config.list_logical_devices("GPU")]


@tensorflow_only
@pytest.mark.parametrize("kind", ["sum", "min", "max"])
def test_reduce_rows_with_dynamic_lengths_under_xla(rng, kind):
    # the row length is a tensor at trace time: the remainder is reduced too
    import tensorflow as tf

    for jit in (False, True):
        fn = tf.function(
            lambda t: reduce_rows(t, kind),
            input_signature=[tf.TensorSpec((None, None), tf.float32)],
            jit_compile=jit,
        )
        for n in (1, PARTS - 1, PARTS, 1001):
            x = _rows(rng, n, None)
            expected = NUMPY[kind](x.astype("float64"), axis=1, keepdims=True)
            np.testing.assert_allclose(fn(x).numpy(), expected, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("kind", ["sum", "min", "max"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_reduce_volumes_per_sample_and_channel(rng, kind, per_channel):
    # 7 * 5 * 3 = 105 voxels: not a multiple of PARTS
    x = rng.normal(0, 10, size=(2, 7, 5, 3, 2)).astype("float32")
    x[1, 6, 4, 2, 1] = 500.0  # the last voxel of one channel
    axes = (1, 2, 3) if per_channel else (1, 2, 3, 4)
    expected = NUMPY[kind](x.astype("float64"), axis=axes, keepdims=True)
    for fn in (
        lambda t: reduce_volumes(t, kind, per_channel),
        compiled(lambda t: reduce_volumes(t, kind, per_channel)),
    ):
        out = to_numpy(fn(x))
        assert out.shape == expected.shape
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)
