"""predict_nifti on any scan size (the model's size divisor), and the headers of what it writes."""

from __future__ import annotations

import keras
import nibabel as nib
import numpy as np
import pytest

from keras_nii.inference import load_model, predict_nifti, predict_volume, size_divisor
from keras_nii.io import load_nifti
from keras_nii.layers import ZScoreNormalization
from keras_nii.models import SizeDivisor, unet3d


@pytest.fixture(scope="module")
def net():
    """A U-Net that takes multiples of 4 only: predict_nifti pads for it."""
    keras.utils.set_random_seed(0)
    return unet3d(
        filters=2, levels=2, normalization=ZScoreNormalization(nonzero=True), pad_to_fit=False
    )


def test_unet3d_records_its_divisor_in_keras_and_saved_models(net, tmp_path):
    assert size_divisor(net) == (4, 4, 4)
    assert size_divisor(unet3d(filters=2, levels=3, pad_to_fit=False)) == (8, 8, 8)
    # padding inside (the default), it takes any size, although it pools by 2 twice
    assert size_divisor(unet3d(filters=2, levels=2)) == (1, 1, 1)
    path = tmp_path / "net.keras"
    net.save(path)
    assert size_divisor(keras.saving.load_model(path)) == (4, 4, 4)
    assert size_divisor(load_model(path)) == (4, 4, 4)
    if keras.backend.backend() == "tensorflow":
        net.export(str(tmp_path / "exported"), verbose=False)
        run = load_model(tmp_path / "exported")
        assert run.size_divisor == (4, 4, 4)
        assert size_divisor(run) == (4, 4, 4)


def test_size_divisor_of_other_models():
    # no SizeDivisor layer: the product of pooling / strided-convolution strides
    inputs = keras.Input((None, None, None, 1))
    x = keras.layers.MaxPooling3D(2)(inputs)
    x = keras.layers.Conv3D(2, 3, strides=(1, 2, 1), padding="same")(x)
    x = keras.layers.Conv3DTranspose(1, 2, strides=(2, 4, 2))(x)
    model = keras.Model(inputs, x)
    assert size_divisor(model) == (2, 4, 2)
    assert size_divisor(lambda batch: batch) is None  # a plain function: unknown


def test_predict_nifti_on_a_scan_of_any_size(net, tmp_path, nibabel_data):
    # anatomical.nii is 33 x 41 x 25, LAS: no size is a multiple of 4
    scan = nibabel_data / "anatomical.nii"
    out = predict_nifti(net, scan, tmp_path / "p.nii.gz", output="probabilities")
    written = nib.load(out)
    assert written.shape == (33, 41, 25)
    np.testing.assert_array_equal(written.affine, nib.load(scan).affine)
    # reference: the RAS+ volume zero padded at the end to 36 x 44 x 28, the model, a crop
    ras = load_nifti(scan).array
    padded = np.zeros((1, 36, 44, 28, 1), np.float32)
    padded[0, :33, :41, :25] = ras
    expected = np.asarray(net.predict_on_batch(padded))[0, :33, :41, :25]
    np.testing.assert_allclose(load_nifti(out).array, expected, atol=1e-5)
    # the same with predict_volume, and with an explicit divisor as for a model that cannot say
    np.testing.assert_allclose(predict_volume(net, ras), expected, atol=1e-5)
    np.testing.assert_allclose(
        predict_volume(net.predict_on_batch, ras, size_divisor=4), expected, atol=1e-5
    )


def test_predict_nifti_with_a_unet_that_pads_by_itself(tmp_path, nibabel_data):
    # the default unet3d: predict_nifti pads nothing, the model does, after its normalization
    keras.utils.set_random_seed(0)
    padding = unet3d(filters=2, levels=2, normalization=ZScoreNormalization(nonzero=True))
    scan = nibabel_data / "anatomical.nii"
    out = predict_nifti(padding, scan, tmp_path / "p.nii.gz", output="probabilities")
    assert nib.load(out).shape == (33, 41, 25)
    ras = load_nifti(scan).array
    expected = np.asarray(padding.predict_on_batch(ras[None]))[0]
    assert expected.shape == (33, 41, 25, 1)
    np.testing.assert_allclose(load_nifti(out).array, expected, atol=1e-5)


def test_size_arguments_are_checked(net):
    volume = np.ones((9, 9, 9, 1), np.float32)
    with pytest.raises(
        ValueError, match=r"patch_size \(6, 6, 6\) is not a multiple .* \(4, 4, 4\)"
    ):
        predict_volume(net, volume, patch_size=(6, 6, 6))
    with pytest.raises(ValueError, match="size_divisor must be a positive int"):
        predict_volume(net, volume, size_divisor=0)
    with pytest.raises(ValueError, match="size_divisor must be a positive int"):
        predict_volume(net, volume, size_divisor=(2, 2))


def test_a_wrong_size_given_to_the_network_says_what_to_set(net):
    # what fit / evaluate would meet on unpadded volumes: one ValueError naming the fix
    with pytest.raises(ValueError, match=r"multiples of 4 x 4 x 4 .*pad_to_multiple=4.*pad_to_fit"):
        net(np.ones((1, 9, 8, 8, 1), np.float32))
    layer = SizeDivisor((2, 4, 8))
    assert layer.get_config()["divisor"] == (2, 4, 8)
    assert SizeDivisor.from_config(layer.get_config()).divisor == (2, 4, 8)
    x = np.ones((1, 2, 4, 8, 3), np.float32)
    np.testing.assert_array_equal(np.asarray(layer(x)), x)
    with pytest.raises(ValueError, match="divisor must be"):
        SizeDivisor(0)


# --------------------------------------------------------------------------- output headers


def _mean_model(channels_out: int):
    """A model of known output: sigmoid of the channel mean, or a softmax over ``k`` shifts."""

    def run(batch: np.ndarray) -> np.ndarray:
        mean = batch.mean(axis=-1, keepdims=True)
        z = (mean - mean.mean()) / (mean.std() + 1e-6)
        if channels_out == 1:
            return 1.0 / (1.0 + np.exp(-z))
        logits = np.concatenate([z * (i - 1) for i in range(channels_out)], axis=-1)
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    return run


def test_label_map_header_from_a_4d_source(tmp_path, nibabel_data):
    # functional.nii: 4D int16, TR 2 s, cal 629.8 .. 5571.6, 'spm - 3D normalized'
    source = nibabel_data / "functional.nii"
    src = nib.load(source).header
    out = predict_nifti(_mean_model(1), source, tmp_path / "labels.nii.gz", size_divisor=1)
    img = nib.load(out)
    header = img.header
    assert img.shape == (17, 21, 3)
    assert img.get_data_dtype() == np.uint8
    data = np.asarray(img.dataobj)
    assert set(np.unique(data)) <= {0, 1} and data.max() == 1
    assert (float(header["cal_min"]), float(header["cal_max"])) == (0.0, 1.0)
    assert header.get_intent()[0] == "label"
    assert header["descrip"].item().decode().startswith("keras-nii ")
    assert "labels" in header["descrip"].item().decode()
    # geometry and space stay the source's; no time
    np.testing.assert_array_equal(img.affine, nib.load(source).affine)
    assert int(header["sform_code"]) == int(src["sform_code"])
    assert int(header["qform_code"]) == int(src["qform_code"])
    np.testing.assert_allclose(header.get_zooms(), src.get_zooms()[:3])
    assert header.get_xyzt_units() == ("mm", "unknown")


def test_probability_map_header(tmp_path, nibabel_data):
    source = nibabel_data / "functional.nii"
    out = predict_nifti(
        _mean_model(3), source, tmp_path / "p.nii", output="probabilities", size_divisor=1
    )
    img = nib.load(out)
    header = img.header
    assert img.shape == (17, 21, 3, 3)  # the 4th axis holds the classes
    assert img.get_data_dtype() == np.float32
    probabilities = np.asarray(img.dataobj)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
    assert (float(header["cal_min"]), float(header["cal_max"])) == (0.0, 1.0)
    assert header.get_intent()[0] == "estimate"
    assert header.get_intent()[2] == "probabilities"
    assert "probabilities of 3 class" in header["descrip"].item().decode()
    assert header.get_xyzt_units() == ("mm", "unknown")
    assert float(header["pixdim"][4]) == 1.0  # not the source's TR of 2 s
    assert float(header["slice_duration"]) == 0.0
    np.testing.assert_array_equal(img.affine, nib.load(source).affine)
    # a multi-class label map: 0 .. K-1
    out = predict_nifti(_mean_model(3), source, tmp_path / "l.nii", size_divisor=1)
    header = nib.load(out).header
    assert (float(header["cal_min"]), float(header["cal_max"])) == (0.0, 2.0)
