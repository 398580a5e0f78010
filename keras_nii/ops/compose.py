"""Spatial transforms as coordinate maps, composed and sampled once.

Each spatial layer can express one draw as a :class:`CoordinateMap`: for every
voxel of its output, the (fractional) voxel index of its input that the voxel
takes its value from. Two forms cover every keras-nii spatial layer:

- an affine map, one ``(batch, 3, 4)`` matrix per sample (the convention of
  :func:`keras_nii.ops.resample.affine_coordinates`): flips and 90-degree
  rotations (*exact*: integer matrices that map voxel centres to voxel
  centres), crops and pads (exact, an offset and an output shape), random
  affine transforms and resizing;
- a displacement field ``(batch, 3, x, y, z)`` on the output grid: output
  voxel ``o`` reads the input at ``o + d(o)`` (elastic deformation).

:func:`compose` chains the maps of consecutive layers into the source
coordinates of the whole chain, and :func:`sample` reads the chain's input
once at them: one interpolation instead of one per layer. Composition goes
from the output towards the input (the last layer's map is applied first):

- affine maps compose by matrix product, without touching a voxel;
- a displacement field is evaluated at the points where the maps after it
  send the output grid (trilinear interpolation of the field, which is a
  smooth cubic B-spline), and added to them;
- where an unfused layer would handle the edge of its input, the composed
  map does the same, at that layer's place in the chain: with
  ``fill_mode="nearest"`` the coordinates are clamped to that layer's input,
  with ``"reflect"`` mirrored into it, with ``"constant"`` the points that
  fall outside take that layer's ``fill_value`` (0 for masks). A check is
  postponed past the layers that map their input box onto their output box
  (flips, 90-degree rotations), where it gives the same answer, so that the
  matrices around them still compose by product.

A chain of exact maps stays exact: its composed matrix is integer, and
:func:`sample` gathers (nearest-neighbour) rather than interpolates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from keras import ops

from keras_nii.ops.resample import (
    FILL_MODES,
    INTERPOLATIONS,
    _reflect,
    affine_coordinates,
    resample,
)
from keras_nii.ops.xla import materialize

__all__ = ["CoordinateMap", "ComposedMap", "compose", "compose_matrices", "sample"]

#: the tolerance of :func:`keras_nii.ops.resample.resample` at the edge of the input
_EDGE = 1e-3


@dataclass(frozen=True)
class CoordinateMap:
    """One spatial layer's draw: a map from output to input voxel coordinates.

    Attributes:
        input_shape: the spatial shape of the layer's input (ints or scalar
            tensors).
        output_shape: the spatial shape of its output.
        matrix: ``(batch, 3, 4)`` output -> input affine matrices, or ``None``
            for a displacement field.
        displacement: ``(batch, 3, x, y, z)`` displacements on the output grid,
            in input voxels (output voxel ``o`` reads ``o + d(o)``), or ``None``.
        exact: whether the map sends voxel centres to voxel centres (integer
            matrices: flips, 90-degree rotations, crops), so that sampling it
            needs no interpolation.
        onto: whether it maps the output box onto the input box (flips and
            90-degree rotations): no point ever falls outside.
        inside: whether every output voxel lands inside the input (``onto``,
            or a crop that pads nothing): no edge handling needed.
        fill_mode: the layer's edge handling, one of ``FILL_MODES``.
        fill_value: the image value for ``fill_mode="constant"`` (masks get 0).
        interpolation: the layer's image interpolation, one of
            ``INTERPOLATIONS`` (irrelevant for exact maps).
    """

    input_shape: tuple
    output_shape: tuple
    matrix: Any = None
    displacement: Any = None
    exact: bool = False
    onto: bool = False
    inside: bool = False
    fill_mode: str = "constant"
    fill_value: float = 0.0
    interpolation: str = "linear"

    def __post_init__(self) -> None:
        if (self.matrix is None) == (self.displacement is None):
            raise ValueError("a CoordinateMap has either a matrix or a displacement field")
        if self.fill_mode not in FILL_MODES:
            raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {self.fill_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )


@dataclass(frozen=True)
class ComposedMap:
    """The source coordinates of a chain of maps, ready for :func:`sample`.

    Attributes:
        coordinates: three ``(batch, X, Y, Z)`` float32 tensors, input indices
            of the chain's first layer.
        fill_mode: the edge handling left to the sampler (the first layer's).
        fill_value: its image fill value for ``"constant"``.
        fills: ``(inside, fill_value)`` pairs of the checks made along the
            chain, outermost (closest to the output) first: where ``inside``
            is false, the image takes ``fill_value`` and the mask 0.
        interpolation: ``"nearest"`` when every map is exact or asks for
            nearest, else ``"linear"``.
    """

    coordinates: tuple
    fill_mode: str
    fill_value: float
    fills: tuple
    interpolation: str


def compose_matrices(outer: Any, inner: Any) -> Any:
    """``(batch, 3, 4)`` matrices of ``outer`` after ``inner``: ``x -> outer(inner(x))``."""
    linear = ops.matmul(outer[:, :, :3], inner[:, :, :3])
    offset = ops.einsum("bij,bj->bi", outer[:, :, :3], inner[:, :, 3]) + outer[:, :, 3]
    return ops.concatenate([linear, offset[:, :, None]], axis=-1)


def _apply_matrix(matrix: Any, coordinates: Sequence[Any]) -> tuple:
    """``matrix`` applied to dense ``(batch, X, Y, Z)`` coordinates, point by point."""
    out = []
    for row in range(3):
        m = [ops.reshape(matrix[:, row, col], (-1, 1, 1, 1)) for col in range(4)]
        out.append(m[0] * coordinates[0] + (m[1] * coordinates[1] + (m[2] * coordinates[2] + m[3])))
    return tuple(out)


def _inside(coordinates: Sequence[Any], shape: Sequence[Any]) -> Any:
    """Whether each point lies in the box of ``shape`` (the sampler's tolerance)."""
    inside = None
    for t, size in zip(coordinates, shape, strict=True):
        high = ops.cast(size, "float32") - 1.0
        ok = ops.logical_and(t >= -_EDGE, t <= high + _EDGE)
        inside = ok if inside is None else ops.logical_and(inside, ok)
    return inside


def _clamp(coordinates: Sequence[Any], shape: Sequence[Any], mode: str) -> tuple:
    """Coordinates brought into the box as the sampler's ``nearest`` / ``reflect`` do."""
    out = []
    for t, size in zip(coordinates, shape, strict=True):
        if mode == "reflect":
            t = _reflect(t, size)
        out.append(ops.clip(t, 0.0, ops.cast(size, "float32") - 1.0))
    return tuple(out)


def _field_at(displacement: Any, coordinates: Sequence[Any]) -> tuple:
    """A ``(batch, 3, x, y, z)`` field, trilinearly interpolated at ``coordinates``."""
    field = ops.transpose(displacement, (0, 2, 3, 4, 1))
    values = resample(field, tuple(coordinates), interpolation="linear", fill_mode="nearest")
    return tuple(values[..., axis] for axis in range(3))


def _grid(shape: Sequence[Any]) -> tuple:
    return (
        ops.reshape(ops.arange(shape[0], dtype="float32"), (1, -1, 1, 1)),
        ops.reshape(ops.arange(shape[1], dtype="float32"), (1, 1, -1, 1)),
        ops.reshape(ops.arange(shape[2], dtype="float32"), (1, 1, 1, -1)),
    )


def compose(maps: Sequence[CoordinateMap]) -> ComposedMap:
    """The source coordinates of ``maps`` applied one after the other.

    Args:
        maps: the maps of consecutive layers, in the order the layers run
            (``maps[0]`` reads the chain's input); each layer's input shape
            is the previous one's output shape.

    Returns:
        A :class:`ComposedMap` on the last map's output grid.
    """
    if not maps:
        raise ValueError("compose needs at least one map")
    output_shape = maps[-1].output_shape
    # the state, from the output side: the current coordinates are
    # ``matrix(dense)``, ``dense`` None meaning the output grid and ``matrix``
    # None the identity; ``pending`` the fill value of a constant-fill check
    # not yet made, owed at the current box
    dense: tuple | None = None
    matrix: Any = None
    pending: float | None = None
    fills: list = []
    costly = False  # whether the coordinates are computed point by point

    def current() -> tuple | None:
        nonlocal costly
        if matrix is None:
            return dense if dense is not None else None
        if dense is None:
            return affine_coordinates(matrix, output_shape)
        costly = True
        return _apply_matrix(matrix, dense)

    def settle(box: Sequence[Any]) -> None:
        """Evaluate the coordinates, and the pending check against ``box``."""
        nonlocal dense, matrix, pending
        coordinates = current()
        if coordinates is None:  # the output grid itself: inside by construction
            coordinates = _grid(output_shape)
            pending = None
        if pending is not None:
            fills.append((_inside(coordinates, box), pending))
            pending = None
        dense, matrix = coordinates, None

    last = len(maps) - 1
    for index in range(last, -1, -1):
        m = maps[index]
        if m.displacement is not None:
            if dense is None and matrix is None:
                # the field on its own grid: exactly what the layer computes
                dense = tuple(
                    g + m.displacement[:, axis] for axis, g in enumerate(_grid(m.output_shape))
                )
            else:
                settle(m.output_shape)
                costly = True
                shift = _field_at(m.displacement, dense)
                dense = tuple(c + s for c, s in zip(dense, shift, strict=True))
        else:
            if pending is not None and not m.onto:
                settle(m.output_shape)
            matrix = m.matrix if matrix is None else compose_matrices(m.matrix, matrix)
        if m.inside or index == 0:
            continue  # nothing can leave this input; or the sampler handles it
        # a map that is not onto has settled any pending check before it
        if m.fill_mode == "constant":
            pending = m.fill_value
        else:
            settle(m.input_shape)
            costly = True
            dense = _clamp(dense, m.input_shape, m.fill_mode)

    first = maps[0]
    coordinates = current()
    if coordinates is None:
        coordinates = _grid(output_shape)
    if pending is not None:  # postponed through onto maps down to the input
        fill_mode, fill_value = "constant", pending
    elif first.inside:
        fill_mode, fill_value = "nearest", 0.0  # a clip that changes nothing
    else:
        fill_mode, fill_value = first.fill_mode, first.fill_value
    linear = any(not m.exact and m.interpolation == "linear" for m in maps)
    if costly:
        # the sampler reads the coordinates at 8 corners: computed point by
        # point (a matrix on dense coordinates, clamps, a field evaluated at
        # points), XLA on CPU would recompute them at each read
        coordinates = tuple(
            materialize(t, lambda t=t: ops.reshape(t, (-1,))[0] > -1e30) for t in coordinates
        )
    return ComposedMap(
        coordinates=tuple(coordinates),
        fill_mode=fill_mode,
        fill_value=fill_value,
        fills=tuple(fills),
        interpolation="linear" if linear else "nearest",
    )


def sample(volumes: Any, composed: ComposedMap, *, mask: bool = False) -> Any:
    """Read ``volumes`` (canonical ``(batch, x, y, z, c)``) once at ``composed``.

    Images get the composed interpolation and fill values; masks
    (``mask=True``) nearest-neighbour sampling and 0 wherever the image gets a
    fill value, keeping their dtype.
    """
    out = resample(
        volumes,
        composed.coordinates,
        interpolation="nearest" if mask else composed.interpolation,
        fill_mode=composed.fill_mode,
        fill_value=0.0 if mask else composed.fill_value,
    )
    for inside, fill_value in reversed(composed.fills):
        fill = ops.cast(0.0 if mask else fill_value, out.dtype)
        out = ops.where(ops.expand_dims(inside, -1), out, fill)
    return out
