"""One 3D sampler for every spatial layer.

A spatial transform is expressed as *source coordinates*: for each voxel of the
output, the (fractional) voxel index in the input that it takes its value from.
Affine transforms give them from one ``(3, 4)`` matrix per sample
(:func:`affine_coordinates`); elastic deformations add a displacement field.
:func:`resample` then gathers and blends, the same way for every layer, with
nearest-neighbour sampling for label maps so they keep their values and dtype.

Conventions follow ``scipy.ndimage.affine_transform``: a matrix ``M`` maps an
output index ``o`` to the input index ``M[:, :3] @ o + M[:, 3]``.

Everything is written with ``keras.ops`` on whole batches (no Python loop over
samples), so under TensorFlow it lowers to a handful of fusable XLA ops and
under JAX to ``jnp`` gathers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from keras_nii.ops.index import positions
from keras_nii.ops.xla import materialize

__all__ = [
    "INTERPOLATIONS",
    "FILL_MODES",
    "affine_coordinates",
    "resample",
    "centered",
    "scaling_matrix",
    "resize_matrix",
]

INTERPOLATIONS = ("linear", "nearest")
FILL_MODES = ("constant", "nearest", "reflect")

Coordinates = tuple[Any, Any, Any]


def affine_coordinates(matrices: Any, output_shape: Sequence[Any]) -> Coordinates:
    """Source coordinates of an affine map, one matrix per sample.

    Args:
        matrices: ``(batch, 3, 4)`` float tensor mapping output voxel indices to
            input voxel indices.
        output_shape: the spatial output size ``(x, y, z)`` (ints or scalar
            tensors).

    Returns:
        Three ``(batch, x, y, z)`` float32 tensors: the input index along each
        axis for every output voxel.
    """
    matrices = ops.cast(matrices, "float32")
    grids = [ops.arange(0, size, dtype="float32") for size in output_shape]
    # o_x varies along axis 1, o_y along 2, o_z along 3 of (batch, x, y, z)
    gx = ops.reshape(grids[0], (1, -1, 1, 1))
    gy = ops.reshape(grids[1], (1, 1, -1, 1))
    gz = ops.reshape(grids[2], (1, 1, 1, -1))
    coords = []
    for row in range(3):
        m = [ops.reshape(matrices[:, row, col], (-1, 1, 1, 1)) for col in range(4)]
        # separable sum: three rank-1 terms broadcast into the full grid once
        coords.append(m[0] * gx + (m[1] * gy + (m[2] * gz + m[3])))
    return tuple(coords)


def _reflect(t: Any, size: Any) -> Any:
    """Mirror coordinates about the voxel edges (scipy's ``mode="reflect"``)."""
    size = ops.cast(size, "float32")
    period = 2.0 * size
    u = t + 0.5
    u = u - period * ops.floor(u / period)
    u = ops.where(u >= size, period - u, u)
    return u - 0.5


def resample(
    volumes: Any,
    coordinates: Coordinates,
    *,
    interpolation: str = "linear",
    fill_mode: str = "constant",
    fill_value: float = 0.0,
) -> Any:
    """Sample a batch of volumes at fractional voxel coordinates.

    Args:
        volumes: ``(batch, x, y, z, channels)`` tensor, any float or integer
            dtype. Integer volumes should use ``interpolation="nearest"``.
        coordinates: three ``(batch, X, Y, Z)`` tensors of input indices, as
            returned by :func:`affine_coordinates`.
        interpolation: ``"linear"`` (trilinear) or ``"nearest"``.
        fill_mode: how points outside the input are filled: ``"constant"``
            (``fill_value``), ``"nearest"`` (edge voxels repeated) or
            ``"reflect"`` (mirrored about the edge).
        fill_value: the value for ``fill_mode="constant"``.

    Returns:
        ``(batch, X, Y, Z, channels)``, of the same dtype as ``volumes``.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
    dtype = keras.backend.standardize_dtype(volumes.dtype)
    # read 8 times per output voxel at scattered places: an input that is
    # still an expression (a flip, noise) is computed once, not at each read
    volumes = materialize(volumes, lambda: ops.reshape(coordinates[0], (-1,))[0] >= 0.0)
    shape = ops.shape(volumes)
    sizes, channels = shape[1:4], shape[4]
    flat = ops.reshape(volumes, (-1, channels))

    inside = None
    prepared = []
    for t, size in zip(coordinates, sizes, strict=True):
        high = ops.cast(size, "float32") - 1.0
        if fill_mode == "constant":
            # a hair of tolerance so that an identity map keeps its edge voxels
            ok = ops.logical_and(t >= -1e-3, t <= high + 1e-3)
            inside = ok if inside is None else ops.logical_and(inside, ok)
        elif fill_mode == "reflect":
            t = _reflect(t, size)
        prepared.append(ops.clip(t, 0.0, high))

    strides = (sizes[1] * sizes[2], sizes[2], 1)
    base = positions(volumes, 0)[..., 0] * ops.cast(sizes[0] * sizes[1] * sizes[2], "int32")

    def gather(indices: Sequence[Any]) -> Any:
        flat_index = base
        for index, stride in zip(indices, strides, strict=True):
            flat_index = flat_index + index * ops.cast(stride, "int32")
        # (batch, X, Y, Z) indices give (batch, X, Y, Z, channels) at once: no
        # reshape to the output's sizes, which jax2onnx cannot map to its input
        return ops.take(flat, flat_index, axis=0)

    if interpolation == "nearest":
        out = gather([ops.cast(ops.floor(t + 0.5), "int32") for t in prepared])
    else:
        lows, highs, weights = [], [], []
        for t, size in zip(prepared, sizes, strict=True):
            low = ops.floor(t)
            weights.append(t - low)
            low = ops.cast(low, "int32")
            lows.append(low)
            highs.append(ops.minimum(low + 1, ops.cast(size, "int32") - 1))
        work = "float64" if dtype == "float64" else "float32"
        out = None
        for corner in range(8):
            bits = [(corner >> (2 - axis)) & 1 for axis in range(3)]
            idx = [highs[a] if bits[a] else lows[a] for a in range(3)]
            w = None
            for a in range(3):
                wa = weights[a] if bits[a] else 1.0 - weights[a]
                w = wa if w is None else w * wa
            term = ops.cast(gather(idx), work) * ops.cast(ops.expand_dims(w, -1), work)
            out = term if out is None else out + term
        out = ops.cast(out, dtype)
    if inside is not None:
        fill = ops.cast(fill_value, dtype)
        out = ops.where(ops.expand_dims(inside, -1), out, fill)
    return out


def centered(linear: Any, in_shape: Sequence[Any], out_shape: Sequence[Any] | None = None) -> Any:
    """Affine matrices that apply ``linear`` about the volume centre.

    Args:
        linear: ``(batch, 3, 3)`` output-to-input linear maps (rotation, zoom,
            shear composed), in voxel units.
        in_shape, out_shape: spatial sizes; the centre of the output maps to
            the centre of the input.

    Returns:
        ``(batch, 3, 4)`` matrices for :func:`affine_coordinates`.
    """
    out_shape = in_shape if out_shape is None else out_shape
    c_in = ops.stack([(ops.cast(s, "float32") - 1.0) / 2.0 for s in in_shape])
    c_out = ops.stack([(ops.cast(s, "float32") - 1.0) / 2.0 for s in out_shape])
    linear = ops.cast(linear, "float32")
    offset = c_in[None, :] - ops.einsum("bij,j->bi", linear, c_out)
    return ops.concatenate([linear, offset[:, :, None]], axis=-1)


def scaling_matrix(scales: Any) -> Any:
    """``(batch, 3, 3)`` diagonal matrices from ``(batch, 3)`` scale factors."""
    eye = ops.eye(3, dtype="float32")
    return ops.cast(scales, "float32")[:, :, None] * eye[None]


def resize_matrix(in_shape: Sequence[Any], out_shape: Sequence[Any], batch: Any) -> Any:
    """Matrices that resize ``in_shape`` to ``out_shape`` (voxel corners aligned).

    Output voxel ``o`` samples the input at ``(o + 0.5) * in / out - 0.5``, the
    convention of ``tf.image.resize`` and ``jax.image.resize``.
    """
    ratios = ops.stack(
        [
            ops.cast(i, "float32") / ops.cast(o, "float32")
            for i, o in zip(in_shape, out_shape, strict=True)
        ]
    )
    linear = ratios[:, None] * ops.eye(3, dtype="float32")
    offset = 0.5 * ratios - 0.5
    matrix = ops.concatenate([linear, offset[:, None]], axis=-1)
    return ops.broadcast_to(matrix[None], (batch, 3, 4))
