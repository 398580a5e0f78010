"""predict_nifti / keras-nii predict with spacing= (resample, predict, back) and tta= (flips).

The geometry checks are exact (the written file has the input's shape and
affine, bit for bit); the label round trip is judged by per-class Dice against
the source label map; the TTA mean and variance against the mean and variance
of ``flip^-1(model(flip(x)))`` computed here with NumPy, one flip at a time,
on the scan as nibabel reorients it.
"""

from __future__ import annotations

import keras
import nibabel as nib
import numpy as np
import pytest

from keras_nii.cli import main
from keras_nii.inference import predict_nifti, predict_volume, tta_flips

from .test_spacing import dice, grid_affine, spheres, write

ALL_8 = [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]


def identity_model(channels: int) -> keras.Model:
    """y = x exactly: a 1x1x1 convolution with an identity kernel, no bias."""
    inputs = keras.Input((None, None, None, channels))
    kernel = np.eye(channels, dtype="float32").reshape(1, 1, 1, channels, channels)
    conv = keras.layers.Conv3D(
        channels, 1, use_bias=False, kernel_initializer=keras.initializers.Constant(kernel)
    )
    return keras.Model(inputs, conv(inputs))


def fcn(channels_out: int = 2) -> keras.Model:
    """A 3x3x3 convolution with random weights: not equivariant to flips."""
    inputs = keras.Input((None, None, None, 1))
    x = keras.layers.Conv3D(
        channels_out,
        3,
        padding="same",
        kernel_initializer=keras.initializers.RandomNormal(0.0, 0.5, seed=4),
        bias_initializer="zeros",
    )(inputs)
    return keras.Model(inputs, keras.ops.sigmoid(x))


def canonical_array(path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    return (data[..., None] if data.ndim == 3 else data), img.affine


GEOMETRIES = [("LPS", (0.9, 1.1, 2.5)), ("PSR", (2.5, 1.0, 0.9)), ("oblique", (1.0, 0.9, 2.5))]


def subject(tmp_path, kind, zooms):
    """A label map of three small spheres on a grid of ~26 mm, and its one-hot channels."""
    shape = tuple(int(round(26 / z)) for z in zooms)
    affine = grid_affine(kind, zooms)
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    offsets = np.array([(-5.0, -5.0, -4.0), (5.0, 4.0, 3.0), (5.0, -5.0, 5.0)])
    labels = spheres(shape, affine, (4.0, 4.5, 5.0), centre + offsets)
    onehot = [
        write(tmp_path / f"p{c}.nii.gz", (labels == c).astype(np.float32), affine) for c in range(4)
    ]
    return labels, affine, onehot


@pytest.mark.parametrize("kind, zooms", GEOMETRIES)
def test_identity_model_label_round_trip_through_spacing(tmp_path, kind, zooms):
    labels, affine, onehot = subject(tmp_path, kind, zooms)
    out = predict_nifti(
        identity_model(4), onehot, tmp_path / "pred.nii.gz", spacing=(1.0, 1.0, 1.0)
    )
    written = nib.load(str(out))
    assert written.shape == labels.shape
    np.testing.assert_array_equal(written.affine, nib.load(onehot[0]).affine)
    back = np.asarray(written.dataobj)
    for value in (1, 2, 3):
        assert dice(back, labels, value) >= 0.95, (value, dice(back, labels, value))


@pytest.mark.parametrize("kind, zooms", GEOMETRIES)
def test_one_sigmoid_channel_through_spacing_and_tta(tmp_path, kind, zooms):
    labels, affine, _ = subject(tmp_path, kind, zooms)
    mask = write(tmp_path / "mask.nii.gz", (labels > 0).astype(np.float32), affine)
    out = predict_nifti(
        identity_model(1),
        mask,
        tmp_path / "pred.nii.gz",
        spacing=(1.0, None, 1.2),
        tta="flips",
        uncertainty_path=tmp_path / "var.nii.gz",
    )
    for path in (out, tmp_path / "var.nii.gz"):
        written = nib.load(str(path))
        assert written.shape == labels.shape
        np.testing.assert_array_equal(written.affine, nib.load(mask).affine)
    assert dice(np.asarray(nib.load(str(out)).dataobj), labels > 0, True) >= 0.95
    # an identity model gives the same prediction for every flip: no variance
    variance = np.asarray(nib.load(str(tmp_path / "var.nii.gz")).dataobj)
    assert variance.dtype == np.float32
    np.testing.assert_allclose(variance, 0.0, atol=1e-10)


def flipped_reference(model, array, flips):
    """mean and variance of flip^-1(model(flip(x))), one flip per model call."""
    outputs = []
    for axes in flips:
        x = np.flip(array, axes) if axes else array
        y = np.asarray(model.predict_on_batch(np.ascontiguousarray(x)[None]))[0]
        outputs.append(np.flip(y, axes) if axes else y)
    stack = np.stack(outputs).astype(np.float64)
    return stack.mean(0), stack.var(0)


@pytest.mark.parametrize("kind", ["LPS", "PSR", "oblique"])
@pytest.mark.parametrize("tta", ["flips", [(0,), (1,), (0, 1)]])
def test_tta_mean_and_variance_equal_a_numpy_reference(tmp_path, kind, tta):
    rng = np.random.default_rng(5)
    affine = grid_affine(kind, (1.0, 1.2, 0.9))
    shape = (10, 12, 8)
    scan = write(tmp_path / "scan.nii.gz", rng.normal(size=shape).astype(np.float32), affine)
    model = fcn(2)
    out = predict_nifti(
        model,
        scan,
        tmp_path / "prob.nii.gz",
        patch_size=shape if kind != "PSR" else (shape[2], shape[0], shape[1]),
        output="probabilities",
        tta=tta,
        uncertainty_path=tmp_path / "var.nii.gz",
    )
    flips = ALL_8 if tta == "flips" else [(), (0,), (1,), (0, 1)]
    array, _ = canonical_array(scan)
    mean, variance = flipped_reference(model, array, flips)
    assert variance.max() > 1e-4  # the flips do disagree: the check has teeth
    for path, want in ((out, mean), (tmp_path / "var.nii.gz", variance)):
        written = nib.load(str(path))
        assert written.shape == (*shape, 2)
        np.testing.assert_array_equal(written.affine, nib.load(scan).affine)
        got, _ = canonical_array(path)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_flips_go_to_the_model_in_one_call():
    calls = []

    def model(batch):
        calls.append(batch.shape)
        return batch * 2.0

    volume = np.random.default_rng(0).normal(size=(6, 5, 4, 1)).astype(np.float32)
    prediction, variance = predict_volume(
        model, volume, patch_size=(6, 5, 4), tta="flips", uncertainty=True, batch_size=1
    )
    assert calls == [(8, 6, 5, 4, 1)]
    np.testing.assert_allclose(prediction, volume * 2.0, atol=1e-6)
    np.testing.assert_allclose(variance, 0.0, atol=1e-10)
    calls.clear()
    predict_volume(model, volume, patch_size=(3, 5, 4), overlap=0.0, tta=[(2,)], batch_size=2)
    assert calls == [(4, 3, 5, 4, 1)]  # two windows, each with its two flips


def test_tta_flips_parsing():
    assert tta_flips(None) == [()]
    assert sorted(tta_flips("flips")) == sorted(ALL_8)
    assert tta_flips([(1, 0), (0, 1), (2,)]) == [(), (0, 1), (2,)]
    assert tta_flips([0, ()]) == [(), (0,)]
    for bad in ("mirror", [(3,)], [(0, 0)], ["01"], 5, [(True,)]):
        with pytest.raises(ValueError, match="tta"):
            tta_flips(bad)


def test_predict_argument_errors(tmp_path):
    scan = write(tmp_path / "s.nii", np.zeros((4, 4, 4), np.float32), np.eye(4))
    model = identity_model(1)
    with pytest.raises(ValueError, match="uncertainty_path needs tta"):
        predict_nifti(model, scan, tmp_path / "o.nii", uncertainty_path=tmp_path / "u.nii")
    with pytest.raises(ValueError, match="same file"):
        predict_nifti(
            model, scan, tmp_path / "o.nii", tta="flips", uncertainty_path=tmp_path / "o.nii"
        )
    with pytest.raises(ValueError, match="input scan"):
        predict_nifti(model, scan, tmp_path / "o.nii", tta="flips", uncertainty_path=scan)
    with pytest.raises(ValueError, match="spacing"):
        predict_nifti(model, scan, tmp_path / "o.nii", spacing=(1.0, 0.0, 1.0))
    assert not (tmp_path / "o.nii").exists()


# --------------------------------------------------------------------------- the CLI


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_predict_with_spacing_tta_and_uncertainty(capsys, tmp_path):
    rng = np.random.default_rng(6)
    affine = grid_affine("oblique", (0.9, 1.1, 2.5))
    scan = write(tmp_path / "scan.nii.gz", rng.normal(size=(12, 10, 6)).astype(np.float32), affine)
    model = fcn(1)
    model_path = tmp_path / "m.keras"
    model.save(model_path)
    argv = ["predict", model_path, scan, tmp_path / "cli.nii.gz", "--spacing", "1", "keep", "1.5"]
    argv += ["--tta", "0", "12", "--uncertainty", tmp_path / "cli-var.nii.gz"]
    argv += ["--output", "probabilities"]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert "the variance across 3 predictions" in out
    api = predict_nifti(
        model,
        scan,
        tmp_path / "api.nii.gz",
        spacing=(1.0, None, 1.5),
        tta=[(0,), (1, 2)],
        uncertainty_path=tmp_path / "api-var.nii.gz",
        output="probabilities",
    )
    for cli, ref in (("cli.nii.gz", api), ("cli-var.nii.gz", tmp_path / "api-var.nii.gz")):
        written, want = nib.load(str(tmp_path / cli)), nib.load(str(ref))
        assert written.shape == (12, 10, 6)
        np.testing.assert_array_equal(written.affine, nib.load(scan).affine)
        np.testing.assert_allclose(np.asarray(written.dataobj), np.asarray(want.dataobj), atol=1e-6)
    assert np.asarray(nib.load(str(tmp_path / "cli-var.nii.gz")).dataobj).max() > 0

    # --tta flips: labels, on the scan's grid
    code, out, err = _run(capsys, "predict", model_path, scan, tmp_path / "l.nii", "--tta", "flips")
    assert code == 0, err
    assert nib.load(str(tmp_path / "l.nii")).shape == (12, 10, 6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tta", "3"], "expected 'flips' or the axes"),
        (["--tta", "00"], "expected 'flips' or the axes"),
        (["--spacing", "1", "0", "1"], "expected a positive spacing"),
        (["--spacing", "1", "x", "1"], "expected a spacing in mm"),
        (["--spacing", "1", "1"], "expected 3 arguments"),
    ],
)
def test_cli_bad_new_flags_are_usage_errors(capsys, tmp_path, extra, message):
    scan = write(tmp_path / "s.nii", np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tmp_path / "m.keras"), scan, str(tmp_path / "o.nii"), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_flag_combinations_are_one_line_errors(capsys, tmp_path):
    scan = write(tmp_path / "s.nii", np.zeros((4, 4, 4), np.float32), np.eye(4))
    model_path = tmp_path / "m.keras"
    identity_model(1).save(model_path)
    out = tmp_path / "o.nii"
    cases = [
        (["--tta", "flips", "0"], "--tta flips already holds every flip"),
        (["--uncertainty", tmp_path / "u.nii"], "--uncertainty needs --tta"),
        (["--tta", "0", "--uncertainty", out], "--uncertainty and OUT are the same file"),
        (["--tta", "0", "--uncertainty", tmp_path / "u.png"], "must end with one of"),
        (["--tta", "0", "--uncertainty", scan], "it is an input scan"),
    ]
    for extra, message in cases:
        code, _, err = _run(capsys, "predict", model_path, scan, out, *extra)
        lines = [line for line in err.splitlines() if line.startswith("keras-nii")]
        assert code == 1 and len(lines) == 1 and message in lines[0], (extra, err)
    assert not out.exists()
    write(tmp_path / "u.nii", np.zeros((4, 4, 4), np.float32), np.eye(4))
    code, _, err = _run(
        capsys, "predict", model_path, scan, out, "--tta", "0", "--uncertainty", tmp_path / "u.nii"
    )
    assert code == 1 and "already exists; pass --overwrite" in err


class ResourceExhaustedError(Exception):
    """Named as TensorFlow's out-of-memory error."""


@pytest.mark.parametrize("error", [MemoryError, ResourceExhaustedError])
def test_flips_are_split_when_memory_runs_out(error):
    calls = []

    def model(batch):
        calls.append(len(batch))
        if len(batch) > 3:
            raise error("OOM when allocating tensor")
        return batch[..., :1] * 3.0 + np.flip(batch, 1)[..., :1]  # not flip-equivariant

    volume = np.random.default_rng(1).normal(size=(4, 6, 4, 1)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="ran out of memory"):
        got = predict_volume(
            model, volume, patch_size=(4, 3, 4), overlap=0.0, tta="flips", batch_size=1
        )
    # window 1: 8 fail, 4 fail, then four calls of 2; window 2 starts at 2
    assert calls == [8, 4, 2, 2, 2, 2, 2, 2, 2, 2]
    for start in (0, 3):
        window = volume[:, start : start + 3]
        # the same windows, one flip at a time
        want = np.mean([np.flip(model(np.flip(window, f)[None])[0], f) for f in ALL_8], axis=0)
        np.testing.assert_allclose(got[:, start : start + 3], want, atol=1e-5)


def test_other_model_errors_are_not_retried():
    calls = []

    def model(batch):
        calls.append(len(batch))
        raise TypeError("bad input")

    volume = np.zeros((4, 4, 4, 1), np.float32)
    with pytest.raises(TypeError, match="bad input"):
        predict_volume(model, volume, tta="flips")
    assert calls == [8]
