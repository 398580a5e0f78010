"""The CT-like phantoms of keras_nii.phantoms: a Decathlon-like task on disk."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from keras_nii.io import load_nifti
from keras_nii.phantoms import (
    CT_LESION_MAX_FRACTION,
    CT_ORGAN,
    make_ct_dataset,
    make_ct_phantom,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    return make_ct_dataset(
        folder, 4, seed=3, in_plane=(40, 64), slices=(16, 30), slice_spacing=(2.0, 5.0)
    )


def test_cases_differ_in_shape_spacing_and_orientation(dataset):
    shapes, spacings, codes = set(), set(), set()
    for image_path, label_path in dataset:
        img, lab = nib.load(image_path), nib.load(label_path)
        assert img.shape == lab.shape
        np.testing.assert_allclose(img.affine, lab.affine)
        assert 40 <= img.shape[0] <= 64 and 16 <= img.shape[2] <= 30
        sizes = nib.affines.voxel_sizes(img.affine)
        assert 0.6 <= sizes[0] <= 0.9 and 2.0 <= sizes[2] <= 5.0  # anisotropic
        shapes.add(img.shape)
        spacings.add(tuple(np.round(sizes, 3)))
        codes.add(nib.aff2axcodes(img.affine))
        obliquity = nib.affines.obliquity(img.affine)
        codes.add("oblique" if np.max(np.abs(obliquity)) > 0.1 else "aligned")
    assert len(shapes) == 4 and len(spacings) == 4
    assert {("R", "A", "S"), ("L", "P", "S"), "oblique", "aligned"} <= codes


def test_stored_as_ct_with_hounsfield_units(dataset):
    image_path, label_path = dataset[0]
    img = nib.load(image_path)
    assert img.get_data_dtype() == np.int16
    assert (img.dataobj.slope, img.dataobj.inter) == (1.0, -1024.0)
    hu = load_nifti(image_path).array[..., 0]
    labels = load_nifti(label_path, dtype="int32").array[..., 0]
    assert hu.min() == pytest.approx(-1000.0)
    assert abs(float(np.median(hu[labels == 1])) - CT_ORGAN) < 25
    assert float(np.median(hu[labels == 2])) < float(np.median(hu[labels == 1])) - 40


def test_labels_and_lesion_budget(dataset):
    for _, label_path in dataset:
        labels = np.asarray(nib.load(label_path).dataobj)
        assert labels.dtype == np.uint8
        assert set(np.unique(labels).tolist()) <= {0, 1, 2}
        fraction = float(np.mean(labels == 2))
        assert 0 < fraction <= CT_LESION_MAX_FRACTION
        assert float(np.mean(labels == 1)) > 10 * fraction


def test_same_seed_same_scan_and_anatomy_in_world_space():
    a = make_ct_phantom((48, 40, 20), spacing=(0.8, 0.8, 3.0), seed=1)
    b = make_ct_phantom((48, 40, 20), spacing=(0.8, 0.8, 3.0), seed=1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    # the LPS grid sees the same anatomy, mirrored in x and y
    ras = make_ct_phantom((48, 40, 20), spacing=(0.8, 0.8, 3.0), seed=5, orientation="RAS")
    lps = make_ct_phantom((48, 40, 20), spacing=(0.8, 0.8, 3.0), seed=5, orientation="LPS")
    np.testing.assert_array_equal(ras[1], lps[1][::-1, ::-1, :])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must"):
        make_ct_dataset(tmp_path, 0)
    with pytest.raises(ValueError, match="slices"):
        make_ct_dataset(tmp_path, 1, slices=(30, 10))
