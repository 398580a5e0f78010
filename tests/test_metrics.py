"""keras_nii.metrics.DiceScore against a NumPy reference, and in fit's history."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_nii.metrics import DiceScore


def numpy_dice(labels: np.ndarray, predicted: np.ndarray, classes, weight=None) -> dict:
    """Pooled Dice per class: 2 |L & P| / (|L| + |P|) over all voxels (NaN if both empty)."""
    weight = np.ones(labels.shape) if weight is None else np.broadcast_to(weight, labels.shape)
    out = {}
    for c in classes:
        is_l, is_p = labels == c, predicted == c
        denominator = (weight * is_l).sum() + (weight * is_p).sum()
        out[c] = np.nan if denominator == 0 else 2 * (weight * (is_l & is_p)).sum() / denominator
    return out


def batches(seed=0, n=3, k=4, shape=(2, 6, 5, 4)):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        labels = rng.integers(0, k, size=(*shape, 1)).astype(np.int32)
        logits = rng.normal(size=(*shape, k)).astype(np.float32)
        logits[..., 1] += 2.0 * (labels[..., 0] == 1)  # some agreement
        yield labels, logits


@pytest.mark.parametrize("ignore_background", [True, False])
def test_accumulates_over_batches_like_numpy(ignore_background: bool) -> None:
    metric = DiceScore(num_classes=4, ignore_background=ignore_background)
    all_labels, all_pred = [], []
    for labels, logits in batches():
        metric.update_state(labels, logits)
        all_labels.append(labels[..., 0])
        all_pred.append(logits.argmax(-1))
    classes = [1, 2, 3] if ignore_background else [0, 1, 2, 3]
    expected = numpy_dice(np.concatenate(all_labels), np.concatenate(all_pred), classes)
    result = {k: float(v) for k, v in metric.result().items()}
    assert set(result) == {f"dice_{c}" for c in classes} | {"dice_mean"}
    for c in classes:
        assert result[f"dice_{c}"] == pytest.approx(expected[c], rel=1e-5)
    assert result["dice_mean"] == pytest.approx(np.mean(list(expected.values())), rel=1e-5)
    # the pooled Dice is not the mean of the batches' Dices
    per_batch = [numpy_dice(lab[..., 0], log.argmax(-1), [1])[1] for lab, log in batches()]
    assert abs(np.mean(per_batch) - expected[1]) > 1e-4
    metric.reset_state()
    metric.update_state(*next(batches(seed=1)))
    labels, logits = next(batches(seed=1))
    assert float(metric.result()["dice_2"]) == pytest.approx(
        numpy_dice(labels[..., 0], logits.argmax(-1), [2])[2], rel=1e-5
    )


def test_an_absent_class_has_no_dice_and_stays_out_of_the_mean() -> None:
    labels = np.zeros((1, 4, 4, 4), np.int32)
    labels[0, :2] = 1
    probabilities = np.zeros((1, 4, 4, 4, 3), np.float32)
    probabilities[..., 0] = 1.0
    probabilities[0, :1, ..., 1] = 2.0  # half of class 1 found; class 2 nowhere
    metric = DiceScore(3)
    metric.update_state(labels, probabilities)
    result = {k: float(v) for k, v in metric.result().items()}
    assert result["dice_1"] == pytest.approx(2 * 16 / (32 + 16))
    assert np.isnan(result["dice_2"])
    assert result["dice_mean"] == pytest.approx(result["dice_1"])
    mean_only = DiceScore(3, per_class=False)
    mean_only.update_state(labels, probabilities)
    assert float(mean_only.result()) == pytest.approx(result["dice_1"])


def test_sigmoid_channel_and_sample_weights() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=(3, 5, 5, 5, 1)).astype(np.int32)
    probability = rng.random((3, 5, 5, 5, 1)).astype(np.float32)
    weight = np.array([1.0, 0.0, 2.0], np.float32).reshape(3, 1, 1, 1)
    metric = DiceScore(2, threshold=0.3)
    metric.update_state(labels, probability, sample_weight=weight)
    expected = numpy_dice(labels[..., 0], (probability[..., 0] > 0.3).astype(int), [1], weight)
    assert float(metric.result()["dice_1"]) == pytest.approx(expected[1], rel=1e-5)


def test_config_and_bad_arguments() -> None:
    metric = DiceScore(5, ignore_background=False, per_class=False, name="d")
    clone = DiceScore.from_config(metric.get_config())
    assert clone.get_config() == metric.get_config() and clone.classes == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="num_classes"):
        DiceScore(1)
    with pytest.raises(ValueError, match="3 channels"):
        DiceScore(3).update_state(np.zeros((1, 2, 2, 2, 1)), np.zeros((1, 2, 2, 2, 2)))


def test_fit_logs_every_class_and_the_mean() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((4, 8, 8, 8, 1)).astype(np.float32)
    y = np.digitize(x[..., :1], [0.4, 0.8]).astype(np.int32)  # 3 classes from intensity
    model = keras.Sequential(
        [keras.Input((8, 8, 8, 1)), keras.layers.Conv3D(3, 1, activation="softmax")]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss="sparse_categorical_crossentropy",
        metrics=[DiceScore(3)],
    )
    history = model.fit(x, y, batch_size=2, epochs=2, validation_data=(x, y), verbose=0).history
    for prefix in ("", "val_"):
        assert {f"{prefix}dice_1", f"{prefix}dice_2", f"{prefix}dice_mean"} <= set(history)
        assert len(history[f"{prefix}dice_1"]) == 2
    # the validation entries are the metric on the whole validation set
    metric = DiceScore(3)
    metric.update_state(y, model.predict(x, verbose=0))
    assert history["val_dice_mean"][-1] == pytest.approx(float(metric.result()["dice_mean"]), 1e-4)


def test_predict_nifti_writes_labels_in_the_smallest_type_for_k(tmp_path) -> None:
    import nibabel as nib

    from keras_nii import predict_nifti

    rng = np.random.default_rng(4)
    scan = rng.random((9, 8, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(scan, np.eye(4)), tmp_path / "scan.nii.gz")
    for k, dtype in ((3, np.uint8), (256, np.uint8), (300, np.uint16)):
        weights = rng.normal(size=k).astype(np.float32)

        def model(batch, weights=weights):  # k channels, the argmax varying with the voxel
            return np.sin(batch * 7.0 * weights)

        out = predict_nifti(model, tmp_path / "scan.nii.gz", tmp_path / f"labels{k}.nii.gz")
        labels = nib.load(out)
        assert labels.get_data_dtype() == dtype
        expected = np.sin(scan[..., None] * 7.0 * weights).argmax(-1)
        np.testing.assert_array_equal(np.asarray(labels.dataobj), expected)
        if k == 300:
            assert expected.max() >= 256  # labels that a uint8 could not hold, written exactly
