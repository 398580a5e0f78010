"""CenterCropOrPad3D, Resize3D and RandomCrop3D against NumPy slicing and scipy.ndimage."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import scipy.ndimage

from keras_nii.layers.crop import CenterCropOrPad3D, RandomCrop3D, Resize3D
from tests.layers.conftest import compiled, tensorflow_only, to_numpy


def coordinates_volume(batch, size, channels=1):
    """Voxel values that encode their coordinates: (i+1)*10000 + (j+1)*100 + (k+1) (+ 0.5 * c)."""
    i, j, k = np.meshgrid(*[np.arange(s) for s in size], indexing="ij")
    code = (i + 1) * 10000 + (j + 1) * 100 + (k + 1)
    volume = np.stack([code + 0.5 * c for c in range(channels)], axis=-1)
    return np.broadcast_to(volume, (batch, *size, channels)).astype("float32").copy()


def center_reference(x, shape, fill=0.0):
    """NumPy center crop/pad of (b, x, y, z, c): start (size-t)//2, pad before (t-size)//2."""
    for axis, target in zip((1, 2, 3), shape, strict=True):
        size = x.shape[axis]
        if size >= target:
            start = (size - target) // 2
            x = np.take(x, np.arange(start, start + target), axis=axis)
        else:
            before = (target - size) // 2
            widths = [(0, 0)] * x.ndim
            widths[axis] = (before, target - size - before)
            x = np.pad(x, widths, constant_values=fill)
    return x


def resize_affine(shape_in, shape_out):
    ratios = np.asarray(shape_in, np.float64) / np.asarray(shape_out, np.float64)
    return ratios, 0.5 * ratios - 0.5


def scipy_resize(x, shape, order):
    ratios, offset = resize_affine(x.shape[1:4], shape)
    out = np.empty((x.shape[0], *shape, x.shape[4]), dtype=np.float64 if order else x.dtype)
    for b in range(x.shape[0]):
        for c in range(x.shape[4]):
            out[b, ..., c] = scipy.ndimage.affine_transform(
                x[b, ..., c].astype(np.float64) if order else x[b, ..., c],
                np.diag(ratios),
                offset=offset,
                output_shape=shape,
                order=order,
                mode="nearest",
            )
    return out


def recover_starts(volume, patches):
    """The (b, 3) window starts of coordinate-encoded patches, checked exactly."""
    starts = []
    for b, patch in enumerate(patches):
        # the patch's largest code is unique (and never padding): locate it in the input
        inner = np.unravel_index(np.argmax(patch[..., 0]), patch.shape[:3])
        found = np.argwhere(volume[b, ..., 0] == patch[(*inner, 0)])
        assert len(found) == 1, "patch voxel not found in the input"
        start = found[0] - np.asarray(inner)
        assert np.all(start >= 0), "window starts before the input"
        window = volume[b][
            tuple(slice(s, s + t) for s, t in zip(start, patch.shape[:3], strict=True))
        ]
        assert window.shape == patch.shape, "window runs past the input"
        np.testing.assert_array_equal(patch, window)
        starts.append(start)
    return np.asarray(starts)


# ----------------------------------------------------------------------------
# CenterCropOrPad3D


@pytest.mark.parametrize(
    "shape",
    [
        (6, 9, 10),  # crop 3 (odd), pad 3 (odd), crop 1
        (4, 10, 11),  # crop 5, pad 4 (even), same size
        (8, 6, 7),  # crop 1, same size, crop 4 (even)
        (12, 13, 14),  # pad everywhere
    ],
)
def test_center_crop_or_pad_matches_numpy(shape, rng):
    x = rng.normal(size=(2, 9, 6, 11, 2)).astype("float32")
    mask = rng.integers(1, 4, size=(2, 9, 6, 11, 1)).astype("int32")
    layer = CenterCropOrPad3D(shape, fill_value=-3.0)
    out = layer({"images": x, "segmentation_masks": mask})
    assert keras.backend.standardize_dtype(out["segmentation_masks"].dtype) == "int32"
    assert tuple(out["images"].shape) == (2, *shape, 2)
    np.testing.assert_array_equal(to_numpy(out["images"]), center_reference(x, shape, -3.0))
    np.testing.assert_array_equal(
        to_numpy(out["segmentation_masks"]), center_reference(mask, shape, 0)
    )
    # unbatched and channels_first give the same
    np.testing.assert_array_equal(to_numpy(layer(x[0])), center_reference(x, shape, -3.0)[0])
    first = CenterCropOrPad3D(shape, fill_value=-3.0, data_format="channels_first")
    np.testing.assert_array_equal(
        to_numpy(first(np.transpose(x, (0, 4, 1, 2, 3)))),
        np.transpose(center_reference(x, shape, -3.0), (0, 4, 1, 2, 3)),
    )


def test_center_crop_or_pad_applies_with_training_false(rng):
    x = rng.normal(size=(1, 5, 6, 7, 1)).astype("float32")
    out = to_numpy(CenterCropOrPad3D((4, 8, 7))(x, training=False))
    np.testing.assert_array_equal(out, center_reference(x, (4, 8, 7)))


@tensorflow_only
def test_center_crop_or_pad_dynamic_shapes_in_graph(rng):
    import tensorflow as tf

    layer = CenterCropOrPad3D((6, 5, 7), fill_value=1.5)
    fn = tf.function(
        lambda t, m: layer({"images": t, "segmentation_masks": m}),
        input_signature=[
            tf.TensorSpec((None, None, None, None, 2)),
            tf.TensorSpec((None, None, None, None, 1), tf.int32),
        ],
    )
    assert tuple(fn.get_concrete_function().structured_outputs["images"].shape) == (
        None,
        6,
        5,
        7,
        2,
    )
    for size in [(4, 5, 10), (9, 2, 7), (6, 8, 3)]:
        x = rng.normal(size=(2, *size, 2)).astype("float32")
        mask = rng.integers(1, 3, size=(2, *size, 1)).astype("int32")
        out = fn(x, mask)
        np.testing.assert_array_equal(out["images"].numpy(), center_reference(x, (6, 5, 7), 1.5))
        np.testing.assert_array_equal(
            out["segmentation_masks"].numpy(), center_reference(mask, (6, 5, 7), 0)
        )


# ----------------------------------------------------------------------------
# Resize3D


def _assert_no_ties(shape_in, shape_out):
    """Nearest-neighbour comparisons need no source coordinate at exactly .5."""
    ratios, offset = resize_affine(shape_in, shape_out)
    for r, o, n in zip(ratios, offset, shape_out, strict=True):
        fraction = (r * np.arange(n) + o) % 1.0
        assert np.all(np.abs(fraction - 0.5) > 1e-3)


@pytest.mark.parametrize("interpolation, order", [("linear", 1), ("nearest", 0)])
def test_resize_matches_scipy(interpolation, order, rng):
    shape = (8, 15, 10)  # 12 -> 8 shrinks, 9 -> 15 and 7 -> 10 grow
    _assert_no_ties((12, 9, 7), shape)
    x = rng.normal(size=(2, 12, 9, 7, 2)).astype("float32")
    mask = rng.integers(0, 5, size=(2, 12, 9, 7, 1)).astype("int32")
    layer = Resize3D(shape, interpolation=interpolation)
    out = layer({"images": x, "segmentation_masks": mask})
    assert tuple(out["images"].shape) == (2, *shape, 2)
    assert keras.backend.standardize_dtype(out["segmentation_masks"].dtype) == "int32"
    np.testing.assert_allclose(to_numpy(out["images"]), scipy_resize(x, shape, order), atol=1e-5)
    # masks: always nearest, whatever the images get
    np.testing.assert_array_equal(to_numpy(out["segmentation_masks"]), scipy_resize(mask, shape, 0))


def test_resize_to_the_same_shape_is_the_identity(rng):
    x = rng.normal(size=(2, 7, 8, 9, 1)).astype("float32")
    out = to_numpy(Resize3D((7, 8, 9))(x))
    np.testing.assert_array_equal(out, x)


def test_resize_keeps_a_linear_ramp_linear():
    size, shape = (10, 8, 6), (7, 13, 9)
    i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in size], indexing="ij")

    def ramp(a, b, c):
        return 2.0 * a - 3.0 * b + 0.5 * c + 7.0

    x = ramp(i, j, k)[None, ..., None].astype("float32")
    out = to_numpy(Resize3D(shape)(x))[0, ..., 0]
    ratios, offset = resize_affine(size, shape)
    source = [r * np.arange(n) + o for r, o, n in zip(ratios, offset, shape, strict=True)]
    a, b, c = np.meshgrid(*source, indexing="ij")
    inside = np.ones(shape, bool)
    for coordinate, n in zip((a, b, c), size, strict=True):
        inside &= (coordinate >= 0) & (coordinate <= n - 1)
    assert inside.sum() > 0.5 * inside.size
    np.testing.assert_allclose(out[inside], ramp(a, b, c)[inside], atol=1e-4)


def test_resize_channels_first(rng):
    x = rng.normal(size=(1, 6, 5, 4, 3)).astype("float32")
    last = to_numpy(Resize3D((4, 7, 6))(x))
    first = to_numpy(
        Resize3D((4, 7, 6), data_format="channels_first")(np.transpose(x, (0, 4, 1, 2, 3)))
    )
    np.testing.assert_allclose(first, np.transpose(last, (0, 4, 1, 2, 3)), atol=1e-6)


# ----------------------------------------------------------------------------
# alignment of images and masks


def test_masks_stay_aligned_with_images(rng):
    x = scipy.ndimage.gaussian_filter(rng.normal(size=(2, 11, 9, 13, 1)), (0, 2, 2, 2, 0))
    x = (x / x.std() + 1.0).astype("float32")  # mostly positive, a smooth blob structure
    threshold = 1.2
    mask = (x > threshold).astype("int32")
    layers = [
        CenterCropOrPad3D((7, 12, 10), fill_value=0.0),
        Resize3D((8, 12, 10), interpolation="nearest"),
        RandomCrop3D((6, 12, 5), seed=3),
        RandomCrop3D((6, 5, 15), foreground_probability=1.0, seed=4),
    ]
    for layer in layers:
        for _ in range(2 if layer.RANDOM else 1):
            out = to_numpy(layer({"images": x, "segmentation_masks": mask}))
            np.testing.assert_array_equal(
                out["segmentation_masks"], (out["images"] > threshold).astype("int32")
            )


# ----------------------------------------------------------------------------
# RandomCrop3D


def test_random_crop_windows_are_valid_and_per_sample():
    size, shape = (9, 7, 6), (6, 4, 6)
    x = coordinates_volume(16, size, channels=2)
    mask = x[..., :1].astype("int32")
    layer = RandomCrop3D(shape, seed=11)
    starts = []
    for _ in range(4):
        out = to_numpy(layer({"images": x, "segmentation_masks": mask}))
        assert out["images"].shape == (16, *shape, 2)
        np.testing.assert_array_equal(
            out["segmentation_masks"], out["images"][..., :1].astype("int32")
        )
        starts.append(recover_starts(x, out["images"]))
    starts = np.concatenate(starts)
    # each sample its own window, and every valid start is drawn, the extremes included
    assert len({tuple(s) for s in starts[:16]}) > 1
    for axis in range(3):
        np.testing.assert_array_equal(
            np.unique(starts[:, axis]), np.arange(size[axis] - shape[axis] + 1)
        )


def test_random_crop_pads_small_axes_centrally():
    size, shape = (5, 10, 3), (8, 6, 6)  # x and z padded (3 and 3: 1 before, 2 after), y cropped
    x = coordinates_volume(6, size)
    out = to_numpy(RandomCrop3D(shape, seed=2)(x))
    padded = center_reference(x, (8, 10, 6))
    for b in range(6):
        matches = [
            y for y in range(10 - 6 + 1) if np.array_equal(out[b], padded[b, :, y : y + 6, :])
        ]
        assert matches, "patch is not a window of the centrally padded input"


@pytest.mark.parametrize("with_images", [True, False])
def test_random_crop_foreground_centres_the_patch(with_images, rng):
    size, shape = (16, 14, 12), (5, 5, 5)
    batch = 6
    x = coordinates_volume(batch, size)
    mask = np.zeros((batch, *size, 1), "int32")
    voxels = []
    for b in range(batch):
        if b < 4:  # far from the borders: the voxel lands at the patch centre
            voxel = tuple(rng.integers(2, s - 2) for s in size)
        else:  # at the borders: it is still inside the patch
            voxel = (0, size[1] - 1, int(rng.integers(0, size[2])))
        mask[(b, *voxel, 0)] = 7
        voxels.append(voxel)
    layer = RandomCrop3D(shape, foreground_probability=1.0, seed=5)
    inputs = (
        {"images": x, "segmentation_masks": mask} if with_images else {"segmentation_masks": mask}
    )
    for _ in range(2):
        out = to_numpy(layer(inputs))
        patches = out["segmentation_masks"]
        assert patches.shape == (batch, *shape, 1)
        for b in range(batch):
            assert (patches[b] == 7).sum() == 1
            if b < 4:
                assert patches[b, 2, 2, 2, 0] == 7
        if with_images:
            starts = recover_starts(x, out["images"])
            for b in range(batch):
                offset = np.asarray(voxels[b]) - starts[b]
                assert np.all(offset >= 0) and np.all(offset < shape)


def test_random_crop_foreground_voxel_is_drawn_uniformly():
    size, shape = (12, 12, 12), (3, 3, 3)
    mask = np.zeros((16, *size, 1), "int32")
    mask[:, 2, 3, 4] = 1
    mask[:, 9, 8, 7] = 2
    mask[3] = 0  # an empty mask falls back to a uniform window
    layer = RandomCrop3D(shape, foreground_probability=1.0, seed=9)
    centres = []
    for _ in range(3):
        out = to_numpy(layer({"segmentation_masks": mask}))["segmentation_masks"]
        centres.extend(out[[b for b in range(16) if b != 3], 1, 1, 1, 0].tolist())
    assert set(centres) == {1, 2}


def test_random_crop_foreground_probability_zero_ignores_the_mask():
    size, shape = (12, 12, 12), (3, 3, 3)
    mask = np.zeros((16, *size, 1), "int32")
    mask[:, 6, 6, 6] = 1
    out = to_numpy(RandomCrop3D(shape, seed=1)({"segmentation_masks": mask}))
    assert (out["segmentation_masks"].reshape(16, -1).sum(axis=1) == 0).any()


def test_random_crop_images_only_and_seeds():
    x = coordinates_volume(4, (8, 9, 10))
    first = to_numpy(RandomCrop3D((4, 4, 4), foreground_probability=1.0, seed=42)(x))
    again = to_numpy(RandomCrop3D((4, 4, 4), foreground_probability=1.0, seed=42)(x))
    other = to_numpy(RandomCrop3D((4, 4, 4), foreground_probability=1.0, seed=43)(x))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    recover_starts(x, first)
    # rank 4, and channels_first with the same seed draws the same windows
    single = to_numpy(RandomCrop3D((4, 4, 4), seed=42)(x[0]))
    recover_starts(x[:1], single[None])
    channels_first = RandomCrop3D((4, 4, 4), seed=42, data_format="channels_first")
    transposed = to_numpy(channels_first(np.transpose(x, (0, 4, 1, 2, 3))))
    np.testing.assert_array_equal(np.transpose(transposed, (0, 2, 3, 4, 1)), first)


def test_random_crop_training_false_is_the_central_window():
    # as Keras's 2D RandomCrop: the declared patch shape holds at inference too
    x = coordinates_volume(2, (8, 9, 3))
    mask = (x > 50000).astype("int32")
    layer = RandomCrop3D((4, 4, 4), foreground_probability=1.0, seed=1)
    out = layer({"images": x, "segmentation_masks": mask}, training=False)
    # crop start (size - 4) // 2 along x and y; z (3 < 4) padded with 0 after
    expected = np.pad(x[:, 2:6, 2:6, :, :], ((0, 0), (0, 0), (0, 0), (0, 1), (0, 0)))
    np.testing.assert_array_equal(to_numpy(out["images"]), expected)
    np.testing.assert_array_equal(
        to_numpy(out["segmentation_masks"]), (expected > 50000).astype("int32")
    )
    assert to_numpy(out["segmentation_masks"]).dtype == np.int32
    # rank 4 and channels_first alike
    np.testing.assert_array_equal(to_numpy(layer(x[0], training=False)), expected[0])
    first = RandomCrop3D((4, 4, 4), data_format="channels_first")
    moved = to_numpy(first(np.transpose(x, (0, 4, 1, 2, 3)), training=False))
    np.testing.assert_array_equal(moved, np.transpose(expected, (0, 4, 1, 2, 3)))


def test_random_crop_in_a_model_predicts_and_validates_at_patch_size():
    # a layer that needs the patch shape follows the crop: predict, evaluate
    # and validation during fit ran the crop with training=False
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 9, 10, 1)),
            RandomCrop3D((4, 4, 4), seed=0),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    x = coordinates_volume(2, (8, 9, 10)) / 1e5
    y = np.zeros((2, 1), "float32")
    history = model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0)
    assert np.isfinite(history.history["val_loss"][0])
    assert model.predict(x, verbose=0).shape == (2, 1)
    # the prediction is the Dense layer on the central window
    kernel, bias = (to_numpy(w) for w in model.layers[-1].weights)
    window = x[:, 2:6, 2:6, 3:7, :].reshape(2, -1)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), window @ kernel + bias, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_random_crop_compiles(probability):
    x = coordinates_volume(3, (9, 8, 7))
    mask = np.zeros(x.shape, "int32")
    mask[:, 4, 4, 3] = 1
    layer = RandomCrop3D((5, 6, 9), foreground_probability=probability, seed=0)
    out = to_numpy(compiled(lambda a, m: layer({"images": a, "segmentation_masks": m}))(x, mask))
    padded = center_reference(x, (9, 8, 9))
    recover_starts(padded, out["images"])
    if probability:
        assert np.all(out["segmentation_masks"][:, 2, 3, :, 0].max(axis=-1) == 1)


@tensorflow_only
@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_random_crop_dynamic_shapes_in_graph(probability):
    import tensorflow as tf

    layer = RandomCrop3D((4, 5, 3), foreground_probability=probability, seed=7)
    fn = tf.function(
        lambda t, m: layer({"images": t, "segmentation_masks": m}),
        input_signature=[
            tf.TensorSpec((None, None, None, None, 1)),
            tf.TensorSpec((None, None, None, None, 1), tf.int32),
        ],
    )
    assert tuple(fn.get_concrete_function().structured_outputs["images"].shape) == (
        None,
        4,
        5,
        3,
        1,
    )
    for size in [(6, 7, 8), (4, 9, 3)]:
        x = coordinates_volume(3, size)
        mask = np.zeros(x.shape, "int32")
        mask[:, 2, 6, 1] = 1
        out = fn(x, mask)
        recover_starts(x, out["images"].numpy())
        if probability:
            assert np.all(out["segmentation_masks"].numpy().reshape(3, -1).sum(axis=1) == 1)


def test_deterministic_layers_compile(rng):
    x = rng.normal(size=(2, 9, 6, 11, 2)).astype("float32")
    for layer, reference in [
        (CenterCropOrPad3D((6, 9, 10), fill_value=2.0), center_reference(x, (6, 9, 10), 2.0)),
        (Resize3D((5, 8, 10)), scipy_resize(x, (5, 8, 10), 1)),
    ]:
        out = to_numpy(compiled(lambda t, layer=layer: layer(t))(x))
        np.testing.assert_allclose(out, reference, atol=1e-5)


# ----------------------------------------------------------------------------
# shapes, config, arguments


def test_compute_output_shape_with_unknown_sizes():
    for layer in EXAMPLES:
        layer = layer()
        out = layer.compute_output_shape((None, None, 20, None, 3))
        assert out == (None, *layer.shape, 3)
        config = layer.get_config()
        assert type(layer).from_config(config).get_config() == config
    first = CenterCropOrPad3D((4, 5, 6), data_format="channels_first")
    assert first.compute_output_shape((2, 3, None, None, None)) == (2, 3, 4, 5, 6)


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: CenterCropOrPad3D((4, 4)), "shape"),
        (lambda: CenterCropOrPad3D((4, 0, 4)), "shape"),
        (lambda: CenterCropOrPad3D((4, 4, 4), fill_value="zero"), "fill_value"),
        (lambda: Resize3D((4, 4, 4.5)), "shape"),
        (lambda: Resize3D((4, 4, 4), interpolation="cubic"), "interpolation"),
        (lambda: RandomCrop3D((4, 4, -4)), "shape"),
        (lambda: RandomCrop3D((4, 4, 4), foreground_probability=1.5), "foreground_probability"),
        (lambda: RandomCrop3D((4, 4, 4), seed=1.5), "seed"),
    ],
)
def test_bad_arguments_name_the_argument(build, name):
    with pytest.raises(ValueError, match=name):
        build()


EXAMPLES = [
    lambda: CenterCropOrPad3D((12, 10, 8), fill_value=-1.0),
    lambda: Resize3D((10, 12, 8), interpolation="nearest"),
    lambda: RandomCrop3D((8, 8, 6), foreground_probability=0.5, seed=3),
]
