"""Spatial size: center crop or pad, resize, and random (foreground-aware) patches.

- :class:`CenterCropOrPad3D` and :class:`Resize3D` are deterministic: they
  apply at training and inference time alike, to bring volumes of any size to
  the size a network expects.
- :class:`RandomCrop3D` draws one random patch per sample for patch-based
  training, optionally centred on the segmentation's foreground.

Images and their segmentation masks always get the same window; masks keep
their dtype (nearest-neighbour sampling in :class:`Resize3D`, fill 0 when
padding). All three work with dynamic (``None``) spatial sizes under
TensorFlow graph tracing, and under XLA and JAX.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from keras_nii.layers.base import (
    MASKS,
    VolumeLayer,
    check_choice,
    check_probability,
    check_shape,
    register,
)
from keras_nii.ops.compose import CoordinateMap
from keras_nii.ops.resample import affine_coordinates, resample, resize_matrix

__all__ = ["CenterCropOrPad3D", "Resize3D", "RandomCrop3D"]


def _check_fill(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _is_static(size: Any) -> bool:
    return isinstance(size, int)


def _center_window(size: Any, target: int) -> tuple[Any, Any, Any]:
    """``(pad_before, pad_after, crop_start)`` along one axis.

    The convention of ``keras_nii.data``: crop start ``(size - target) // 2``,
    pad before ``(target - size) // 2`` and after the rest. ``size`` is an int
    or, under graph tracing, a scalar tensor.
    """
    if _is_static(size):
        pad = max(target - size, 0)
        return pad // 2, pad - pad // 2, max(size - target, 0) // 2
    size = ops.cast(size, "int32")
    pad = ops.maximum(target - size, 0)
    before = pad // 2
    return before, pad - before, ops.maximum(size - target, 0) // 2


def _pad_to_at_least(volumes: Any, shape: Sequence[int], fill: Any) -> Any:
    """Pad ``(b, x, y, z, c)`` centrally so that each spatial axis is >= ``shape``."""
    windows = [_center_window(s, t) for s, t in zip(ops.shape(volumes)[1:4], shape, strict=True)]
    if all(_is_static(before) and before == 0 and after == 0 for before, after, _ in windows):
        return volumes
    paddings = [[0, 0]] + [[before, after] for before, after, _ in windows] + [[0, 0]]
    return ops.pad(volumes, paddings, mode="constant", constant_values=fill)


def _gather_windows(volumes: Any, starts: Any, shape: Sequence[int], fill: Any = None) -> Any:
    """Each sample's window of spatial ``shape`` from ``(b, x, y, z, c)``, by one gather.

    Output voxel ``o`` of sample ``n`` reads input voxel ``o + starts[n]``
    (``starts``: ``(b, 3)`` int32). With ``fill=None`` every window must lie
    inside the volume; otherwise reads outside it are clipped to the border
    and then replaced by ``fill``, so no pad is needed.
    """
    full = ops.shape(volumes)
    batch, channels = full[0], full[4]
    sizes = [ops.cast(s, "int32") for s in full[1:4]]
    starts = ops.cast(starts, "int32")
    index, inside = [], None
    for axis, target in enumerate(shape):
        view = [1, 1, 1]
        view[axis] = -1
        at = ops.reshape(starts[:, axis], (-1, 1, 1, 1)) + ops.reshape(
            ops.arange(target, dtype="int32"), (1, *view)
        )
        if fill is not None:
            valid = ops.logical_and(at >= 0, at < sizes[axis])
            inside = valid if inside is None else ops.logical_and(inside, valid)
            at = ops.clip(at, 0, sizes[axis] - 1)
        index.append(at)
    base = ops.reshape(ops.arange(batch, dtype="int32"), (-1, 1, 1, 1)) * (
        sizes[0] * sizes[1] * sizes[2]
    )
    flat = base + (index[0] * sizes[1] + index[1]) * sizes[2] + index[2]
    # a 2D take along axis 0: PyTorch's exporter knows it (an embedding lookup)
    values = ops.take(ops.reshape(volumes, (-1, channels)), ops.reshape(flat, (-1,)), axis=0)
    values = ops.reshape(values, (batch, *shape, channels))
    if fill is None:
        return values
    return ops.where(inside[..., None], values, ops.cast(fill, volumes.dtype))


def _take_center(volumes: Any, shape: Sequence[int], fill: Any) -> Any:
    """:func:`_center_crop_or_pad` as one take per axis and a select, without a pad.

    For JAX's symbolic sizes (an ONNX export through jax2onnx, which also
    cannot reshape to -1 or index a range of symbolic length).
    """
    inside = None
    for axis, target in enumerate(shape, start=1):
        size = ops.shape(volumes)[axis]
        before, _, start = _center_window(size, target)
        at = ops.arange(0, target, dtype="int32") + ops.cast(start - before, "int32")
        size = ops.cast(size, "int32")
        view = [1, 1, 1, 1, 1]
        view[axis] = target
        valid = ops.reshape(ops.logical_and(at >= 0, at < size), view)
        inside = valid if inside is None else ops.logical_and(inside, valid)
        volumes = ops.take(volumes, ops.clip(at, 0, size - 1), axis=axis)
    return ops.where(inside, volumes, ops.cast(fill, volumes.dtype))


def _center_crop_or_pad(volumes: Any, shape: Sequence[int], fill: Any) -> Any:
    """Center crop or pad ``(b, x, y, z, c)`` to the spatial ``shape``.

    Under PyTorch, one gather (:func:`_gather_windows`) instead of a pad and
    a slice: ``torch.onnx`` exports a pad of dynamic widths as int32 widths
    concatenated with int64 zeros, a graph ONNX Runtime refuses to load.
    Under JAX with symbolic sizes (an export), a take per axis: JAX pads
    only by static widths.
    """
    sizes = ops.shape(volumes)[1:4]
    if all(_is_static(s) and s == t for s, t in zip(sizes, shape, strict=True)):
        return volumes
    backend = keras.backend.backend()
    if backend == "jax" and not all(map(_is_static, sizes)):
        return _take_center(volumes, shape, fill)
    if backend == "torch":
        offsets = [start - before for before, _, start in map(_center_window, sizes, shape)]
        starts = ops.broadcast_to(_as_vector(offsets, "int32")[None, :], (ops.shape(volumes)[0], 3))
        return _gather_windows(volumes, starts, shape, fill)
    volumes = _pad_to_at_least(volumes, shape, fill)
    starts = [_center_window(s, t)[2] for s, t in zip(sizes, shape, strict=True)]
    full = ops.shape(volumes)
    # explicit sizes: "-1 = to the end" is not understood by every backend (torch)
    return ops.slice(volumes, [0, *starts, 0], [full[0], *shape, full[4]])


def _as_vector(values: Sequence[Any], dtype: str) -> Any:
    """A 1D tensor from ints and/or scalar tensors."""
    return ops.stack([ops.cast(v, dtype) for v in values])


def _window_map(
    starts: Any, spatial_shape: Sequence[Any], shape: Sequence[int], fill_value: float
) -> CoordinateMap:
    """A crop (and pad) as an exact map: output ``o`` reads input ``o + starts``.

    ``starts`` is ``(batch, 3)``, in input indices (negative where padding
    comes first); the map is inside the input when nothing is padded.
    """
    batch = ops.shape(starts)[0]
    eye = ops.broadcast_to(ops.eye(3, dtype="float32")[None], (batch, 3, 3))
    matrix = ops.concatenate([eye, ops.cast(starts, "float32")[:, :, None]], axis=-1)
    pads = not all(_is_static(s) and s >= t for s, t in zip(spatial_shape, shape, strict=True))
    return CoordinateMap(
        tuple(spatial_shape),
        tuple(shape),
        matrix=matrix,
        exact=True,
        inside=not pads,
        fill_value=fill_value,
    )


# ----------------------------------------------------------------------------


@register
class CenterCropOrPad3D(VolumeLayer):
    """Center crop or pad every volume to a fixed spatial shape.

    Each spatial axis independently is cropped (when larger than the target)
    or padded with a constant (when smaller), centred: the crop starts at
    ``(size - target) // 2`` and the padding puts ``(target - size) // 2``
    voxels before and the rest after (the convention of ``keras_nii.data``).
    Deterministic: it applies at inference too. Segmentation masks get the
    same window and are padded with 0.

    Args:
        shape: the target spatial shape ``(x, y, z)``.
        fill_value: the value images are padded with.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        **kwargs: passed to ``keras.layers.Layer``.

    Input shape:
        ``(batch, x, y, z, channels)`` or ``(x, y, z, channels)`` (channels
        last), or a dict with ``"images"`` and ``"segmentation_masks"``.
        Spatial sizes may be dynamic (``None``).

    Output shape:
        ``(batch, *shape, channels)``; dtypes are kept.

    Example:

    ```python
    layer = keras_nii.layers.CenterCropOrPad3D((96, 96, 64))
    out = layer({"images": images, "segmentation_masks": labels})
    ```
    """

    SPATIAL = True

    def __init__(
        self,
        shape: Sequence[int],
        fill_value: float = 0.0,
        data_format: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(data_format=data_format, **kwargs)
        self.shape = check_shape("shape", shape)
        self.fill_value = _check_fill("fill_value", fill_value)

    def transform_images(self, images: Any, transformation: Any) -> Any:
        return _center_crop_or_pad(images, self.shape, self.fill_value)

    def transform_segmentation_masks(self, masks: Any, transformation: Any) -> Any:
        return _center_crop_or_pad(masks, self.shape, 0)

    def compute_spatial_output_shape(self, spatial_shape: tuple) -> tuple:
        return tuple(self.shape)

    def coordinate_map(
        self, transformation: Any, spatial_shape: Sequence[Any], batch_size: Any
    ) -> CoordinateMap:
        """The window as an exact map (for ``Pipeline3D``); pads take ``fill_value``."""
        windows = [_center_window(s, t) for s, t in zip(spatial_shape, self.shape, strict=True)]
        offsets = _as_vector([start - before for before, _, start in windows], "int32")
        starts = ops.broadcast_to(offsets[None, :], (batch_size, 3))
        return _window_map(starts, spatial_shape, self.shape, self.fill_value)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(shape=tuple(self.shape), fill_value=self.fill_value)
        return config


@register
class Resize3D(VolumeLayer):
    """Resample every volume to a fixed spatial shape.

    Output voxel ``o`` samples the input at ``(o + 0.5) * size / target -
    0.5`` along each axis (voxel corners aligned, the convention of
    ``tf.image.resize`` and ``jax.image.resize``), with trilinear or
    nearest-neighbour interpolation; points beyond the outermost voxel
    centres repeat the edge voxels. No antialiasing when shrinking.
    Deterministic: it applies at inference too. Segmentation masks are always
    resampled with nearest neighbour and keep their dtype.

    Args:
        shape: the target spatial shape ``(x, y, z)``.
        interpolation: ``"linear"`` (trilinear, default) or ``"nearest"``,
            for the images.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        **kwargs: passed to ``keras.layers.Layer``.

    Input shape:
        ``(batch, x, y, z, channels)`` or ``(x, y, z, channels)`` (channels
        last), or a dict with ``"images"`` and ``"segmentation_masks"``.
        Spatial sizes may be dynamic (``None``).

    Output shape:
        ``(batch, *shape, channels)``; dtypes are kept.

    Example:

    ```python
    layer = keras_nii.layers.Resize3D((64, 64, 64))
    out = layer({"images": images, "segmentation_masks": labels})
    ```
    """

    SPATIAL = True

    def __init__(
        self,
        shape: Sequence[int],
        interpolation: str = "linear",
        data_format: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(data_format=data_format, **kwargs)
        self.shape = check_shape("shape", shape)
        self.interpolation = check_choice("interpolation", interpolation, ("linear", "nearest"))

    def _resize(self, volumes: Any, interpolation: str) -> Any:
        shape = ops.shape(volumes)
        matrices = resize_matrix(shape[1:4], self.shape, shape[0])
        coordinates = affine_coordinates(matrices, self.shape)
        return resample(volumes, coordinates, interpolation=interpolation, fill_mode="nearest")

    def transform_images(self, images: Any, transformation: Any) -> Any:
        return self._resize(images, self.interpolation)

    def coordinate_map(
        self, transformation: Any, spatial_shape: Sequence[Any], batch_size: Any
    ) -> CoordinateMap:
        """The resize as its matrices (for ``Pipeline3D``); edges repeat, as the layer's."""
        matrix = resize_matrix(spatial_shape, self.shape, batch_size)
        return CoordinateMap(
            tuple(spatial_shape),
            tuple(self.shape),
            matrix=matrix,
            fill_mode="nearest",
            interpolation=self.interpolation,
        )

    def transform_segmentation_masks(self, masks: Any, transformation: Any) -> Any:
        return self._resize(masks, "nearest")

    def compute_spatial_output_shape(self, spatial_shape: tuple) -> tuple:
        return tuple(self.shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(shape=tuple(self.shape), interpolation=self.interpolation)
        return config


@register
class RandomCrop3D(VolumeLayer):
    """Random patches of a fixed shape, one window per sample, optionally on the foreground.

    For patch-based training of 3D networks on volumes too large to fit
    whole. Every sample of the batch gets its own window; its image and mask
    get the same one. Windows are drawn uniformly among all the valid
    positions, or, with probability ``foreground_probability`` per sample,
    centred (as far as the borders allow) on a voxel drawn uniformly among the
    mask's foreground voxels (``mask != 0`` in any channel), like MONAI's
    ``RandCropByPosNegLabel``. The chosen voxel lands at index
    ``shape[axis] // 2`` of the patch (the centre for odd sizes). Samples
    whose mask is empty, and inputs without masks, fall back to uniform
    windows.

    An axis smaller than ``shape`` is first padded centrally with 0 (as by
    :class:`CenterCropOrPad3D`), then cropped.

    With ``training=False`` (``predict``, ``evaluate``, validation during
    ``fit``) it returns the central window instead, as Keras's 2D
    ``RandomCrop`` does, so the patch shape it declares holds at inference
    too (a layer that needs that shape may follow it). For inference on
    whole volumes use sliding windows (``keras_nii.inference``).

    Args:
        shape: the patch shape ``(x, y, z)``.
        foreground_probability: probability, per sample, that the patch is
            centred on a foreground voxel of the mask.
        seed: the seed of the layer's random stream.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        **kwargs: passed to ``keras.layers.Layer``.

    Input shape:
        ``(batch, x, y, z, channels)`` or ``(x, y, z, channels)`` (channels
        last), or a dict with ``"images"`` and ``"segmentation_masks"``.
        Spatial sizes may be dynamic (``None``).

    Output shape:
        ``(batch, *shape, channels)``; dtypes are kept.

    Example:

    ```python
    crop = keras_nii.layers.RandomCrop3D((64, 64, 64), foreground_probability=0.5, seed=1)
    patches = crop({"images": images, "segmentation_masks": labels})
    ```
    """

    RANDOM = True
    SPATIAL = True
    CHANGES_SHAPE = True

    def __init__(
        self,
        shape: Sequence[int],
        foreground_probability: float = 0.0,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(data_format=data_format, seed=seed, **kwargs)
        self.shape = check_shape("shape", shape)
        self.foreground_probability = check_probability(
            "foreground_probability", foreground_probability
        )

    # -- the draw ---------------------------------------------------------------

    def _room(self, spatial_shape: Sequence[Any]) -> list[Any]:
        """The largest valid start along each axis (of the padded volume)."""
        return [
            max(s - t, 0) if _is_static(s) else ops.maximum(ops.cast(s, "int32") - t, 0)
            for s, t in zip(spatial_shape, self.shape, strict=True)
        ]

    def get_random_transformation(self, batch_size: Any, spatial_shape: Sequence[Any]) -> Any:
        """Uniform windows: ``{"starts": (batch, 3) int32}`` in the padded volume."""
        room = _as_vector(self._room(spatial_shape), "int32")
        draw = self.uniform((batch_size, 3)) * ops.cast(room + 1, "float32")[None, :]
        starts = ops.minimum(ops.cast(ops.floor(draw), "int32"), room[None, :])
        return {"starts": starts}

    def _foreground_transformation(self, masks: Any) -> Any:
        """Windows centred on random foreground voxels of ``masks`` (canonical).

        One uniform number per sample picks the ``k``-th foreground voxel in
        flat order (``k = floor(u * count)``), found as the number of positions
        whose running foreground count is still <= ``k``: vectorized, no
        random tensor the size of the volume, no tie-breaking in ``argmax``.
        """
        shape = ops.shape(masks)
        batch, sizes = shape[0], shape[1:4]
        transformation = self.get_random_transformation(batch, sizes)
        room = _as_vector(self._room(sizes), "int32")

        foreground = ops.any(ops.not_equal(masks, 0), axis=-1)
        flat = ops.cast(ops.reshape(foreground, (batch, -1)), "int32")
        count = ops.sum(flat, axis=1)
        pick = ops.cast(ops.floor(self.uniform((batch,)) * ops.cast(count, "float32")), "int32")
        pick = ops.minimum(pick, ops.maximum(count - 1, 0))
        index = ops.sum(ops.cast(ops.cumsum(flat, axis=1) <= pick[:, None], "int32"), axis=1)

        size_y, size_z = ops.cast(sizes[1], "int32"), ops.cast(sizes[2], "int32")
        voxel = ops.stack(
            [index // (size_y * size_z), (index // size_z) % size_y, index % size_z], 1
        )
        before = _as_vector(
            [_center_window(s, t)[0] for s, t in zip(sizes, self.shape, strict=True)], "int32"
        )
        half = ops.convert_to_tensor([t // 2 for t in self.shape], dtype="int32")
        centred = ops.minimum(
            ops.maximum(voxel + before[None, :] - half[None, :], 0), room[None, :]
        )

        chosen = ops.logical_and(self.coin(batch, self.foreground_probability), count > 0)
        starts = ops.where(chosen[:, None], centred, transformation["starts"])
        return {"starts": starts}

    # -- the crop ---------------------------------------------------------------

    def _crop(self, volumes: Any, transformation: Any) -> Any:
        """Pad to at least ``shape``, then gather each sample's window."""
        volumes = _pad_to_at_least(volumes, self.shape, 0)
        return _gather_windows(volumes, transformation["starts"], self.shape)

    def transform_images(self, images: Any, transformation: Any) -> Any:
        return self._crop(images, transformation)

    def transform_segmentation_masks(self, masks: Any, transformation: Any) -> Any:
        return self._crop(masks, transformation)

    def transform_for_inference(self, data: dict) -> dict:
        """The central window of every sample (padded with 0 where the volume is smaller)."""
        return {key: _center_crop_or_pad(value, self.shape, 0) for key, value in data.items()}

    def coordinate_map(
        self, transformation: Any, spatial_shape: Sequence[Any], batch_size: Any
    ) -> CoordinateMap:
        """The windows as exact maps (for ``Pipeline3D``); what is padded reads 0."""
        before = _as_vector(
            [_center_window(s, t)[0] for s, t in zip(spatial_shape, self.shape, strict=True)],
            "int32",
        )
        starts = ops.cast(transformation["starts"], "int32") - before[None, :]
        return _window_map(starts, spatial_shape, self.shape, 0.0)

    def draws_from_data(self, keys: Sequence[str]) -> bool:
        """Whether a draw reads the data itself (the mask's foreground), not only its shape."""
        return self.foreground_probability > 0 and MASKS in keys

    def draw_transformation(self, data: dict) -> Any:
        """Foreground-centred windows when a mask is given, else uniform ones."""
        if self.foreground_probability == 0 or MASKS not in data:
            return super().draw_transformation(data)
        return self._foreground_transformation(data[MASKS])

    def compute_spatial_output_shape(self, spatial_shape: tuple) -> tuple:
        return tuple(self.shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(shape=tuple(self.shape), foreground_probability=self.foreground_probability)
        return config
