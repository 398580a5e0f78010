"""keras_nii.models: the 3D U-Net, dice_score and DiceLoss."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_nii.layers.normalization import ZScoreNormalization
from keras_nii.models import DiceLoss, dice_score, unet3d


def _volumes(shape=(2, 8, 8, 8, 1), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# --------------------------------------------------------------------------- unet3d


@pytest.mark.parametrize(
    ("num_classes", "levels", "activation"),
    [(1, 2, "sigmoid"), (3, 1, "softmax")],
)
def test_unet_shapes_and_output_range(num_classes, levels, activation):
    model = unet3d((None, None, None, 2), num_classes=num_classes, filters=2, levels=levels)
    x = _volumes((1, 8, 12, 4, 2))
    y = np.asarray(model(x, training=False))
    assert y.shape == (1, 8, 12, 4, num_classes)
    assert model.get_layer("padded_probabilities").get_config()["activation"] == activation
    assert model.output_names == ["probabilities"]
    assert np.all((y >= 0) & (y <= 1))
    if num_classes > 1:
        np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-5)


def test_unet_static_shape_and_levels_build_the_expected_layers():
    model = unet3d((16, 16, 8, 1), filters=4, levels=3)
    assert model.output_shape == (None, 16, 16, 8, 1)
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling3D)]
    assert len(pools) == 3
    # filters double at each level: 4, 8, 16 and 32 at the bottom
    assert model.get_layer("bottom_conv2").filters == 32


def test_unet_without_batch_norm():
    model = unet3d(filters=2, levels=1, batch_norm=False)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


def test_unet_normalization_layer_comes_first_and_is_applied():
    model = unet3d(filters=2, levels=1, normalization=ZScoreNormalization(nonzero=True, name="z"))
    assert model.layers[1].name == "z"
    # a global intensity scale is normalized away inside the model
    x = np.abs(_volumes((1, 8, 8, 8, 1))) + 1.0
    np.testing.assert_allclose(
        np.asarray(model(x, training=False)),
        np.asarray(model(x * 250.0, training=False)),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("shape", "levels", "message"),
    [
        ((16, 18, 16, 1), 2, r"divisible by 2\*\*levels = 4 .*axis 1 has 18"),
        ((12, 12, None, 1), 3, r"axis 0 has 12, axis 1 has 12"),
    ],
)
def test_unet_rejects_sizes_not_divisible_by_2_to_the_levels(shape, levels, message):
    with pytest.raises(ValueError, match=message + ".*pad_to_fit=True"):
        unet3d(shape, levels=levels, pad_to_fit=False)
    # padding inside the model, it takes them
    model = unet3d(shape, levels=levels, filters=2)
    assert model.output_shape == (None, *shape[:3], 1)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_unet_pads_any_size_inside_and_crops_back(levels):
    """An odd size gives what the network gives on the volume zero padded by hand.

    The reference is the same weights run on a padded input (a multiple, so
    the model pads nothing), cropped: the padding is a 0 at the end of each
    axis after the normalization, and the output is the input's voxels.
    """
    keras.utils.set_random_seed(levels)
    model = unet3d(filters=2, levels=levels, batch_norm=False)
    x = _volumes((2, 9, 14, 5, 1), seed=levels)
    factor = 2**levels
    padded = np.zeros((2, *(-(-s // factor) * factor for s in (9, 14, 5)), 1), np.float32)
    padded[:, :9, :14, :5] = x
    want = np.asarray(model(padded, training=False))[:, :9, :14, :5]
    got = np.asarray(model(x, training=False))
    assert got.shape == (2, 9, 14, 5, 1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # a multiple is left as it is: nothing padded, nothing cropped
    layer = model.get_layer("pad_to_fit")
    assert layer(padded).shape == padded.shape and tuple(layer(x).shape[1:4]) == padded.shape[1:4]


def test_unet_pad_to_fit_is_checked_and_kept_by_save(tmp_path):
    with pytest.raises(ValueError, match="pad_to_fit must be True or False"):
        unet3d(pad_to_fit="yes")
    model = unet3d(filters=2, levels=2, normalization=ZScoreNormalization(nonzero=True))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.abs(_volumes((1, 7, 10, 6, 1))) + 1.0
    np.testing.assert_allclose(
        np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False)), atol=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"input_shape": (8, 8, 1)}, "input_shape"),
        ({"input_shape": (8, 8, 8, None)}, "channels"),
        ({"num_classes": 0}, "num_classes"),
        ({"filters": 1.5}, "filters"),
        ({"levels": 0}, "levels"),
        ({"normalization": "zscore"}, "normalization"),
    ],
)
def test_unet_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        unet3d(**kwargs)


def test_unet_keras_file_round_trip(tmp_path):
    model = unet3d(
        (None, None, None, 1), filters=2, levels=1, normalization=ZScoreNormalization(nonzero=True)
    )
    model.compile("adam", DiceLoss(bce_weight=0.5))
    x = np.abs(_volumes((1, 8, 8, 8, 1)))
    expected = np.asarray(model(x, training=False))
    path = tmp_path / "unet.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), expected, atol=1e-6)
    assert isinstance(loaded.layers[1], ZScoreNormalization)
    assert loaded.layers[1].nonzero is True
    assert isinstance(loaded.loss, DiceLoss)
    assert loaded.loss.bce_weight == 0.5


# --------------------------------------------------------------------------- dice_score


def test_dice_score_hand_computed_values():
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    assert dice_score(truth, truth) == 1.0
    assert dice_score(truth, 1 - truth) == 0.0
    # |T| = 4, |P| = 2, |T & P| = 2: 2 * 2 / (4 + 2)
    assert dice_score(truth, [1, 1, 0, 0, 0, 0, 0, 0]) == pytest.approx(2 / 3)
    # |T| = 4, |P| = 4, |T & P| = 3: 6 / 8
    assert dice_score(truth, [1, 1, 1, 0, 1, 0, 0, 0]) == pytest.approx(0.75)


def test_dice_score_empty_conventions():
    empty = np.zeros((4, 4, 4), np.uint8)
    some = empty.copy()
    some[1, 1, 1] = 1
    # both empty: perfect by convention
    assert dice_score(empty, empty) == 1.0
    assert dice_score(some, empty) == 0.0
    assert dice_score(empty, some) == 0.0


def test_dice_score_thresholds_probabilities_and_takes_bools():
    truth = np.array([True, True, False, False])
    probabilities = np.array([0.9, 0.4, 0.6, 0.1], np.float32)
    # > 0.5: [1, 0, 1, 0] -> 2 * 1 / (2 + 2)
    assert dice_score(truth, probabilities) == pytest.approx(0.5)
    # > 0.3: [1, 1, 1, 0] -> 2 * 2 / (2 + 3)
    assert dice_score(truth, probabilities, threshold=0.3) == pytest.approx(0.8)


def test_dice_score_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        dice_score(np.zeros((2, 2)), np.zeros((2, 3)))


# --------------------------------------------------------------------------- DiceLoss


def test_dice_loss_values():
    truth = np.zeros((2, 4, 4, 4, 1), np.float32)
    truth[:, :2] = 1.0
    loss = DiceLoss(smooth=0.0)
    assert float(loss(truth, truth)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(truth, 1.0 - truth)) == pytest.approx(1.0, abs=1e-6)
    # half of the foreground predicted at probability 1: 1 - 2 * 16 / (32 + 16)
    half = truth.copy()
    half[:, 1] = 0.0
    assert float(loss(truth, half)) == pytest.approx(1.0 - 32 / 48, abs=1e-6)
    # the cross-entropy term adds a positive amount for an imperfect prediction
    assert float(DiceLoss(smooth=0.0, bce_weight=1.0)(truth, half)) > float(loss(truth, half))


def test_dice_loss_multiclass_takes_integer_labels():
    labels = np.zeros((1, 4, 4, 4, 1), np.int32)
    labels[:, :2] = 2
    one_hot = np.eye(3, dtype=np.float32)[labels[..., 0]]
    assert float(DiceLoss()(labels, one_hot)) == pytest.approx(0.0, abs=1e-6)
    assert float(DiceLoss(bce_weight=1.0)(labels, one_hot)) < 1e-5


def test_dice_loss_bad_arguments_and_config():
    with pytest.raises(ValueError, match="smooth"):
        DiceLoss(smooth=-1)
    with pytest.raises(ValueError, match="bce_weight"):
        DiceLoss(bce_weight="a")
    config = DiceLoss(smooth=2.0, bce_weight=0.3).get_config()
    again = DiceLoss.from_config(config)
    assert (again.smooth, again.bce_weight) == (2.0, 0.3)


def test_unet_learns_a_threshold_quickly():
    """A few steps on bright cubes in noise reach a useful Dice (the demo's recipe, tiny)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 0.3, size=(8, 8, 8, 8, 1)).astype("float32")
    y = np.zeros_like(x)
    for i in range(8):
        a, b, c = rng.integers(0, 5, size=3)
        y[i, a : a + 3, b : b + 3, c : c + 3] = 1.0
    x += 2.0 * y
    keras.utils.set_random_seed(0)
    model = unet3d(filters=4, levels=1)
    model.compile(keras.optimizers.Adam(1e-2), DiceLoss(bce_weight=1.0))
    model.fit(x, y, batch_size=4, epochs=50, verbose=0)
    assert dice_score(y, model.predict(x, verbose=0)) > 0.8
