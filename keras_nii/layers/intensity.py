"""Random intensity augmentation of 3D images: shift, scale, gamma, noise, blur,
bias field, contrast.

These layers change voxel values, never positions: segmentation masks pass
through untouched (same values, same dtype). Each sample of a batch gets its own
draw, and is transformed with ``probability`` (else left exactly as it was).
Math runs in float32 for float16/bfloat16 images (in the input's precision for
float32/float64); the output has the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_nii.layers.base import (
    IMAGES,
    MASKS,
    VolumeLayer,
    broadcast_per_sample,
    check_bool,
    check_number,
    check_per_axis_range,
    check_probability,
    check_range,
    register,
)
from keras_nii.ops.reduce import finite_min_max, reduce_volumes

__all__ = [
    "RandomIntensityShift",
    "RandomIntensityScale",
    "RandomGamma",
    "RandomGaussianNoise",
    "RandomGaussianBlur3D",
    "RandomBiasField",
    "RandomContrast3D",
]

# ----------------------------------------------------------------------------
# helpers


def _work(images: Any) -> Any:
    """The images in the dtype the math runs in (float32 for 16-bit floats)."""
    dtype = keras.backend.standardize_dtype(images.dtype)
    if dtype in ("float16", "bfloat16"):
        return ops.cast(images, "float32")
    return images


def _select(apply: Any, new: Any, images: Any) -> Any:
    """Per sample: ``new`` where ``apply``, else the untouched ``images``."""
    new = ops.cast(new, images.dtype)
    return ops.where(ops.reshape(apply, (-1, 1, 1, 1, 1)), new, images)


def _check_order(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


class _IntensityLayer(VolumeLayer):
    """Shared plumbing: random, images only, one coin per sample."""

    RANDOM = True

    def __init__(self, probability: float = 1.0, data_format=None, seed=None, **kwargs):
        super().__init__(data_format=data_format, seed=seed, **kwargs)
        self.probability = check_probability("probability", probability)

    def get_config(self) -> dict:
        config = super().get_config()
        config["probability"] = self.probability
        return config


# ----------------------------------------------------------------------------
# shift and scale


class _PerChannelLayer(_IntensityLayer):
    """A layer drawing one value per sample, or per sample and channel."""

    #: the key of the drawn value in the transformation, and its range attribute
    KEY = ""

    def draw_transformation(self, data: dict) -> Any:
        # the channel count comes from the images (per-channel draws need it)
        reference = data.get(IMAGES, data.get(MASKS))
        shape = ops.shape(reference)
        channels = ops.shape(data[IMAGES])[4] if IMAGES in data else 1
        return self.get_random_transformation(shape[0], shape[1:4], channels)

    def get_random_transformation(
        self, batch_size: Any, spatial_shape: Sequence[Any], channels: Any = 1
    ) -> Any:
        """``apply`` ``(batch,)`` and the value: ``(batch,)``, or ``(batch,
        channels)`` with ``per_channel=True``."""
        low, high = getattr(self, self.KEY)
        shape = (batch_size, channels) if self.per_channel else (batch_size,)
        return {
            "apply": self.coin(batch_size, self.probability),
            self.KEY: self.uniform(shape, low, high),
        }


@register
class RandomIntensityShift(_PerChannelLayer):
    """Adds a random offset to the voxel values.

    ``x' = x + o`` with ``o ~ U(low, high)``, one offset per sample (or, with
    ``per_channel=True``, one per sample and channel: the layer's
    ``get_random_transformation(batch, spatial_shape, channels)`` then takes the
    channel count, which ``call`` reads from the images).

    Args:
        offset: the range of the offset, in intensity units: a number ``o``
            means ``(-o, o)``, or a ``(low, high)`` pair.
        per_channel: draw one offset per channel instead of one per sample.
        probability: the probability that a sample is shifted.
        data_format: ``"channels_last"`` or ``"channels_first"``.
        seed: int seed of the random stream.

    Input shape:
        ``(x, y, z, c)`` or ``(batch, x, y, z, c)`` (channels last), or a dict
        with the keys ``"images"`` and ``"segmentation_masks"`` (masks are
        returned unchanged).

    Output shape:
        The input's shape (and dtype; integer images become floats).

    Example:

    ```python
    import numpy as np
    from keras_nii.layers import RandomIntensityShift

    layer = RandomIntensityShift(offset=0.1, seed=0)
    out = layer(np.random.rand(2, 16, 16, 16, 1).astype("float32"))
    ```
    """

    KEY = "offset"
    #: voxel-wise: commutes with spatial layers in a ``Pipeline3D``
    VOXELWISE = True

    def __init__(
        self,
        offset: float | Sequence[float],
        per_channel: bool = False,
        probability: float = 1.0,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(probability=probability, data_format=data_format, seed=seed, **kwargs)
        self.offset = check_range("offset", offset)
        self.per_channel = check_bool("per_channel", per_channel)

    def transform_images(self, images: Any, transformation: Any) -> Any:
        x = _work(images)
        offset = broadcast_per_sample(transformation["offset"], x)
        return _select(transformation["apply"], x + offset, images)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"offset": list(self.offset), "per_channel": self.per_channel})
        return config


@register
class RandomIntensityScale(_PerChannelLayer):
    """Multiplies the voxel values by a random factor.

    ``x' = x * f`` with ``f ~ U(low, high)``, one factor per sample (or, with
    ``per_channel=True``, one per sample and channel: the layer's
    ``get_random_transformation(batch, spatial_shape, channels)`` then takes the
    channel count, which ``call`` reads from the images).

    Args:
        factor: the range of the factor: a number ``f`` means
            ``(1 - f, 1 + f)``, or a ``(low, high)`` pair. Factors must be
            ``>= 0``.
        per_channel: draw one factor per channel instead of one per sample.
        probability: the probability that a sample is scaled.
        data_format: ``"channels_last"`` or ``"channels_first"``.
        seed: int seed of the random stream.

    Input shape:
        ``(x, y, z, c)`` or ``(batch, x, y, z, c)`` (channels last), or a dict
        with the keys ``"images"`` and ``"segmentation_masks"`` (masks are
        returned unchanged).

    Output shape:
        The input's shape (and dtype; integer images become floats).

    Example:

    ```python
    import numpy as np
    from keras_nii.layers import RandomIntensityScale

    layer = RandomIntensityScale(factor=0.1, per_channel=True, seed=0)
    out = layer(np.random.rand(2, 16, 16, 16, 2).astype("float32"))
    ```
    """

    KEY = "factor"
    #: voxel-wise: commutes with spatial layers in a ``Pipeline3D``
    VOXELWISE = True

    def __init__(
        self,
        factor: float | Sequence[float],
        per_channel: bool = False,
        probability: float = 1.0,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(probability=probability, data_format=data_format, seed=seed, **kwargs)
        self.factor = check_range("factor", factor, symmetric_about=1.0, minimum=0.0)
        self.per_channel = check_bool("per_channel", per_channel)

    def transform_images(self, images: Any, transformation: Any) -> Any:
        x = _work(images)
        factor = broadcast_per_sample(transformation["factor"], x)
        return _select(transformation["apply"], x * factor, images)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"factor": list(self.factor), "per_channel": self.per_channel})
        return config


# ----------------------------------------------------------------------------
# gamma


@register
class RandomGamma(_IntensityLayer):
    """Applies a random gamma curve within each image's own intensity range.

    As nnU-Net's (batchgenerators') gamma augmentation: with ``lo, hi`` the
    minimum and maximum of a sample's channel,
    ``x' = lo + (hi - lo) * ((x - lo) / (hi - lo + eps)) ** gamma``, so the
    range is kept and negative values (z-scored images) are fine. One gamma per
    sample, drawn log-uniformly in ``gamma`` (so that ``gamma`` and
    ``1 / gamma`` are equally likely for a range like ``(0.5, 2)``); the minimum
    and maximum are taken per sample and channel, over its finite voxels;
    non-finite voxels (NaN, +-inf) pass through unchanged.

    Args:
        gamma: the range of the exponent, a ``(low, high)`` pair with
            ``0 < low <= high`` (a single number is a fixed exponent).
        probability: the probability that a sample is transformed.
        data_format: ``"channels_last"`` or ``"channels_first"``.
        seed: int seed of the random stream.

    Input shape:
        ``(x, y, z, c)`` or ``(batch, x, y, z, c)`` (channels last), or a dict
        with the keys ``"images"`` and ``"segmentation_masks"`` (masks are
        returned unchanged).

    Output shape:
        The input's shape (and dtype; integer images become floats).

    Example:

    ```python
    import numpy as np
    from keras_nii.layers import RandomGamma

    layer = RandomGamma(gamma=(0.7, 1.5), seed=0)
    out = layer(np.random.rand(2, 16, 16, 16, 1).astype("float32"))
    ```
    """

    EPSILON = 1e-7

    def __init__(
        self,
        gamma: float | Sequence[float] = (0.7, 1.5),
        probability: float = 1.0,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(probability=probability, data_format=data_format, seed=seed, **kwargs)
        gamma = check_range("gamma", gamma, symmetric_about=None)
        if gamma[0] <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        self.gamma = gamma

    def get_random_transformation(self, batch_size: Any, spatial_shape: Sequence[Any]) -> Any:
        low, high = self.gamma
        gamma = ops.exp(self.uniform((batch_size,), math.log(low), math.log(high)))
        return {
            "apply": self.coin(batch_size, self.probability),
            # the clip makes a fixed gamma exact despite exp(log(.)) rounding
            "gamma": ops.clip(gamma, low, high),
        }

    def transform_images(self, images: Any, transformation: Any) -> Any:
        x = _work(images)
        low, high = finite_min_max(x)
        span = high - low
        unit = (x - low) / (span + self.EPSILON)
        gamma = broadcast_per_sample(transformation["gamma"], x)
        # unit ** gamma as exp(gamma * log(unit)): ops.power is 1.5-3x slower on
        # CPU (under XLA and in TF graphs). unit is clipped away from 0 so that the
        # log (and its gradient) stays finite; unit == 0 still maps to 0
        # exactly, as 0 ** gamma does, so each minimum stays where it was.
        tiny = float(np.finfo(keras.backend.standardize_dtype(x.dtype)).tiny)
        curve = ops.exp(gamma * ops.log(ops.maximum(unit, tiny)))
        curve = ops.where(unit > 0, curve, ops.zeros_like(curve))
        out = ops.where(ops.isfinite(x), low + span * curve, x)
        return _select(transformation["apply"], out, images)

    def get_config(self) -> dict:
        config = super().get_config()
        config["gamma"] = list(self.gamma)
        return config


# ----------------------------------------------------------------------------
# noise


@register
class RandomGaussianNoise(_IntensityLayer):
    """Adds Gaussian noise of a random standard deviation.

    ``x' = x + n`` with ``n ~ N(mean, sigma)`` drawn independently for every
    voxel and channel, and ``sigma ~ U(std)`` drawn once per sample. ``std`` and
    ``mean`` are in absolute intensity units, so the layer is typically placed
    after a normalization (e.g. z-scoring), where ``std=(0, 0.1)`` means up to
    a tenth of the image's standard deviation.

    The per-voxel noise is drawn when the images are transformed; the
    transformation holds the per-sample ``sigma``.

    Args:
        std: the range of the noise's standard deviation: a ``(low, high)``
            pair with ``0 <= low <= high``, or one number for a fixed value.
        mean: the mean of the noise.
        probability: the probability that a sample gets noise.
        data_format: ``"channels_last"`` or ``"channels_first"``.
        seed: int seed of the random stream.

    Input shape:
        ``(x, y, z, c)`` or ``(batch, x, y, z, c)`` (channels last), or a dict
        with the keys ``"images"`` and ``"segmentation_masks"`` (masks are
        returned unchanged).

    Output shape:
        The input's shape (and dtype; integer images become floats).

    Example:

    ```python
    import numpy as np
    from keras_nii.layers import RandomGaussianNoise

    layer = RandomGaussianNoise(std=(0.0, 0.1), seed=0)
    out = layer(np.random.randn(2, 16, 16, 16, 1).astype("float32"))
    ```
    """

    #: voxel-wise: commutes with spatial layers in a ``Pipeline3D``
    VOXELWISE = True

    def __init__(
        self,
        std: float | Sequence[float] = (0.0, 0.1),
        mean: float = 0.0,
        probability: float = 1.0,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(probability=probability, data_format=data_format, seed=seed, **kwargs)
        self.std = check_range("std", std, symmetric_about=None, minimum=0.0)
        self.mean = check_number("mean", mean)

    def get_random_transformation(self, batch_size: Any, spatial_shape: Sequence[Any]) -> Any:
        low, high = self.std
        return {
            "apply": self.coin(batch_size, self.probability),
            "sigma": self.uniform((batch_size,), low, high),
        }

    def transform_images(self, images: Any, transformation: Any) -> Any:
        x = _work(images)
        noise = self.normal(ops.shape(x))
        sigma = ops.reshape(transformation["sigma"], (-1, 1, 1, 1, 1))
        noise = ops.cast(noise * sigma + self.mean, x.dtype)
        return _select(transformation["apply"], x + noise, images)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"std": list(self.std), "mean": self.mean})
        return config


# ----------------------------------------------------------------------------
# blur


def _reflect_index(index: Any, size: Any) -> Any:
    """Mirror integer indices into ``[0, size)`` (scipy's ``mode="reflect"``:
    ``d c b a | a b c d | d c b a``), for any distance outside."""
    size = ops.cast(size, "int32")
    period = 2 * size
    index = ops.mod(index, period)
    return ops.where(index >= size, period - 1 - index, index)


def _blur_axis(x: Any, kernel: Any, radius: int, axis: int) -> Any:
    """Convolve ``x`` along ``axis`` with per-sample kernels ``(batch, 2r + 1)``."""
    size = ops.shape(x)[axis]
    positions = ops.arange(size, dtype="int32")
    shape = [1, 1, 1, 1, 1]
    shape[0] = -1
    out = None
    for tap in range(2 * radius + 1):
        shifted = ops.take(x, _reflect_index(positions + (tap - radius), size), axis=axis)
        weight = ops.reshape(kernel[:, tap], shape)
        term = weight * shifted
        out = term if out is None else out + term
    return out


@register
class RandomGaussianBlur3D(_IntensityLayer):
    """Blurs volumes with a Gaussian of random width.

    A separable 3D Gaussian filter, one sigma per sample and axis, each drawn
    independently in its range (as TorchIO's ``RandomBlur``), in voxels. The
    kernels are truncated at a fixed radius ``ceil(3 * max_sigma)`` per axis
    (``max_sigma`` the top of that axis's range) and normalized to sum to 1;
    the volume is extended by mirroring about its edges (scipy's
    ``mode="reflect"``), so a constant volume stays constant. With a fixed
    ``sigma = s`` it matches ``scipy.ndimage.gaussian_filter(x, s, mode="reflect",
    radius=ceil(3 * s))``.

    Args:
        sigma: the Gaussian's standard deviation, in voxels: a ``(low, high)``
            range for all axes, three ranges (one per axis), one number (a fixed
            sigma) or three numbers. Must be ``>= 0``; 0 leaves an axis
            unblurred.
        probability: the probability that a sample is blurred.
        data_format: ``"channels_last"`` or ``"channels_first"``.
        seed: int seed of the random stream.

    Input shape:
        ``(x, y, z, c)`` or ``(batch, x, y, z, c)`` (channels last), or a dict
        with the keys ``"images"`` and ``"segmentation_masks"`` (masks are
        returned unchanged).

    Output shape:
        The input's shape (and dtype; integer images become floats).

    Example:

    ```python
    import numpy as np
    from keras_nii.layers import RandomGaussianBlur3D

    layer = RandomGaussianBlur3D(sigma=(0.5, 1.5), seed=0)
    out = layer(np.random.rand(2, 16, 16, 16, 1).astype("float32"))
    ```
    """

    def __init__(
        self,
        sigma: float | Sequence[Any] = (0.5, 1.5),
        probability: float = 1.0,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(probability=probability, data_format=data_format, seed=seed, **kwargs)
        self.sigma = check_per_axis_range("sigma", sigma, symmetric_about=None, minimum=0.0)
        self.radius = tuple(int(math.ceil(3.0 * high)) for _, high in self.sigma)

    def get_random_transformation(self, batch_size: Any, spatial_shape: Sequence[Any]) -> Any:
        sigma = ops.stack(
            [self.uniform((batch_size,), low, high) for low, high in self.sigma], axis=-1
        )
        return {"apply": self.coin(batch_size, self.probability), "sigma": sigma}

    def transform_images(self, images: Any, transformation: Any) -> Any:
        x = _work(images)
        sigma = ops.cast(transformation["sigma"], "float32")
        for axis, radius in enumerate(self.radius):
            if radius == 0:
                continue
            taps = ops.arange(-radius, radius + 1, dtype="float32")
            s = ops.maximum(sigma[:, axis : axis + 1], 1e-6)
            kernel = ops.exp(-0.5 * (taps[None, :] / s) ** 2)
            kernel = kernel / ops.sum(kernel, axis=1, keepdims=True)
            x = _blur_axis(x, ops.cast(kernel, x.dtype), radius, axis + 1)
        return _select(transformation["apply"], x, images)

    def get_config(self) -> dict:
        config = super().get_config()
        config["sigma"] = [list(r) for r in self.sigma]
        return config


# ----------------------------------------------------------------------------
# bias field


def _polynomial_terms(order: int) -> list[tuple[int, int, int]]:
    """Exponents ``(i, j, k)`` with ``i + j + k <= order``, TorchIO's order."""
    return [
        (i, j, k)
        for i in range(order + 1)
        for j in range(order + 1 - i)
        for k in range(order + 1 - i - j)
    ]


def _unit_coordinates(size: Any) -> Any:
    """``linspace(-1, 1, size)`` for a possibly symbolic size."""
    n = ops.cast(size, "float32")
    return ops.arange(size, dtype="float32") * (2.0 / ops.maximum(n - 1.0, 1.0)) - 1.0


@register
class RandomBiasField(_IntensityLayer):
    """Multiplies images by a smooth random field, like MRI's bias field.

    As TorchIO's ``RandomBiasField``: the field is ``exp(P(x, y, z))`` with
    ``P`` a polynomial of total degree ``<= order`` in voxel coordinates
    normalized to ``[-1, 1]`` along each axis (the corner voxels at -1 and 1),
    with every coefficient (the constant term included) drawn from
    ``U(coefficients)``, per sample. All channels of a sample share the field.

    Args:
        coefficients: the range of the polynomial's coefficients: a number
            ``c`` means ``(-c, c)``, or a ``(low, high)`` pair.
        order: the polynomial's degree, an int ``>= 0`` (0: a constant
            per-sample factor).
        probability: the probability that a sample is transformed.
        data_format: ``"channels_last"`` or ``"channels_first"``.
        seed: int seed of the random stream.

    Input shape:
        ``(x, y, z, c)`` or ``(batch, x, y, z, c)`` (channels last), or a dict
        with the keys ``"images"`` and ``"segmentation_masks"`` (masks are
        returned unchanged).

    Output shape:
        The input's shape (and dtype; integer images become floats).

    Example:

    ```python
    import numpy as np
    from keras_nii.layers import RandomBiasField

    layer = RandomBiasField(coefficients=0.5, order=3, seed=0)
    out = layer(np.random.rand(2, 16, 16, 16, 1).astype("float32"))
    ```
    """

    def __init__(
        self,
        coefficients: float | Sequence[float] = 0.5,
        order: int = 3,
        probability: float = 1.0,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(probability=probability, data_format=data_format, seed=seed, **kwargs)
        self.coefficients = check_range("coefficients", coefficients)
        self.order = _check_order("order", order)
        self.terms = _polynomial_terms(self.order)
        # (terms, order + 1, order + 1, order + 1): which monomial each term is
        selector = np.zeros((len(self.terms),) + (self.order + 1,) * 3, dtype="float32")
        for t, (i, j, k) in enumerate(self.terms):
            selector[t, i, j, k] = 1.0
        self._selector = selector

    def get_random_transformation(self, batch_size: Any, spatial_shape: Sequence[Any]) -> Any:
        low, high = self.coefficients
        return {
            "apply": self.coin(batch_size, self.probability),
            "coefficients": self.uniform((batch_size, len(self.terms)), low, high),
        }

    def log_field(self, coefficients: Any, spatial_shape: Sequence[Any]) -> Any:
        """``P(x, y, z)``, ``(batch, x, y, z)`` float32, of ``(batch, terms)``
        coefficients (in the order of ``self.terms``)."""
        grid = ops.einsum(
            "bt,tijk->bijk",
            ops.cast(coefficients, "float32"),
            ops.convert_to_tensor(self._selector),
        )
        powers = []
        for size in spatial_shape:
            u = _unit_coordinates(size)
            powers.append(ops.stack([u**p for p in range(self.order + 1)], axis=1))
        field = ops.einsum("bijk,zk->bijz", grid, powers[2])
        field = ops.einsum("bijz,yj->biyz", field, powers[1])
        return ops.einsum("biyz,xi->bxyz", field, powers[0])

    def transform_images(self, images: Any, transformation: Any) -> Any:
        x = _work(images)
        log_field = self.log_field(transformation["coefficients"], ops.shape(x)[1:4])
        field = ops.cast(ops.expand_dims(ops.exp(log_field), -1), x.dtype)
        return _select(transformation["apply"], x * field, images)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"coefficients": list(self.coefficients), "order": self.order})
        return config


# ----------------------------------------------------------------------------
# contrast


@register
class RandomContrast3D(_IntensityLayer):
    """Scales the voxel values about their mean by a random factor.

    ``x' = (x - mean) * f + mean`` with ``mean`` the mean of each sample's
    channel over the volume and ``f ~ U(low, high)`` drawn once per sample
    (Keras's ``RandomContrast`` in 3D, without clipping to a value range). The
    mean is kept. It is the mean of the finite voxels; non-finite ones (NaN,
    +-inf) pass through unchanged.

    Args:
        factor: the range of ``f``: a number ``v`` means ``(1 - v, 1 + v)``,
            or a ``(low, high)`` pair. Factors must be ``>= 0``.
        probability: the probability that a sample is transformed.
        data_format: ``"channels_last"`` or ``"channels_first"``.
        seed: int seed of the random stream.

    Input shape:
        ``(x, y, z, c)`` or ``(batch, x, y, z, c)`` (channels last), or a dict
        with the keys ``"images"`` and ``"segmentation_masks"`` (masks are
        returned unchanged).

    Output shape:
        The input's shape (and dtype; integer images become floats).

    Example:

    ```python
    import numpy as np
    from keras_nii.layers import RandomContrast3D

    layer = RandomContrast3D(factor=0.2, seed=0)
    out = layer(np.random.rand(2, 16, 16, 16, 1).astype("float32"))
    ```
    """

    def __init__(
        self,
        factor: float | Sequence[float],
        probability: float = 1.0,
        data_format: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(probability=probability, data_format=data_format, seed=seed, **kwargs)
        self.factor = check_range("factor", factor, symmetric_about=1.0, minimum=0.0)

    def get_random_transformation(self, batch_size: Any, spatial_shape: Sequence[Any]) -> Any:
        low, high = self.factor
        return {
            "apply": self.coin(batch_size, self.probability),
            "factor": self.uniform((batch_size,), low, high),
        }

    def transform_images(self, images: Any, transformation: Any) -> Any:
        x = _work(images)
        shape = ops.shape(x)
        mean = reduce_volumes(x, "sum") / ops.cast(shape[1] * shape[2] * shape[3], x.dtype)

        def over_finite_voxels() -> Any:
            finite = ops.isfinite(x)
            count = reduce_volumes(ops.cast(finite, x.dtype), "sum")
            return reduce_volumes(ops.where(finite, x, 0.0), "sum") / ops.maximum(count, 1.0)

        # a non-finite voxel makes the sum non-finite: only then is it taken again
        mean = ops.cond(ops.all(ops.isfinite(mean)), lambda: mean, over_finite_voxels)
        factor = broadcast_per_sample(transformation["factor"], x)
        out = ops.where(ops.isfinite(x), (x - mean) * factor + mean, x)
        return _select(transformation["apply"], out, images)

    def get_config(self) -> dict:
        config = super().get_config()
        config["factor"] = list(self.factor)
        return config
