"""predict_nifti / predict_volume / load_model.

Identity-like models make the geometry checks exact: the written prediction of
an identity model must be the input scan itself, voxel for voxel, in the input
file's own shape, affine and voxel order, whatever that order is (LPS, PSR,
oblique). Sliding windows are checked against one whole-volume pass of a fully
convolutional network.
"""

from __future__ import annotations

import hashlib
import os

import keras
import nibabel as nib
import numpy as np
import pytest

from keras_nii.inference import (
    load_model,
    predict_nifti,
    predict_volume,
    sliding_window_positions,
)
from keras_nii.io import NiftiError
from keras_nii.phantoms import make_phantom

tf_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="SavedModel export needs TensorFlow"
)

SHAPE = (12, 16, 10)  # not cubic: a transposed axis cannot go unnoticed


# ----------------------------------------------------------------------------
# helpers


def write_scan(path, data, affine, dtype=None) -> str:
    data = np.asarray(data)
    img = nib.Nifti1Image(data if dtype is None else data.astype(dtype), affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def phantom_scan(tmp_path, orientation, name="scan.nii.gz", spacing=(1.2, 1.0, 0.9), seed=0):
    image, _, affine = make_phantom(SHAPE, seed=seed, orientation=orientation, spacing=spacing)
    return write_scan(tmp_path / name, image, affine), image, affine


def identity_model(fixed: tuple | None = None) -> keras.Model:
    """y = x exactly (a 1x1x1 convolution with kernel 1, no bias)."""
    inputs = keras.Input((*(fixed or (None, None, None)), 1))
    conv = keras.layers.Conv3D(1, 1, use_bias=False, kernel_initializer="ones")
    return keras.Model(inputs, conv(inputs))


def weighted_sum_model(weights) -> keras.Model:
    """y = sum_c weights[c] * x[..., c], exactly (for small integer weights)."""
    inputs = keras.Input((None, None, None, len(weights)))
    conv = keras.layers.Conv3D(
        1,
        1,
        use_bias=False,
        kernel_initializer=keras.initializers.Constant(
            np.asarray(weights, "float32").reshape(1, 1, 1, len(weights), 1)
        ),
    )
    return keras.Model(inputs, conv(inputs))


def fcn(channels_in: int = 1, channels_out: int = 3) -> keras.Model:
    """Two 3x3x3 convolutions with random weights: receptive-field radius 2."""

    def init(seed):
        return keras.initializers.RandomNormal(0.0, 0.5, seed=seed)

    inputs = keras.Input((None, None, None, channels_in))
    hidden = keras.layers.Conv3D(
        4,
        3,
        padding="same",
        activation="tanh",
        kernel_initializer=init(1),
        bias_initializer=init(2),
    )(inputs)
    outputs = keras.layers.Conv3D(
        channels_out, 3, padding="same", kernel_initializer=init(3), bias_initializer=init(4)
    )(hidden)
    return keras.Model(inputs, outputs)


def never_called(batch):
    raise AssertionError("the model must not run")


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_same_space(out_path, in_path):
    """Same shape, exactly the same affine, same orientation as the input file."""
    out, src = nib.load(str(out_path)), nib.load(str(in_path))
    assert out.shape[:3] == src.shape[:3]
    np.testing.assert_array_equal(out.affine, src.affine)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)
    return out, src


# ----------------------------------------------------------------------------
# geometry: the prediction lands on the scan


@pytest.mark.parametrize("orientation", ["LPS", "PSR", "oblique", "RAS"])
def test_probabilities_round_trip(tmp_path, orientation):
    in_path, image, affine = phantom_scan(tmp_path, orientation)
    out_path = tmp_path / "pred.nii.gz"
    written = predict_nifti(identity_model(), in_path, out_path, output="probabilities")
    assert os.fspath(written) == os.fspath(out_path)
    out, src = assert_same_space(out_path, in_path)
    assert out.shape == image.shape
    np.testing.assert_array_equal(out.get_fdata(dtype=np.float32), image)
    # the input really is stored otherwise than RAS+ on a diagonal grid
    if orientation in ("LPS", "PSR"):
        assert "".join(nib.aff2axcodes(src.affine)) == orientation
    elif orientation == "oblique":
        rotation = src.affine[:3, :3]
        assert np.abs(rotation - np.diag(np.diag(rotation))).max() > 0.1


@pytest.mark.parametrize("orientation", ["LPS", "PSR", "oblique"])
def test_labels_land_on_the_right_voxels(tmp_path, orientation):
    in_path, image, _ = phantom_scan(tmp_path, orientation, name="scan.nii")
    out_path = tmp_path / "labels.nii.gz"
    # identity output thresholded: label 1 exactly where the scan is > 600
    predict_nifti(identity_model(), in_path, out_path, output="labels", threshold=600.0)
    out, _ = assert_same_space(out_path, in_path)
    labels = np.asarray(out.dataobj)
    assert labels.dtype == np.uint8
    expected = (image > 600.0).astype(np.uint8)
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(labels, expected)


def test_scaled_integer_scan(tmp_path):
    # an int16 scan with scl_slope/scl_inter: the model sees the scaled values
    image, _, affine = make_phantom(SHAPE, seed=2, orientation="LPS")
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    img = nib.Nifti1Image(image, affine, header)
    img.header.set_slope_inter(0.5, 10.0)
    in_path = str(tmp_path / "int16.nii")
    nib.save(img, in_path)
    scaled = nib.load(in_path).get_fdata(dtype=np.float32)
    assert not np.array_equal(scaled, np.asarray(nib.load(in_path).dataobj.get_unscaled()))

    predict_nifti(identity_model(), in_path, tmp_path / "p.nii.gz", output="probabilities")
    out, _ = assert_same_space(tmp_path / "p.nii.gz", in_path)
    np.testing.assert_array_equal(out.get_fdata(dtype=np.float32), scaled)

    predict_nifti(identity_model(), in_path, tmp_path / "l.nii.gz", threshold=600.0)
    out, _ = assert_same_space(tmp_path / "l.nii.gz", in_path)
    labels = np.asarray(out.dataobj)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, (scaled > 600.0).astype(np.uint8))


def test_labels_from_a_channel_argmax(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random(SHAPE).astype("float32")
    _, _, affine = make_phantom(SHAPE, seed=0, orientation="PSR")
    in_path = write_scan(tmp_path / "scan.nii", data, affine)
    # channels x, 1 - x, 0.55: argmax 0 above 0.55, 1 below 0.45, 2 between
    inputs = keras.Input((None, None, None, 1))
    conv = keras.layers.Conv3D(
        3,
        1,
        kernel_initializer=keras.initializers.Constant(
            np.array([1.0, -1.0, 0.0], "float32").reshape(1, 1, 1, 1, 3)
        ),
        bias_initializer=keras.initializers.Constant(np.array([0.0, 1.0, 0.55], "float32")),
    )
    model = keras.Model(inputs, conv(inputs))
    expected = np.where(data > 0.55, 0, np.where(data < 0.45, 1, 2)).astype(np.uint8)
    assert set(np.unique(expected)) == {0, 1, 2}

    predict_nifti(model, in_path, tmp_path / "labels.nii.gz", output="labels")
    out, _ = assert_same_space(tmp_path / "labels.nii.gz", in_path)
    assert out.shape == SHAPE
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected)

    # the probabilities of a multi-channel output: a 4D file, channels last
    predict_nifti(model, in_path, tmp_path / "probs.nii.gz", output="probabilities")
    out, _ = assert_same_space(tmp_path / "probs.nii.gz", in_path)
    assert out.shape == (*SHAPE, 3)
    probs = out.get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(probs[..., 0], data)
    np.testing.assert_allclose(probs[..., 1], 1.0 - data, atol=1e-6)
    np.testing.assert_allclose(probs[..., 2], 0.55, atol=1e-6)


def test_real_scan_from_nibabel(tmp_path, nibabel_data):
    in_path = nibabel_data / "anatomical.nii"
    src = nib.load(str(in_path))
    out_path = tmp_path / "anatomical_pred.nii.gz"
    predict_nifti(identity_model(), in_path, out_path, output="probabilities")
    out, _ = assert_same_space(out_path, in_path)
    expected = src.get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(out.get_fdata(dtype=np.float32), expected)

    threshold = float(np.percentile(expected, 70))
    predict_nifti(identity_model(), in_path, tmp_path / "labels.nii", threshold=threshold)
    labels = np.asarray(nib.load(str(tmp_path / "labels.nii")).dataobj)
    np.testing.assert_array_equal(labels, (expected > threshold).astype(np.uint8))


def test_two_modalities(tmp_path):
    image, _, affine = make_phantom(SHAPE, seed=1, orientation="LPS")
    other = np.flip(image, axis=1).copy()  # any second volume on the same grid
    first = write_scan(tmp_path / "t1.nii.gz", image, affine)
    second = write_scan(tmp_path / "t2.nii.gz", other, affine)
    out_path = tmp_path / "pred.nii.gz"
    predict_nifti(weighted_sum_model([1.0, 2.0]), [first, second], out_path, output="probabilities")
    out, _ = assert_same_space(out_path, first)
    # the channels are in the order given: t1 + 2 * t2
    np.testing.assert_allclose(out.get_fdata(dtype=np.float32), image + 2 * other, rtol=1e-6)

    # modalities on different grids are refused
    shifted = affine.copy()
    shifted[:3, 3] += 5.0
    third = write_scan(tmp_path / "t3.nii.gz", other, shifted)
    with pytest.raises(ValueError, match="grid"):
        predict_nifti(weighted_sum_model([1.0, 2.0]), [first, third], tmp_path / "x.nii.gz")


# ----------------------------------------------------------------------------
# sliding windows


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_sliding_windows_equal_one_pass_with_a_margin(blend):
    model = fcn()
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(20, 22, 18, 1)).astype("float32")
    whole = predict_volume(model, volume)
    assert whole.shape == (20, 22, 18, 3)
    kwargs = {"patch_size": (12, 12, 12), "overlap": 0.5, "blend": blend, "batch_size": 4}
    windows = predict_volume(model, volume, margin=2, **kwargs)
    assert windows.shape == whole.shape
    # equal everywhere, borders and window seams included
    np.testing.assert_allclose(windows, whole, atol=2e-5, rtol=0)
    # without the margin the seams show: the check above has teeth
    seams = predict_volume(model, volume, margin=0, **kwargs)
    assert np.abs(seams - whole).max() > 0.1


def test_sliding_windows_through_predict_nifti(tmp_path):
    in_path, image, _ = phantom_scan(tmp_path, "PSR", spacing=(1.0, 1.0, 1.0))
    model = fcn(channels_out=1)
    whole = tmp_path / "whole.nii.gz"
    tiled = tmp_path / "tiled.nii.gz"
    predict_nifti(model, in_path, whole, output="probabilities")
    predict_nifti(
        model, in_path, tiled, output="probabilities", patch_size=(8, 8, 8), overlap=0.5, margin=2
    )
    a = nib.load(str(whole)).get_fdata(dtype=np.float32)
    b = nib.load(str(tiled)).get_fdata(dtype=np.float32)
    assert a.shape == image.shape
    np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max(), rtol=0)


def test_volume_smaller_than_the_patch(tmp_path):
    in_path, image, _ = phantom_scan(tmp_path, "LPS")
    seen = []

    def model(batch):
        seen.append(batch.shape)
        return batch  # the identity

    out_path = tmp_path / "pred.nii.gz"
    predict_nifti(model, in_path, out_path, output="probabilities", patch_size=(16, 20, 16))
    assert seen and all(shape[1:4] == (16, 20, 16) for shape in seen)
    out, _ = assert_same_space(out_path, in_path)
    np.testing.assert_array_equal(out.get_fdata(dtype=np.float32), image)


def test_patch_size_from_a_fixed_input_model(tmp_path):
    in_path, image, _ = phantom_scan(tmp_path, "oblique")
    # a dense map over an 8x8x8 window: runs on exactly that input size only
    size = 8 * 8 * 8
    inputs = keras.Input((8, 8, 8, 1))
    flat = keras.layers.Flatten()(inputs)
    dense = keras.layers.Dense(size, use_bias=False, kernel_initializer="identity")(flat)
    model = keras.Model(inputs, keras.layers.Reshape((8, 8, 8, 1))(dense))
    out_path = tmp_path / "pred.nii.gz"
    predict_nifti(model, in_path, out_path, output="probabilities")
    out, _ = assert_same_space(out_path, in_path)
    np.testing.assert_allclose(out.get_fdata(dtype=np.float32), image, rtol=1e-6)


def test_sliding_window_positions():
    assert sliding_window_positions(20, 12, 0.5) == [0, 6, 8]
    assert sliding_window_positions(24, 12, 0.0) == [0, 12]
    assert sliding_window_positions(12, 12, 0.5) == [0]
    assert sliding_window_positions(8, 12, 0.5) == [0]
    for size in range(8, 40):
        for patch in (5, 8, 13):
            for overlap in (0.0, 0.25, 0.5, 0.9):
                starts = sliding_window_positions(size, patch, overlap)
                covered = np.zeros(size, bool)
                for start in starts:
                    assert 0 <= start and (start + patch <= size or start == 0)
                    covered[start : start + patch] = True
                assert covered.all(), (size, patch, overlap, starts)
                assert starts == sorted(set(starts))


# ----------------------------------------------------------------------------
# errors


def test_refuses_to_write_over_the_input(tmp_path):
    in_path, _, _ = phantom_scan(tmp_path, "LPS")
    before = digest(in_path)
    with pytest.raises(ValueError, match="input"):
        predict_nifti(identity_model(), in_path, in_path)
    # the same file by another spelling, and by a link
    roundabout = os.path.join(str(tmp_path), "..", tmp_path.name, "scan.nii.gz")
    with pytest.raises(ValueError, match="input"):
        predict_nifti(identity_model(), in_path, roundabout)
    link = tmp_path / "link.nii.gz"
    os.symlink(in_path, link)
    with pytest.raises(ValueError, match="input"):
        predict_nifti(identity_model(), in_path, link)
    assert digest(in_path) == before


def test_missing_output_folder_fails_before_the_model_runs(tmp_path):
    in_path, _, _ = phantom_scan(tmp_path, "LPS")
    missing = tmp_path / "no_such_folder" / "pred.nii.gz"
    with pytest.raises(NiftiError, match="no_such_folder"):
        predict_nifti(never_called, in_path, missing)
    assert not missing.parent.exists()


@pytest.mark.parametrize("name", ["pred.txt", "pred.nii.bz2", "pred"])
def test_bad_output_suffix(tmp_path, name):
    in_path, _, _ = phantom_scan(tmp_path, "LPS")
    with pytest.raises(ValueError, match="out_path"):
        predict_nifti(never_called, in_path, tmp_path / name)


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5])
def test_overlap_out_of_range(tmp_path, overlap):
    in_path, _, _ = phantom_scan(tmp_path, "LPS")
    with pytest.raises(ValueError, match="overlap"):
        predict_nifti(
            never_called, in_path, tmp_path / "p.nii.gz", patch_size=(8, 8, 8), overlap=overlap
        )


def test_margin_too_big_for_the_overlap(tmp_path):
    in_path, _, _ = phantom_scan(tmp_path, "LPS")
    # windows of 8 with overlap 0.5 share 4 voxels; margin 3 needs 6
    with pytest.raises(ValueError, match="margin"):
        predict_nifti(
            never_called,
            in_path,
            tmp_path / "p.nii.gz",
            patch_size=(8, 8, 8),
            overlap=0.5,
            margin=3,
        )
    with pytest.raises(ValueError, match="margin"):
        predict_volume(never_called, np.zeros((8, 8, 8, 1), "float32"), margin=-1)


def test_output_of_another_spatial_size(tmp_path):
    in_path, _, _ = phantom_scan(tmp_path, "LPS")
    inputs = keras.Input((None, None, None, 1))
    valid = keras.Model(inputs, keras.layers.Conv3D(1, 3, padding="valid")(inputs))
    out_path = tmp_path / "p.nii.gz"
    with pytest.raises(ValueError, match="spatial size"):
        predict_nifti(valid, in_path, out_path)
    assert not out_path.exists()


def test_other_bad_arguments(tmp_path):
    in_path, _, _ = phantom_scan(tmp_path, "LPS")
    out = tmp_path / "p.nii.gz"
    with pytest.raises(ValueError, match="output"):
        predict_nifti(never_called, in_path, out, output="logits")
    with pytest.raises(ValueError, match="in_path"):
        predict_nifti(never_called, [], out)
    with pytest.raises(ValueError, match="channel"):
        predict_nifti(weighted_sum_model([1.0, 1.0]), in_path, out)
    with pytest.raises(ValueError, match="blend"):
        predict_volume(never_called, np.zeros((8, 8, 8, 1), "float32"), blend="max")
    with pytest.raises(ValueError, match="patch_size"):
        predict_volume(never_called, np.zeros((8, 8, 8, 1), "float32"), patch_size=(8, 8))
    with pytest.raises(ValueError, match="array"):
        predict_volume(never_called, np.zeros((8, 8, 8), "float32"))
    with pytest.raises(NiftiError, match="missing.nii"):
        predict_nifti(identity_model(), tmp_path / "missing.nii", out)
    assert not out.exists()


@pytest.mark.parametrize(
    "argument, value",
    [
        ("overlap", "0.5"),
        ("overlap", True),
        ("overlap", float("nan")),
        ("batch_size", 2.5),
        ("batch_size", "2"),
        ("batch_size", 0),
        ("patch_size", (8.5, 8, 8)),
        ("patch_size", "888"),
        ("patch_size", (8, 8, True)),
        ("patch_size", 8),
    ],
)
def test_window_arguments_of_another_type_name_themselves(tmp_path, argument, value):
    # overlap="0.5" and batch_size=2.5 were TypeErrors; patch_size=(8.5, 8, 8)
    # and "888" were silently made (8, 8, 8)
    in_path, _, _ = phantom_scan(tmp_path, "LPS")
    out = tmp_path / "p.nii.gz"
    with pytest.raises(ValueError, match=argument):
        predict_nifti(never_called, in_path, out, **{argument: value})
    with pytest.raises(ValueError, match=argument):
        predict_volume(never_called, np.zeros((8, 8, 8, 1), "float32"), **{argument: value})
    assert not out.exists()
    # NumPy scalars are numbers like any other
    got = predict_volume(
        lambda b: b,
        np.ones((8, 8, 8, 1), "float32"),
        overlap=np.float32(0.25),
        batch_size=np.int64(2),
        patch_size=np.array([4, 4, 4]),
    )
    np.testing.assert_allclose(got, 1.0, rtol=1e-6)


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), "0.5", None])
def test_threshold_must_be_a_finite_number(tmp_path, threshold):
    in_path, _, _ = phantom_scan(tmp_path, "LPS")
    with pytest.raises(ValueError, match="threshold"):
        predict_nifti(never_called, in_path, tmp_path / "p.nii.gz", threshold=threshold)


@pytest.mark.parametrize("output", ["labels", "probabilities"])
def test_a_model_output_with_nan_is_an_error_not_an_empty_label_map(tmp_path, output):
    # NaN > threshold is False: the label map came out all zeros, silently
    in_path, _, _ = phantom_scan(tmp_path, "LPS")
    out = tmp_path / "p.nii.gz"

    def broken(batch):
        result = np.array(batch, dtype="float32")
        result[:, 1, 2, 3] = np.nan
        return result

    with pytest.raises(ValueError, match="NaN or inf"):
        predict_nifti(broken, in_path, out, output=output)
    assert not out.exists()


# ----------------------------------------------------------------------------
# models from files


def test_predict_from_a_keras_file(tmp_path):
    in_path, image, _ = phantom_scan(tmp_path, "PSR")
    model_path = tmp_path / "model.keras"
    identity_model().save(model_path)
    loaded = load_model(model_path)
    assert isinstance(loaded, keras.Model)
    out_path = tmp_path / "pred.nii.gz"
    predict_nifti(str(model_path), in_path, out_path, output="probabilities")
    out, _ = assert_same_space(out_path, in_path)
    np.testing.assert_array_equal(out.get_fdata(dtype=np.float32), image)


@tf_only
def test_predict_from_a_saved_model_folder(tmp_path):
    in_path, image, _ = phantom_scan(tmp_path, "oblique")
    export_dir = tmp_path / "exported"
    identity_model().export(str(export_dir), verbose=False)
    out_path = tmp_path / "pred.nii.gz"
    predict_nifti(str(export_dir), in_path, out_path, output="probabilities")
    out, _ = assert_same_space(out_path, in_path)
    np.testing.assert_array_equal(out.get_fdata(dtype=np.float32), image)


@tf_only
def test_saved_model_with_a_fixed_input_size(tmp_path):
    # the windows take the exported input size; the whole volume would not fit
    in_path, image, _ = phantom_scan(tmp_path, "LPS")
    export_dir = tmp_path / "exported"
    identity_model(fixed=(8, 8, 8)).export(str(export_dir), verbose=False)
    run = load_model(export_dir)
    assert tuple(run.input_shape) == (None, 8, 8, 8, 1)
    out_path = tmp_path / "pred.nii.gz"
    predict_nifti(export_dir, in_path, out_path, output="probabilities")
    out, _ = assert_same_space(out_path, in_path)
    np.testing.assert_allclose(out.get_fdata(dtype=np.float32), image, rtol=1e-6)


@tf_only
def test_saved_model_with_a_signature_only(tmp_path):
    # a SavedModel written by tf.saved_model.save, with no Keras "serve" endpoint
    import tensorflow as tf

    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, None, None, None, 1), tf.float32)])
        def double(self, volume):
            return {"prediction": 2.0 * volume}

    module = Doubler()
    export_dir = tmp_path / "signature_only"
    tf.saved_model.save(module, str(export_dir), signatures={"serving_default": module.double})
    run = load_model(export_dir)
    assert tuple(run.input_shape) == (None, None, None, None, 1)
    in_path, image, _ = phantom_scan(tmp_path, "PSR")
    out_path = tmp_path / "pred.nii.gz"
    predict_nifti(export_dir, in_path, out_path, output="probabilities")
    out, _ = assert_same_space(out_path, in_path)
    np.testing.assert_array_equal(out.get_fdata(dtype=np.float32), 2.0 * image)


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_model(tmp_path / "missing.keras")
    folder = tmp_path / "not_a_saved_model"
    folder.mkdir()
    (folder / "variables").mkdir()
    with pytest.raises(ValueError, match="saved_model.pb"):
        load_model(folder)
    weights = tmp_path / "model.h5"
    weights.write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(ValueError, match=r"\.keras"):
        load_model(weights)
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_model(broken)
    # predict_nifti reports the same before it reads anything
    in_path, _, _ = phantom_scan(tmp_path, "LPS")
    with pytest.raises(ValueError, match="no such file"):
        predict_nifti(tmp_path / "missing.keras", in_path, tmp_path / "p.nii.gz")
