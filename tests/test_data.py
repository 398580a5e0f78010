"""Tests of keras_nii.data: NiftiDataset and center_crop_or_pad."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pytest

import keras_nii
from keras_nii import data as kdata
from keras_nii.data import NiftiDataset, center_crop_or_pad
from keras_nii.io import NiftiError

# --------------------------------------------------------------------------- helpers


def write(path, data, affine=None) -> str:
    """Write ``data`` as a NIfTI file (RAS+ affine by default, so arrays come back as is)."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine
    data = np.asarray(data)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    nib.save(img, os.fspath(path))
    return os.fspath(path)


def make_subjects(folder, n=5, shape=(8, 9, 10), threshold=0.6, seed=0, suffix=".nii.gz"):
    """n random images and their masks ``image > threshold``; returns paths and arrays."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, masks, arrays = [], [], []
    for i in range(n):
        x = rng.random(shape).astype(np.float32)
        x[0, 0, 0] = i  # marks the subject
        images.append(write(folder / f"img{i}{suffix}", x))
        masks.append(write(folder / f"mask{i}{suffix}", (x > threshold).astype(np.uint8)))
        arrays.append(x)
    return images, masks, arrays


class CountingLoad:
    """Stands in for keras_nii.data.load_nifti and counts the files it reads."""

    def __init__(self):
        self.calls: list[str] = []
        self.real = kdata.load_nifti

    def __call__(self, path, **kwargs):
        self.calls.append(os.fspath(path))
        return self.real(path, **kwargs)


@pytest.fixture
def counting(monkeypatch):
    counter = CountingLoad()
    monkeypatch.setattr(kdata, "load_nifti", counter)
    return counter


def epoch(ds):
    """All batches of one epoch, then on_epoch_end (as fit does)."""
    batches = [ds[i] for i in range(len(ds))]
    ds.on_epoch_end()
    return batches


def reference_crop_or_pad(array, target):
    """Independent reference: copy the overlap of two centered boxes into zeros."""
    out = np.zeros(tuple(target) + array.shape[3:], dtype=array.dtype)
    src, dst = [], []
    for size, want in zip(array.shape[:3], target, strict=True):
        length = min(size, want)
        s0 = max(0, (size - want) // 2)
        d0 = max(0, (want - size) // 2)
        src.append(slice(s0, s0 + length))
        dst.append(slice(d0, d0 + length))
    out[tuple(dst)] = array[tuple(src)]
    return out


# --------------------------------------------------------------------------- batches


def test_segmentation_batches(tmp_path):
    images, masks, arrays = make_subjects(tmp_path, n=5)
    ds = NiftiDataset(images, masks, batch_size=2)
    assert isinstance(ds, keras.utils.PyDataset)
    assert len(ds) == 3
    seen = []
    for b in range(len(ds)):
        x, y = ds[b]
        size = 2 if b < 2 else 1
        assert x.shape == (size, 8, 9, 10, 1) and x.dtype == np.float32
        assert y.shape == (size, 8, 9, 10, 1) and y.dtype == np.int32
        for k in range(size):
            i = 2 * b + k
            np.testing.assert_array_equal(x[k, ..., 0], arrays[i])
            np.testing.assert_array_equal(y[k, ..., 0], arrays[i] > 0.6)
            seen.append(i)
    assert seen == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(ds[-1][0], ds[2][0])
    with pytest.raises(IndexError):
        ds[3]
    np.testing.assert_array_equal(ds.order, np.arange(5))


@pytest.mark.parametrize("n, batch_size, expected", [(1, 1, 1), (4, 2, 2), (5, 2, 3), (3, 8, 1)])
def test_len(tmp_path, n, batch_size, expected):
    images, _, _ = make_subjects(tmp_path, n=n, shape=(3, 3, 3))
    ds = NiftiDataset(images, batch_size=batch_size)
    assert len(ds) == expected
    assert sum(len(ds[i]) for i in range(len(ds))) == n


def test_predict_mode_returns_x_only(tmp_path):
    images, _, arrays = make_subjects(tmp_path, n=3)
    ds = NiftiDataset(images, batch_size=3)
    x = ds[0]
    assert isinstance(x, np.ndarray)
    assert x.shape == (3, 8, 9, 10, 1)
    np.testing.assert_array_equal(x[2, ..., 0], arrays[2])


def test_canonical_reorients_image_and_mask(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    las = np.diag([-2.0, 1.0, 3.0, 1.0])
    img = write(tmp_path / "las.nii.gz", data, las)
    mask = write(tmp_path / "las_mask.nii.gz", (data > 50).astype(np.int16), las)
    x, y = NiftiDataset([img], [mask])[0]
    np.testing.assert_array_equal(x[0, ..., 0], data[::-1])
    np.testing.assert_array_equal(y[0, ..., 0], data[::-1] > 50)
    x, y = NiftiDataset([img], [mask], canonical=False)[0]
    np.testing.assert_array_equal(x[0, ..., 0], data)
    np.testing.assert_array_equal(y[0, ..., 0], data > 50)


def test_mask_values_are_rounded_labels(tmp_path):
    img = write(tmp_path / "img.nii", np.zeros((3, 4, 5), np.float32))
    labels = np.zeros((3, 4, 5), np.float32)
    labels[0, 0, 0], labels[1, 1, 1], labels[2, 2, 2] = 0.9999, 2.0001, 1.49
    mask = write(tmp_path / "lab.nii", labels)
    _, y = NiftiDataset([img], [mask])[0]
    assert (y[0, 0, 0, 0, 0], y[0, 1, 1, 1, 0], y[0, 2, 2, 2, 0]) == (1, 2, 1)
    assert y.dtype == np.int32


# --------------------------------------------------------------------------- modalities


def test_modalities_become_channels_in_order(tmp_path):
    rng = np.random.default_rng(1)
    subjects, expected = [], []
    for s in range(3):
        t1 = rng.random((6, 7, 8)).astype(np.float32)
        flair = rng.random((6, 7, 8)).astype(np.float32) + 10
        dwi = rng.random((6, 7, 8, 2)).astype(np.float32) + 20  # a 4D modality: 2 channels
        subjects.append(
            [
                write(tmp_path / f"s{s}_t1.nii.gz", t1),
                write(tmp_path / f"s{s}_flair.nii.gz", flair),
                write(tmp_path / f"s{s}_dwi.nii.gz", dwi),
            ]
        )
        expected.append(np.concatenate([t1[..., None], flair[..., None], dwi], axis=-1))
    ds = NiftiDataset(subjects, [0, 1, 0], batch_size=2)
    x, y = ds[0]
    assert x.shape == (2, 6, 7, 8, 4)
    np.testing.assert_array_equal(x, np.stack(expected[:2]))
    np.testing.assert_array_equal(y, [0, 1])
    np.testing.assert_array_equal(ds[1][0][0], expected[2])
    # tuples of Paths work as well
    ds2 = NiftiDataset([tuple(Path(p) for p in s) for s in subjects])
    np.testing.assert_array_equal(ds2[2][0], expected[2])


def test_modality_shape_mismatch_names_subject_and_files(tmp_path):
    good = [write(tmp_path / "a_t1.nii", np.zeros((4, 4, 4), np.float32))]
    good.append(write(tmp_path / "a_t2.nii", np.zeros((4, 4, 4), np.float32)))
    t1 = write(tmp_path / "b_t1.nii", np.zeros((4, 4, 4), np.float32))
    t2 = write(tmp_path / "b_t2.nii", np.zeros((4, 4, 5), np.float32))
    ds = NiftiDataset([good, [t1, t2]], batch_size=1)
    ds[0]
    with pytest.raises(ValueError) as info:
        ds[1]
    msg = str(info.value)
    assert "subject 1" in msg and t1 in msg and t2 in msg


def test_modality_affine_mismatch_names_subject_and_files(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    t1 = write(tmp_path / "t1.nii.gz", data, np.diag([1.0, 1.0, 1.0, 1.0]))
    shifted = np.diag([1.0, 1.0, 1.0, 1.0])
    shifted[0, 3] = 0.5
    t2 = write(tmp_path / "t2.nii.gz", data, shifted)
    close = np.diag([1.0, 1.0, 1.0, 1.0])
    close[0, 3] = 2e-5  # within tolerance: the same grid
    t3 = write(tmp_path / "t3.nii.gz", data, close)
    assert NiftiDataset([[t1, t3]])[0].shape == (1, 4, 4, 4, 2)
    with pytest.raises(NiftiError) as info:
        NiftiDataset([[t1, t3], [t1, t2]], batch_size=2)[0]
    msg = str(info.value)
    assert "subject 1" in msg and t1 in msg and t2 in msg


def test_mask_grid_mismatch_names_both_files(tmp_path):
    img = write(tmp_path / "img.nii.gz", np.zeros((4, 5, 6), np.float32))
    bad_shape = write(tmp_path / "m1.nii.gz", np.zeros((4, 5, 7), np.uint8))
    bad_affine = write(tmp_path / "m2.nii.gz", np.zeros((4, 5, 6), np.uint8), np.diag([2, 1, 1, 1]))
    for mask in (bad_shape, bad_affine):
        with pytest.raises(ValueError) as info:
            NiftiDataset([img], [mask], shape=(4, 5, 6))[0]
        assert img in str(info.value) and mask in str(info.value)
        assert "subject 0" in str(info.value)


def test_different_sizes_in_one_batch_name_both_files(tmp_path):
    a = write(tmp_path / "small.nii.gz", np.zeros((4, 5, 6), np.float32))
    b = write(tmp_path / "large.nii.gz", np.zeros((4, 5, 8), np.float32))
    with pytest.raises(ValueError) as info:
        NiftiDataset([a, b], batch_size=2)[0]
    assert a in str(info.value) and b in str(info.value)
    # one a batch is fine; so is a common shape
    ds = NiftiDataset([a, b], batch_size=1)
    assert ds[0].shape == (1, 4, 5, 6, 1) and ds[1].shape == (1, 4, 5, 8, 1)
    assert NiftiDataset([a, b], batch_size=2, shape=(4, 5, 7))[0].shape == (2, 4, 5, 7, 1)


# --------------------------------------------------------------------------- labels


def test_integer_class_labels(tmp_path):
    images, _, _ = make_subjects(tmp_path, n=4, shape=(3, 3, 3))
    ds = NiftiDataset(images, [3, 1, 4, 1], batch_size=3)
    x, y = ds[0]
    assert y.dtype == np.int32 and y.shape == (3,)
    np.testing.assert_array_equal(y, [3, 1, 4])
    np.testing.assert_array_equal(ds[1][1], [1])
    _, yb = NiftiDataset(images, [True, False, True, True], batch_size=4)[0]
    assert yb.dtype == np.int32
    np.testing.assert_array_equal(yb, [1, 0, 1, 1])


def test_float_and_vector_labels(tmp_path):
    images, _, _ = make_subjects(tmp_path, n=3, shape=(3, 3, 3))
    _, y = NiftiDataset(images, [0.5, 1.0, 72.25], batch_size=3)[0]
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [0.5, 1.0, 72.25])
    vectors = [[1, 0, 0], [0, 1, 0], [0, 0, 1.0]]
    _, y = NiftiDataset(images, vectors, batch_size=2)[0]
    assert y.shape == (2, 3) and y.dtype == np.float32
    np.testing.assert_array_equal(y, vectors[:2])
    _, y = NiftiDataset(images, np.array([[1, 2], [3, 4], [5, 6]]), batch_size=3)[0]
    assert y.dtype == np.int32 and y.shape == (3, 2)
    with pytest.raises(ValueError, match="same length"):
        NiftiDataset(images, [[1, 2], [3], [4, 5]])


def test_shuffled_labels_follow_their_images(tmp_path):
    images, _, _ = make_subjects(tmp_path, n=6, shape=(3, 3, 3))
    ds = NiftiDataset(images, [10, 11, 12, 13, 14, 15], batch_size=4, shuffle=True, seed=3)
    for _ in range(3):
        for x, y in epoch(ds):
            # voxel (0, 0, 0) of subject i holds i
            np.testing.assert_array_equal(x[:, 0, 0, 0, 0].astype(int) + 10, y)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=-2), "batch_size"),
        (dict(batch_size=1.5), "batch_size"),
        (dict(batch_size=True), "batch_size"),
        (dict(shape=(4, 4)), "shape"),
        (dict(shape=(4, 4, 0)), "shape"),
        (dict(shape=(4, 4, 2.5)), "shape"),
        (dict(shape="444"), "shape"),
        (dict(shape=4), "shape"),
        (dict(cache=True), "cache"),
        (dict(cache=5), "cache"),
        (dict(cache=""), "cache"),
        (dict(seed=1.5), "seed"),
        (dict(labels=[1, 2]), "len"),
        (dict(labels="mask.nii"), "labels"),
        (dict(labels=[1, "a.nii", 2]), "labels"),
        (dict(labels=[object(), object(), object()]), "labels"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, argument):
    images, _, _ = make_subjects(tmp_path, n=3, shape=(3, 3, 3))
    with pytest.raises(ValueError, match=argument):
        NiftiDataset(images, **kwargs)


def test_bad_images_argument(tmp_path):
    images, _, _ = make_subjects(tmp_path, n=2, shape=(3, 3, 3))
    with pytest.raises(ValueError, match="empty"):
        NiftiDataset([])
    with pytest.raises(ValueError, match="images"):
        NiftiDataset(images[0])  # a str, not a list
    with pytest.raises(ValueError, match=r"images\[1\]"):
        NiftiDataset([images[0], []])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        NiftiDataset([images[0], 3])
    with pytest.raises(ValueError, match="number of modalities"):
        NiftiDataset([[images[0], images[1]], [images[0]]])


def test_cache_argument_that_is_a_file(tmp_path):
    images, _, _ = make_subjects(tmp_path, n=1, shape=(3, 3, 3))
    f = tmp_path / "not_a_dir"
    f.write_text("x")
    with pytest.raises(ValueError, match="cache"):
        NiftiDataset(images, cache=f)


def test_missing_files_named_at_construction(tmp_path):
    images, masks, _ = make_subjects(tmp_path, n=2, shape=(3, 3, 3))
    gone = str(tmp_path / "gone.nii.gz")
    with pytest.raises(NiftiError, match="gone.nii.gz"):
        NiftiDataset([images[0], gone])
    with pytest.raises(NiftiError, match="gone.nii.gz"):
        NiftiDataset(images, [masks[0], gone])


def test_bad_file_names_itself_at_read(tmp_path):
    images, _, _ = make_subjects(tmp_path, n=2, shape=(3, 3, 3))
    Path(images[1]).write_bytes(b"not a nifti")
    ds = NiftiDataset(images, batch_size=1)
    ds[0]
    with pytest.raises(NiftiError, match=images[1]):
        ds[1]


# --------------------------------------------------------------------------- crop / pad


@pytest.mark.parametrize(
    "size, target",
    [
        ((7, 8, 9), (5, 5, 5)),  # crop: odd and even differences
        ((5, 6, 7), (9, 9, 9)),  # pad: even, odd, even
        ((7, 4, 6), (4, 7, 6)),  # crop odd, pad odd, keep
        ((8, 5, 1), (5, 8, 2)),
        ((4, 4, 4), (4, 4, 4)),
    ],
)
def test_center_crop_or_pad_matches_reference(size, target):
    a = np.random.default_rng(0).random(size + (2,)).astype(np.float32)
    out = center_crop_or_pad(a, target)
    assert out.shape == target + (2,) and out.dtype == a.dtype
    np.testing.assert_array_equal(out, reference_crop_or_pad(a, target))
    # does not alias the input
    out[...] = -1
    assert a.min() >= 0


def test_center_crop_or_pad_explicit_windows():
    a = np.arange(6)[:, None, None] * np.ones((1, 1, 1))
    # crop 6 -> 3: start (6 - 3) // 2 = 1
    np.testing.assert_array_equal(center_crop_or_pad(a, (3, 1, 1))[:, 0, 0], [1, 2, 3])
    # crop 6 -> 5: start 0, the extra voxel goes from the end
    np.testing.assert_array_equal(center_crop_or_pad(a, (5, 1, 1))[:, 0, 0], [0, 1, 2, 3, 4])
    # pad 6 -> 9: 1 before, 2 after
    np.testing.assert_array_equal(
        center_crop_or_pad(a + 1, (9, 1, 1))[:, 0, 0], [0, 1, 2, 3, 4, 5, 6, 0, 0]
    )
    # pad 6 -> 8: 1 before, 1 after
    np.testing.assert_array_equal(
        center_crop_or_pad(a + 1, (8, 1, 1))[:, 0, 0], [0, 1, 2, 3, 4, 5, 6, 0]
    )
    with pytest.raises(ValueError, match="shape"):
        center_crop_or_pad(a, (3, 3))
    with pytest.raises(ValueError, match="3 dimensions"):
        center_crop_or_pad(np.zeros((3, 3)), (3, 3, 3))


@pytest.mark.parametrize("target", [(5, 6, 7), (11, 12, 13), (6, 13, 8), (9, 9, 10)])
def test_crop_pad_keeps_image_and_mask_aligned(tmp_path, target):
    images, masks, arrays = make_subjects(tmp_path, n=3, shape=(8, 9, 10), threshold=0.6)
    ds = NiftiDataset(images, masks, batch_size=3, shape=target)
    x, y = ds[0]
    assert x.shape == (3, *target, 1) and y.shape == (3, *target, 1)
    np.testing.assert_array_equal(y, (x > 0.6).astype(np.int32))
    for k in range(3):
        ref = reference_crop_or_pad(arrays[k], target)
        np.testing.assert_array_equal(x[k, ..., 0], ref)
        np.testing.assert_array_equal(y[k, ..., 0], ref > 0.6)
    assert y.sum() > 0


def _layouts(a):
    """``a`` (x, y, z, c) in memory layouts a reader can produce, same values."""
    fortran = np.asfortranarray(a)
    yield "C", np.ascontiguousarray(a)
    yield "Fortran", fortran
    flipped = np.asfortranarray(a[::-1, :, ::-1])
    yield "Fortran, flipped", flipped[::-1, :, ::-1]
    swapped = np.asfortranarray(np.transpose(a, (1, 0, 2, 3)))
    yield "Fortran, x and y swapped", np.transpose(swapped, (1, 0, 2, 3))
    last = np.asfortranarray(np.transpose(a, (2, 1, 0, 3)))
    yield "z fastest, not contiguous", np.transpose(last, (2, 1, 0, 3))[:, :, :, :]


@pytest.mark.parametrize(
    "shape", [(5, 6, 7, 1), (40, 3, 37, 2), (17, 33, 16, 1), (1, 1, 1, 1), (33, 20, 1, 3)]
)
@pytest.mark.parametrize("dtype", ["float32", "int32", "uint8"])
def test_copy_reordered_any_layout_into_any_window(shape, dtype):
    a = (np.random.default_rng(0).random(shape) * 200).astype(dtype)
    for name, source in _layouts(a):
        np.testing.assert_array_equal(source, a, err_msg=name)
        out = np.full(shape, 7, dtype)
        kdata._copy_reordered(out, source)
        np.testing.assert_array_equal(out, a, err_msg=name)
        # into a window of a bigger C-ordered batch (a sample, a crop, channels)
        batch = np.zeros((2, shape[0] + 3, shape[1] + 2, shape[2] + 5, shape[3] + 1), dtype)
        window = (1, slice(1, -2), slice(2, None), slice(5, None), slice(1, None))
        kdata._copy_reordered(batch[window], source)
        np.testing.assert_array_equal(batch[window], a, err_msg=name)
        batch[window] = 0
        assert not batch.any(), f"{name}: wrote outside the window"
        assert kdata._c_ordered(source).flags.c_contiguous
        np.testing.assert_array_equal(kdata._c_ordered(source), a, err_msg=name)


@pytest.mark.parametrize("cache", [None, "memory", "dir"])
def test_batches_are_c_ordered_whatever_the_file_orientation(tmp_path, cache):
    # nibabel decodes Fortran-ordered data, reorientation flips and swaps it:
    # batches are still plain C-ordered arrays holding the RAS+ volumes
    ornt = nib.orientations
    rng = np.random.default_rng(3)
    images, masks, expected_x, expected_y = [], [], [], []
    for i, codes in enumerate(["RAS", "LPS", "SRA", "ILP"]):
        canonical = rng.random((18, 20, 22, 1)).astype(np.float32)
        # stored with voxel axes along ``codes``: load_nifti must give ``canonical`` back
        to_file = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.axcodes2ornt(codes))
        source = ornt.apply_orientation(canonical[..., 0], to_file)
        affine = ornt.inv_ornt_aff(to_file, canonical.shape[:3])
        images.append(write(tmp_path / f"img{i}.nii.gz", source.astype(np.float32), affine))
        masks.append(write(tmp_path / f"mask{i}.nii.gz", (source > 0.5).astype(np.uint8), affine))
        expected_x.append(canonical)
        expected_y.append((canonical > 0.5).astype(np.int32))
    cache = tmp_path / "cache" if cache == "dir" else cache
    for shape in (None, (16, 21, 25)):
        ds = NiftiDataset(images, masks, batch_size=4, shape=shape, cache=cache)
        for _ in range(2):  # cold, then from the cache
            x, y = ds[0]
            assert x.flags.c_contiguous and y.flags.c_contiguous
            assert x.dtype == np.float32 and y.dtype == np.int32
            ex = [e if shape is None else center_crop_or_pad(e, shape) for e in expected_x]
            ey = [e if shape is None else center_crop_or_pad(e, shape) for e in expected_y]
            np.testing.assert_array_equal(x, np.stack(ex))
            np.testing.assert_array_equal(y, np.stack(ey))


# --------------------------------------------------------------------------- shuffling


def orders(ds, epochs):
    result = []
    for _ in range(epochs):
        result.append(ds.order.tolist())
        ds.on_epoch_end()
    return result


def test_shuffle_is_reproducible_and_changes_each_epoch(tmp_path):
    images, _, _ = make_subjects(tmp_path, n=10, shape=(2, 2, 2))
    a = orders(NiftiDataset(images, shuffle=True, seed=7), 4)
    b = orders(NiftiDataset(images, shuffle=True, seed=7), 4)
    c = orders(NiftiDataset(images, shuffle=True, seed=8), 4)
    assert a == b
    assert a != c
    assert all(sorted(o) == list(range(10)) for o in a)
    assert a[0] != list(range(10))  # epoch 0 is shuffled too
    assert len({tuple(o) for o in a}) == 4  # a new order every epoch
    # batches follow the order
    ds = NiftiDataset(images, batch_size=4, shuffle=True, seed=7)
    batches = epoch(ds)
    marks = np.concatenate([x[:, 0, 0, 0, 0] for x in batches]).astype(int).tolist()
    assert marks == a[0]
    marks = np.concatenate([x[:, 0, 0, 0, 0] for x in epoch(ds)]).astype(int).tolist()
    assert marks == a[1]


def test_no_shuffle_keeps_given_order(tmp_path):
    images, _, _ = make_subjects(tmp_path, n=6, shape=(2, 2, 2))
    ds = NiftiDataset(images[::-1], batch_size=4)
    for _ in range(2):
        marks = np.concatenate([x[:, 0, 0, 0, 0] for x in epoch(ds)]).astype(int).tolist()
        assert marks == [5, 4, 3, 2, 1, 0]


# --------------------------------------------------------------------------- caches


def test_memory_cache_reads_each_file_once(tmp_path, counting):
    images, masks, arrays = make_subjects(tmp_path, n=5)
    ds = NiftiDataset(images, masks, batch_size=2, cache="memory", shuffle=True, seed=0)
    first = epoch(ds)
    assert sorted(counting.calls) == sorted(images + masks)
    counting.calls.clear()
    second = epoch(ds)
    assert counting.calls == []
    got = {int(x[k, 0, 0, 0, 0]): (x[k], y[k]) for x, y in second for k in range(len(x))}
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(got[i][0][..., 0], a)
        np.testing.assert_array_equal(got[i][1][..., 0], a > 0.6)
    assert len(first) == len(second) == 3
    # batches are copies: changing one does not change the cache
    x, _ = ds[0]
    x[...] = -5
    assert ds[0][0].min() >= 0


def test_memory_cache_rereads_a_changed_file(tmp_path, counting):
    images, _, _ = make_subjects(tmp_path, n=2, shape=(3, 3, 3), suffix=".nii")
    ds = NiftiDataset(images, cache="memory")
    epoch(ds)
    before = os.stat(images[1])
    write(images[1], np.full((3, 3, 3), 7, np.float32))
    os.utime(images[1], ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))
    assert os.stat(images[1]).st_size == before.st_size
    counting.calls.clear()
    np.testing.assert_array_equal(ds[1][0], 7)
    assert counting.calls == [images[1]]


def test_directory_cache(tmp_path, counting):
    images, masks, arrays = make_subjects(tmp_path / "data", n=5)
    cache = tmp_path / "cache"
    ds = NiftiDataset(images, masks, batch_size=2, cache=cache, shuffle=True, seed=1)
    assert cache.is_dir()
    first = epoch(ds)
    assert sorted(counting.calls) == sorted(images + masks)
    npy = sorted(cache.glob("*.npy"))
    assert len(npy) == 10 and len(list(cache.glob("*.json"))) == 10
    assert not list(cache.glob("*.tmp"))
    stored = np.load(next(p for p in npy if p.name.startswith("img3-")))
    np.testing.assert_array_equal(stored[..., 0], arrays[3])
    assert stored.dtype == np.float32
    mask_entry = np.load(next(p for p in npy if p.name.startswith("mask3-")))
    assert mask_entry.dtype == np.int32

    counting.calls.clear()
    second = epoch(ds)
    assert counting.calls == []  # the second epoch reads no NIfTI file
    # a new dataset (a later run) on the same directory reads nothing either
    again = NiftiDataset(images, masks, batch_size=2, cache=str(cache))
    x, y = again[1]
    assert counting.calls == []
    np.testing.assert_array_equal(x[0, ..., 0], arrays[2])
    np.testing.assert_array_equal(y[1, ..., 0], arrays[3] > 0.6)
    assert len(first) == len(second)
    # canonical=False is another entry
    NiftiDataset(images[:1], cache=cache, canonical=False)[0]
    assert counting.calls == [images[0]]


def test_directory_cache_rereads_a_changed_file(tmp_path, counting):
    # uncompressed: the rewritten file has the very same size, only its mtime differs
    images, masks, arrays = make_subjects(tmp_path / "data", n=3, shape=(4, 5, 6), suffix=".nii")
    cache = tmp_path / "cache"
    ds = NiftiDataset(images, masks, batch_size=3, cache=cache)
    epoch(ds)
    before = os.stat(images[1])
    new = np.full((4, 5, 6), 3.0, np.float32)
    write(images[1], new)
    os.utime(images[1], ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))
    assert os.stat(images[1]).st_size == before.st_size
    counting.calls.clear()
    x, y = ds[0]
    assert counting.calls == [images[1]]
    np.testing.assert_array_equal(x[1, ..., 0], new)
    np.testing.assert_array_equal(x[0, ..., 0], arrays[0])
    counting.calls.clear()
    ds[0]
    assert counting.calls == []
    # a changed file is checked again: a mask that no longer fits its image
    write(masks[2], np.zeros((4, 5, 7), np.uint8))
    with pytest.raises(ValueError) as info:
        ds[0]
    assert masks[2] in str(info.value) and images[2] in str(info.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated data", "empty"])
def test_directory_cache_recovers_from_a_damaged_entry(tmp_path, counting, damage):
    """Entries are memory-mapped: one too short for its header is read again
    from the source, never mapped past its end."""
    images, _, arrays = make_subjects(tmp_path / "data", n=1, shape=(3, 4, 5))
    cache = tmp_path / "cache"
    ds = NiftiDataset(images, cache=cache)
    ds[0]
    (entry,) = cache.glob("*.npy")
    blob = entry.read_bytes()
    entry.write_bytes({"garbage": b"garbage", "truncated data": blob[:-7], "empty": b""}[damage])
    counting.calls.clear()
    np.testing.assert_array_equal(ds[0][0, ..., 0], arrays[0])
    assert counting.calls == images
    counting.calls.clear()
    ds[0]
    assert counting.calls == []


# --------------------------------------------------------------------------- from_folder


def test_from_folder_pairs_by_name(tmp_path):
    imgs, labs = tmp_path / "images", tmp_path / "labels"
    imgs.mkdir()
    labs.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for name in ["sub-02", "sub-01", "sub-10"]:
        arrays[name] = rng.random((4, 4, 4)).astype(np.float32)
        write(imgs / f"{name}.nii.gz", arrays[name])
    write(labs / "sub-01.nii", (arrays["sub-01"] > 0.5).astype(np.uint8))  # .nii pairs .nii.gz
    write(labs / "sub-02.nii.gz", (arrays["sub-02"] > 0.5).astype(np.uint8))
    write(labs / "sub-10.nii.gz", (arrays["sub-10"] > 0.5).astype(np.uint8))
    (imgs / "notes.txt").write_text("ignored")
    (imgs / "sub-03.nii.gz.bak").write_text("ignored")
    write(imgs / ".hidden.nii.gz", np.zeros((4, 4, 4), np.float32))
    (imgs / "sub-99.nii").mkdir()  # a folder, not a file
    ds = NiftiDataset.from_folder(imgs, labs, batch_size=3, shuffle=False)
    assert [Path(s[0]).name for s in ds.images] == [
        "sub-01.nii.gz",
        "sub-02.nii.gz",
        "sub-10.nii.gz",
    ]
    assert [Path(p).name for p in ds.labels] == ["sub-01.nii", "sub-02.nii.gz", "sub-10.nii.gz"]
    x, y = ds[0]
    for k, name in enumerate(["sub-01", "sub-02", "sub-10"]):
        np.testing.assert_array_equal(x[k, ..., 0], arrays[name])
        np.testing.assert_array_equal(y[k, ..., 0], arrays[name] > 0.5)
    # without labels: predict batches
    only = NiftiDataset.from_folder(str(imgs), batch_size=2)
    assert only.label_kind == "none" and len(only) == 2
    # kwargs go through
    assert NiftiDataset.from_folder(imgs, labs, shape=(2, 2, 2))[0][0].shape == (1, 2, 2, 2, 1)


def test_from_folder_errors(tmp_path):
    imgs, labs, empty = tmp_path / "images", tmp_path / "labels", tmp_path / "empty"
    for d in (imgs, labs, empty):
        d.mkdir()
    (empty / "readme.txt").write_text("no volumes here")
    for name in ["a", "b"]:
        write(imgs / f"{name}.nii.gz", np.zeros((2, 2, 2), np.float32))
    write(labs / "a.nii.gz", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError) as info:
        NiftiDataset.from_folder(imgs, labs)
    assert str(imgs / "b.nii.gz") in str(info.value)
    write(labs / "b.nii.gz", np.zeros((2, 2, 2), np.uint8))
    write(labs / "c.nii.gz", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError) as info:
        NiftiDataset.from_folder(imgs, labs)
    assert str(labs / "c.nii.gz") in str(info.value)
    (labs / "c.nii.gz").unlink()
    assert len(NiftiDataset.from_folder(imgs, labs)) == 2
    with pytest.raises(ValueError, match="no .nii"):
        NiftiDataset.from_folder(empty)
    with pytest.raises(ValueError, match="labels_dir"):
        NiftiDataset.from_folder(imgs, empty)
    with pytest.raises(ValueError, match="not a directory"):
        NiftiDataset.from_folder(tmp_path / "nowhere")
    write(imgs / "a.nii", np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError) as info:
        NiftiDataset.from_folder(imgs)
    assert "a.nii.gz" in str(info.value) and str(imgs / "a.nii") in str(info.value)


# --------------------------------------------------------------------------- Keras


def test_pickle_round_trip(tmp_path):
    images, masks, _ = make_subjects(tmp_path, n=4)
    ds = NiftiDataset(images, masks, batch_size=2, shuffle=True, seed=5, cache="memory", workers=3)
    epoch(ds)
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone._memory) == 0 and clone._memory.nbytes == 0
    assert clone.workers == 3
    np.testing.assert_array_equal(clone.order, ds.order)
    for a, b in zip(epoch(clone), epoch(ds), strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_package_exports():
    assert keras_nii.NiftiDataset is NiftiDataset
    assert "NiftiDataset" in keras_nii.__all__
    assert "tensorflow" not in Path(kdata.__file__).read_text()


def tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16, 16, 16, 1)),
            keras.layers.Conv3D(2, 3, padding="same"),
            keras.layers.Conv3D(1, 1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


@pytest.mark.slow
def test_fit_evaluate_predict(tmp_path):
    images, masks, _ = make_subjects(tmp_path, n=5, shape=(18, 16, 14), threshold=0.5)
    train = NiftiDataset(
        images,
        masks,
        batch_size=2,
        shape=(16, 16, 16),
        shuffle=True,
        seed=0,
        cache="memory",
        workers=2,
        use_multiprocessing=False,
    )
    model = tiny_model()
    history = model.fit(train, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert all(np.isfinite(history.history["loss"]))
    loss = model.evaluate(NiftiDataset(images, masks, batch_size=2, shape=(16, 16, 16)), verbose=0)
    assert np.isfinite(loss)
    pred = model.predict(NiftiDataset(images, batch_size=2, shape=(16, 16, 16)), verbose=0)
    assert pred.shape == (5, 16, 16, 16, 1)
    # predictions follow the given order: same as predicting each subject alone
    alone = model.predict(NiftiDataset([images[3]], shape=(16, 16, 16)), verbose=0)
    np.testing.assert_allclose(pred[3], alone[0], atol=1e-6)


MULTIPROCESSING_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import keras
    from keras_nii.data import NiftiDataset

    folder, cache, pids = sys.argv[1], sys.argv[2], sys.argv[3]

    class Recording(NiftiDataset):
        def __getitem__(self, index):
            with open(pids, "a") as f:
                f.write(f"{os.getpid()}\\n")
            return super().__getitem__(index)

    images = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("img"))
    masks = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("mask"))
    ds = Recording(images, masks, batch_size=2, shape=(16, 16, 16), cache=cache,
                   shuffle=True, seed=0, workers=2, use_multiprocessing=True)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16, 16, 16, 1)),
                              keras.layers.Conv3D(2, 3, padding="same"),
                              keras.layers.Conv3D(1, 1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    history = model.fit(ds, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"])), history.history
    print("MAIN_PID", os.getpid())
    print("OK", history.history["loss"])
    """
)


@pytest.mark.slow
def test_fit_with_multiprocessing(tmp_path):
    """use_multiprocessing=True: batches built in worker processes, cached on disk."""
    make_subjects(tmp_path / "data", n=5, shape=(16, 16, 16), threshold=0.5)
    script = tmp_path / "fit_mp.py"
    script.write_text(MULTIPROCESSING_SCRIPT)
    pids = tmp_path / "pids.txt"
    cache = tmp_path / "cache"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "data"), str(cache), str(pids)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"fit with use_multiprocessing=True hung; output:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    assert "OK" in out, out[-3000:]
    main_pid = int(out.split("MAIN_PID")[1].split()[0])
    workers = {int(p) for p in pids.read_text().split()} - {main_pid}
    assert workers, "no batch was built in a worker process"
    assert len(list(cache.glob("*.npy"))) == 10  # written by the workers, shared
