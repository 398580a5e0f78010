"""keras_nii.ops.quantile against numpy.quantile (method="linear")."""

from __future__ import annotations

import numpy as np
import pytest

from keras_nii.ops.quantile import finite_quantiles, quantiles, searched_quantiles
from tests.layers.conftest import compiled, tensorflow_only, to_numpy

QS = [0.0, 0.005, 0.02, 0.25, 0.5, 0.995, 1.0]


@pytest.mark.parametrize("n", [1, 2, 7, 4096, 4097, 100_003])
def test_quantiles_match_numpy(rng, n):
    rows = rng.normal(100, 30, size=(2, n, 3)).astype("float32")
    out = [to_numpy(v) for v in quantiles(rows, QS, axis=1)]
    expected = np.quantile(rows.astype("float64"), QS, axis=1)
    for got, want in zip(out, expected, strict=True):
        assert got.shape == (2, 3)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_quantiles_of_ties_and_a_2d_row(rng):
    rows = np.repeat(rng.integers(0, 5, size=(1, 50)), 3, axis=1).astype("float32")
    out = [to_numpy(v) for v in quantiles(rows, QS, axis=1)]
    np.testing.assert_allclose(out, np.quantile(rows, QS, axis=1), rtol=0, atol=1e-6)


def test_quantiles_compile(rng):
    rows = rng.normal(size=(2, 999)).astype("float32")
    out = to_numpy(compiled(lambda t: quantiles(t, [0.01, 0.99])[1])(rows))
    np.testing.assert_allclose(out, np.quantile(rows, 0.99, axis=1), rtol=1e-6)


@tensorflow_only
def test_quantiles_use_no_float64_in_a_tf_graph(rng):
    # LiteRT's builtin ops have no float64 arithmetic (keras.ops.quantile's positions)
    import tensorflow as tf

    fn = tf.function(
        lambda t: quantiles(t, [0.005, 0.995]), input_signature=[tf.TensorSpec((None, None))]
    )
    graph = fn.get_concrete_function().graph
    dtypes = {t.dtype for op in graph.get_operations() for t in op.outputs}
    assert tf.float64 not in dtypes
    rows = rng.normal(size=(3, 1001)).astype("float32")
    np.testing.assert_allclose(
        np.stack([v.numpy() for v in fn(rows)]),
        np.quantile(rows, [0.005, 0.995], axis=1),
        rtol=1e-6,
    )


def test_a_quantile_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="quantile"):
        quantiles(np.zeros((1, 4), "float32"), [1.5])


def _finite_reference(rows, qs):
    """numpy.quantile of each row's finite values (0 for a row without one)."""
    out = np.zeros((len(qs), rows.shape[0], 1, *rows.shape[2:]))
    for index in np.ndindex(rows.shape[0], *rows.shape[2:]):
        row = rows[(index[0], slice(None), *index[1:])].astype("float64")
        row = row[np.isfinite(row)]
        if row.size:
            out[(slice(None), index[0], 0, *index[1:])] = np.quantile(row, qs)
    return out


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_searched_quantiles_equal_the_sorted_ones(rng, n):
    # the sort-free search (for jax2onnx) against numpy, and the sorting version against both
    rows = rng.normal(100, 30, size=(3, n, 2)).astype("float32")
    rows[1] = np.round(rows[1] / 10) * 10  # ties
    rows[2, : n // 3] = np.nan  # non-finite values are left out
    rows[2, n // 3 : n // 2] = -np.inf
    searched = [to_numpy(v) for v in searched_quantiles(rows, QS)]
    expected = _finite_reference(rows, QS)
    for got, sorted_, want in zip(searched, finite_quantiles(rows, QS), expected, strict=True):
        assert got.shape == (3, 1, 2)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got, to_numpy(sorted_))


def test_searched_quantiles_of_extreme_and_empty_rows():
    rows = np.array(
        [
            [-3e38, 3e38, 1.0, 2.0, 1e-30],  # the whole float32 range: no overflow
            [5.0, 5.0, 5.0, 5.0, 5.0],  # constant
            [np.nan, np.inf, -np.inf, np.nan, np.nan],  # no finite value: 0
            [1e-30, 2e-30, 0.0, -1e-30, 3e-30],  # tiny gaps
            [-1e30, 1.5, 1.5000001, 7.0, 1e30],  # neighbouring floats in a huge range
        ],
        np.float32,
    )
    got = np.stack([to_numpy(v) for v in searched_quantiles(rows, QS)])
    np.testing.assert_array_equal(got, np.stack([to_numpy(v) for v in finite_quantiles(rows, QS)]))
    np.testing.assert_allclose(got, _finite_reference(rows, QS), rtol=1e-6, atol=0)
