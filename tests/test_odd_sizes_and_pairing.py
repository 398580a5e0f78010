"""Training on volumes of any size (pad_to_multiple, clear errors) and from_folder pairing rules."""

from __future__ import annotations

from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pytest

from keras_nii import NiftiDataset
from keras_nii.data import center_crop_or_pad
from keras_nii.io import load_nifti
from keras_nii.models import DiceLoss, unet3d


def _write(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 1.0, 1.0])), path)
    return path


def _odd_subjects(tmp_path: Path, shapes) -> tuple[list[str], list[str], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    images, masks, arrays = [], [], []
    for i, shape in enumerate(shapes):
        image = rng.uniform(1, 100, shape).astype(np.float32)
        arrays.append(image)
        images.append(str(_write(tmp_path / f"img{i}.nii.gz", image)))
        masks.append(str(_write(tmp_path / f"mask{i}.nii.gz", (image > 50).astype(np.uint8))))
    return images, masks, arrays


def test_pad_to_multiple_pads_image_and_mask_alike(tmp_path):
    images, masks, arrays = _odd_subjects(tmp_path, [(9, 7, 5)])
    ds = NiftiDataset(images, masks, pad_to_multiple=4)
    x, y = ds[0]
    assert x.shape == (1, 12, 8, 8, 1) and y.shape == (1, 12, 8, 8, 1)
    # centred zero padding, as center_crop_or_pad does for shape=
    np.testing.assert_array_equal(x[0, ..., 0], center_crop_or_pad(arrays[0], (12, 8, 8)))
    np.testing.assert_array_equal(
        y[0, ..., 0], center_crop_or_pad((arrays[0] > 50).astype(np.int32), (12, 8, 8))
    )
    # one multiple per axis, applied after shape=
    x = NiftiDataset(images, pad_to_multiple=(2, 4, 8), shape=(9, 9, 9))[0]
    assert x.shape == (1, 10, 12, 16, 1)
    # a size already a multiple is left alone
    assert NiftiDataset(images, pad_to_multiple=1)[0].shape == (1, 9, 7, 5, 1)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, (4, 4), "4", (4, 0, 4)])
def test_pad_to_multiple_is_checked(tmp_path, bad):
    images, _, _ = _odd_subjects(tmp_path, [(4, 4, 4)])
    with pytest.raises(ValueError, match="pad_to_multiple"):
        NiftiDataset(images, pad_to_multiple=bad)


def test_fit_and_validate_on_odd_sizes(tmp_path):
    # 99 x 117 x 95 in the issue; the same sizes modulo 4, small
    images, masks, _ = _odd_subjects(tmp_path, [(11, 13, 7), (9, 13, 7), (10, 9, 11)])
    keras.utils.set_random_seed(0)
    net = unet3d(filters=2, levels=2)
    net.compile("adam", DiceLoss())
    train = NiftiDataset(images[:2], masks[:2], batch_size=1, pad_to_multiple=4)
    val = NiftiDataset(images[2:], masks[2:], batch_size=1, pad_to_multiple=4)
    history = net.fit(train, validation_data=val, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and np.isfinite(history.history["val_loss"][0])


def test_fit_and_validate_on_unpadded_volumes_of_varied_odd_sizes(tmp_path):
    # the default unet3d pads inside the model and crops back: no pad_to_multiple, volumes
    # of three odd sizes (so TensorFlow traces the step for unknown sizes), validation too
    sizes = [(11, 13, 7), (9, 14, 7), (10, 9, 11), (7, 6, 5)]
    images, masks, _ = _odd_subjects(tmp_path, sizes)
    keras.utils.set_random_seed(0)
    net = unet3d(filters=2, levels=2)
    net.compile("adam", DiceLoss())
    train = NiftiDataset(images[:3], masks[:3], batch_size=1)
    val = NiftiDataset(images[3:], masks[3:], batch_size=1)
    history = net.fit(train, validation_data=val, epochs=2, verbose=0)
    assert all(np.isfinite(v) for v in history.history["loss"] + history.history["val_loss"])
    for image, size in zip(images, sizes, strict=True):
        x = load_nifti(image).array[None]
        assert net.predict_on_batch(x).shape == (1, *size, 1)


def test_a_dataset_says_when_its_sizes_vary(tmp_path):
    # Keras's tf.data signature comes from the first two batches; the dataset corrects it
    # from its headers, and only when the sizes really vary
    import tensorflow as tf

    from keras_nii._pydataset_spec import relax

    images, masks, _ = _odd_subjects(tmp_path, [(8, 8, 4), (8, 8, 4), (8, 6, 4)])
    assert not NiftiDataset(images[:2], masks[:2], batch_size=1)._sizes_vary()
    assert NiftiDataset(images, masks, batch_size=1)._sizes_vary()
    spec = (tf.TensorSpec((1, 8, 8, 4, 1), tf.float32), tf.TensorSpec((1, 8, 8, 4, 1), tf.int32))
    relaxed = relax(spec)
    assert [tuple(s.shape) for s in relaxed] == [(1, None, None, None, 1)] * 2
    assert [s.dtype for s in relaxed] == [tf.float32, tf.int32]
    assert not NiftiDataset(images, masks, batch_size=1, shape=(8, 8, 4))._sizes_vary()


def test_unpadded_odd_volumes_fail_with_one_clear_error(tmp_path):
    # a unet3d that takes multiples only (pad_to_fit=False), on volumes of one odd size
    # (the 99 x 117 x 95, batch_size=1): Keras traces the step for that shape,
    # and the network's SizeDivisor says what to set
    images, masks, _ = _odd_subjects(tmp_path, [(11, 13, 7), (11, 13, 7)])
    keras.utils.set_random_seed(0)
    net = unet3d(filters=2, levels=2, pad_to_fit=False)
    net.compile("adam", DiceLoss())
    raw = NiftiDataset(images, masks, batch_size=1)
    with pytest.raises(ValueError, match=r"multiples of 4 x 4 x 4.*pad_to_multiple=4"):
        net.fit(raw, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="pad_to_multiple=4"):
        net.evaluate(raw, verbose=0)


# --------------------------------------------------------------------------- pairing


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        _write(folder / name, np.zeros((2, 2, 2), np.float32))


def _names(values) -> list:
    return [
        [Path(p).name for p in v] if isinstance(v, (list, tuple)) else Path(v).name for v in values
    ]


def test_pair_by_bids(tmp_path):
    imgs, labs = tmp_path / "anat", tmp_path / "derivatives"
    _touch(imgs, "sub-02_T1w.nii.gz", "sub-01_T1w.nii.gz", "sub-01_ses-2_T1w.nii.gz")
    _touch(labs, "sub-01_mask.nii.gz", "sub-02_desc-lesion_mask.nii", "sub-01_ses-2_mask.nii.gz")
    ds = NiftiDataset.from_folder(imgs, labs, pair_by="bids")
    assert _names(ds.images) == [
        ["sub-01_T1w.nii.gz"],
        ["sub-01_ses-2_T1w.nii.gz"],
        ["sub-02_T1w.nii.gz"],
    ]
    assert _names(ds.labels) == [
        "sub-01_mask.nii.gz",
        "sub-01_ses-2_mask.nii.gz",
        "sub-02_desc-lesion_mask.nii",
    ]
    # identical stems would not pair these
    with pytest.raises(ValueError, match="without a label map"):
        NiftiDataset.from_folder(imgs, labs)


def test_pair_by_bids_modalities_and_errors(tmp_path):
    imgs, labs = tmp_path / "images", tmp_path / "labels"
    _touch(imgs, "sub-01_T1w.nii.gz", "sub-01_FLAIR.nii.gz", "sub-02_T1w.nii.gz")
    _touch(imgs, "sub-02_FLAIR.nii.gz")
    _touch(labs, "sub-01_mask.nii.gz", "sub-02_mask.nii.gz")
    ds = NiftiDataset.from_folder(imgs, labs, pair_by="bids")
    assert _names(ds.images) == [
        ["sub-01_FLAIR.nii.gz", "sub-01_T1w.nii.gz"],
        ["sub-02_FLAIR.nii.gz", "sub-02_T1w.nii.gz"],
    ]
    assert ds[0][0].shape == (1, 2, 2, 2, 2)  # two channels
    # an unpaired image, an orphan label map, a name that is not BIDS, two label maps
    _touch(imgs, "sub-03_T1w.nii.gz", "sub-03_FLAIR.nii.gz")
    with pytest.raises(ValueError, match=r"1 image\(s\) without a label map.*sub-03_FLAIR"):
        NiftiDataset.from_folder(imgs, labs, pair_by="bids")
    _touch(labs, "sub-03_mask.nii.gz", "sub-04_mask.nii.gz")
    with pytest.raises(ValueError, match=r"label map\(s\) without an image.*sub-04_mask"):
        NiftiDataset.from_folder(imgs, labs, pair_by="bids")
    (labs / "sub-04_mask.nii.gz").unlink()
    _touch(imgs, "participants_T1w.nii.gz")
    with pytest.raises(ValueError, match=r"does not match pair_by='bids'.*participants_T1w"):
        NiftiDataset.from_folder(imgs, labs, pair_by="bids")
    (imgs / "participants_T1w.nii.gz").unlink()
    _touch(labs, "sub-03_dseg.nii.gz")
    with pytest.raises(ValueError, match="share a subject key.*sub-03_dseg"):
        NiftiDataset.from_folder(imgs, labs, pair_by="bids")
    (labs / "sub-03_dseg.nii.gz").unlink()
    (imgs / "sub-03_FLAIR.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"different numbers of images \(\[1, 2\]\).*sub-03_T1w"):
        NiftiDataset.from_folder(imgs, labs, pair_by="bids")


def test_pair_by_nnunet(tmp_path):
    imgs, labs = tmp_path / "imagesTr", tmp_path / "labelsTr"
    _touch(imgs, "BraTS_0001_0001.nii.gz", "BraTS_0001_0000.nii.gz")
    _touch(imgs, "BraTS_0002_0000.nii.gz", "BraTS_0002_0001.nii.gz")
    _touch(labs, "BraTS_0001.nii.gz", "BraTS_0002.nii.gz")
    ds = NiftiDataset.from_folder(imgs, labs, pair_by="nnunet")
    assert _names(ds.images) == [
        ["BraTS_0001_0000.nii.gz", "BraTS_0001_0001.nii.gz"],
        ["BraTS_0002_0000.nii.gz", "BraTS_0002_0001.nii.gz"],
    ]
    assert _names(ds.labels) == ["BraTS_0001.nii.gz", "BraTS_0002.nii.gz"]
    # one channel
    one = tmp_path / "one"
    _touch(one / "i", "case_00000_0000.nii.gz", "case_00001_0000.nii.gz")
    _touch(one / "l", "case_00000.nii.gz", "case_00001.nii.gz")
    ds = NiftiDataset.from_folder(one / "i", one / "l", pair_by="nnunet")
    assert _names(ds.images) == [["case_00000_0000.nii.gz"], ["case_00001_0000.nii.gz"]]
    # channels must agree between cases
    (imgs / "BraTS_0002_0001.nii.gz").rename(imgs / "BraTS_0002_0002.nii.gz")
    with pytest.raises(ValueError, match="different channel indices"):
        NiftiDataset.from_folder(imgs, labs, pair_by="nnunet")
    # an image without the channel suffix
    _touch(one / "i", "case_00002.nii.gz")
    with pytest.raises(ValueError, match=r"does not match pair_by='nnunet'.*case_00002\.nii\.gz"):
        NiftiDataset.from_folder(one / "i", one / "l", pair_by="nnunet")


def test_pair_by_regex_and_function(tmp_path):
    imgs, labs = tmp_path / "images", tmp_path / "labels"
    _touch(imgs, "patient7_ct.nii.gz", "patient12_ct.nii.gz")
    _touch(labs, "seg_patient7.nii.gz", "seg_patient12.nii.gz")
    ds = NiftiDataset.from_folder(imgs, labs, pair_by=r"patient(?P<key>\d+)")
    assert _names(ds.images) == [["patient12_ct.nii.gz"], ["patient7_ct.nii.gz"]]  # "12" < "7"
    assert _names(ds.labels) == ["seg_patient12.nii.gz", "seg_patient7.nii.gz"]
    ds = NiftiDataset.from_folder(
        imgs, labs, pair_by=lambda name: name.rsplit("patient", 1)[1].split("_")[0]
    )
    assert len(ds.images) == 2
    assert _names(ds.labels) == ["seg_patient12.nii.gz", "seg_patient7.nii.gz"]
    with pytest.raises(ValueError, match="pair_by must be one of"):
        NiftiDataset.from_folder(imgs, labs, pair_by="nnu")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        NiftiDataset.from_folder(imgs, labs, pair_by="patient(")
    with pytest.raises(ValueError, match="pair_by must be one of"):
        NiftiDataset.from_folder(imgs, labs, pair_by=3)
