"""RandomFlip3D and RandomRotation90_3D: exact against numpy.flip / numpy.rot90."""

import itertools

import keras
import numpy as np
import pytest

from keras_nii.layers.flip import RandomFlip3D, RandomRotation90_3D
from tests.layers.conftest import to_numpy


def _numpy_flip(volume, flips):
    """``volume`` (x, y, z, c) flipped along the spatial axes whose flag is true."""
    axes = tuple(axis for axis in range(3) if flips[axis])
    return np.flip(volume, axes) if axes else volume


def _numpy_rot90(volume, planes, ks):
    for plane, k in zip(planes, ks, strict=True):
        volume = np.rot90(volume, int(k), axes=plane)
    return volume


def _recover_flips(inputs, outputs):
    """Per sample, the flip combination that turns the input into the output."""
    found = []
    for x, y in zip(inputs, outputs, strict=True):
        matches = [
            combo
            for combo in itertools.product((False, True), repeat=3)
            if np.array_equal(_numpy_flip(x, combo), y)
        ]
        assert len(matches) == 1, "the output is not a flip of the input"
        found.append(matches[0])
    return np.array(found)


def _distinct_volumes(batch, shape, channels=1):
    """Volumes whose voxels all differ, so that every flip is recognizable."""
    n = int(np.prod(shape)) * channels
    return np.stack(
        [np.arange(n, dtype="float32").reshape((*shape, channels)) + 1000 * i for i in range(batch)]
    )


# ----------------------------------------------------------------------------
# RandomFlip3D


def test_flip_matches_numpy_for_the_drawn_flips(rng):
    x = rng.normal(size=(4, 5, 6, 7, 2)).astype("float32")
    twin = RandomFlip3D(seed=11)
    flips = to_numpy(twin.get_random_transformation(4, (5, 6, 7))["flips"])
    assert flips.shape == (4, 3) and flips.dtype == bool
    out = to_numpy(RandomFlip3D(seed=11)(x))
    for i in range(4):
        np.testing.assert_array_equal(out[i], _numpy_flip(x[i], flips[i]))


def test_flip_probability_zero_and_one(rng):
    x = rng.normal(size=(3, 4, 5, 6, 1)).astype("float32")
    np.testing.assert_array_equal(to_numpy(RandomFlip3D(probability=0.0, seed=1)(x)), x)
    out = to_numpy(RandomFlip3D(axes=(0, 2), probability=1.0, seed=1)(x))
    np.testing.assert_array_equal(out, np.flip(x, (1, 3)))
    out = to_numpy(RandomFlip3D(probability=1.0, seed=1)(x))
    np.testing.assert_array_equal(out, np.flip(x, (1, 2, 3)))


def test_flip_unlisted_axes_never_flip():
    x = _distinct_volumes(48, (3, 3, 3))
    out = to_numpy(RandomFlip3D(axes=(1,), probability=0.5, seed=5)(x))
    flips = _recover_flips(x, out)
    assert not flips[:, 0].any() and not flips[:, 2].any()
    assert 0 < flips[:, 1].sum() < 48


def test_flip_axes_are_independent():
    n = 256
    x = _distinct_volumes(n, (2, 3, 4))
    flips = _recover_flips(x, to_numpy(RandomFlip3D(probability=0.5, seed=7)(x)))
    combos = {tuple(row) for row in flips}
    assert len(combos) == 8, "every flip combination should occur"
    frequency = flips.mean(axis=0)
    assert np.all(np.abs(frequency - 0.5) < 0.1), frequency
    for a, b in itertools.combinations(range(3), 2):
        assert not np.array_equal(flips[:, a], flips[:, b])
        agreement = np.mean(flips[:, a] == flips[:, b])
        assert 0.35 < agreement < 0.65, (a, b, agreement)


def test_flip_samples_get_their_own_draw():
    x = np.repeat(_distinct_volumes(1, (3, 4, 5)), 32, axis=0)
    flips = _recover_flips(x, to_numpy(RandomFlip3D(seed=2)(x)))
    assert len({tuple(row) for row in flips}) > 1


def test_flip_image_and_mask_stay_aligned(rng):
    labels = rng.integers(0, 5, size=(6, 5, 6, 7, 1))
    out = RandomFlip3D(seed=3)(
        {"images": labels.astype("float32"), "segmentation_masks": labels.astype("int32")}
    )
    assert keras.backend.standardize_dtype(out["segmentation_masks"].dtype) == "int32"
    out = to_numpy(out)
    np.testing.assert_array_equal(out["images"], out["segmentation_masks"].astype("float32"))
    assert not np.array_equal(out["segmentation_masks"], labels)


def test_flip_unbatched_and_channels_first(rng):
    x = rng.normal(size=(4, 5, 6, 2)).astype("float32")
    out = to_numpy(RandomFlip3D(axes=0, probability=1.0, seed=0)(x))
    np.testing.assert_array_equal(out, x[::-1])
    x = rng.normal(size=(2, 3, 4, 5, 6)).astype("float32")  # (b, c, x, y, z)
    layer = RandomFlip3D(axes=(2,), probability=1.0, data_format="channels_first", seed=0)
    np.testing.assert_array_equal(to_numpy(layer(x)), x[..., ::-1])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"axes": (3,)}, "axes"),
        ({"axes": (0, 0)}, "axes"),
        ({"probability": 1.5}, "probability"),
        ({"probability": -0.1}, "probability"),
    ],
)
def test_flip_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RandomFlip3D(**kwargs)


def test_flip_config_round_trip():
    layer = RandomFlip3D(axes=(0, 2), probability=0.3, seed=4)
    config = layer.get_config()
    assert config["axes"] == [0, 2] and config["probability"] == 0.3
    assert RandomFlip3D.from_config(config).get_config() == config


# ----------------------------------------------------------------------------
# RandomRotation90_3D


@pytest.mark.parametrize("planes", [((0, 1), (0, 2), (1, 2)), ((2, 1), (0, 1)), ((1, 0),)])
def test_rot90_matches_numpy_for_the_drawn_turns(rng, planes):
    x = rng.normal(size=(6, 5, 5, 5, 2)).astype("float32")
    twin = RandomRotation90_3D(planes=planes, seed=21)
    ks = to_numpy(twin.get_random_transformation(6, (5, 5, 5))["k"])
    assert ks.shape == (6, len(planes))
    out = to_numpy(RandomRotation90_3D(planes=planes, seed=21)(x))
    for i in range(6):
        np.testing.assert_array_equal(out[i], _numpy_rot90(x[i], planes, ks[i]))


def test_rot90_every_quarter_turn_occurs():
    layer = RandomRotation90_3D(seed=8)
    ks = to_numpy(layer.get_random_transformation(200, (4, 4, 4))["k"])
    assert set(np.unique(ks)) == {0, 1, 2, 3}
    # 64 combinations of the three planes: most of them occur in 200 draws
    assert len({tuple(row) for row in ks}) > 40


def test_rot90_probability_zero_is_identity(rng):
    x = rng.normal(size=(3, 4, 4, 4, 1)).astype("float32")
    np.testing.assert_array_equal(to_numpy(RandomRotation90_3D(probability=0.0, seed=1)(x)), x)
    ks = to_numpy(
        RandomRotation90_3D(probability=0.0, seed=1).get_random_transformation(8, (4,) * 3)["k"]
    )
    assert not ks.any()


def test_rot90_image_and_mask_stay_aligned(rng):
    labels = rng.integers(0, 4, size=(5, 4, 4, 4, 1))
    out = RandomRotation90_3D(seed=4)(
        {"images": labels.astype("float32"), "segmentation_masks": labels.astype("int32")}
    )
    assert keras.backend.standardize_dtype(out["segmentation_masks"].dtype) == "int32"
    out = to_numpy(out)
    np.testing.assert_array_equal(out["images"], out["segmentation_masks"].astype("float32"))


def test_rot90_requires_equal_sizes_in_its_planes(rng):
    x = rng.normal(size=(2, 6, 6, 4, 1)).astype("float32")
    with pytest.raises(ValueError, match=r"\(6, 6, 4\)"):
        RandomRotation90_3D(seed=0)(x)
    with pytest.raises(ValueError, match=r"\(6, 6, 4\)"):
        RandomRotation90_3D().compute_output_shape((None, 6, 6, 4, 1))
    # rotating in the (0, 1) plane only is fine for that shape
    layer = RandomRotation90_3D(planes=((0, 1),), seed=0)
    assert to_numpy(layer(x)).shape == x.shape
    assert layer.compute_output_shape((None, None, None, 4, 1)) == (None, None, None, 4, 1)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"planes": ((0, 0),)}, "planes"),
        ({"planes": ((0, 3),)}, "planes"),
        ({"planes": ((0, 1), (1, 0))}, "planes"),
        ({"planes": ()}, "planes"),
        ({"planes": ((0, 1, 2),)}, "planes"),
        ({"probability": 2}, "probability"),
    ],
)
def test_rot90_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RandomRotation90_3D(**kwargs)


def test_rot90_config_round_trip():
    layer = RandomRotation90_3D(planes=((1, 2), (0, 1)), probability=0.4, seed=9)
    config = layer.get_config()
    assert config["planes"] == [[1, 2], [0, 1]] and config["probability"] == 0.4
    rebuilt = RandomRotation90_3D.from_config(config)
    assert rebuilt.planes == ((1, 2), (0, 1))
    assert rebuilt.get_config() == config
    # a single plane may be given as one pair
    assert RandomRotation90_3D(planes=(0, 2)).planes == ((0, 2),)


EXAMPLES = [
    lambda: RandomFlip3D(axes=(0, 2), probability=0.7, seed=3),
    lambda: RandomRotation90_3D(planes=((0, 1), (1, 2)), probability=0.8, seed=5),
]
