"""Exact random flips and 90-degree rotations of 3D volumes.

Both layers only permute voxels (``ops.flip``, ``ops.transpose``, chosen per
sample with ``ops.where``): no interpolation, so images keep their values
bit for bit and segmentation masks keep their labels and dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import ops

from keras_nii.layers.base import (
    VolumeLayer,
    check_axes,
    check_probability,
    register,
)
from keras_nii.ops.compose import CoordinateMap, compose_matrices

__all__ = ["RandomFlip3D", "RandomRotation90_3D"]


def _per_sample(flags: Any) -> Any:
    """``(batch,)`` booleans, shaped to broadcast over a rank-5 batch."""
    return ops.reshape(flags, (-1, 1, 1, 1, 1))


def _flip_where(volumes: Any, flags: Any, axis: int) -> Any:
    """Flip spatial ``axis`` of the samples whose flag is true."""
    return ops.where(_per_sample(flags), ops.flip(volumes, axis=1 + axis), volumes)


@register
class RandomFlip3D(VolumeLayer):
    """Randomly flips 3D volumes along each chosen spatial axis, independently.

    Each sample of the batch gets its own draw, and each listed axis its own
    coin: axis ``a`` of sample ``i`` is reversed with probability
    ``probability``, independently of the other axes (unlike Keras's 2D
    ``RandomFlip("horizontal_and_vertical")``, which flips both axes or
    neither). With ``probability=0.5`` and the three axes, the 8 flip
    combinations are equally likely. Flipping is exact (no interpolation);
    segmentation masks are flipped identically and keep their dtype.

    Flipping axis 0 of a RAS+ volume swaps left and right: when the labels are
    lateralized (left/right structures), the flipped mask is still aligned
    with the flipped image, but "left" labels now lie on the right.

    Args:
        axes: the spatial axes that may be flipped, a subset of ``(0, 1, 2)``
            (NIfTI voxel axes x, y, z). Axes not listed are never flipped.
        probability: the probability that each listed axis is flipped, per
            sample and per axis, in ``[0, 1]``.
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
    layer = keras_nii.layers.RandomFlip3D(axes=(0, 1, 2), probability=0.5, seed=0)
    out = layer({"images": images, "segmentation_masks": masks})
    ```
    """

    RANDOM = True
    SPATIAL = True

    def __init__(
        self,
        axes: Sequence[int] = (0, 1, 2),
        probability: float = 0.5,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(data_format=data_format, seed=seed, **kwargs)
        self.axes = check_axes("axes", axes)
        self.probability = check_probability("probability", probability)

    def get_random_transformation(self, batch_size: Any, spatial_shape: Sequence[Any]) -> Any:
        """``{"flips": (batch, 3) bool}``: whether each axis of each sample flips."""
        draws = self.uniform((batch_size, 3)) < self.probability
        allowed = ops.convert_to_tensor([axis in self.axes for axis in range(3)])
        return {"flips": ops.logical_and(draws, allowed[None, :])}

    def _flip(self, volumes: Any, transformation: Any) -> Any:
        flips = transformation["flips"]
        for axis in self.axes:
            volumes = _flip_where(volumes, flips[:, axis], axis)
        return volumes

    def transform_images(self, images: Any, transformation: Any) -> Any:
        return self._flip(images, transformation)

    def coordinate_map(
        self, transformation: Any, spatial_shape: Sequence[Any], batch_size: Any
    ) -> CoordinateMap:
        """The draw as an exact index map: ``i_a = n_a - 1 - o_a`` on flipped axes."""
        flips = ops.cast(transformation["flips"], "float32")
        last = ops.stack([ops.cast(n, "float32") - 1.0 for n in spatial_shape])
        linear = (1.0 - 2.0 * flips)[:, :, None] * ops.eye(3, dtype="float32")[None]
        matrix = ops.concatenate([linear, (flips * last[None, :])[:, :, None]], axis=-1)
        shape = tuple(spatial_shape)
        return CoordinateMap(shape, shape, matrix=matrix, exact=True, onto=True, inside=True)

    def transform_segmentation_masks(self, masks: Any, transformation: Any) -> Any:
        return self._flip(masks, transformation)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"axes": list(self.axes), "probability": self.probability})
        return config


def _check_planes(name: str, value: Any) -> tuple[tuple[int, int], ...]:
    """Planes of rotation: distinct ordered pairs of distinct spatial axes."""
    error = ValueError(
        f"{name} must be a sequence of (axis, axis) pairs of distinct spatial axes "
        f"among (0, 1, 2), each plane at most once, got {value!r}"
    )
    if not isinstance(value, (list, tuple)) or not value:
        raise error
    if len(value) == 2 and all(isinstance(a, int) and not isinstance(a, bool) for a in value):
        value = (value,)  # a single plane given as one pair
    planes = []
    for plane in value:
        if not isinstance(plane, (list, tuple)) or len(plane) != 2:
            raise error
        try:
            a, b = check_axes(name, plane)
        except ValueError:
            raise error from None
        planes.append((a, b))
    if len({frozenset(plane) for plane in planes}) != len(planes):
        raise error
    return tuple(planes)


@register
class RandomRotation90_3D(VolumeLayer):
    """Randomly rotates 3D volumes by multiples of 90 degrees, exactly.

    For each sample, with probability ``probability``, a number of quarter
    turns ``k`` is drawn uniformly from ``{0, 1, 2, 3}`` for each plane of
    ``planes``, independently; the rotations are applied one plane after the
    other, in the order of ``planes``. Without the draw (probability
    ``1 - probability``) the sample is returned unchanged. The result is
    exactly NumPy's::

        for plane, k in zip(planes, ks[i]):
            volume = numpy.rot90(volume, k, axes=plane)

    i.e. a quarter turn in the plane ``(a, b)`` turns axis ``a`` towards axis
    ``b``. Rotations only permute voxels (flip and transpose, no
    interpolation); segmentation masks turn identically and keep their dtype.

    A quarter turn in the plane ``(a, b)`` swaps the lengths of axes ``a`` and
    ``b``, and each sample of a batch may turn differently, so the two axes of
    every chosen plane must have the same length (e.g. cubic patches for the
    three planes). This is checked when the shapes are known (a ``ValueError``
    naming the shape); with dynamic shapes a mismatch fails at run time.

    Args:
        planes: the planes of rotation, a sequence of pairs of spatial axes
            (NIfTI voxel axes 0, 1, 2), each plane at most once; the pair's
            order gives the direction of a quarter turn (as ``numpy.rot90``'s
            ``axes``) and the list's order the order of application.
            Default: ``((0, 1), (0, 2), (1, 2))``.
        probability: the probability that a sample is rotated at all, in
            ``[0, 1]``.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        seed: an int seed for the layer's random stream, or ``None``.
        **kwargs: base layer keyword arguments (``name``, ``dtype``...).

    Input shape:
        ``(batch, x, y, z, channels)`` or ``(x, y, z, channels)`` (channels
        first with ``data_format="channels_first"``), or a dict with the keys
        ``"images"`` and/or ``"segmentation_masks"`` of such tensors; the two
        axes of each plane of rotation of equal length.

    Output shape:
        Same as the input.

    Example:

    ```python
    # axial-plane quarter turns of 64^3 patches
    layer = keras_nii.layers.RandomRotation90_3D(planes=((0, 1),), seed=0)
    out = layer({"images": patches, "segmentation_masks": masks})
    ```
    """

    RANDOM = True
    SPATIAL = True

    def __init__(
        self,
        planes: Sequence[Sequence[int]] = ((0, 1), (0, 2), (1, 2)),
        probability: float = 1.0,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(data_format=data_format, seed=seed, **kwargs)
        self.planes = _check_planes("planes", planes)
        self.probability = check_probability("probability", probability)

    def _check_square(self, spatial_shape: Sequence[Any]) -> None:
        for a, b in self.planes:
            n_a, n_b = spatial_shape[a], spatial_shape[b]
            if isinstance(n_a, int) and isinstance(n_b, int) and n_a != n_b:
                raise ValueError(
                    f"{type(self).__name__} rotates in the plane of axes {(a, b)}, whose sizes "
                    f"must be equal; got the spatial shape {tuple(spatial_shape)}"
                )

    def compute_spatial_output_shape(self, spatial_shape: tuple) -> tuple:
        self._check_square(spatial_shape)
        return tuple(spatial_shape)

    def get_random_transformation(self, batch_size: Any, spatial_shape: Sequence[Any]) -> Any:
        """``{"k": (batch, len(planes)) int32}``: quarter turns per sample and plane."""
        k = ops.minimum(ops.floor(self.uniform((batch_size, len(self.planes)), 0.0, 4.0)), 3.0)
        k = ops.where(self.coin(batch_size, self.probability)[:, None], k, 0.0)
        return {"k": ops.cast(k, "int32")}

    def _rotate(self, volumes: Any, transformation: Any) -> Any:
        self._check_square(tuple(volumes.shape[1:4]))
        ks = transformation["k"]
        for index, (a, b) in enumerate(self.planes):
            k = ks[:, index]
            # rot90(x, k, (a, b)) = flips, then a swap of axes a and b when k is odd:
            # k=1: swap(flip_b x); k=2: flip_a flip_b x; k=3: swap(flip_a x)
            volumes = _flip_where(volumes, k >= 2, a)
            volumes = _flip_where(volumes, ops.logical_or(k == 1, k == 2), b)
            perm = list(range(5))
            perm[1 + a], perm[1 + b] = perm[1 + b], perm[1 + a]
            volumes = ops.where(_per_sample(k % 2 == 1), ops.transpose(volumes, perm), volumes)
        return volumes

    def transform_images(self, images: Any, transformation: Any) -> Any:
        return self._rotate(images, transformation)

    def coordinate_map(
        self, transformation: Any, spatial_shape: Sequence[Any], batch_size: Any
    ) -> CoordinateMap:
        """The draw as an exact index map, one integer matrix per sample.

        A quarter turn ``k`` in the plane ``(a, b)`` reads ``(i_a, i_b) =
        (c o_a + s o_b, -s o_a + c o_b)`` plus ``n - 1`` on the axes it
        reverses, with ``(c, s)`` = (1, 0), (0, 1), (-1, 0), (0, -1) for ``k``
        = 0..3; the planes turn one after the other, so the first plane's map
        is applied last.
        """
        self._check_square(tuple(spatial_shape))
        ks = transformation["k"]
        matrix = None
        for index, (a, b) in enumerate(self.planes):
            k = ks[:, index]
            cos = ops.cast(k == 0, "float32") - ops.cast(k == 2, "float32")
            sin = ops.cast(k == 1, "float32") - ops.cast(k == 3, "float32")
            last = ops.cast(spatial_shape[a], "float32") - 1.0
            e = np.eye(3, dtype="float32")
            keep = ops.convert_to_tensor(e - np.outer(e[a], e[a]) - np.outer(e[b], e[b]))
            same = ops.convert_to_tensor(np.outer(e[a], e[a]) + np.outer(e[b], e[b]))
            cross = ops.convert_to_tensor(np.outer(e[a], e[b]) - np.outer(e[b], e[a]))
            turn = cos[:, None, None] * same[None] + sin[:, None, None] * cross[None]
            offset = (
                ops.cast(k >= 2, "float32")[:, None] * ops.convert_to_tensor(e[a])[None]
                + ops.cast(ops.logical_or(k == 1, k == 2), "float32")[:, None]
                * ops.convert_to_tensor(e[b])[None]
            ) * last
            plane = ops.concatenate([keep[None] + turn, offset[:, :, None]], axis=-1)
            matrix = plane if matrix is None else compose_matrices(matrix, plane)
        shape = tuple(spatial_shape)
        return CoordinateMap(shape, shape, matrix=matrix, exact=True, onto=True, inside=True)

    def transform_segmentation_masks(self, masks: Any, transformation: Any) -> Any:
        return self._rotate(masks, transformation)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {"planes": [list(plane) for plane in self.planes], "probability": self.probability}
        )
        return config
