"""Index ranges along a tensor's axis, in a form every exporter can trace.

``ops.arange(n)`` over a dynamic size ``n`` is fine for TensorFlow, XLA and
PyTorch, but under JAX's symbolic shapes (an ONNX export through jax2onnx)
the range gets a shape that later reshapes and slices cannot use, and
jax2onnx's ``arange`` refuses Keras's one-argument call outright. A running
sum of ones along the axis is the same range, with the tensor's own symbolic
size, in every backend.
"""

from __future__ import annotations

from typing import Any

from keras import ops

__all__ = ["positions"]


def positions(tensor: Any, axis: int) -> Any:
    """``0, 1, ..., n - 1`` (int32) along ``axis`` of ``tensor`` (of size ``n`` there).

    The result has ``tensor``'s rank, size 1 on every other axis, so it
    broadcasts against ``tensor``.
    """
    rank = len(tensor.shape)
    axis = axis % rank
    line = tensor[tuple(slice(None) if a == axis else slice(0, 1) for a in range(rank))]
    return ops.cumsum(ops.ones_like(line, dtype="int32"), axis=axis) - 1
