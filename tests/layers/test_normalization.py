"""ZScoreNormalization, MinMaxNormalization and IntensityWindow against NumPy references."""

from __future__ import annotations

import os

import keras
import nibabel
import numpy as np
import pytest

import keras_nii
from keras_nii.layers.normalization import (
    IntensityWindow,
    MinMaxNormalization,
    ZScoreNormalization,
)
from tests.layers.conftest import compiled, tensorflow_only, to_numpy

DATA = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")


def load(name: str) -> np.ndarray:
    path = os.path.join(DATA, name)
    if not os.path.isfile(path):
        pytest.skip(f"nibabel's test data is not installed ({path})")
    return keras_nii.load_nifti(path).array


# ----------------------------------------------------------------------------
# NumPy references (float64)


def zscore_reference(x, nonzero=False, per_channel=True, epsilon=1e-8):
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        groups = [[c] for c in range(x.shape[-1])] if per_channel else [list(range(x.shape[-1]))]
        for channels in groups:
            v = x[b][..., channels]
            keep = v != 0 if nonzero else np.ones(v.shape, bool)
            if not keep.any():
                out[b][..., channels] = 0
                continue
            mean = v[keep].mean()
            std = v[keep].std()  # ddof=0, as MONAI
            std = 1.0 if std < epsilon else std
            res = np.where(keep, (v - mean) / std, 0.0)
            out[b][..., channels] = res
    return out


def minmax_reference(x, output_range=(0.0, 1.0), percentiles=None, clip=True, per_channel=True):
    x = np.asarray(x, np.float64)
    a, b = output_range
    out = np.zeros_like(x)
    for s in range(x.shape[0]):
        groups = [[c] for c in range(x.shape[-1])] if per_channel else [list(range(x.shape[-1]))]
        for channels in groups:
            v = x[s][..., channels]
            if percentiles is None:
                low, high = v.min(), v.max()
            else:
                low, high = np.percentile(v, percentiles)
            if high > low:
                res = (v - low) / (high - low) * (b - a) + a
            else:
                res = np.full_like(v, a)
            out[s][..., channels] = np.clip(res, a, b) if clip else res
    return out


def window_reference(x, minval, maxval, output_range=(0.0, 1.0), clip=True):
    a, b = output_range
    res = (np.asarray(x, np.float64) - minval) / (maxval - minval) * (b - a) + a
    return np.clip(res, a, b) if clip else res


# ----------------------------------------------------------------------------
# ZScoreNormalization


def test_zscore_nonzero_on_anatomical_matches_numpy():
    anatomical = load("anatomical.nii")  # (33, 41, 25, 1), no zero voxels
    # a skull-stripped-like volume: background (the dimmest 40%) set to 0
    masked = np.where(anatomical > np.percentile(anatomical, 40), anatomical, 0).astype("float32")
    batch = np.stack([masked, anatomical])
    out = to_numpy(ZScoreNormalization(nonzero=True)(batch))
    expected = zscore_reference(batch, nonzero=True)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # zero voxels stay exactly zero, and the others have mean 0, std 1
    assert np.all(out[0][masked == 0] == 0)
    foreground = out[0][masked != 0]
    assert abs(foreground.mean()) < 1e-5 and abs(foreground.std() - 1) < 1e-5
    # without zeros in the volume, nonzero makes no difference
    plain = to_numpy(ZScoreNormalization()(batch[1:]))
    np.testing.assert_allclose(plain, out[1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain, zscore_reference(batch[1:]), rtol=1e-5, atol=1e-5)


def test_zscore_differs_from_nonzero_when_there_is_background(rng):
    x = rng.normal(50, 10, size=(1, 10, 10, 10, 1)).astype("float32")
    x[:, :5] = 0
    with_zeros = to_numpy(ZScoreNormalization()(x))
    nonzero = to_numpy(ZScoreNormalization(nonzero=True)(x))
    np.testing.assert_allclose(with_zeros, zscore_reference(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nonzero, zscore_reference(x, nonzero=True), rtol=1e-5, atol=1e-5)
    assert np.all(nonzero[:, :5] == 0) and not np.all(with_zeros[:, :5] == 0)


def test_zscore_statistics_are_per_sample(rng):
    a = rng.normal(0.0, 1.0, size=(8, 9, 10, 1))
    b = rng.normal(1000.0, 50.0, size=(8, 9, 10, 1))
    batch = np.stack([a, b]).astype("float32")
    layer = ZScoreNormalization()
    out = to_numpy(layer(batch))
    for i in range(2):
        alone = to_numpy(layer(batch[i : i + 1]))[0]
        np.testing.assert_allclose(out[i], alone, rtol=1e-5, atol=1e-5)
        assert abs(out[i].mean()) < 1e-4 and abs(out[i].std() - 1) < 1e-4


def test_zscore_per_channel_or_not_on_functional():
    functional = load("functional.nii")  # (17, 21, 3, 20): time as channels
    two = functional[..., :2].copy()
    two[..., 1] = two[..., 1] * 3 + 500  # a second "modality" on another scale
    batch = two[None].astype("float32")
    per = to_numpy(ZScoreNormalization(per_channel=True)(batch))
    joint = to_numpy(ZScoreNormalization(per_channel=False)(batch))
    np.testing.assert_allclose(per, zscore_reference(batch), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        joint, zscore_reference(batch, per_channel=False), rtol=1e-5, atol=1e-5
    )
    for c in range(2):
        assert abs(per[..., c].mean()) < 1e-5 and abs(per[..., c].std() - 1) < 1e-4
    assert abs(joint.mean()) < 1e-5 and abs(joint.std() - 1) < 1e-4
    assert abs(joint[..., 1].mean()) > 0.5  # the channels were not equalized


@pytest.mark.parametrize("nonzero", [False, True])
def test_zscore_constant_and_all_zero_volumes_are_finite(nonzero):
    x = np.zeros((3, 6, 6, 6, 1), "float32")
    x[0] = 1000.3  # constant, non-zero
    x[1] = 0.1  # constant, not exactly representable
    # x[2] all zero
    out = to_numpy(ZScoreNormalization(nonzero=nonzero)(x))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, 0)
    # nearly constant: std below epsilon is taken as 1, the volume is only centred
    y = np.full((1, 4, 4, 4, 1), 1000.0, "float32")
    y[0, 0, 0, 0, 0] = np.nextafter(np.float32(1000), np.float32(2000))  # std ~7.6e-6
    out = to_numpy(ZScoreNormalization(nonzero=nonzero, epsilon=1e-3)(y))
    expected = y.astype("float64") - y.astype("float64").mean()
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_zscore_sparse_foreground_that_the_shift_subsample_misses(rng):
    # the shift is taken from every 4th voxel along each axis; here sample 0's
    # non-zero voxels all lie off that grid (the whole volume is searched
    # instead), sample 1's foreground is constant, sample 2 is on the grid
    x = np.zeros((3, 9, 9, 9, 1), "float32")
    x[0, 1::4, 2::4, 3::4] = rng.normal(-1000, 2, size=x[0, 1::4, 2::4, 3::4].shape)
    x[1, 1::2, 1::2, 1::2] = 0.1  # constant, not exactly representable, off the grid
    x[2, ::4, ::4, ::4] = rng.normal(5, 1, size=x[2, ::4, ::4, ::4].shape)
    layer = ZScoreNormalization(nonzero=True)
    for fn in (layer, compiled(lambda t: layer(t))):
        out = to_numpy(fn(x))
        np.testing.assert_allclose(out, zscore_reference(x, nonzero=True), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out[1], 0)  # constant foreground: exactly 0
        assert np.all(out[x == 0] == 0)
        for b in (0, 2):
            inside = out[b][x[b] != 0]
            assert abs(inside.mean()) < 1e-5 and abs(inside.std() - 1) < 1e-4


@pytest.mark.parametrize("nonzero", [False, True])
def test_zscore_compiled_matches_numpy_and_keeps_constants_exact(rng, nonzero):
    x = rng.normal(300, 40, size=(3, 12, 10, 8, 2)).astype("float32")
    x[:, :3] = 0
    x[1] = 1000.3  # constant
    x[2, ..., 1] = -1024.0  # a constant channel (CT air)
    for per_channel in (True, False):
        layer = ZScoreNormalization(nonzero=nonzero, per_channel=per_channel)
        out = to_numpy(compiled(lambda t, layer=layer: layer(t))(x))
        expected = zscore_reference(x, nonzero=nonzero, per_channel=per_channel)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out[1], 0)
        if per_channel:
            np.testing.assert_array_equal(out[2, ..., 1], 0)


def test_zscore_large_offset_small_spread_keeps_precision(rng):
    # CT-like: a large offset, a spread 1e5 times smaller (float32 resolves
    # ~6e-5 at 1000): the shift by a voxel value keeps the z-scores accurate
    x = (-1000.0 + rng.normal(0, 0.01, size=(2, 16, 16, 16, 1))).astype("float32")
    layer = ZScoreNormalization()
    for fn in (layer, compiled(lambda t: layer(t))):
        out = to_numpy(fn(x))
        np.testing.assert_allclose(out, zscore_reference(x), atol=2e-4)
        assert abs(out.std() - 1) < 1e-4


@tensorflow_only
def test_zscore_dynamic_shapes_in_graph_and_data(rng):
    import tensorflow as tf

    layer = ZScoreNormalization(nonzero=True)
    fn = tf.function(
        lambda t: layer(t), input_signature=[tf.TensorSpec((None, None, None, None, 1))]
    )
    for shape in [(1, 5, 6, 7, 1), (2, 9, 4, 3, 1), (1, 1, 1, 1, 1)]:
        x = rng.normal(10, 2, size=shape).astype("float32")
        x[..., :1, :] = 0
        np.testing.assert_allclose(
            fn(x).numpy(), zscore_reference(x, nonzero=True), rtol=1e-5, atol=1e-5
        )
    x = rng.normal(10, 2, size=(4, 6, 6, 6, 1)).astype("float32")
    x[1] = 0
    batches = tf.data.Dataset.from_tensor_slices(x).batch(2).map(layer)
    out = np.concatenate([b.numpy() for b in batches])
    np.testing.assert_allclose(out, zscore_reference(x, nonzero=True), rtol=1e-5, atol=1e-5)


def test_zscore_masks_untouched_and_training_false_applies(rng):
    x = rng.normal(3, 2, size=(2, 6, 7, 8, 1)).astype("float32")
    mask = rng.integers(0, 3, size=(2, 6, 7, 8, 1)).astype("int32")
    layer = ZScoreNormalization()
    out = layer({"images": x, "segmentation_masks": mask}, training=False)
    assert keras.backend.standardize_dtype(out["segmentation_masks"].dtype) == "int32"
    np.testing.assert_array_equal(to_numpy(out["segmentation_masks"]), mask)
    np.testing.assert_allclose(to_numpy(out["images"]), zscore_reference(x), rtol=1e-5, atol=1e-5)


def fixed_zscore_reference(x, mean, std, nonzero=False):
    x = np.asarray(x, np.float64)
    out = (x - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)
    return np.where(x != 0, out, 0.0) if nonzero else out


@pytest.mark.parametrize("nonzero", [False, True])
def test_zscore_fixed_statistics_match_numpy_and_ignore_the_sample(rng, nonzero):
    # CT-like: two samples of very different content get the same affine map
    x = rng.normal(40, 300, size=(2, 7, 6, 5, 1)).astype("float32")
    x[1] = x[1] * 0.1 + 900
    x[:, :2] = 0
    layer = ZScoreNormalization(mean=95.6, std=48.2, nonzero=nonzero)
    for fn in (layer, compiled(lambda t: layer(t))):
        out = to_numpy(fn(x))
        expected = fixed_zscore_reference(x, 95.6, 48.2, nonzero)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        # each sample alone gives the same: nothing depends on the batch or the data
        np.testing.assert_allclose(to_numpy(fn(x[1:])), out[1:], rtol=1e-6, atol=1e-6)
    if nonzero:
        assert np.all(out[:, :2] == 0)
    else:
        np.testing.assert_allclose(out[:, :2], -95.6 / 48.2, rtol=1e-6)


def test_zscore_fixed_statistics_per_channel(rng):
    # two modalities with their own dataset statistics; per_channel does not matter
    x = np.concatenate(
        [rng.normal(300, 80, size=(2, 6, 5, 4, 1)), rng.normal(-2, 0.5, size=(2, 6, 5, 4, 1))],
        axis=-1,
    ).astype("float32")
    for per_channel in (True, False):
        layer = ZScoreNormalization(mean=[300.0, -2.0], std=[80.0, 0.5], per_channel=per_channel)
        out = to_numpy(layer(x))
        expected = fixed_zscore_reference(x, [300.0, -2.0], [80.0, 0.5])
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # channels_first takes the list along its channel axis too
    first = ZScoreNormalization(mean=[300.0, -2.0], std=[80.0, 0.5], data_format="channels_first")
    out = to_numpy(first(np.transpose(x, (0, 4, 1, 2, 3))))
    np.testing.assert_allclose(out, np.transpose(expected, (0, 4, 1, 2, 3)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 channels"):
        ZScoreNormalization(mean=[1.0, 2.0], std=[1.0, 1.0])(np.ones((1, 4, 4, 4, 3), "float32"))


def test_zscore_fixed_statistics_survive_saving(tmp_path, rng):
    inputs = keras.Input((None, None, None, 2))
    outputs = ZScoreNormalization(mean=[95.5, -3.0], std=[48.25, 2.0])(inputs)
    model = keras.Model(inputs, outputs)
    path = str(tmp_path / "fixed.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.layers[-1]
    assert layer.mean == (95.5, -3.0) and layer.std == (48.25, 2.0)
    x = rng.normal(50, 40, size=(1, 5, 4, 3, 2)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(loaded(x)),
        fixed_zscore_reference(x, [95.5, -3.0], [48.25, 2.0]),
        rtol=1e-5,
        atol=1e-5,
    )


# ----------------------------------------------------------------------------
# MinMaxNormalization


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("percentiles", [None, (2.0, 98.0), (0.5, 99.5)])
def test_minmax_matches_numpy(per_channel, percentiles):
    functional = load("functional.nii")
    batch = np.stack([functional[..., :2], functional[..., 5:7] * 0.5 - 100]).astype("float32")
    layer = MinMaxNormalization(
        output_range=(-1.0, 1.0), percentiles=percentiles, per_channel=per_channel
    )
    out = to_numpy(layer(batch))
    expected = minmax_reference(batch, (-1.0, 1.0), percentiles, per_channel=per_channel)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-6)
    assert out.min() >= -1 and out.max() <= 1


def test_minmax_percentiles_without_clip_keep_outliers(rng):
    x = rng.normal(0, 1, size=(2, 8, 8, 8, 1)).astype("float32")
    x[0, 0, 0, 0, 0] = 50.0  # an outlier that min/max scaling would let dominate
    layer = MinMaxNormalization(percentiles=(1, 99), clip=False)
    out = to_numpy(layer(x))
    expected = minmax_reference(x, percentiles=(1, 99), clip=False)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-6)
    assert out.max() > 1 and out.min() < 0
    clipped = to_numpy(MinMaxNormalization(percentiles=(1, 99))(x))
    np.testing.assert_allclose(clipped, np.clip(expected, 0, 1), rtol=1e-5, atol=2e-6)


def test_minmax_constant_volume_maps_to_low_end():
    x = np.zeros((2, 5, 5, 5, 2), "float32")
    x[0] = 7.0
    x[1, ..., 1] = np.arange(125, dtype="float32").reshape(5, 5, 5)
    for percentiles in (None, (5, 95)):
        out = to_numpy(MinMaxNormalization(output_range=(2, 3), percentiles=percentiles)(x))
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out[0], 2.0)
        np.testing.assert_array_equal(out[1, ..., 0], 2.0)
        np.testing.assert_allclose(
            out[1, ..., 1], minmax_reference(x, (2, 3), percentiles)[1, ..., 1], rtol=1e-6
        )


def test_minmax_percentiles_compile(rng):
    x = rng.normal(size=(2, 7, 8, 9, 2)).astype("float32")
    layer = MinMaxNormalization(percentiles=(3, 97))
    out = to_numpy(compiled(lambda t: layer(t))(x))
    np.testing.assert_allclose(out, minmax_reference(x, percentiles=(3, 97)), rtol=1e-5, atol=2e-6)


@tensorflow_only
def test_minmax_percentiles_dynamic_shapes_in_graph(rng):
    import tensorflow as tf

    layer = MinMaxNormalization(percentiles=(3, 97), per_channel=False)
    fn = tf.function(
        lambda t: layer(t), input_signature=[tf.TensorSpec((None, None, None, None, 1))]
    )
    for shape in [(1, 5, 6, 7, 1), (2, 9, 4, 3, 1)]:
        x = rng.normal(size=shape).astype("float32")
        out = fn(x).numpy()
        np.testing.assert_allclose(
            out, minmax_reference(x, percentiles=(3, 97), per_channel=False), rtol=1e-5, atol=2e-6
        )


# ----------------------------------------------------------------------------
# IntensityWindow


def test_intensity_window_matches_numpy_on_int16_ct(rng):
    ct = rng.integers(-1024, 3000, size=(2, 8, 9, 10, 1)).astype("int16")
    layer = IntensityWindow(minval=-1000, maxval=400)
    out = layer(ct)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(
        to_numpy(out), window_reference(ct, -1000, 400), rtol=1e-6, atol=1e-6
    )
    free = to_numpy(IntensityWindow(-160, 240, output_range=(-1, 1), clip=False)(ct))
    np.testing.assert_allclose(
        free, window_reference(ct, -160, 240, (-1, 1), clip=False), rtol=1e-6, atol=1e-5
    )
    assert free.max() > 1 and free.min() < -1


# ----------------------------------------------------------------------------
# all three: dtypes, layouts, arguments


def example_layers():
    return [
        ZScoreNormalization(),
        ZScoreNormalization(nonzero=True, per_channel=False),
        ZScoreNormalization(mean=150.0, std=40.0, nonzero=True),
        MinMaxNormalization(),
        MinMaxNormalization(percentiles=(1, 99), output_range=(-1, 1)),
        IntensityWindow(-100, 300),
    ]


def test_integer_images_are_cast_to_float(rng):
    x = rng.integers(-500, 2000, size=(2, 6, 6, 6, 1)).astype("int16")
    for layer in example_layers():
        out = layer(x)
        assert keras.backend.standardize_dtype(out.dtype) == "float32", layer
        expected = to_numpy(layer(x.astype("float32")))
        np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-6, atol=1e-6)


def test_float16_in_float16_out(rng):
    # Keras autocasts float inputs to the layer's compute dtype, so float16
    # images stay float16 under a float16 policy (mixed precision); the
    # statistics are still computed in float32 inside.
    x = rng.normal(200, 60, size=(2, 6, 7, 8, 2))
    x[:, :2] = 0
    half = x.astype("float16")
    for layer in example_layers():
        config = layer.get_config()
        config["dtype"] = "mixed_float16"
        mixed = type(layer).from_config(config)
        out = mixed(half)
        assert keras.backend.standardize_dtype(out.dtype) == "float16", layer
        out = to_numpy(out).astype("float32")
        assert np.all(np.isfinite(out))
        # the float32 result, up to the float16 rounding of the output
        reference = to_numpy(layer(half.astype("float32")))
        np.testing.assert_allclose(out, reference, rtol=2e-3, atol=2e-3)


def test_channels_first_agrees_with_channels_last(rng):
    x = rng.normal(10, 3, size=(2, 5, 6, 7, 3)).astype("float32")
    x[:, :, :2] = 0
    for layer in example_layers():
        config = layer.get_config()
        config["data_format"] = "channels_first"
        first = type(layer).from_config(config)
        out = to_numpy(first(np.transpose(x, (0, 4, 1, 2, 3))))
        expected = np.transpose(to_numpy(layer(x)), (0, 4, 1, 2, 3))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_unbatched_input(rng):
    x = rng.normal(size=(5, 6, 7, 2)).astype("float32")
    for layer in example_layers():
        out = to_numpy(layer(x))
        np.testing.assert_allclose(out, to_numpy(layer(x[None]))[0], rtol=1e-6, atol=1e-6)


def test_config_round_trip():
    for layer in example_layers():
        config = layer.get_config()
        assert type(layer).from_config(config).get_config() == config


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: ZScoreNormalization(epsilon=0), "epsilon"),
        (lambda: ZScoreNormalization(nonzero="yes"), "nonzero"),
        (lambda: ZScoreNormalization(per_channel=1), "per_channel"),
        (lambda: ZScoreNormalization(mean=1.0), "mean and std"),
        (lambda: ZScoreNormalization(std=1.0), "mean and std"),
        (lambda: ZScoreNormalization(mean=float("nan"), std=1.0), "mean"),
        (lambda: ZScoreNormalization(mean="0", std=1.0), "mean"),
        (lambda: ZScoreNormalization(mean=[], std=1.0), "mean"),
        (lambda: ZScoreNormalization(mean=0.0, std=0.0), "std"),
        (lambda: ZScoreNormalization(mean=0.0, std=[1.0, -2.0]), "std"),
        (lambda: ZScoreNormalization(mean=0.0, std=float("inf")), "std"),
        (lambda: MinMaxNormalization(output_range=(1, 0)), "output_range"),
        (lambda: MinMaxNormalization(output_range=(1, 1)), "output_range"),
        (lambda: MinMaxNormalization(output_range=1.0), "output_range"),
        (lambda: MinMaxNormalization(percentiles=(-1, 99)), "percentiles"),
        (lambda: MinMaxNormalization(percentiles=(1, 101)), "percentiles"),
        (lambda: MinMaxNormalization(percentiles=(60, 40)), "percentiles"),
        (lambda: MinMaxNormalization(percentiles=(50, 50)), "percentiles"),
        (lambda: MinMaxNormalization(clip=None), "clip"),
        (lambda: IntensityWindow(400, -1000), "minval"),
        (lambda: IntensityWindow(0, 0), "minval"),
        (lambda: IntensityWindow(float("nan"), 1), "minval"),
        (lambda: IntensityWindow(0, "1"), "maxval"),
        (lambda: IntensityWindow(0, 1, output_range=(0, 1, 2)), "output_range"),
    ],
)
def test_bad_arguments_name_the_argument(build, name):
    with pytest.raises(ValueError, match=name):
        build()


EXAMPLES = [
    lambda: ZScoreNormalization(nonzero=True, per_channel=False, epsilon=1e-6),
    lambda: MinMaxNormalization(
        output_range=(-1.0, 1.0), percentiles=(0.5, 99.5), clip=False, per_channel=False
    ),
    lambda: IntensityWindow(minval=-1000.0, maxval=400.0, output_range=(0.0, 2.0), clip=True),
]
