"""Intensity normalization: z-score, min-max (optionally robust) and fixed windows.

These layers are deterministic: they apply at training *and* inference time
(``training=False`` changes nothing), so the normalization a model was trained
with travels inside the saved model. Statistics are always computed per
sample, never across the batch, in float32 (float64 for float64 inputs) even
when the images are float16 or bfloat16; the output has the input's dtype
(integer images are first cast to the layer's compute dtype). Segmentation
masks pass through untouched.

Non-finite voxels (NaN, +-inf) are left out of every statistic, so one of
them no longer turns a volume into NaN (z-score) or zero (min-max); they come
out as NaN and +-inf again (min-max with ``clip`` saturates +-inf at the ends
of its output range). A volume without one finite voxel gives statistics of
0 and 1 (z-score), or an empty window (min-max).
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from keras_nii.layers.base import VolumeLayer, check_bool, check_number, check_range, register
from keras_nii.ops.quantile import finite_quantiles
from keras_nii.ops.reduce import finite_min_max, reduce_rows

__all__ = ["ZScoreNormalization", "MinMaxNormalization", "IntensityWindow"]


# ----------------------------------------------------------------------------
# argument parsing


def _check_interval(name: str, value: Any, **bounds: Any) -> tuple[float, float]:
    """An increasing ``(low, high)`` pair with ``low < high``."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a (low, high) pair with low < high, got {value!r}")
    low, high = check_range(name, value, symmetric_about=None, **bounds)
    if not low < high:
        raise ValueError(f"{name} must be a (low, high) pair with low < high, got {value!r}")
    return low, high


def _check_statistic(name: str, value: Any, positive: bool = False) -> Any:
    """``None``, a finite number, or a non-empty list of them (one a channel)."""
    if value is None:
        return None
    many = isinstance(value, (list, tuple))
    values = list(value) if many else [value]
    kind = "positive finite" if positive else "finite"
    problem = ValueError(
        f"{name} must be None, a {kind} number or a list of them (one a channel), got {value!r}"
    )
    if not values:
        raise problem
    try:
        numbers = tuple(check_number(name, v) for v in values)
    except ValueError:
        raise problem from None
    if positive and min(numbers) <= 0:
        raise problem
    return numbers if many else numbers[0]


# ----------------------------------------------------------------------------
# helpers


def _work_dtype(dtype: Any) -> str:
    """float64 stays float64; everything else computes in float32."""
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


#: the z-score's shift is picked among every _SHIFT_STRIDE-th voxel along each axis
_SHIFT_STRIDE = 4


def _value_nearest_mean(values: Any, keep: Any) -> tuple[Any, Any]:
    """Per row of ``values`` (reduced over axis 1): a kept value nearest the
    mean of the kept values, and how many values are kept.

    ``keep`` is ``values``'s 0/1 mask. A row without kept values gives 0
    and a count of 0. Of two
    kept values equally near the mean, the larger. (A minimum and a select,
    not ``argmin``: under TensorFlow an argmin over floats lowers to bit
    operations that ONNX and LiteRT cannot run.)
    """
    count = ops.sum(keep, axis=1, keepdims=True)
    kept = ops.where(keep > 0, values, ops.zeros_like(values))  # NaN * 0 would be NaN
    mean = ops.sum(kept, axis=1, keepdims=True) / ops.maximum(count, 1.0)
    distance = ops.where(keep > 0, ops.abs(kept - mean), math.inf)
    nearest = ops.equal(distance, ops.min(distance, axis=1, keepdims=True))
    return ops.max(ops.where(nearest, kept, -math.inf), axis=1, keepdims=True), count


def _kept(values: Any, nonzero: bool) -> Any:
    """Which voxels the statistics take: the finite ones (and non-zero ones)."""
    keep = ops.isfinite(values)
    return ops.logical_and(keep, ops.not_equal(values, 0)) if nonzero else keep


# ----------------------------------------------------------------------------


@register
class ZScoreNormalization(VolumeLayer):
    """Standardize each volume to zero mean and unit standard deviation.

    For every sample of the batch (never across the batch), subtracts the mean
    and divides by the standard deviation (population std, ``ddof=0``), per
    channel or over all channels together. With ``nonzero=True`` the
    statistics are taken over the non-zero voxels only and zero voxels stay
    exactly zero: the semantics of MONAI's ``NormalizeIntensity(nonzero=True)``,
    for skull-stripped or masked scans whose background is 0.

    A (nearly) constant volume would divide by ~0: where the std is below
    ``epsilon`` it is taken as 1 (as MONAI does for a std of 0), so the output
    is only centred, ``x - mean``, which is exactly 0 for a constant volume.
    An all-zero volume with ``nonzero=True`` stays all zeros. The statistics
    are computed after shifting by one of the voxels taken into account (the
    one nearest their mean in a subsample of every 4th voxel along each axis,
    or in the whole volume when that subsample holds none of them), so a
    constant volume has an exactly zero spread and large offsets (CT at
    -1000 HU) lose no precision. Non-finite voxels (NaN, +-inf) are left out
    of the statistics and come out as they went in.

    With ``mean`` and ``std`` (given together) the statistics are fixed,
    dataset-wide (e.g. the foreground statistics of a dataset fingerprint, as
    nnU-Net does for CT): every sample becomes ``(x - mean) / std``, with one
    number for all channels or a list of one a channel. Nothing is computed
    from the data, and the values are saved and exported with the model.
    ``nonzero=True`` still leaves zero voxels at zero; ``epsilon`` plays no
    part (a fixed std must be positive).

    Args:
        nonzero: compute the statistics over the non-zero voxels only and leave
            zero voxels at zero.
        per_channel: normalize each channel on its own (default) or all
            channels of a sample together.
        epsilon: a std below this is treated as 1 (must be > 0).
        mean: ``None`` (each sample's own mean) or the fixed mean to
            subtract: a finite number, or a list of one a channel.
        std: ``None`` (each sample's own std) or the fixed std to divide by:
            a positive number, or a list of one a channel. Given with
            ``mean``.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        **kwargs: passed to ``keras.layers.Layer``.

    Input shape:
        ``(batch, x, y, z, channels)`` or ``(x, y, z, channels)`` (channels
        last), or a dict with ``"images"`` and ``"segmentation_masks"``.

    Output shape:
        Same as the input; images keep their float dtype, masks are untouched.

    Example:

    ```python
    layer = keras_nii.layers.ZScoreNormalization(nonzero=True)
    out = layer(np.random.rand(2, 16, 16, 16, 1).astype("float32"))
    # fixed statistics of a CT dataset's foreground, after a window
    fixed = keras_nii.layers.ZScoreNormalization(mean=95.6, std=48.2)
    ```
    """

    def __init__(
        self,
        nonzero: bool = False,
        per_channel: bool = True,
        epsilon: float = 1e-8,
        mean: float | list[float] | None = None,
        std: float | list[float] | None = None,
        data_format: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(data_format=data_format, **kwargs)
        self.nonzero = check_bool("nonzero", nonzero)
        self.per_channel = check_bool("per_channel", per_channel)
        epsilon = check_number("epsilon", epsilon)
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        self.epsilon = epsilon
        self.mean = _check_statistic("mean", mean)
        self.std = _check_statistic("std", std, positive=True)
        if (self.mean is None) != (self.std is None):
            raise ValueError(
                f"mean and std are fixed together: give both or neither, got mean={mean!r}, "
                f"std={std!r}"
            )

    def _fixed(self, name: str, x: Any) -> Any:
        """The fixed statistic ``name`` as a constant that broadcasts over ``x``."""
        value = getattr(self, name)
        if isinstance(value, tuple):
            channels = x.shape[4]
            if channels is not None and len(value) not in (1, channels):
                raise ValueError(
                    f"{name} has {len(value)} values (one a channel) but the images have "
                    f"{channels} channels"
                )
        return ops.convert_to_tensor(value, dtype=x.dtype)

    def _shift(self, voxels: Any, subsample: Any, work: str) -> Any:
        """A value of the voxels taken into account, near their mean, per row.

        Taken from the strided ``subsample`` (a 1/64 of the voxels: cheap).
        The subsample may hold none of them (only zeros of a sparse volume
        with ``nonzero``, only non-finite values); then (and only then: a
        conditional, not a second pass every time) the whole volume is
        searched. Any value of the data would keep a constant
        volume exact; one near the mean also keeps ``E[s^2] - E[s]^2`` free
        of cancellation.
        """
        keep = ops.cast(_kept(subsample, self.nonzero), work)
        shift, found = _value_nearest_mean(subsample, keep)

        def from_the_whole_volume() -> Any:
            whole, _ = _value_nearest_mean(voxels, ops.cast(_kept(voxels, self.nonzero), work))
            return ops.where(found > 0, shift, whole)

        return ops.cond(ops.any(ops.equal(found, 0)), from_the_whole_volume, lambda: shift)

    def transform_images(self, images: Any, transformation: Any) -> Any:
        dtype = images.dtype
        work = _work_dtype(dtype)
        x = ops.cast(images, work)
        if self.mean is not None:
            out = (x - self._fixed("mean", x)) / self._fixed("std", x)
            if self.nonzero:
                out = ops.where(ops.not_equal(x, 0), out, ops.zeros_like(out))
            return ops.cast(out, dtype)
        shape = ops.shape(x)
        # One row per sample, or per sample and channel, reduced over axis 1.
        # (batch, voxels) when a sample is one group: XLA's CPU reductions are
        # fastest on such 2D rows.
        if self.per_channel and x.shape[4] != 1:
            rows = (shape[0], -1, shape[4])
        else:
            rows = (shape[0], -1)
        voxels = ops.reshape(x, rows)
        step = _SHIFT_STRIDE
        subsample = ops.reshape(x[:, ::step, ::step, ::step, :], rows)
        shift = self._shift(voxels, subsample, work)
        shifted = voxels - shift
        # count, sum and sum of squares: three reductions of the same shifted
        # values, none waiting for another (voxels left out are zeroed), where
        # the minimum, the count, the mean and then the centred squares took
        # four passes, each depending on the last
        if self.nonzero:
            inside = ops.not_equal(voxels, 0)
            masked = shifted * ops.cast(inside, work)
            count = ops.maximum(reduce_rows(ops.cast(inside, work)), 1.0)
        else:
            masked = shifted
            count = ops.cast(ops.shape(voxels)[1], work)
        mean = reduce_rows(masked) / count
        squares = reduce_rows(ops.square(masked)) / count

        def over_finite_voxels() -> tuple[Any, Any]:
            keep = _kept(voxels, self.nonzero)
            kept = ops.where(keep, shifted, ops.zeros_like(shifted))
            kept_count = ops.maximum(reduce_rows(ops.cast(keep, work)), 1.0)
            return reduce_rows(kept) / kept_count, reduce_rows(ops.square(kept)) / kept_count

        # a non-finite voxel makes the sum of squares non-finite: only then are
        # the sums taken again without them (one conditional, not a mask always)
        mean, squares = ops.cond(
            ops.all(ops.isfinite(squares)), lambda: (mean, squares), over_finite_voxels
        )
        # the shift is a voxel near the mean, so E[s^2] - E[s]^2 cancels little;
        # a constant volume has masked == 0, hence mean == variance == 0 exactly
        variance = ops.maximum(squares - ops.square(mean), 0.0)
        std = ops.sqrt(variance)
        std = ops.where(std < self.epsilon, ops.ones_like(std), std)
        if keras.backend.backend() == "jax":
            # applied to the volume itself, the statistics reshaped to broadcast:
            # jax2onnx (an ONNX export) cannot reshape the rows back to symbolic
            # (x, y, z) sizes; XLA fuses either form into the same loop
            stats = (shape[0], 1, 1, 1, shape[4] if len(rows) == 3 else 1)
            shift, mean, std = (ops.reshape(v, stats) for v in (shift, mean, std))
            out = (x - shift - mean) / std
            if self.nonzero:
                out = ops.where(ops.not_equal(x, 0), out, ops.zeros_like(out))
            return ops.cast(out, dtype)
        out = (shifted - mean) / std  # NaN and +-inf stay what they were
        if self.nonzero:
            out = ops.where(inside, out, ops.zeros_like(out))
        out = ops.reshape(out, shape)
        return ops.cast(out, dtype)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            nonzero=self.nonzero,
            per_channel=self.per_channel,
            epsilon=self.epsilon,
            mean=list(self.mean) if isinstance(self.mean, tuple) else self.mean,
            std=list(self.std) if isinstance(self.std, tuple) else self.std,
        )
        return config


@register
class MinMaxNormalization(VolumeLayer):
    """Rescale each volume linearly from its own [min, max] (or percentiles) to a range.

    For every sample of the batch (never across the batch), per channel or
    over all channels together, maps the volume's minimum to
    ``output_range[0]`` and its maximum to ``output_range[1]``. With
    ``percentiles=(low, high)`` the robust version: the ``low``-th and
    ``high``-th percentiles (linear interpolation, as ``numpy.percentile``)
    are mapped instead, as MONAI's ``ScaleIntensityRangePercentiles``; then
    ``clip`` clips the result to ``output_range`` so outliers saturate.

    When the window is empty (a constant volume, or two percentiles that
    coincide), every voxel maps to ``output_range[0]``. The minimum, maximum
    and percentiles are those of the finite voxels; NaN comes out as NaN,
    +-inf as the ends of ``output_range`` with ``clip`` (+-inf without).

    Args:
        output_range: ``(low, high)``, ``low < high``, the target range.
        percentiles: ``None`` (min and max) or ``(low, high)`` with
            ``0 <= low < high <= 100``.
        clip: clip the output to ``output_range`` (matters with percentiles).
        per_channel: rescale each channel on its own (default) or all
            channels of a sample together.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        **kwargs: passed to ``keras.layers.Layer``.

    Input shape:
        ``(batch, x, y, z, channels)`` or ``(x, y, z, channels)`` (channels
        last), or a dict with ``"images"`` and ``"segmentation_masks"``.

    Output shape:
        Same as the input; images keep their float dtype, masks are untouched.

    Example:

    ```python
    layer = keras_nii.layers.MinMaxNormalization(percentiles=(0.5, 99.5))
    out = layer(np.random.rand(2, 16, 16, 16, 1).astype("float32"))
    ```
    """

    def __init__(
        self,
        output_range: tuple[float, float] = (0.0, 1.0),
        percentiles: tuple[float, float] | None = None,
        clip: bool = True,
        per_channel: bool = True,
        data_format: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(data_format=data_format, **kwargs)
        self.output_range = _check_interval("output_range", output_range)
        if percentiles is not None:
            percentiles = _check_interval("percentiles", percentiles, minimum=0.0, maximum=100.0)
        self.percentiles = percentiles
        self.clip = check_bool("clip", clip)
        self.per_channel = check_bool("per_channel", per_channel)

    def _bounds(self, x: Any) -> tuple[Any, Any]:
        """The window of each sample (and channel), over its finite voxels."""
        if self.percentiles is None:
            return finite_min_max(x, self.per_channel)
        shape = ops.shape(x)
        # the percentiles of the finite voxels of each row
        channels = shape[4] if self.per_channel else 1
        rows = (shape[0], -1, channels) if self.per_channel else (shape[0], -1)
        fractions = [p / 100.0 for p in self.percentiles]
        low, high = finite_quantiles(ops.reshape(x, rows), fractions)
        window = (shape[0], 1, 1, 1, channels)
        return ops.reshape(low, window), ops.reshape(high, window)

    def transform_images(self, images: Any, transformation: Any) -> Any:
        dtype = images.dtype
        x = ops.cast(images, _work_dtype(dtype))
        low, high = self._bounds(x)
        a, b = self.output_range
        width = high - low
        empty = ops.logical_not(width > 0)
        width = ops.where(empty, ops.ones_like(width), width)
        out = (x - low) / width * (b - a) + a
        # the window is finite, so NaN and +-inf come out as they went in (and
        # the clip, which keeps NaN, saturates +-inf); so too in an empty window
        inside = ops.where(ops.isfinite(x), ops.full_like(x, a), x)
        out = ops.where(empty, inside, out)
        if self.clip:
            out = ops.clip(out, a, b)
        return ops.cast(out, dtype)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            output_range=tuple(self.output_range),
            percentiles=None if self.percentiles is None else tuple(self.percentiles),
            clip=self.clip,
            per_channel=self.per_channel,
        )
        return config


@register
class IntensityWindow(VolumeLayer):
    """Map a fixed intensity window linearly to a range, e.g. CT Hounsfield units.

    ``minval`` maps to ``output_range[0]`` and ``maxval`` to
    ``output_range[1]``; with ``clip`` (default) values outside the window
    saturate. The window is the same for every sample (it does not depend on
    the data), as for CT windowing: ``minval=-1000, maxval=400`` for lung and
    soft tissue, ``-160, 240`` for abdomen, ``0, 80`` for brain.

    Args:
        minval: the intensity mapped to ``output_range[0]``.
        maxval: the intensity mapped to ``output_range[1]``; ``minval < maxval``.
        output_range: ``(low, high)``, ``low < high``.
        clip: clip the output to ``output_range``.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        **kwargs: passed to ``keras.layers.Layer``.

    Input shape:
        ``(batch, x, y, z, channels)`` or ``(x, y, z, channels)`` (channels
        last), or a dict with ``"images"`` and ``"segmentation_masks"``.

    Output shape:
        Same as the input; images keep their float dtype (integer CT volumes
        are cast to the compute dtype), masks are untouched.

    Example:

    ```python
    layer = keras_nii.layers.IntensityWindow(minval=-1000, maxval=400)
    ct = np.random.randint(-1024, 3000, size=(1, 16, 16, 16, 1)).astype("int16")
    out = layer(ct)  # float32 in [0, 1]
    ```
    """

    def __init__(
        self,
        minval: float,
        maxval: float,
        output_range: tuple[float, float] = (0.0, 1.0),
        clip: bool = True,
        data_format: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(data_format=data_format, **kwargs)
        self.minval = check_number("minval", minval)
        self.maxval = check_number("maxval", maxval)
        if not self.minval < self.maxval:
            raise ValueError(f"minval must be < maxval, got minval={minval!r}, maxval={maxval!r}")
        self.output_range = _check_interval("output_range", output_range)
        self.clip = check_bool("clip", clip)

    def transform_images(self, images: Any, transformation: Any) -> Any:
        dtype = images.dtype
        x = ops.cast(images, _work_dtype(dtype))
        a, b = self.output_range
        scale = (b - a) / (self.maxval - self.minval)
        out = (x - self.minval) * scale + a
        if self.clip:
            out = ops.clip(out, a, b)
        return ops.cast(out, dtype)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            minval=self.minval,
            maxval=self.maxval,
            output_range=tuple(self.output_range),
            clip=self.clip,
        )
        return config
