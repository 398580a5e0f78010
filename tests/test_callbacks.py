"""keras_nii.callbacks.SlidingWindowValidation, and the memory of sliding windows on a large scan."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pytest

from keras_nii import predict_nifti
from keras_nii.callbacks import SlidingWindowValidation, dice_per_class
from keras_nii.layers import RandomFlip3D
from keras_nii.training import AugmentedModel

SHAPES = [(20, 18, 16), (17, 22, 12)]


def write(path, data, affine=None) -> str:
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    img.header.set_data_dtype(np.asarray(data).dtype)
    nib.save(img, os.fspath(path))
    return os.fspath(path)


def three_classes(image: np.ndarray) -> np.ndarray:
    return np.digitize(image, [0.4, 0.8]).astype(np.int16)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    images, labels = [], []
    # the second scan is stored in LPS: predictions and Dice are on each file's own grid
    affines = [np.eye(4), np.diag([-1.0, -1.0, 1.0, 1.0])]
    for i, (shape, affine) in enumerate(zip(SHAPES, affines, strict=True)):
        image = rng.random(shape).astype(np.float32)
        images.append(write(folder / f"img{i}.nii.gz", image, affine))
        labels.append(write(folder / f"lab{i}.nii.gz", three_classes(image), affine))
    return images, labels


def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((None, None, None, 1)), keras.layers.Conv3D(3, 1, activation="softmax")]
    )


def training_data():
    rng = np.random.default_rng(1)
    x = rng.random((4, 8, 8, 8, 1)).astype(np.float32)
    return x, three_classes(x).astype(np.int32)


def reference_dice(model, images, labels, tmp_path, **options) -> dict[str, float]:
    """predict_nifti to files, then NumPy: the mean over scans of each class's Dice."""
    per_scan = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        out = tmp_path / f"pred{i}.nii.gz"
        predict_nifti(model, image, out, patch_size=(8, 8, 8), **options)
        predicted = np.asarray(nib.load(out).dataobj)
        truth = np.asarray(nib.load(label).dataobj)
        row = []
        for c in (1, 2):
            both = (predicted == c).sum() + (truth == c).sum()
            row.append(2 * ((predicted == c) & (truth == c)).sum() / both)
        per_scan.append(row)
    means = np.mean(per_scan, axis=0)
    return {"val_dice_1": means[0], "val_dice_2": means[1], "val_dice_mean": means.mean()}


def test_dice_per_class_against_numpy() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=(9, 8, 7))
    predicted = rng.integers(0, 3, size=(9, 8, 7))  # class 3 never predicted
    labels[labels == 2] = 0  # class 2 only predicted
    dice = dice_per_class(labels, predicted, 5)
    for c in range(4):
        a, b = labels == c, predicted == c
        assert dice[c] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert np.isnan(dice[4])  # in neither


def test_fit_logs_whole_scan_dice_per_class(scans, tmp_path) -> None:
    images, labels = scans
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    validate = SlidingWindowValidation(images, labels, patch_size=(8, 8, 8))
    x, y = training_data()
    history = model.fit(x, y, batch_size=2, epochs=2, callbacks=[validate], verbose=0).history
    assert {"val_dice_1", "val_dice_2", "val_dice_mean"} <= set(history)
    assert "val_dice_0" not in history
    assert all(len(history[k]) == 2 for k in ("val_dice_1", "val_dice_mean"))
    expected = reference_dice(model, images, labels, tmp_path)
    for key, value in expected.items():
        assert history[key][-1] == pytest.approx(value, abs=1e-6)
    assert validate.last_scores.shape == (2, 3)


def test_spacing_and_tta_are_predict_niftis(scans, tmp_path) -> None:
    images, labels = scans
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    options = dict(spacing=(2.0, 1.0, 1.5), tta=[(0,), (1, 2)])
    validate = SlidingWindowValidation(images, labels, patch_size=(8, 8, 8), **options)
    x, y = training_data()
    history = model.fit(x, y, batch_size=2, epochs=1, callbacks=[validate], verbose=0).history
    expected = reference_dice(model, images, labels, tmp_path, **options)
    for key, value in expected.items():
        assert history[key][-1] == pytest.approx(value, abs=1e-6)


def test_with_augmented_model_and_model_checkpoint(scans, tmp_path) -> None:
    images, labels = scans
    net = tiny_model()
    model = AugmentedModel(net, RandomFlip3D(seed=0))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    best = tmp_path / "best.keras"
    callbacks = [
        SlidingWindowValidation(images, labels, patch_size=(8, 8, 8), every=2),
        keras.callbacks.ModelCheckpoint(
            best, monitor="val_dice_mean", mode="max", save_best_only=True
        ),
    ]
    x, y = training_data()
    history = model.fit(x, y, batch_size=2, epochs=4, callbacks=callbacks, verbose=0).history
    assert len(history["val_dice_mean"]) == 2  # epochs 2 and 4
    assert best.exists()
    saved = keras.saving.load_model(best)
    expected = reference_dice(saved, images, labels, tmp_path)["val_dice_mean"]
    assert expected == pytest.approx(max(history["val_dice_mean"]), abs=1e-6)


def test_bad_arguments(scans) -> None:
    images, labels = scans
    with pytest.raises(ValueError, match="one length"):
        SlidingWindowValidation(images, labels[:1], patch_size=(8, 8, 8))
    with pytest.raises(ValueError, match="every"):
        SlidingWindowValidation(images, labels, patch_size=(8, 8, 8), every=0)
    with pytest.raises(ValueError, match="not found"):
        SlidingWindowValidation(images, [labels[0], "missing.nii.gz"], patch_size=(8, 8, 8))
    with pytest.raises(ValueError, match="patch_size"):
        SlidingWindowValidation(images, labels, patch_size=(8, 8))


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from keras_nii.inference import predict_nifti

    def model(batch):  # a cheap 3-class "model": probabilities that sum to 1
        x = batch[..., :1] / 1000.0  # 1 in the body, 0 in the air
        return np.concatenate([np.full_like(x, 0.2), 0.8 * x, 0.8 * (1.0 - x)], axis=-1)

    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * page
    predict_nifti(model, sys.argv[1], sys.argv[2], patch_size=(96, 96, 96), overlap=0.25,
                  batch_size=2)
    # this process's own peak (VmHWM), not ru_maxrss: Linux carries the parent's peak
    # RSS into the child's ru_maxrss across fork / exec, so under a pytest process of
    # 3 GB it read 3 GB whatever predict_nifti did
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    print(before, peak)
    """
)


@pytest.mark.slow
def test_sliding_windows_on_a_large_scan_stay_within_memory(tmp_path) -> None:
    shape = (512, 512, 300)
    scan = np.zeros(shape, np.int16)
    scan[100:400, 120:420, 50:250] = 1000
    source = tmp_path / "ct.nii"  # uncompressed: quick to write and read
    write(source, scan)
    del scan
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env["KERAS_BACKEND"] = "numpy"  # the model is plain NumPy: the quickest import
    out = tmp_path / "labels.nii"
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(source), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr
    before, peak = (int(v) for v in proc.stdout.split()[-2:])
    probabilities = np.prod(shape) * 3 * 4  # the float32 probability map
    # the feed accumulates in place: at most 3x the probability map (the model has no footprint)
    assert peak - before <= 3 * probabilities, (peak - before) / probabilities
    # and it did hold one: the measure is not asleep
    assert peak - before >= probabilities
    labels = nib.load(out)
    assert labels.get_data_dtype() == np.uint8 and labels.shape == shape
    assert labels.dataobj[256, 256, 150] == 1 and labels.dataobj[0, 0, 0] == 2
