"""Intensity augmentation layers against NumPy/scipy references of their drawn parameters."""

import math

import numpy as np
import pytest
from keras import ops
from scipy import ndimage, stats

from keras_nii.layers import (
    RandomBiasField,
    RandomContrast3D,
    RandomGamma,
    RandomGaussianBlur3D,
    RandomGaussianNoise,
    RandomIntensityScale,
    RandomIntensityShift,
)
from tests.layers.conftest import compiled, to_numpy

SHAPE = (10, 12, 9)


def volume(rng, batch=3, channels=2, shape=SHAPE, loc=0.0):
    return rng.normal(loc, 1.0, size=(batch, *shape, channels)).astype("float32")


def draw_and_apply(layer, images):
    """The layer's transformation, drawn by hand, and its result on ``images``."""
    transformation = layer.get_random_transformation(images.shape[0], images.shape[1:4])
    out = layer.transform_images(ops.convert_to_tensor(images), transformation)
    return to_numpy(transformation), to_numpy(out)


def per_sample(values):
    return np.asarray(values).reshape(-1, 1, 1, 1, 1)


ALL_LAYERS = [
    lambda **kw: RandomIntensityShift(offset=0.5, **kw),
    lambda **kw: RandomIntensityShift(offset=0.5, per_channel=True, **kw),
    lambda **kw: RandomIntensityScale(factor=0.3, **kw),
    lambda **kw: RandomIntensityScale(factor=0.3, per_channel=True, **kw),
    lambda **kw: RandomGamma(**kw),
    lambda **kw: RandomGaussianNoise(std=(0.05, 0.2), **kw),
    lambda **kw: RandomGaussianBlur3D(sigma=(0.5, 1.0), **kw),
    lambda **kw: RandomBiasField(coefficients=0.4, order=2, **kw),
    lambda **kw: RandomContrast3D(factor=0.4, **kw),
]


# ----------------------------------------------------------------------------
# shared behaviour


@pytest.mark.parametrize("make", ALL_LAYERS)
def test_masks_untouched_and_probability_zero_is_identity(rng, make):
    images = volume(rng, loc=3.0)
    for mask_dtype in ("int32", "uint8"):
        masks = rng.integers(0, 3, size=(3, *SHAPE, 1)).astype(mask_dtype)
        out = to_numpy(make(seed=1)({"images": images, "segmentation_masks": masks}))
        assert out["segmentation_masks"].dtype == np.dtype(mask_dtype)
        np.testing.assert_array_equal(out["segmentation_masks"], masks)
        assert out["images"].dtype == np.float32
        assert not np.allclose(out["images"], images)
    never = to_numpy(make(probability=0.0, seed=1)(images))
    np.testing.assert_array_equal(never, images)


@pytest.mark.parametrize("make", ALL_LAYERS)
def test_each_sample_its_own_draw_and_seeds_reproduce(rng, make):
    images = np.repeat(volume(rng, batch=1, loc=3.0), 3, axis=0)
    out = to_numpy(make(seed=5)(images))
    assert not np.allclose(out[0], out[1]) and not np.allclose(out[1], out[2])
    np.testing.assert_array_equal(out, to_numpy(make(seed=5)(images)))


@pytest.mark.parametrize("make", ALL_LAYERS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_in_low_precision_out(rng, make, dtype):
    images = volume(rng, loc=3.0)
    layer = make(seed=2)
    transformation = layer.get_random_transformation(3, SHAPE)
    out = layer.transform_images(ops.cast(images, dtype), transformation)
    assert ops.dtype(out) == dtype
    assert np.all(np.isfinite(to_numpy(ops.cast(out, "float32"))))


def test_probability_picks_samples(rng):
    images = volume(rng, batch=12, loc=3.0)
    layer = RandomIntensityShift(offset=(1.0, 2.0), probability=0.5, seed=3)
    t, out = draw_and_apply(layer, images)
    assert 0 < t["apply"].sum() < 12
    np.testing.assert_array_equal(out[~t["apply"]], images[~t["apply"]])
    assert np.all(out[t["apply"]] >= images[t["apply"]] + 1.0 - 1e-5)


# ----------------------------------------------------------------------------
# shift and scale


def test_shift_adds_the_drawn_offset(rng):
    images = volume(rng)
    t, out = draw_and_apply(RandomIntensityShift(offset=(-2.0, 3.0), seed=0), images)
    assert t["offset"].shape == (3,)
    assert np.all((t["offset"] >= -2.0) & (t["offset"] < 3.0))
    np.testing.assert_allclose(out, images + per_sample(t["offset"]), rtol=1e-6, atol=1e-6)


def test_scale_multiplies_by_the_drawn_factor(rng):
    images = volume(rng)
    t, out = draw_and_apply(RandomIntensityScale(factor=0.5, seed=0), images)
    assert np.all((t["factor"] >= 0.5) & (t["factor"] < 1.5))
    np.testing.assert_allclose(out, images * per_sample(t["factor"]), rtol=1e-6)


def test_per_channel_shift_and_scale_draw_each_channel(rng):
    images = volume(rng, channels=4, loc=5.0)
    shift = RandomIntensityShift(offset=1.0, per_channel=True, seed=0)
    t = to_numpy(shift.get_random_transformation(3, SHAPE, 4))
    assert t["offset"].shape == (3, 4)
    assert np.all(np.abs(t["offset"]) <= 1.0)
    assert all(len(np.unique(row)) == 4 for row in t["offset"])
    out = to_numpy(shift.transform_images(ops.convert_to_tensor(images), t))
    np.testing.assert_allclose(out, images + t["offset"][:, None, None, None, :], rtol=1e-6)

    scale = RandomIntensityScale(factor=(0.5, 2.0), per_channel=True, seed=0)
    t = to_numpy(scale.get_random_transformation(3, SHAPE, 4))
    assert np.all((t["factor"] >= 0.5) & (t["factor"] < 2.0))
    out = to_numpy(scale.transform_images(ops.convert_to_tensor(images), t))
    np.testing.assert_allclose(out, images * t["factor"][:, None, None, None, :], rtol=1e-6)

    # called on images, the layer reads the channel count and draws one value per channel
    for layer in (shift, scale):
        out = to_numpy(layer(images))
        change = out - images if layer is shift else out / images
        np.testing.assert_allclose(
            change, change[:, :1, :1, :1, :] + 0 * change, rtol=1e-4, atol=1e-5
        )
        assert all(len(np.unique(np.round(row, 5))) == 4 for row in change[:, 0, 0, 0, :])


# ----------------------------------------------------------------------------
# gamma


def gamma_reference(images, gamma):
    low = images.min(axis=(1, 2, 3), keepdims=True)
    span = images.max(axis=(1, 2, 3), keepdims=True) - low
    return low + span * ((images - low) / (span + 1e-7)) ** per_sample(gamma)


def test_gamma_one_is_the_identity_and_two_is_the_formula(rng):
    images = volume(rng, loc=-1.0)  # negative values are fine: the range is the sample's own
    _, out = draw_and_apply(RandomGamma(gamma=(1.0, 1.0), seed=0), images)
    np.testing.assert_allclose(out, images, rtol=1e-5, atol=1e-5)
    t, out = draw_and_apply(RandomGamma(gamma=(2.0, 2.0), seed=0), images)
    np.testing.assert_array_equal(t["gamma"], 2.0)
    np.testing.assert_allclose(out, gamma_reference(images, t["gamma"]), rtol=1e-5, atol=1e-5)
    # the range of each sample's channel is kept
    np.testing.assert_allclose(out.min(axis=(1, 2, 3)), images.min(axis=(1, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(out.max(axis=(1, 2, 3)), images.max(axis=(1, 2, 3)), atol=1e-5)


def test_gamma_keeps_each_minimum_exactly(rng):
    # unit == 0 maps to exactly 0, as 0 ** gamma does: the minimum voxel of every
    # sample's channel keeps its value bit for bit (0 stays 0), for any gamma
    images = np.abs(volume(rng, channels=2))
    images[0, ..., 0] -= images[0, ..., 0].min()  # a channel whose minimum is 0
    images[1, ..., 1] = images[1, ..., 1] * 1e-30  # tiny values: clipped logs stay finite
    for gamma in (0.5, 1.0, 2.0):
        _, out = draw_and_apply(RandomGamma(gamma=(gamma, gamma), seed=0), images)
        assert np.all(np.isfinite(out))
        for b in range(images.shape[0]):
            for c in range(images.shape[-1]):
                at = images[b, ..., c] == images[b, ..., c].min()
                np.testing.assert_array_equal(out[b, ..., c][at], images[b, ..., c][at])
        np.testing.assert_allclose(
            out, gamma_reference(images, np.full(images.shape[0], gamma)), rtol=1e-5, atol=1e-5
        )


def test_gamma_draws_log_uniformly_in_the_range(rng):
    images = volume(rng, batch=2)
    t, out = draw_and_apply(RandomGamma(gamma=(0.5, 2.0), seed=1), images)
    np.testing.assert_allclose(out, gamma_reference(images, t["gamma"]), rtol=1e-5, atol=1e-5)
    layer = RandomGamma(gamma=(0.5, 2.0), seed=2)
    gammas = to_numpy(layer.get_random_transformation(4000, SHAPE)["gamma"])
    assert np.all((gammas >= 0.5) & (gammas <= 2.0))
    # log-uniform: gamma < 1 and gamma > 1 equally likely
    assert abs(np.mean(gammas < 1.0) - 0.5) < 0.04


# ----------------------------------------------------------------------------
# noise


def test_noise_has_the_drawn_std_and_mean(rng):
    images = volume(rng, batch=3, channels=2, shape=(16, 16, 16))
    layer = RandomGaussianNoise(std=(0.1, 1.0), mean=0.5, seed=0)
    t, out = draw_and_apply(layer, images)
    noise = (out - images).reshape(3, -1)
    np.testing.assert_allclose(noise.std(axis=1), t["sigma"], rtol=0.05)
    np.testing.assert_allclose(noise.mean(axis=1), 0.5, atol=0.05)
    assert np.all((t["sigma"] >= 0.1) & (t["sigma"] < 1.0))


def test_noise_is_normally_distributed():
    # one sigma, 2 * 48^3 draws: the standardized noise against N(0, 1)
    images = np.zeros((2, 48, 48, 48, 1), "float32")
    layer = RandomGaussianNoise(std=(0.3, 0.3), seed=3)
    for _draw in range(2):  # two successive draws of the stream
        _, out = draw_and_apply(layer, images)
        z = out.ravel().astype("float64") / 0.3
        assert np.all(np.isfinite(z))
        assert stats.kstest(z, "norm").pvalue > 1e-3
        # both tails are there, beyond 4 sigma, and not beyond what float32 allows
        assert z.min() < -4 and z.max() > 4 and np.abs(z).max() < 6
        # third and fourth moments of a normal: 0 and 3
        assert abs(stats.skew(z)) < 0.02 and abs(stats.kurtosis(z, fisher=False) - 3) < 0.05


# ----------------------------------------------------------------------------
# blur


def test_blur_with_a_fixed_sigma_is_scipys_gaussian_filter(rng):
    images = volume(rng)
    for sigma in (1.0, (0.7, 1.3, 0.0)):
        layer = RandomGaussianBlur3D(sigma=sigma, seed=0)
        _, out = draw_and_apply(layer, images)
        sigmas = (sigma,) * 3 if np.isscalar(sigma) else sigma
        radius = [math.ceil(3 * s) for s in sigmas]
        expected = ndimage.gaussian_filter(
            images.astype("float64"),
            sigma=[s if s > 0 else 0 for s in sigmas],
            mode="reflect",
            radius=[max(r, 1) for r in radius],
            axes=(1, 2, 3),
        )
        np.testing.assert_allclose(out, expected, atol=1e-5)


def test_blur_per_sample_sigmas_and_short_axes(rng):
    # an axis shorter than the kernel radius is mirrored as often as needed
    images = volume(rng, batch=3, channels=1, shape=(9, 3, 7))
    layer = RandomGaussianBlur3D(sigma=((0.5, 1.5), (1.0, 2.0), (0.2, 0.8)), seed=4)
    t, out = draw_and_apply(layer, images)
    radius = [math.ceil(3 * 1.5), math.ceil(3 * 2.0), math.ceil(3 * 0.8)]
    assert len(np.unique(t["sigma"][:, 0])) == 3
    for b in range(3):
        expected = ndimage.gaussian_filter(
            images[b].astype("float64"),
            sigma=t["sigma"][b],
            mode="reflect",
            radius=radius,
            axes=(0, 1, 2),
        )
        np.testing.assert_allclose(out[b], expected, atol=1e-5)


def test_blur_keeps_a_constant_volume():
    images = np.full((2, *SHAPE, 1), 7.25, dtype="float32")
    out = to_numpy(RandomGaussianBlur3D(sigma=(0.5, 2.0), seed=0)(images))
    np.testing.assert_allclose(out, images, rtol=1e-6)


# ----------------------------------------------------------------------------
# bias field


def bias_reference(coefficients, order, shape):
    """``exp(sum c * x^i y^j z^k)`` over ``i + j + k <= order`` (TorchIO's term order)."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    log_field = np.zeros(shape)
    term = 0
    for i in range(order + 1):
        for j in range(order + 1 - i):
            for k in range(order + 1 - (i + j)):
                log_field += coefficients[term] * x**i * y**j * z**k
                term += 1
    assert term == len(coefficients)
    return np.exp(log_field)


def test_bias_field_is_exp_of_the_drawn_polynomial(rng):
    images = volume(rng, loc=5.0)
    layer = RandomBiasField(coefficients=0.5, order=3, seed=0)
    t, out = draw_and_apply(layer, images)
    assert t["coefficients"].shape == (3, 20)
    assert np.all(np.abs(t["coefficients"]) <= 0.5)
    for b in range(3):
        field = bias_reference(t["coefficients"][b], 3, SHAPE)[..., None]
        np.testing.assert_allclose(out[b], images[b] * field, rtol=1e-5, atol=1e-5)
    ratio = out / images
    assert np.all(ratio > 0)
    # smooth, and shared by the channels
    np.testing.assert_allclose(ratio[..., 0], ratio[..., 1], rtol=1e-5)


def test_bias_field_of_order_one_is_log_linear_and_order_zero_constant(rng):
    images = np.abs(volume(rng, loc=5.0)) + 0.5
    _, out = draw_and_apply(RandomBiasField(coefficients=0.8, order=1, seed=0), images)
    log_ratio = np.log(out / images)[..., 0]
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    design = np.stack([np.ones_like(x), x, y, z], axis=-1).reshape(-1, 4)
    for b in range(3):
        _, residual, *_ = np.linalg.lstsq(design, log_ratio[b].reshape(-1), rcond=None)
        assert residual[0] < 1e-8 * design.shape[0]
        assert np.ptp(log_ratio[b]) > 0.1

    t, out = draw_and_apply(RandomBiasField(coefficients=0.8, order=0, seed=0), images)
    assert t["coefficients"].shape == (3, 1)
    ratio = out / images
    np.testing.assert_allclose(
        ratio, per_sample(np.exp(t["coefficients"][:, 0])) + 0 * ratio, rtol=1e-5
    )


# ----------------------------------------------------------------------------
# contrast


def test_contrast_is_the_formula_and_keeps_the_mean(rng):
    images = volume(rng, loc=2.0)
    t, out = draw_and_apply(RandomContrast3D(factor=0.5, seed=0), images)
    assert np.all((t["factor"] >= 0.5) & (t["factor"] < 1.5))
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(
        out, (images - mean) * per_sample(t["factor"]) + mean, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), mean[:, 0, 0, 0], atol=1e-5)


def test_gamma_and_contrast_compiled_match_their_formulas(rng):
    # XLA reduces each sample's voxels in chunks under TensorFlow (ops.reduce);
    # 7 * 6 * 5 voxels leave a remainder after the chunks
    images = volume(rng, shape=(7, 6, 5), loc=2.0)
    images[2, 6, 5, 4, 1] = 40.0  # a maximum in the remainder
    gamma = RandomGamma(gamma=(2.0, 2.0), seed=0)
    t = to_numpy(gamma.get_random_transformation(3, (7, 6, 5)))
    out = to_numpy(compiled(lambda x: gamma.transform_images(x, t))(ops.convert_to_tensor(images)))
    np.testing.assert_allclose(out, gamma_reference(images, t["gamma"]), rtol=1e-5, atol=1e-5)
    contrast = RandomContrast3D(factor=0.5, seed=0)
    t = to_numpy(contrast.get_random_transformation(3, (7, 6, 5)))
    out = to_numpy(
        compiled(lambda x: contrast.transform_images(x, t))(ops.convert_to_tensor(images))
    )
    mean = images.astype("float64").mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(
        out, (images - mean) * per_sample(t["factor"]) + mean, rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------
# non-finite voxels


def with_nonfinite(rng, images):
    """``images`` with a NaN, a +inf and a -inf in every sample and channel."""
    images = images.copy()
    places = ((0, 0, 0), (3, 4, 5), (9, 11, 8))
    for value, (i, j, k) in zip((np.nan, np.inf, -np.inf), places, strict=True):
        images[:, i, j, k, :] = value
    return images


def finite_stats(images, function):
    """``function`` over the finite voxels of each sample and channel, broadcastable."""
    masked = np.ma.masked_invalid(images.astype("float64"))
    return np.ma.filled(function(masked, axis=(1, 2, 3), keepdims=True), np.nan)


def assert_nonfinite_pass_through(out, images):
    bad = ~np.isfinite(images)
    np.testing.assert_array_equal(out[bad], images[bad])  # NaN as NaN, +-inf as +-inf
    assert np.all(np.isfinite(out[~bad]))


@pytest.mark.parametrize("run", ["eager", "compiled"])
def test_gamma_and_contrast_take_their_statistics_over_finite_voxels(rng, run):
    # one NaN made the whole volume NaN; the reductions keep their XLA fast path
    images = with_nonfinite(rng, volume(rng, loc=2.0))
    finite = np.where(np.isfinite(images), images, 0.0)

    def apply(layer, t):
        fn = lambda x: layer.transform_images(x, t)  # noqa: E731
        return to_numpy((compiled(fn) if run == "compiled" else fn)(ops.convert_to_tensor(images)))

    gamma = RandomGamma(gamma=(2.0, 2.0), seed=0)
    t = to_numpy(gamma.get_random_transformation(3, SHAPE))
    out = apply(gamma, t)
    low, high = finite_stats(images, np.ma.min), finite_stats(images, np.ma.max)
    expected = low + (high - low) * ((finite - low) / (high - low + 1e-7)) ** per_sample(2.0)
    good = np.isfinite(images)
    np.testing.assert_allclose(out[good], expected[good], rtol=1e-5, atol=1e-5)
    assert_nonfinite_pass_through(out, images)

    contrast = RandomContrast3D(factor=0.5, seed=0)
    t = to_numpy(contrast.get_random_transformation(3, SHAPE))
    out = apply(contrast, t)
    mean = finite_stats(images, np.ma.mean)
    expected = (finite - mean) * per_sample(t["factor"]) + mean
    np.testing.assert_allclose(out[good], expected[good], rtol=1e-5, atol=1e-5)
    assert_nonfinite_pass_through(out, images)


# ----------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: RandomIntensityShift(offset=-1.0), "offset"),
        (lambda: RandomIntensityShift(offset=(2.0, 1.0)), "offset"),
        (lambda: RandomIntensityShift(offset=1.0, per_channel="yes"), "per_channel"),
        (lambda: RandomIntensityScale(factor=1.5), "factor"),
        (lambda: RandomIntensityScale(factor=(-0.5, 1.0)), "factor"),
        (lambda: RandomGamma(gamma=(0.0, 1.0)), "gamma"),
        (lambda: RandomGamma(gamma=(-1.0, 1.0)), "gamma"),
        (lambda: RandomGaussianNoise(std=(-0.1, 0.1)), "std"),
        (lambda: RandomGaussianNoise(mean="zero"), "mean"),
        (lambda: RandomGaussianBlur3D(sigma=(-1.0, 1.0)), "sigma"),
        (lambda: RandomGaussianBlur3D(sigma=((0.5, 1.0), (1.0, 0.5), 1.0)), "sigma"),
        (lambda: RandomBiasField(order=-1), "order"),
        (lambda: RandomBiasField(order=1.5), "order"),
        (lambda: RandomBiasField(coefficients=(1.0, 0.0)), "coefficients"),
        (lambda: RandomContrast3D(factor=2.0), "factor"),
        (lambda: RandomContrast3D(factor=0.2, probability=-0.1), "probability"),
    ],
)
def test_bad_arguments_name_themselves(build, name):
    with pytest.raises(ValueError, match=name):
        build()


@pytest.mark.parametrize("make", ALL_LAYERS)
def test_config_round_trip(make):
    layer = make(probability=0.4, seed=9)
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


EXAMPLES = [
    lambda: RandomIntensityShift(offset=(-0.2, 0.3), per_channel=True, probability=0.8, seed=1),
    lambda: RandomIntensityScale(factor=0.2, per_channel=True, probability=0.8, seed=2),
    lambda: RandomGamma(gamma=(0.8, 1.25), probability=0.9, seed=3),
    lambda: RandomGaussianNoise(std=(0.5, 2.0), mean=0.1, probability=0.9, seed=4),
    lambda: RandomGaussianBlur3D(sigma=((0.3, 1.0), (0.5, 1.2), 0.8), probability=0.9, seed=5),
    lambda: RandomBiasField(coefficients=0.3, order=2, probability=0.9, seed=6),
    lambda: RandomContrast3D(factor=(0.6, 1.4), probability=0.9, seed=7),
]
