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

The order statistics come from a sort, except where a graph cannot sort:
jax2onnx (Keras's ONNX exporter under JAX) sorts only along static lengths,
so under JAX with symbolic sizes :func:`searched_quantiles` finds them by
bisection instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import keras
from keras import ops

from keras_nii.ops.index import positions

__all__ = ["finite_quantiles", "quantiles", "searched_quantiles"]

_SPLIT = 4096


def _split(m: Any) -> tuple[Any, Any]:
    """``divmod(m, _SPLIT)`` of a non-negative int32 tensor, without an integer division.

    jax2onnx cannot lower JAX's integer remainder (which ``//`` and ``%`` use)
    on a tensor of symbolic shape: the quotient is taken in float32 (off by
    at most one for ``m`` up to ``2**31``) and corrected in int32.
    """
    a = ops.cast(ops.floor(ops.cast(m, "float32") / _SPLIT), "int32")
    b = m - a * _SPLIT
    a, b = ops.where(b < 0, a - 1, a), ops.where(b < 0, b + _SPLIT, b)
    return ops.where(b >= _SPLIT, a + 1, a), ops.where(b >= _SPLIT, b - _SPLIT, b)


def _position(count: Any, q: float) -> tuple[Any, Any]:
    """``q * (count - 1)`` as an int32 floor and a float32 fraction in [0, 1)."""
    m = ops.cast(count, "int32") - 1
    a, b = _split(m)
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
    chosen = ops.where(positions(ordered, 1) == index, ordered, ops.zeros_like(ordered))
    return ops.sum(chosen, axis=1, keepdims=True)


def finite_quantiles(rows: Any, qs: Sequence[float]) -> list[Any]:
    """The ``qs`` quantiles of the finite values of each row, along axis 1.

    As :func:`quantiles`, but NaN and +-inf are left out: each row has its own
    count of finite values (0 gives a quantile of 0). NaN sorts last (as
    +inf) and -inf first, so a row's finite values lie in between, from its
    count of -inf on. Each result keeps axis 1, of size 1.
    """
    if keras.backend.backend() == "jax" and not isinstance(ops.shape(rows)[1], int):
        return searched_quantiles(rows, qs)
    finite = ops.isfinite(rows)
    ordered = ops.sort(ops.where(ops.isnan(rows), ops.full_like(rows, math.inf), rows), axis=1)
    count = ops.sum(ops.cast(finite, "int32"), axis=1, keepdims=True)
    below = ops.logical_and(ops.logical_not(finite), rows < 0)
    first = ops.sum(ops.cast(below, "int32"), axis=1, keepdims=True)
    end = ops.cast(ops.shape(rows)[1], "int32") - 1
    out = []
    for lower, fraction, last in _finite_positions(count, qs):
        upper = ops.minimum(lower + 1, last)
        low = _pick(ordered, ops.minimum(first + lower, end))
        high = _pick(ordered, ops.minimum(first + upper, end))
        out.append(_interpolate(low, high, fraction, count))
    return out


def _finite_positions(count: Any, qs: Sequence[float]) -> Iterator[tuple[Any, Any, Any]]:
    """For each quantile of ``count`` finite values: the lower order statistic's
    index (clipped to the last), the fraction towards the next, and the last index."""
    last = ops.maximum(count - 1, 0)
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"a quantile must be in [0, 1], got {q!r}")
        lower, fraction = _position(ops.maximum(count, 1), float(q))
        yield ops.minimum(lower, last), fraction, last


def _interpolate(low: Any, high: Any, fraction: Any, count: Any) -> Any:
    """``low`` to ``high`` by ``fraction``; 0 for a row without a finite value."""
    value = low + (high - low) * ops.cast(fraction, low.dtype)
    return ops.where(count > 0, value, ops.zeros_like(value))


#: halvings of each row's range in :func:`searched_quantiles`: first of the
#: values' logarithms (their magnitudes), then of the values themselves
COARSE_BISECTIONS = 40
FINE_BISECTIONS = 32


def _count_at_most(values: Any, finite: Any, value: Any) -> Any:
    kept = ops.logical_and(finite, values <= value)
    return ops.sum(ops.cast(kept, "int32"), axis=1, keepdims=True)


def _largest_at_most(rows: Any, finite: Any, values: Any, value: Any) -> Any:
    kept = ops.logical_and(finite, values <= value)
    return ops.max(ops.where(kept, rows, ops.full_like(rows, -math.inf)), axis=1, keepdims=True)


def _smallest_above(rows: Any, finite: Any, value: Any) -> Any:
    kept = ops.logical_and(finite, rows > value)
    return ops.min(ops.where(kept, rows, ops.full_like(rows, math.inf)), axis=1, keepdims=True)


def _bisect(values: Any, finite: Any, target: Any, lo: Any, hi: Any, steps: int) -> tuple:
    """Narrow ``(lo, hi]`` around the ``target``-th smallest of ``values`` (1-based).

    Keeps fewer than ``target`` values at most ``lo`` and at least
    ``target`` at most ``hi``.
    """
    for _ in range(steps):
        mid = lo * 0.5 + hi * 0.5  # not lo + (hi - lo) / 2: that overflows for +-3e38
        enough = _count_at_most(values, finite, mid) >= target
        lo, hi = ops.where(enough, lo, mid), ops.where(enough, mid, hi)
    return lo, hi


def _order_statistic(rows: Any, finite: Any, k: Any, low: Any, high: Any) -> Any:
    """The ``k``-th smallest finite value of each row (0-based), by bisection.

    ``low`` and ``high`` are the rows' finite minimum and maximum. A plain
    bisection of the values cannot reach a value of 1 in a row that spans
    +-3e38 in a few dozen steps, so it first bisects ``sign(x) log(1 + |x|)``
    (a monotone map of every float32 into [-89, 89]), then, from the data
    values that bound what it kept, the values themselves, down to
    neighbouring floats. The answer is the smallest value above the lower
    bound: a value of the row.
    """
    target = k + 1
    magnitudes = ops.sign(rows) * ops.log1p(ops.abs(rows))
    lo, hi = _bisect(
        magnitudes,
        finite,
        target,
        ops.sign(low) * ops.log1p(ops.abs(low)),
        ops.sign(high) * ops.log1p(ops.abs(high)),
        COARSE_BISECTIONS,
    )
    # the log map is monotone: "magnitude <= m" is "value <= the largest value so
    # mapped". For the lower bound the map's inverse is tighter (no data value may
    # lie near it), kept where it keeps fewer than target values at most it
    hi = _largest_at_most(rows, finite, magnitudes, hi)
    below = _largest_at_most(rows, finite, magnitudes, lo)
    inverse = ops.sign(lo) * ops.expm1(ops.abs(lo))
    usable = ops.logical_and(_count_at_most(rows, finite, inverse) < target, inverse > below)
    lo = ops.where(usable, inverse, below)
    lo, _ = _bisect(rows, finite, target, lo, hi, FINE_BISECTIONS)
    at_minimum = _count_at_most(rows, finite, low) >= target
    return ops.where(at_minimum, low, _smallest_above(rows, finite, lo))


def searched_quantiles(rows: Any, qs: Sequence[float]) -> list[Any]:
    """:func:`finite_quantiles` without a sort: order statistics found by bisection.

    For graphs that cannot sort: jax2onnx, Keras's ONNX exporter under JAX,
    sorts only along axes of a static length, and an exported model's
    spatial sizes are symbolic. Each quantile costs about
    ``COARSE_BISECTIONS + FINE_BISECTIONS`` counting passes over the row
    instead of one sort; the values equal :func:`finite_quantiles`' (tested
    against it and against ``numpy.quantile``), except where a CPU flushes
    subnormal numbers (below 1.2e-38) to zero.
    """
    rows = ops.convert_to_tensor(rows)
    finite = ops.isfinite(rows)
    count = ops.sum(ops.cast(finite, "int32"), axis=1, keepdims=True)
    low = ops.min(ops.where(finite, rows, ops.full_like(rows, math.inf)), axis=1, keepdims=True)
    high = ops.max(ops.where(finite, rows, ops.full_like(rows, -math.inf)), axis=1, keepdims=True)
    out = []
    for lower, fraction, last in _finite_positions(count, qs):
        value_low = _order_statistic(rows, finite, lower, low, high)
        # the next order statistic: the same value while it repeats, else the next value
        repeats = _count_at_most(rows, finite, value_low) >= lower + 2
        value_high = ops.where(
            ops.logical_or(repeats, lower >= last),
            value_low,
            _smallest_above(rows, finite, value_low),
        )
        out.append(_interpolate(value_low, value_high, fraction, count))
    return out
