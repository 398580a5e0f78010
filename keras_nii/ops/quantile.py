"""Quantiles of rows, in float32 index arithmetic, for graphs that are exported.

``keras.ops.quantile`` under TensorFlow computes the interpolation positions
in float64, which LiteRT's builtin ops cannot run ('tf.Sub' / 'tf.Mul' /
'tf.Ceil' on float64 stop the conversion). Here the position ``q * (n - 1)``
of each quantile is computed from int32 and float32 values only, split so
that it stays exact to about ``n * 2**-36`` voxels: for ``n - 1 = a * 4096 +
b``, ``q * (n - 1) = a * floor(4096 q) + (a * frac(4096 q) + b * q)``, an
exact int32 product plus a float32 term below ``2**19 + 4096``. The values
are interpolated linearly between the two neighbouring order statistics, as
``numpy.percentile``'s default ``method="linear"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from keras import ops

__all__ = ["finite_quantiles", "quantiles"]

_SPLIT = 4096


def _position(count: Any, q: float) -> tuple[Any, Any]:
    """``q * (count - 1)`` as an int32 floor and a float32 fraction in [0, 1)."""
    m = ops.cast(count, "int32") - 1
    a, b = m // _SPLIT, m % _SPLIT
    scaled = _SPLIT * q
    whole = math.floor(scaled)
    rest = ops.cast(a, "float32") * (scaled - whole) + ops.cast(b, "float32") * q
    carry = ops.floor(rest)
    lower = a * whole + ops.cast(carry, "int32")
    return lower, rest - carry


def _at(values: Any, index: Any, axis: int) -> Any:
    """``values`` at one (tensor) ``index`` along ``axis``, the axis removed.

    A slice, not ``ops.take``: under PyTorch that ravels its index, which the
    ONNX exporter does not know.
    """
    shape = list(ops.shape(values))
    start = [0] * len(shape)
    start[axis], shape[axis] = index, 1
    return ops.squeeze(ops.slice(values, start, shape), axis)


def quantiles(rows: Any, qs: Sequence[float], axis: int = 1) -> list[Any]:
    """The ``qs`` quantiles (each in [0, 1]) of ``rows`` along ``axis``.

    Args:
        rows: a float tensor; its ``axis`` runs over the values of one row
            (it may be symbolic).
        qs: the quantiles, Python floats in [0, 1].
        axis: the axis reduced (removed from each result's shape).

    Returns:
        One tensor a quantile, of ``rows``'s shape less ``axis``, and its dtype.
    """
    ordered = ops.sort(rows, axis=axis)
    count = ops.shape(rows)[axis]
    last = ops.cast(count, "int32") - 1
    out = []
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"a quantile must be in [0, 1], got {q!r}")
        lower, fraction = _position(count, float(q))
        lower = ops.minimum(lower, last)
        upper = ops.minimum(lower + 1, last)
        low, high = _at(ordered, lower, axis), _at(ordered, upper, axis)
        fraction = ops.cast(fraction, rows.dtype)
        out.append(low + (high - low) * fraction)
    return out


def _pick(ordered: Any, index: Any) -> Any:
    """``ordered`` at ``index`` along axis 1 (``index`` has size 1 there), as
    ``ops.take_along_axis(ordered, index, axis=1)``.

    A select and a sum, not ``ops.take_along_axis``: PyTorch's ONNX exporter
    has no ``take_along_dim``, and the select costs one elementwise pass,
    small beside the sort.
    """
    rank = len(ordered.shape)
    positions = ops.reshape(
        ops.arange(ops.shape(ordered)[1], dtype="int32"), (1, -1) + (1,) * (rank - 2)
    )
    chosen = ops.where(positions == index, ordered, ops.zeros_like(ordered))
    return ops.sum(chosen, axis=1, keepdims=True)


def finite_quantiles(rows: Any, qs: Sequence[float]) -> list[Any]:
    """The ``qs`` quantiles of the finite values of each row, along axis 1.

    As :func:`quantiles`, but NaN and +-inf are left out: each row has its own
    count of finite values (0 gives a quantile of 0). NaN sorts last (as
    +inf) and -inf first, so a row's finite values lie in between, from its
    count of -inf on. Each result keeps axis 1, of size 1.
    """
    finite = ops.isfinite(rows)
    ordered = ops.sort(ops.where(ops.isnan(rows), ops.full_like(rows, math.inf), rows), axis=1)
    count = ops.sum(ops.cast(finite, "int32"), axis=1, keepdims=True)
    below = ops.logical_and(ops.logical_not(finite), rows < 0)
    first = ops.sum(ops.cast(below, "int32"), axis=1, keepdims=True)
    last = ops.maximum(count - 1, 0)
    end = ops.cast(ops.shape(rows)[1], "int32") - 1
    out = []
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"a quantile must be in [0, 1], got {q!r}")
        lower, fraction = _position(ops.maximum(count, 1), float(q))
        lower = ops.minimum(lower, last)
        upper = ops.minimum(lower + 1, last)
        low = _pick(ordered, ops.minimum(first + lower, end))
        high = _pick(ordered, ops.minimum(first + upper, end))
        value = low + (high - low) * ops.cast(fraction, rows.dtype)
        out.append(ops.where(count > 0, value, ops.zeros_like(value)))
    return out
