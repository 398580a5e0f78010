"""Random 3D affine augmentation: rotation, zoom, shear and translation.

Every draw is composed into one affine map per sample and applied with one
resampling pass (:mod:`keras_nii.ops.resample`), so a rotation plus a zoom
interpolates once, not twice.

Conventions (all in voxel index space, NIfTI voxel axes 0, 1, 2 = x, y, z):

- The drawn transform is the *forward* map, input position -> output
  position, about the volume centre ``c = (n - 1) / 2``::

      y = c + R @ Z @ S @ (x - c) + t

  i.e. the volume is sheared (``S``), then scaled (``Z``), then rotated
  (``R = Rz @ Ry @ Rx``: about axis 0 first, then axis 1, then axis 2), then
  translated by ``t`` voxels. A zoom factor above 1 makes the content bigger;
  a translation of ``+2`` along axis 0 moves a voxel from ``i`` to ``i + 2``.
- The resampler wants the output -> input map, so the layer samples the input
  at ``x = c + A^-1 @ (y - c - t)`` with ``A = R @ Z @ S`` (inverted in closed
  form).
- Rotations are right-handed: a positive angle about axis 2 turns axis 0
  towards axis 1, about axis 0 turns axis 1 towards axis 2, about axis 1 turns
  axis 2 towards axis 0::

      Rx = [[1, 0, 0], [0, cos, -sin], [0, sin, cos]]
      Ry = [[cos, 0, sin], [0, 1, 0], [-sin, 0, cos]]
      Rz = [[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]]

- Shear is three angles, for the planes (0, 1), (0, 2) and (1, 2)::

      S = [[1, tan(s01), tan(s02)], [0, 1, tan(s12)], [0, 0, 1]]

  (``x0' = x0 + tan(s01) x1 + tan(s02) x2``, ``x1' = x1 + tan(s12) x2``).
  With the rotation and the per-axis scales, this upper-triangular form
  reaches every orientation-preserving linear map (a QR decomposition).

Physical units: with ``spacing=(sx, sy, sz)`` (mm per voxel along axes 0, 1,
2) the same forward map is drawn in millimetres about the same centre, so
rotations and shears are true angles on an anisotropic grid and ``t`` is in
mm. In index space, with ``D = diag(spacing)``, the linear part becomes
``D^-1 @ A @ D`` and the translation ``D^-1 @ t``; the zoom, diagonal,
commutes with ``D`` and is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import ops

from keras_nii.layers.base import (
    VolumeLayer,
    check_bool,
    check_choice,
    check_number,
    check_per_axis_range,
    check_probability,
    check_spacing,
    register,
)
from keras_nii.ops.compose import CoordinateMap
from keras_nii.ops.resample import (
    FILL_MODES,
    INTERPOLATIONS,
    affine_coordinates,
    centered,
    resample,
)

__all__ = ["RandomAffine3D", "RandomRotation3D", "RandomZoom3D", "RandomTranslation3D"]

Ranges = tuple[tuple[float, float], tuple[float, float], tuple[float, float]]


# ----------------------------------------------------------------------------
# argument parsing


def _check_scales(name: str, value: Any) -> Ranges:
    """Zoom factor ranges: ``s`` -> ``(1 - s, 1 + s)``, or ``(low, high)`` factors > 0."""
    ranges = check_per_axis_range(name, value, symmetric_about=1.0)
    for low, _ in ranges:
        if low <= 0:
            raise ValueError(f"{name} must give zoom factors > 0, got {value!r}")
    return ranges


def _check_shear(name: str, value: Any) -> Ranges:
    ranges = check_per_axis_range(name, value)
    for low, high in ranges:
        if low <= -90 or high >= 90:
            raise ValueError(
                f"{name} angles must lie strictly within (-90, 90) degrees, got {value!r}"
            )
    return ranges


def _as_list(ranges: Ranges) -> list[list[float]]:
    return [list(r) for r in ranges]


# ----------------------------------------------------------------------------
# matrices, with keras.ops, batched


def _matrix(rows: Sequence[Sequence[Any]]) -> Any:
    """``(batch, 3, 3)`` from nine ``(batch,)`` entries."""
    return ops.stack([ops.stack(list(row), axis=-1) for row in rows], axis=-2)


def rotation_matrix(angles: Any) -> Any:
    """``R = Rz @ Ry @ Rx`` from ``(batch, 3)`` angles in radians (see the module doc)."""
    cos, sin = ops.cos(angles), ops.sin(angles)
    one, zero = ops.ones_like(angles[:, 0]), ops.zeros_like(angles[:, 0])
    cx, cy, cz = cos[:, 0], cos[:, 1], cos[:, 2]
    sx, sy, sz = sin[:, 0], sin[:, 1], sin[:, 2]
    rx = _matrix([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
    ry = _matrix([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rz = _matrix([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
    return ops.matmul(rz, ops.matmul(ry, rx))


def inverse_shear_matrix(shears: Any) -> Any:
    """``S^-1`` for ``(batch, 3)`` shear angles ``(s01, s02, s12)`` in radians."""
    t = ops.tan(shears)
    a, c, b = t[:, 0], t[:, 1], t[:, 2]  # S = [[1, a, c], [0, 1, b], [0, 0, 1]]
    one, zero = ops.ones_like(a), ops.zeros_like(a)
    return _matrix([[one, -a, a * b - c], [zero, one, -b], [zero, zero, one]])


def inverse_affine_matrices(
    angles: Any,
    scales: Any,
    shears: Any,
    translations: Any,
    spatial_shape: Sequence[Any],
    spacing: Sequence[float] | None = None,
) -> Any:
    """The resampler's ``(batch, 3, 4)`` output -> input matrices of the forward map
    ``y = c + Rz Ry Rx Z S (x - c) + t`` (angles and shears in radians, scales as
    factors, translations in voxels, all ``(batch, 3)``).

    With ``spacing`` (mm per voxel, three numbers) the map is one in
    millimetres (translations in mm): the index-space matrices are
    ``D^-1 A^-1 D`` with ``D = diag(spacing)`` (see the module docstring)."""
    rotation_t = ops.transpose(rotation_matrix(angles), (0, 2, 1))
    # A^-1 = S^-1 @ Z^-1 @ R^T; Z^-1 @ R^T scales the rows of R^T
    linear = ops.matmul(inverse_shear_matrix(shears), rotation_t / scales[:, :, None])
    if spacing is not None:
        # D^-1 L D: entry (i, j) times spacing[j] / spacing[i]; mm -> voxels
        size = ops.convert_to_tensor(np.asarray(spacing, dtype="float32"))
        linear = linear * (size[None, None, :] / size[None, :, None])
        translations = translations / size[None, :]
    matrices = centered(linear, spatial_shape)  # x = c + A^-1 (y - c)
    offset = matrices[:, :, 3] - ops.einsum("bij,bj->bi", linear, translations)
    return ops.concatenate([matrices[:, :, :3], offset[:, :, None]], axis=-1)


# ----------------------------------------------------------------------------


@register
class RandomAffine3D(VolumeLayer):
    """Randomly rotates, zooms, shears and translates 3D volumes, in one pass.

    Each sample of the batch gets its own draw of every parameter, uniform in
    its range. Rotation, zoom and shear are composed, about the volume centre,
    into one affine map together with the translation (see the module
    docstring for the exact matrix convention)::

        y = c + Rz @ Ry @ Rx @ Z @ S @ (x - c) + t,   c = (n - 1) / 2

    and the volume is resampled once through it. Segmentation masks are
    resampled at the very same coordinates with nearest-neighbour sampling,
    the same ``fill_mode`` and background 0 where ``fill_mode="constant"``;
    they keep their dtype.

    Without ``spacing`` every parameter is in voxel units: on an anisotropic
    grid a rotation is then a rotation of the voxel grid (a 30 degree turn
    in a plane of 1 mm x 3 mm voxels is not 30 degrees in the body) and
    ``translation`` is in voxels. With ``spacing=(sx, sy, sz)``, the voxel
    size of the volumes the layer gets (e.g. the plan's ``target_spacing``),
    rotations and shears are physical angles and ``translation`` is in mm
    (``D^-1 A D`` in index space, ``D = diag(spacing)``).

    For strongly anisotropic data (the thick axis over 3x the thin ones),
    keep the transform in the slice plane, as nnU-Net's "dummy 2D"
    augmentation does: with thick slices along axis 2, rotate about axis 2
    only (``degrees=(0, 0, 180)``), shear in the plane (0, 1) only
    (``shear=(5, 0, 0)``), do not zoom or shift along axis 2
    (``scales=(0.15, 0.15, 0), isotropic=False``, ``translation=(t, t, 0)``):
    every output voxel then samples its own slice, and nothing is
    interpolated across the thick axis.

    Args:
        degrees: rotation angles in degrees about axes 0, 1 and 2 (right
            handed: a positive angle about axis 2 turns axis 0 towards axis
            1). A number ``d`` draws each angle in ``(-d, d)``; a pair
            ``(low, high)`` is the range for the three axes; three numbers or
            pairs give one range per axis.
        scales: zoom factors; above 1 the content gets bigger. A number
            ``s`` means ``(1 - s, 1 + s)``; a pair ``(low, high)`` of factors
            (> 0); or three numbers or pairs, one per axis. Default 0: no zoom.
        translation: shift along each axis, in voxels (in mm with
            ``spacing``; positive: towards higher indices). A number ``t``
            means ``(-t, t)``; a pair; or per axis.
        shear: shear angles in degrees, for the planes (0, 1), (0, 2) and
            (1, 2) (``x0 += tan(s01) x1 + tan(s02) x2``, ``x1 += tan(s12) x2``).
            A number ``d`` means ``(-d, d)`` for the three; a pair; or three
            numbers or pairs, one per plane in that order. Within (-90, 90).
        interpolation: ``"linear"`` (trilinear) or ``"nearest"``, for the
            images; masks always use nearest.
        fill_mode: how points outside the input are filled: ``"constant"``,
            ``"nearest"`` (edge voxels repeated) or ``"reflect"`` (mirrored
            about the edge, as ``scipy.ndimage``'s ``"reflect"``).
        fill_value: the image value for ``fill_mode="constant"`` (masks get 0).
        isotropic: if true, one zoom factor is drawn per sample for the three
            axes (``scales`` must then be one range).
        probability: the probability that a sample is transformed at all, in
            ``[0, 1]``; the others are returned unchanged.
        spacing: ``None`` (default: voxel units) or the voxel size in mm
            ``(sx, sy, sz)`` of the volumes: rotation and shear angles are
            then physical and ``translation`` is in mm.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        seed: an int seed for the layer's random stream, or ``None``.
        **kwargs: base layer keyword arguments (``name``, ``dtype``...).

    Input shape:
        ``(batch, x, y, z, channels)`` or ``(x, y, z, channels)`` (channels
        first with ``data_format="channels_first"``), or a dict with the keys
        ``"images"`` and/or ``"segmentation_masks"`` of such tensors.

    Output shape:
        Same as the input.

    Example:

    ```python
    layer = keras_nii.layers.RandomAffine3D(
        degrees=10, scales=(0.9, 1.2), translation=4, shear=5, seed=0
    )
    out = layer({"images": images, "segmentation_masks": masks})
    ```
    """

    RANDOM = True
    SPATIAL = True
    #: the constructor arguments that get_config records
    _ARGUMENTS = (
        "degrees",
        "scales",
        "translation",
        "shear",
        "interpolation",
        "fill_mode",
        "fill_value",
        "isotropic",
        "probability",
        "spacing",
    )

    def __init__(
        self,
        degrees: Any = 0.0,
        scales: Any = 0.0,
        translation: Any = 0.0,
        shear: Any = 0.0,
        interpolation: str = "linear",
        fill_mode: str = "constant",
        fill_value: float = 0.0,
        isotropic: bool = False,
        probability: float = 1.0,
        spacing: Sequence[float] | None = None,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(data_format=data_format, seed=seed, **kwargs)
        self.degrees = check_per_axis_range("degrees", degrees)
        self.scales = _check_scales("scales", scales)
        self.translation = check_per_axis_range("translation", translation)
        self.shear = _check_shear("shear", shear)
        self.interpolation = check_choice("interpolation", interpolation, INTERPOLATIONS)
        self.fill_mode = check_choice("fill_mode", fill_mode, FILL_MODES)
        self.fill_value = check_number("fill_value", fill_value)
        self.isotropic = check_bool("isotropic", isotropic)
        if self.isotropic and len(set(self.scales)) != 1:
            raise ValueError(
                f"isotropic=True draws one zoom factor for all axes: scales must be one "
                f"range, got {scales!r}"
            )
        self.probability = check_probability("probability", probability)
        self.spacing = check_spacing("spacing", spacing)

    def _draw(self, batch_size: Any, ranges: Ranges, one: bool = False) -> Any:
        """``(batch, 3)`` uniform draws in per-axis ranges (one for all if ``one``)."""
        low = ops.convert_to_tensor([r[0] for r in ranges], dtype="float32")
        high = ops.convert_to_tensor([r[1] for r in ranges], dtype="float32")
        u = self.uniform((batch_size, 1 if one else 3))
        return low[None, :] + u * (high - low)[None, :]

    def get_random_transformation(self, batch_size: Any, spatial_shape: Sequence[Any]) -> Any:
        """One affine map per sample.

        Returns a dict with ``"matrices"``, the ``(batch, 3, 4)`` output ->
        input matrices of :func:`keras_nii.ops.affine_coordinates`, and
        ``"coordinates"``, the source coordinates they give on
        ``spatial_shape``, computed once and shared by images and masks.
        """
        to_radians = math.pi / 180.0
        angles = self._draw(batch_size, self.degrees) * to_radians
        scales = self._draw(batch_size, self.scales, one=self.isotropic)
        scales = ops.broadcast_to(scales, ops.shape(angles))
        translations = self._draw(batch_size, self.translation)
        shears = self._draw(batch_size, self.shear) * to_radians
        apply = self.coin(batch_size, self.probability)[:, None]
        angles = ops.where(apply, angles, 0.0)
        scales = ops.where(apply, scales, 1.0)
        translations = ops.where(apply, translations, 0.0)
        shears = ops.where(apply, shears, 0.0)
        matrices = inverse_affine_matrices(
            angles, scales, shears, translations, spatial_shape, spacing=self.spacing
        )
        return {
            "matrices": matrices,
            "coordinates": affine_coordinates(matrices, spatial_shape),
        }

    def transform_images(self, images: Any, transformation: Any) -> Any:
        return resample(
            images,
            transformation["coordinates"],
            interpolation=self.interpolation,
            fill_mode=self.fill_mode,
            fill_value=self.fill_value,
        )

    def transform_segmentation_masks(self, masks: Any, transformation: Any) -> Any:
        return resample(
            masks,
            transformation["coordinates"],
            interpolation="nearest",
            fill_mode=self.fill_mode,
            fill_value=0,
        )

    def coordinate_map(
        self, transformation: Any, spatial_shape: Sequence[Any], batch_size: Any
    ) -> CoordinateMap:
        """The draw as its ``(batch, 3, 4)`` output -> input matrices (for ``Pipeline3D``)."""
        shape = tuple(spatial_shape)
        return CoordinateMap(
            shape,
            shape,
            matrix=transformation["matrices"],
            fill_mode=self.fill_mode,
            fill_value=self.fill_value,
            interpolation=self.interpolation,
        )

    def _config_value(self, name: str) -> Any:
        value = getattr(self, name)
        if name in ("degrees", "scales", "translation", "shear"):
            return _as_list(value)
        if name == "spacing":
            return None if value is None else list(value)
        return value

    def get_config(self) -> dict:
        config = VolumeLayer.get_config(self)
        config.update({name: self._config_value(name) for name in self._ARGUMENTS})
        return config


@register
class RandomRotation3D(RandomAffine3D):
    """Randomly rotates 3D volumes about their centre.

    :class:`RandomAffine3D` with rotation only: each sample gets its own
    angles about axes 0, 1 and 2, composed as ``Rz @ Ry @ Rx`` (about axis 0
    first), right handed (a positive angle about axis 2 turns axis 0
    towards axis 1), in voxel index space or, with ``spacing``, in mm. One
    resampling pass; masks follow with
    nearest-neighbour sampling and keep their dtype.

    Args:
        degrees: rotation angles in degrees. A number ``d`` draws each angle
            in ``(-d, d)``; a pair ``(low, high)`` is the range for the three
            axes; three numbers or pairs give one range per axis (``0`` for
            no rotation about that axis).
        interpolation: ``"linear"`` (trilinear) or ``"nearest"``, for the
            images; masks always use nearest.
        fill_mode: ``"constant"``, ``"nearest"`` or ``"reflect"``: how points
            outside the input are filled.
        fill_value: the image value for ``fill_mode="constant"`` (masks get 0).
        probability: the probability that a sample is transformed, in
            ``[0, 1]``.
        spacing: ``None`` (voxel units) or the voxel size in mm ``(sx, sy,
            sz)``: the angles are then physical angles, on any grid.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        seed: an int seed for the layer's random stream, or ``None``.
        **kwargs: base layer keyword arguments (``name``, ``dtype``...).

    Input shape:
        ``(batch, x, y, z, channels)`` or ``(x, y, z, channels)``, or a dict
        with the keys ``"images"`` and/or ``"segmentation_masks"``.

    Output shape:
        Same as the input.

    Example:

    ```python
    # up to 15 degrees about the z axis only
    layer = keras_nii.layers.RandomRotation3D(degrees=(0, 0, 15), seed=0)
    out = layer({"images": images, "segmentation_masks": masks})
    ```
    """

    _ARGUMENTS = ("degrees", "interpolation", "fill_mode", "fill_value", "probability", "spacing")

    def __init__(
        self,
        degrees: Any,
        interpolation: str = "linear",
        fill_mode: str = "constant",
        fill_value: float = 0.0,
        probability: float = 1.0,
        spacing: Sequence[float] | None = None,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            degrees=degrees,
            interpolation=interpolation,
            fill_mode=fill_mode,
            fill_value=fill_value,
            probability=probability,
            spacing=spacing,
            data_format=data_format,
            seed=seed,
            **kwargs,
        )


@register
class RandomZoom3D(RandomAffine3D):
    """Randomly zooms 3D volumes about their centre.

    :class:`RandomAffine3D` with scaling only: a factor above 1 makes the
    content bigger (zoom in), below 1 smaller. The output keeps the input's
    shape. One resampling pass; masks follow with nearest-neighbour sampling
    and keep their dtype.

    Args:
        scales: zoom factors. A number ``s`` means ``(1 - s, 1 + s)``; a pair
            ``(low, high)`` of factors (> 0); or, with ``isotropic=False``,
            three numbers or pairs, one per axis.
        isotropic: if true (default), one factor per sample for the three
            axes; else one per axis.
        interpolation: ``"linear"`` (trilinear) or ``"nearest"``, for the
            images; masks always use nearest.
        fill_mode: ``"constant"``, ``"nearest"`` or ``"reflect"``: how points
            outside the input are filled.
        fill_value: the image value for ``fill_mode="constant"`` (masks get 0).
        probability: the probability that a sample is transformed, in
            ``[0, 1]``.
        spacing: ``None`` or the voxel size in mm, accepted as by the other
            affine layers; a zoom along the voxel axes is the same in mm and
            in voxels, so it changes nothing.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        seed: an int seed for the layer's random stream, or ``None``.
        **kwargs: base layer keyword arguments (``name``, ``dtype``...).

    Input shape:
        ``(batch, x, y, z, channels)`` or ``(x, y, z, channels)``, or a dict
        with the keys ``"images"`` and/or ``"segmentation_masks"``.

    Output shape:
        Same as the input.

    Example:

    ```python
    layer = keras_nii.layers.RandomZoom3D(scales=(0.8, 1.25), seed=0)
    out = layer({"images": images, "segmentation_masks": masks})
    ```
    """

    _ARGUMENTS = (
        "scales",
        "isotropic",
        "interpolation",
        "fill_mode",
        "fill_value",
        "probability",
        "spacing",
    )

    def __init__(
        self,
        scales: Any,
        isotropic: bool = True,
        interpolation: str = "linear",
        fill_mode: str = "constant",
        fill_value: float = 0.0,
        probability: float = 1.0,
        spacing: Sequence[float] | None = None,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            scales=scales,
            isotropic=isotropic,
            interpolation=interpolation,
            fill_mode=fill_mode,
            fill_value=fill_value,
            probability=probability,
            spacing=spacing,
            data_format=data_format,
            seed=seed,
            **kwargs,
        )


@register
class RandomTranslation3D(RandomAffine3D):
    """Randomly shifts 3D volumes by a number of voxels.

    :class:`RandomAffine3D` with translation only: a shift of ``+t`` along an
    axis moves the voxel at index ``i`` to ``i + t`` (fractional shifts are
    interpolated). Shifts are in voxels, or in mm with ``spacing``. One
    resampling pass; masks follow with nearest-neighbour sampling and keep
    their dtype.

    Args:
        translation: shift in voxels. A number ``t`` means ``(-t, t)`` on each
            axis; a pair ``(low, high)`` for the three axes; or three numbers
            or pairs, one per axis.
        interpolation: ``"linear"`` (trilinear) or ``"nearest"``, for the
            images; masks always use nearest.
        fill_mode: ``"constant"``, ``"nearest"`` or ``"reflect"``: how points
            outside the input are filled.
        fill_value: the image value for ``fill_mode="constant"`` (masks get 0).
        probability: the probability that a sample is transformed, in
            ``[0, 1]``.
        spacing: ``None`` (shifts in voxels) or the voxel size in mm ``(sx,
            sy, sz)``: ``translation`` is then in mm.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        seed: an int seed for the layer's random stream, or ``None``.
        **kwargs: base layer keyword arguments (``name``, ``dtype``...).

    Input shape:
        ``(batch, x, y, z, channels)`` or ``(x, y, z, channels)``, or a dict
        with the keys ``"images"`` and/or ``"segmentation_masks"``.

    Output shape:
        Same as the input.

    Example:

    ```python
    layer = keras_nii.layers.RandomTranslation3D(translation=(8, 8, 4), seed=0)
    out = layer({"images": images, "segmentation_masks": masks})
    ```
    """

    _ARGUMENTS = (
        "translation",
        "interpolation",
        "fill_mode",
        "fill_value",
        "probability",
        "spacing",
    )

    def __init__(
        self,
        translation: Any,
        interpolation: str = "linear",
        fill_mode: str = "constant",
        fill_value: float = 0.0,
        probability: float = 1.0,
        spacing: Sequence[float] | None = None,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            translation=translation,
            interpolation=interpolation,
            fill_mode=fill_mode,
            fill_value=fill_value,
            probability=probability,
            spacing=spacing,
            data_format=data_format,
            seed=seed,
            **kwargs,
        )
