"""Per-sample reductions over every voxel, in the form each runtime runs fastest.

The XLA that TensorFlow 2.21 compiles with (``jit_compile=True``; Keras's
default only on a GPU) emits a reduction over a computed operand as one loop
on one thread: summing a 128^3 float32 volume took 0.96 ms, where a copy of it
(a read *and* a write, spread over the cores) took 0.6 ms. Folding the row
first into its :data:`PARTS` contiguous chunks, added elementwise, is an
ordinary loop fusion that XLA splits across threads, and it leaves an eighth
of the data for the true reduction: the same sum then took 0.14 ms, and the
z-score's three sums 0.49 ms instead of 3.2 (2-core AMD EPYC).

Everywhere else the plain reduction is the fast one, and the fold only adds
work: TensorFlow graphs and eager ops without XLA (where each chunk would be
a copy: 2.9 against 1.7 ms for those three sums), JAX (whose newer XLA
reduces in parallel: 0.86 ms plain against 6.5 ms folded) and torch. On a
GPU, XLA already splits long reductions over many blocks; the fold is not
used there either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from keras import ops

from keras_nii.ops.xla import tensorflow_xla_on_cpu

__all__ = ["PARTS", "finite_min_max", "reduce_rows", "reduce_volumes"]

#: how many contiguous chunks a row is folded into before it is reduced
PARTS = 8

_FOLD: dict[str, tuple[Callable[[Any, Any], Any], Callable[..., Any]]] = {
    "sum": (lambda a, b: a + b, ops.sum),
    "min": (ops.minimum, ops.min),
    "max": (ops.maximum, ops.max),
}


def reduce_rows(values: Any, kind: str = "sum") -> Any:
    """Reduce ``(rows, n, ...)`` over axis 1, keeping it: ``(rows, 1, ...)``.

    The result equals ``ops.sum`` (or ``ops.min`` / ``ops.max``) over axis 1
    with ``keepdims=True`` (sums up to float rounding: under XLA in
    TensorFlow they are added in a different order, see the module's notes).

    Args:
        values: a tensor whose axis 1 runs over the voxels of one row.
        kind: ``"sum"``, ``"min"`` or ``"max"``.
    """
    if kind not in _FOLD:
        raise ValueError(f"kind must be one of {tuple(_FOLD)}, got {kind!r}")
    combine, reduce = _FOLD[kind]
    n = ops.shape(values)[1]
    if not tensorflow_xla_on_cpu() or (isinstance(n, int) and n < PARTS):
        return reduce(values, axis=1, keepdims=True)
    part = n // PARTS
    folded = values[:, :part]
    for k in range(1, PARTS):
        folded = combine(folded, values[:, k * part : (k + 1) * part])
    out = reduce(folded, axis=1, keepdims=True)
    # the last n % PARTS voxels; statically absent when n is a multiple (an
    # empty min or max has no value under JAX or torch)
    if not isinstance(n, int) or n % PARTS:
        out = combine(out, reduce(values[:, PARTS * part :], axis=1, keepdims=True))
    return out


def reduce_volumes(volumes: Any, kind: str = "sum", per_channel: bool = True) -> Any:
    """Reduce ``(batch, x, y, z, channels)`` over each sample's voxels.

    Args:
        volumes: a channels-last batch.
        kind: ``"sum"``, ``"min"`` or ``"max"``.
        per_channel: one value per sample and channel, ``(batch, 1, 1, 1,
            channels)``; or per sample, over all its channels too, ``(batch,
            1, 1, 1, 1)``.
    """
    shape = ops.shape(volumes)
    channels = shape[4] if per_channel else 1
    rows = ops.reshape(volumes, (shape[0], -1, channels) if per_channel else (shape[0], -1))
    return ops.reshape(reduce_rows(rows, kind), (shape[0], 1, 1, 1, channels))


def finite_min_max(x: Any, per_channel: bool = True) -> tuple[Any, Any]:
    """:func:`reduce_volumes`'s minimum and maximum over each volume's finite voxels.

    ``(0, 0)`` for a volume without a finite voxel.

    A non-finite voxel shows in the plain minimum or maximum (NaN, or +-inf;
    TensorFlow's XLA skips NaN, which leaves them right): only then are they
    taken again without them, under one conditional.
    """
    low = reduce_volumes(x, "min", per_channel)
    high = reduce_volumes(x, "max", per_channel)

    def over_finite_voxels() -> tuple[Any, Any]:
        finite = ops.isfinite(x)
        kept_low = reduce_volumes(ops.where(finite, x, math.inf), "min", per_channel)
        kept_high = reduce_volumes(ops.where(finite, x, -math.inf), "max", per_channel)
        none = ops.logical_not(ops.isfinite(kept_low))
        zero = ops.zeros_like(kept_low)
        return ops.where(none, zero, kept_low), ops.where(none, zero, kept_high)

    finite = ops.all(ops.logical_and(ops.isfinite(low), ops.isfinite(high)))
    return ops.cond(finite, lambda: (low, high), over_finite_voxels)
