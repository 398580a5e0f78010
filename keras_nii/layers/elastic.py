"""Random elastic deformation of 3D volumes, images and masks warped together.

A coarse grid of random displacement vectors (one grid per sample) is turned
into a smooth dense displacement field with a cubic B-spline, and every voxel
of the output takes its value from ``its own position + displacement`` in the
input. Images and segmentation masks are sampled through the *same* field
(masks with nearest-neighbour sampling, keeping their dtype), unlike Keras's 2D
``RandomElasticTransform``, which draws a different field for each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import ops

from keras_nii.layers.base import (
    VolumeLayer,
    check_choice,
    check_probability,
    check_spacing,
    register,
)
from keras_nii.ops.compose import CoordinateMap
from keras_nii.ops.resample import FILL_MODES, INTERPOLATIONS, resample

__all__ = ["RandomElasticDeformation3D", "dense_displacement"]


def _check_control_points(name: str, value: Any) -> tuple[int, int, int]:
    """An int >= 4, or three of them (one per axis)."""

    def ok(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 4

    if ok(value):
        return (int(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(ok(v) for v in value):
        return tuple(int(v) for v in value)
    raise ValueError(f"{name} must be an int >= 4 or three of them (x, y, z), got {value!r}")


def _check_displacement(name: str, value: Any) -> tuple[float, float, float]:
    """A number >= 0, or three of them (one per axis), in voxels."""

    def ok(v: Any) -> bool:
        return (
            isinstance(v, (int, float, np.integer, np.floating))
            and not isinstance(v, bool)
            and bool(np.isfinite(v))
            and v >= 0
        )

    if ok(value):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(ok(v) for v in value):
        return tuple(float(v) for v in value)
    raise ValueError(
        f"{name} must be a finite number >= 0 or three of them (x, y, z), got {value!r}"
    )


def _bspline_weights(size: Any, num_points: int) -> Any:
    """``(size, num_points + 2)`` cubic B-spline weights along one axis.

    Control point ``k`` (``0 <= k < num_points``) sits at voxel
    ``k * (size - 1) / (num_points - 1)``, so the grid spans the whole axis
    (corners aligned); columns 0 and ``num_points + 1`` are the extrapolated
    points ``-1`` and ``num_points``. Each row is non-negative and sums to 1.
    """
    n = ops.cast(size, "float32")
    step = float(num_points - 1) / ops.maximum(n - 1.0, 1.0)
    u = ops.arange(size, dtype="float32") * step
    knots = ops.arange(-1, num_points + 1, dtype="float32")
    t = ops.abs(u[:, None] - knots[None, :])
    inner = (4.0 - 6.0 * t * t + 3.0 * t * t * t) / 6.0
    outer = (2.0 - t) ** 3 / 6.0
    return ops.where(t < 1.0, inner, ops.where(t < 2.0, outer, ops.zeros_like(t)))


def _extend(grid: Any, axis: int, bound: Any) -> Any:
    """Add one linearly extrapolated control point at both ends of ``axis``.

    ``c[-1] = 2 c[0] - c[1]`` makes the spline pass through the border control
    points (so locked borders stay exactly at rest); the extrapolated values are
    clipped to the displacement bound so the field never exceeds it.
    """
    size = grid.shape[axis]

    def take(i: int) -> Any:
        return ops.take(grid, [i], axis=axis)

    first = ops.clip(2.0 * take(0) - take(1), -bound, bound)
    last = ops.clip(2.0 * take(size - 1) - take(size - 2), -bound, bound)
    return ops.concatenate([first, grid, last], axis=axis)


def dense_displacement(
    control_points: Any,
    spatial_shape: Sequence[Any],
    max_displacement: Sequence[float] | None = None,
) -> Any:
    """The dense displacement field of a coarse grid of control points.

    Evaluates the cubic B-spline with the given control displacements on every
    voxel (separably, three small matrix products). The grid spans the volume
    with its corner points on the corner voxels; beyond the grid the control
    points are extrapolated linearly (clipped to ``max_displacement``), so the
    field equals the border control points on the volume's faces.

    Args:
        control_points: ``(batch, gx, gy, gz, 3)`` displacements in voxels
            (``gx, gy, gz >= 2``).
        spatial_shape: the volume size ``(x, y, z)`` (ints or scalar tensors).
        max_displacement: per-axis bound used to clip the extrapolated points;
            by default the largest absolute control displacement per axis.

    Returns:
        ``(batch, x, y, z, 3)`` float32 displacements, in voxels. Every value is
        a convex combination of (clipped) control values, so the field stays
        within ``max_displacement``.
    """
    field = _displacement_components(control_points, spatial_shape, max_displacement)
    return ops.transpose(field, (0, 2, 3, 4, 1))


def _displacement_components(
    control_points: Any,
    spatial_shape: Sequence[Any],
    max_displacement: Sequence[float] | None = None,
) -> Any:
    """:func:`dense_displacement` as ``(batch, 3, x, y, z)``: one block per axis.

    The x axis is contracted first and z last, so that the last (and only
    large) product writes the field in this order directly; the resampler
    reads each component as a contiguous block. With z contracted first, the
    field came out with x fastest-varying and every read of it was strided:
    the elastic layer took twice as long (128^3, TensorFlow XLA on CPU).
    """
    grid = ops.cast(control_points, "float32")
    if max_displacement is None:
        bound = ops.max(ops.abs(grid), axis=(0, 1, 2, 3))
    else:
        bound = ops.convert_to_tensor(np.asarray(max_displacement, dtype="float32"))
    for axis in (1, 2, 3):
        grid = _extend(grid, axis, bound)
    wx, wy, wz = (
        _bspline_weights(size, int(points) - 2)
        for size, points in zip(spatial_shape, grid.shape[1:4], strict=True)
    )
    field = ops.einsum("bijkc,xi->bcxjk", grid, wx)
    field = ops.einsum("bcxjk,yj->bcxyk", field, wy)
    return ops.einsum("bcxyk,zk->bcxyz", field, wz)


@register
class RandomElasticDeformation3D(VolumeLayer):
    """Randomly deforms volumes with a smooth elastic displacement field.

    For each sample, a coarse grid of ``num_control_points`` displacement
    vectors is drawn, uniform in ``[-max_displacement, max_displacement]`` per
    axis (as TorchIO's ``RandomElasticDeformation``), in voxels, or in mm
    with ``spacing`` (the bound along axis ``a`` is then
    ``max_displacement[a] / spacing[a]`` voxels: on a 1 x 1 x 3 mm grid, 3 mm
    is 3 voxels in-plane and 1 across slices). A cubic
    B-spline through the grid (see :func:`dense_displacement`) gives a smooth
    (twice continuously differentiable) dense field; output voxel ``p`` takes
    its value from ``p + displacement(p)`` in the input. The control grid spans
    the whole volume, its corner points on the corner voxels, and the field
    never exceeds ``max_displacement``; neighbouring voxels' displacements
    differ by at most ``2 * max_displacement * (g - 1) / (size - 1)`` along an
    axis with ``g`` control points. To avoid folding, keep
    ``max_displacement`` below about half the control-point spacing
    ``(size - 1) / (g - 1)``.

    Images are sampled with ``interpolation``; segmentation masks go through
    the *same* field with nearest-neighbour sampling and keep their dtype. Points
    that land outside the volume are filled per ``fill_mode`` (masks use the
    same mode, with 0 for ``"constant"``).

    Args:
        num_control_points: control points per axis: an int >= 4 or three
            ints ``(gx, gy, gz)``.
        max_displacement: the largest displacement, in voxels (in mm with
            ``spacing``): a number >= 0 or three numbers (one per axis);
            ``(d, d, 0)`` keeps every voxel in its slice (thick slices along
            axis 2, nnU-Net's "dummy 2D" augmentation).
        locked_borders: if true (default), the control points on the grid's
            border do not move, so the volume's faces stay in place.
        interpolation: ``"linear"`` (default) or ``"nearest"``, for images.
        fill_mode: ``"nearest"`` (default), ``"constant"`` or ``"reflect"``.
        fill_value: the image value for ``fill_mode="constant"``.
        probability: the probability that a sample is deformed.
        spacing: ``None`` (default: ``max_displacement`` in voxels) or the
            voxel size in mm ``(sx, sy, sz)`` of the volumes.
        data_format: ``"channels_last"`` or ``"channels_first"``.
        seed: int seed of the random stream.

    Input shape:
        ``(x, y, z, c)`` or ``(batch, x, y, z, c)`` (channels last), or a dict
        of such tensors with the keys ``"images"`` and
        ``"segmentation_masks"``.

    Output shape:
        The input's shape (and dtype).

    Example:

    ```python
    import numpy as np
    from keras_nii.layers import RandomElasticDeformation3D

    layer = RandomElasticDeformation3D(num_control_points=6, max_displacement=3, seed=0)
    batch = {
        "images": np.random.rand(2, 32, 32, 32, 1).astype("float32"),
        "segmentation_masks": np.random.randint(0, 3, (2, 32, 32, 32, 1)),
    }
    out = layer(batch)  # the same deformation of each image and its mask
    ```
    """

    RANDOM = True
    SPATIAL = True

    def __init__(
        self,
        num_control_points: int | Sequence[int] = 7,
        max_displacement: float | Sequence[float] = 4.0,
        locked_borders: bool = True,
        interpolation: str = "linear",
        fill_mode: str = "nearest",
        fill_value: float = 0.0,
        probability: float = 1.0,
        spacing: Sequence[float] | None = None,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(data_format=data_format, seed=seed, **kwargs)
        self.num_control_points = _check_control_points("num_control_points", num_control_points)
        self.max_displacement = _check_displacement("max_displacement", max_displacement)
        if not isinstance(locked_borders, (bool, np.bool_)):
            raise ValueError(f"locked_borders must be True or False, got {locked_borders!r}")
        self.locked_borders = bool(locked_borders)
        self.interpolation = check_choice("interpolation", interpolation, INTERPOLATIONS)
        self.fill_mode = check_choice("fill_mode", fill_mode, FILL_MODES)
        if (
            isinstance(fill_value, bool)
            or not isinstance(fill_value, (int, float, np.integer, np.floating))
            or not np.isfinite(fill_value)
        ):
            raise ValueError(f"fill_value must be a finite number, got {fill_value!r}")
        self.fill_value = float(fill_value)
        self.probability = check_probability("probability", probability)
        self.spacing = check_spacing("spacing", spacing)
        # constants: the per-axis bound in voxels and the mask of movable control points
        bound = np.asarray(self.max_displacement, dtype="float64")
        if self.spacing is not None:
            bound = bound / np.asarray(self.spacing, dtype="float64")
        self._bound = bound.astype("float32")
        movable = np.ones(self.num_control_points, dtype="float32")
        if self.locked_borders:
            movable[[0, -1], :, :] = 0.0
            movable[:, [0, -1], :] = 0.0
            movable[:, :, [0, -1]] = 0.0
        self._movable = movable[..., None]

    def get_random_transformation(self, batch_size: Any, spatial_shape: Sequence[Any]) -> Any:
        """The coarse grid ``(batch, gx, gy, gz, 3)``, zero for samples left alone."""
        bound = ops.convert_to_tensor(self._bound)
        unit = self.uniform((batch_size, *self.num_control_points, 3), -1.0, 1.0)
        grid = unit * bound * ops.convert_to_tensor(self._movable)
        apply = self.coin(batch_size, self.probability)
        grid = ops.where(ops.reshape(apply, (-1, 1, 1, 1, 1)), grid, ops.zeros_like(grid))
        return {"control_points": grid}

    def _field(self, spatial: Sequence[Any], transformation: Any) -> Any:
        """The dense displacements ``(batch, 3, x, y, z)``, in voxels."""
        return _displacement_components(transformation["control_points"], spatial, self._bound)

    def coordinate_map(
        self, transformation: Any, spatial_shape: Sequence[Any], batch_size: Any
    ) -> CoordinateMap:
        """The draw as its dense displacement field (for ``Pipeline3D``)."""
        shape = tuple(spatial_shape)
        return CoordinateMap(
            shape,
            shape,
            displacement=self._field(shape, transformation),
            fill_mode=self.fill_mode,
            fill_value=self.fill_value,
            interpolation=self.interpolation,
        )

    def _coordinates(self, shape: Any, transformation: Any) -> tuple[Any, Any, Any]:
        spatial = shape[1:4]
        field = self._field(spatial, transformation)
        grids = (
            ops.reshape(ops.arange(spatial[0], dtype="float32"), (1, -1, 1, 1)),
            ops.reshape(ops.arange(spatial[1], dtype="float32"), (1, 1, -1, 1)),
            ops.reshape(ops.arange(spatial[2], dtype="float32"), (1, 1, 1, -1)),
        )
        return tuple(grids[axis] + field[:, axis] for axis in range(3))

    def transform_images(self, images: Any, transformation: Any) -> Any:
        coordinates = self._coordinates(ops.shape(images), transformation)
        return resample(
            images,
            coordinates,
            interpolation=self.interpolation,
            fill_mode=self.fill_mode,
            fill_value=self.fill_value,
        )

    def transform_segmentation_masks(self, masks: Any, transformation: Any) -> Any:
        coordinates = self._coordinates(ops.shape(masks), transformation)
        return resample(
            masks, coordinates, interpolation="nearest", fill_mode=self.fill_mode, fill_value=0.0
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "num_control_points": list(self.num_control_points),
                "max_displacement": list(self.max_displacement),
                "locked_borders": self.locked_borders,
                "interpolation": self.interpolation,
                "fill_mode": self.fill_mode,
                "fill_value": self.fill_value,
                "probability": self.probability,
                "spacing": None if self.spacing is None else list(self.spacing),
            }
        )
        return config
