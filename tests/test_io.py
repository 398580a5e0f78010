"""Tests of keras_nii.io on the NIfTI files nibabel ships and on synthetic ones."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_nii import io as knio
from keras_nii import storage
from keras_nii.io import NiftiError, Volume, load_nifti, save_nifti

# --------------------------------------------------------------------------- helpers

_AXIS = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}

READABLE = [
    "anatomical.nii",
    "functional.nii",
    "example4d.nii.gz",
    "example_nifti2.nii.gz",
    "standard.nii.gz",
    "reoriented_anat_moved.nii",
    "resampled_anat_moved.nii",
]


def axcodes_affine(codes, zooms=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), degrees=0.0):
    """A voxel-to-world affine whose voxel axes point along ``codes``, optionally rotated."""
    affine = np.eye(4)
    affine[:3, :3] = 0
    for i, code in enumerate(codes):
        axis, sign = _AXIS[code]
        affine[axis, i] = sign * zooms[i]
    if degrees:
        a, b = np.deg2rad(degrees), np.deg2rad(degrees / 2)
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        affine[:3, :3] = rx @ rz @ affine[:3, :3]
    affine[:3, 3] = origin
    return affine


def unique_data(shape, dtype="int16", seed=0):
    """Data whose every voxel holds a different value (a shuffled 0..n-1)."""
    n = int(np.prod(shape))
    return np.random.default_rng(seed).permutation(n).reshape(shape).astype(dtype)


def write(path, data, affine, klass=nib.Nifti1Image, slope=None, inter=None):
    img = klass(data, affine)
    img.header.set_data_dtype(data.dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    img.set_qform(affine, 1)
    img.set_sform(affine, 2)
    nib.save(img, os.fspath(path))
    return Path(path)


def assert_world_positions_kept(vol: Volume, src_data: np.ndarray, src_affine: np.ndarray):
    """Every voxel of ``vol.array`` sits at the world position its value had in the source.

    ``src_data`` must hold unique integer values 0..n-1 (see ``unique_data``).
    """
    src = src_data.reshape(src_data.shape[:3] + (-1,))
    where = np.empty((src.size, 4), dtype=np.int64)
    where[src.ravel().astype(np.int64)] = np.argwhere(np.ones(src.shape, bool))
    values = np.rint(vol.array).astype(np.int64)
    assert values.size == src.size
    found = where[values.reshape(-1)]  # (n, 4): source (i, j, k, channel) of each voxel
    here = np.argwhere(np.ones(values.shape, bool))  # (n, 4) in the same C order
    np.testing.assert_array_equal(found[:, 3], here[:, 3])  # channels keep their order
    ones = np.ones((len(here), 1))
    world_here = np.hstack([here[:, :3], ones]) @ vol.affine.T
    world_src = np.hstack([found[:, :3], ones]) @ np.asarray(src_affine).T
    np.testing.assert_allclose(world_here, world_src, atol=1e-4)


def assert_same_file(p, q):
    """``q`` holds what ``p`` holds: shape, affine, values, on-disk encoding."""
    a, b = nib.load(os.fspath(p)), nib.load(os.fspath(q))
    assert b.shape == a.shape
    assert isinstance(b, (nib.Nifti2Image, nib.Nifti2Pair)) == isinstance(
        a, (nib.Nifti2Image, nib.Nifti2Pair)
    )
    np.testing.assert_array_equal(b.affine, a.affine)
    assert b.get_data_dtype() == a.get_data_dtype()
    assert (b.dataobj.slope, b.dataobj.inter) == (a.dataobj.slope, a.dataobj.inter)
    np.testing.assert_array_equal(b.dataobj.get_unscaled(), a.dataobj.get_unscaled())
    np.testing.assert_array_equal(b.get_fdata(), a.get_fdata())  # NaNs compare equal here
    assert b.header.get_xyzt_units() == a.header.get_xyzt_units()
    assert b.header.get_zooms() == a.header.get_zooms()
    for key in ("sform_code", "qform_code", "srow_x", "srow_y", "srow_z", "quatern_b"):
        np.testing.assert_array_equal(b.header[key], a.header[key], err_msg=key)
    # pixdim of the axes in use (qfac, zooms, TR) bit for bit
    used = len(a.shape) + 1
    np.testing.assert_array_equal(b.header["pixdim"][:used], a.header["pixdim"][:used])


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def round_trip(p, q, **load_kwargs):
    vol = load_nifti(p, **load_kwargs)
    out = save_nifti(vol.array, q, like=load_nifti(p, **load_kwargs))
    assert out == Path(q)
    return vol


# --------------------------------------------------------------------------- real files


def test_anatomical_3d_las_int16(nibabel_data):
    p = nibabel_data / "anatomical.nii"
    img = nib.load(p)
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    vol = load_nifti(p)
    assert vol.shape == (33, 41, 25, 1)
    assert vol.array.dtype == np.float32
    assert vol.axcodes == ("R", "A", "S")
    assert vol.path == os.fspath(p)
    assert vol.source_shape == (33, 41, 25)
    np.testing.assert_array_equal(vol.source_affine, img.affine)
    # LAS -> RAS flips axis 0 and nothing else
    np.testing.assert_array_equal(vol.array[..., 0], img.get_fdata()[::-1].astype(np.float32))
    canon = nib.as_closest_canonical(img)
    np.testing.assert_allclose(vol.affine, canon.affine, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, img.header.get_zooms(), rtol=1e-6)


def test_anatomical_not_canonical_keeps_file_order(nibabel_data):
    p = nibabel_data / "anatomical.nii"
    img = nib.load(p)
    vol = load_nifti(p, canonical=False)
    assert vol.axcodes == ("L", "A", "S")
    np.testing.assert_array_equal(vol.affine, img.affine)
    np.testing.assert_array_equal(vol.orientation, [[0, 1], [1, 1], [2, 1]])
    np.testing.assert_array_equal(vol.array[..., 0], img.get_fdata().astype(np.float32))


def test_functional_4d_scaled_once(nibabel_data):
    p = nibabel_data / "functional.nii"
    img = nib.load(p)
    assert img.get_data_dtype() == np.int16
    slope, inter = img.dataobj.slope, img.dataobj.inter
    assert slope != 1 and inter != 0  # the file really is scaled
    ref = img.get_fdata()  # float64, scaled by nibabel
    vol = load_nifti(p, canonical=False)
    assert vol.shape == (17, 21, 3, 20)
    assert vol.array.dtype == np.float32
    raw = np.asarray(img.dataobj.get_unscaled())
    assert not np.allclose(raw, ref)  # scaled values are not the raw ones
    tol = 4 * np.finfo(np.float32).eps * np.abs(ref).max()
    np.testing.assert_allclose(vol.array, ref, rtol=0, atol=tol)
    # canonical: same values, reoriented like nibabel does it
    canon = nib.as_closest_canonical(img)
    vol_ras = load_nifti(p)
    assert vol_ras.axcodes == ("R", "A", "S")
    np.testing.assert_allclose(vol_ras.array, canon.get_fdata(), rtol=0, atol=tol)
    np.testing.assert_allclose(vol_ras.affine, canon.affine, atol=1e-6)
    # float64 output is nibabel's own value
    np.testing.assert_allclose(load_nifti(p, canonical=False, dtype="float64").array, ref)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("example4d.nii.gz", (128, 96, 24, 2)),
        ("example_nifti2.nii.gz", (32, 20, 12, 2)),
        ("standard.nii.gz", (4, 5, 7, 1)),
        ("reoriented_anat_moved.nii", (21, 26, 22, 1)),
    ],
)
def test_real_files_match_nibabel(nibabel_data, name, shape):
    p = nibabel_data / name
    img = nib.load(p)
    canon = nib.as_closest_canonical(img)
    vol = load_nifti(p)
    ref = canon.get_fdata().reshape(vol.shape)
    assert vol.shape == shape
    assert vol.axcodes == ("R", "A", "S")
    np.testing.assert_allclose(vol.array, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vol.affine, canon.affine, atol=1e-5)


def test_nifti2_header_kept(nibabel_data):
    vol = load_nifti(nibabel_data / "example_nifti2.nii.gz")
    assert isinstance(vol.header, nib.Nifti2Header)


@pytest.mark.parametrize("name", ["nifti1.hdr", "nifti2.hdr"])
def test_hdr_without_img_names_the_file(nibabel_data, name):
    p = nibabel_data / name
    assert not p.with_suffix(".img").exists()
    with pytest.raises(NiftiError, match=name.replace(".", r"\.")) as info:
        load_nifti(p)
    assert isinstance(info.value, ValueError)
    assert str(p) in str(info.value)
    assert name.replace(".hdr", ".img") in str(info.value)


def test_nan_file_policies(nibabel_data):
    p = nibabel_data / "resampled_anat_moved.nii"
    with pytest.raises(NiftiError) as info:
        load_nifti(p)
    assert str(p) in str(info.value) and "153" in str(info.value)
    kept = load_nifti(p, nonfinite="keep")
    nans = np.isnan(kept.array)
    assert nans.sum() == 153
    zeroed = load_nifti(p, nonfinite="zero")
    assert np.isfinite(zeroed.array).all()
    np.testing.assert_array_equal(zeroed.array[nans], 0)
    np.testing.assert_array_equal(zeroed.array[~nans], kept.array[~nans])
    ref = nib.as_closest_canonical(nib.load(p)).get_fdata()[..., None]
    np.testing.assert_array_equal(np.isnan(ref), nans)
    np.testing.assert_allclose(kept.array[~nans], ref[~nans], rtol=1e-6)
    # labels from a NaN file: zeroed then rounded
    labels = load_nifti(p, nonfinite="zero", dtype="int32")
    np.testing.assert_array_equal(labels.array, np.rint(zeroed.array).astype(np.int32))
    with pytest.raises(ValueError, match="nonfinite"):
        load_nifti(p, nonfinite="keep", dtype="int32")


def test_inf_is_non_finite(tmp_path):
    data = np.ones((3, 4, 5), np.float32)
    data[1, 2, 3] = np.inf
    data[0, 0, 0] = -np.inf
    p = write(tmp_path / "inf.nii", data, np.eye(4))
    with pytest.raises(NiftiError, match="2 non-finite"):
        load_nifti(p)
    assert load_nifti(p, nonfinite="zero", canonical=False).array[1, 2, 3, 0] == 0


@pytest.mark.parametrize(
    "name, problem",
    [("analyze.hdr", "not a NIfTI"), ("row_major.dconn.nii", "CIFTI")],
)
def test_not_nifti_volumes(nibabel_data, name, problem):
    p = nibabel_data / name
    with pytest.raises(NiftiError, match=problem) as info:
        load_nifti(p)
    assert str(p) in str(info.value)


# --------------------------------------------------------------------------- shapes


def test_shapes_3d_4d_5d(tmp_path):
    a = np.eye(4)
    d3 = unique_data((4, 5, 6), "float32")
    d4 = unique_data((4, 5, 6, 3), "float32")
    d5 = unique_data((4, 5, 6, 1, 2), "float32")
    v3 = load_nifti(write(tmp_path / "a3.nii", d3, a))
    v4 = load_nifti(write(tmp_path / "a4.nii", d4, a))
    v5 = load_nifti(write(tmp_path / "a5.nii", d5, a))
    assert v3.shape == (4, 5, 6, 1)
    assert v4.shape == (4, 5, 6, 3)
    assert v5.shape == (4, 5, 6, 2)
    np.testing.assert_array_equal(v3.array[..., 0], d3)
    np.testing.assert_array_equal(v4.array, d4)
    np.testing.assert_array_equal(v5.array, d5[:, :, :, 0, :])
    assert v5.source_shape == (4, 5, 6, 1, 2)
    # a 5D file goes back to 5D
    q = save_nifti(v5.array, tmp_path / "b5.nii", like=v5)
    assert_same_file(tmp_path / "a5.nii", q)


@pytest.mark.parametrize(
    "shape", [(4, 5), (4, 5, 6, 2, 3), (4, 5, 6, 1, 2, 2), (0, 5, 6), (4, 5, 6, 0)]
)
def test_unsupported_shapes_name_the_file(tmp_path, shape):
    p = write(tmp_path / "bad_rank.nii", np.zeros(shape, np.float32), np.eye(4))
    with pytest.raises(NiftiError) as info:
        load_nifti(p)
    assert str(p) in str(info.value)
    assert str(shape).replace(" ", "") in str(info.value).replace(" ", "")


# --------------------------------------------------------------------------- scaling, dtypes


def test_synthetic_slope_inter_exact(tmp_path):
    raw = np.arange(-500, 500, dtype=np.int16)[:960].reshape(8, 10, 12)
    p = write(tmp_path / "scaled.nii.gz", raw, np.eye(4), slope=2.5, inter=-10)
    img = nib.load(p)
    assert (img.dataobj.slope, img.dataobj.inter) == (2.5, -10)
    vol = load_nifti(p, canonical=False)
    expected = raw.astype(np.float64) * 2.5 - 10
    np.testing.assert_array_equal(vol.array[..., 0], expected.astype(np.float32))
    np.testing.assert_array_equal(vol.array[..., 0].astype(np.float64), expected)
    # integer labels from a scaled file are the scaled values
    ints = load_nifti(p, canonical=False, dtype="int32").array[..., 0]
    np.testing.assert_array_equal(ints, np.rint(expected).astype(np.int32))  # round half to even
    # and writing it back stores the same integers with the same scaling
    q = save_nifti(vol.array, tmp_path / "scaled_back.nii.gz", like=vol)
    assert_same_file(p, q)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".img"])
@pytest.mark.parametrize("codes", ["RAS", "LPS", "SRA"])
def test_array_is_in_memory_writable_and_any_layout(tmp_path, suffix, codes):
    # the array keeps nibabel's memory layout (Fortran order, seen through the
    # reorientation's flips and transposes) but is always the file's values,
    # writable, and never a memory map of the file: the file can change or go
    # away afterwards
    raw = unique_data((6, 7, 8), dtype="float32")
    p = write(tmp_path / f"v{suffix}", raw, axcodes_affine(codes))
    vol = load_nifti(p)
    assert_world_positions_kept(vol, raw, axcodes_affine(codes))
    np.testing.assert_array_equal(np.ascontiguousarray(vol.array), vol.array)
    assert vol.array.flags.writeable
    assert not knio._maps_a_file(vol.array)
    before = vol.array.copy()
    write(tmp_path / f"v{suffix}", raw * 0 - 1, axcodes_affine(codes))  # the file changes
    np.testing.assert_array_equal(vol.array, before)
    vol.array[0, 0, 0, 0] = -5.0  # and writing into the array leaves the file alone
    assert load_nifti(p).array.max() == -1
    # nothing to scale: nibabel's own array is used as it is, without a copy
    if suffix == ".nii.gz" and codes == "RAS":
        assert vol.array.flags.f_contiguous


# --------------------------------------------------------------------------- one-call gunzip


def _gz_source(tmp_path, case):
    """A ``.nii.gz`` of one kind, and the float32 array nibabel reads from it."""
    rng = np.random.default_rng(11)
    affine = axcodes_affine("LPS", zooms=(0.8, 0.9, 1.7), origin=(4.0, -2.0, 9.0))
    p = tmp_path / f"{case}.nii.gz"
    if case == "float32":
        write(p, rng.normal(size=(9, 8, 7)).astype(np.float32), affine)
    elif case == "int16-scaled":
        write(p, unique_data((9, 8, 7)), affine, slope=0.37, inter=-5.0)
    elif case == "big-endian-int16-scaled":
        img = nib.Nifti1Image(
            unique_data((9, 8, 7)).astype(">i2"), affine, nib.Nifti1Header(endianness=">")
        )
        img.header.set_data_dtype(">i2")
        img.header.set_slope_inter(1.5, 2.0)
        nib.save(img, os.fspath(p))
        assert nib.load(p).dataobj.dtype == np.dtype(">i2")
    elif case == "uint8-4d":
        write(
            p,
            rng.integers(0, 255, size=(5, 6, 7, 3)).astype(np.uint8),
            affine,
            slope=2.0,
            inter=1.0,
        )
    elif case == "nifti2-float64":
        write(p, rng.normal(size=(6, 5, 4)), affine, klass=nib.Nifti2Image)
    else:  # pragma: no cover - a typo in the parametrization
        raise AssertionError(case)
    return p, nib.load(p).get_fdata(dtype=np.float32)


GZ_CASES = ["float32", "int16-scaled", "big-endian-int16-scaled", "uint8-4d", "nifti2-float64"]


@pytest.mark.parametrize("case", GZ_CASES)
def test_gz_decoded_by_storage_equals_nibabel(tmp_path, case):
    p, ref = _gz_source(tmp_path, case)
    img = nib.load(p)
    proxy = knio._data_proxy(img, os.fspath(p), np.dtype("float32"))
    assert proxy is not img.dataobj  # inflated by keras_nii.storage, not by nibabel's gzip
    got = proxy.__array__(np.float32)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    vol = load_nifti(p, canonical=False)
    assert vol.array.flags.writeable and not knio._maps_a_file(vol.array)
    np.testing.assert_array_equal(vol.array, ref.reshape(vol.shape))


@pytest.mark.parametrize("case", GZ_CASES)
def test_gz_read_in_small_pieces_equals_nibabel(tmp_path, monkeypatch, case):
    """The bounded inflater reads the file in chunks: chunk boundaries that
    fall anywhere (here every 7 bytes) change nothing."""
    p, ref = _gz_source(tmp_path, case)
    monkeypatch.setattr(storage, "_READ_CHUNK", 7)
    got = load_nifti(p, canonical=False).array
    np.testing.assert_array_equal(got, ref.reshape(got.shape))


def test_gz_of_several_members_reads_them_all(tmp_path):
    """gzip allows concatenated members (bgzip writes them): all are read."""
    p, ref = _gz_source(tmp_path, "int16-scaled")
    raw = gzip.decompress(p.read_bytes())
    q = tmp_path / "members.nii.gz"
    q.write_bytes(
        gzip.compress(raw[:500]) + gzip.compress(raw[500:1000]) + gzip.compress(raw[1000:])
    )
    np.testing.assert_array_equal(nib.load(q).get_fdata(dtype=np.float32), ref)
    np.testing.assert_array_equal(load_nifti(q, canonical=False).array[..., 0], ref)


@pytest.mark.parametrize("where, problem", [(-8, "CRC"), (-4, "length")])
def test_gz_with_a_bad_crc_or_length_is_an_error(tmp_path, where, problem):
    """nibabel's reader stops at the data's end, before the stored CRC-32 and
    length, so it reads such a file without complaint; keras-nii does not."""
    p, ref = _gz_source(tmp_path, "float32")
    blob = bytearray(p.read_bytes())
    blob[where] ^= 0xFF
    q = tmp_path / "crc.nii.gz"
    q.write_bytes(bytes(blob))
    np.testing.assert_array_equal(nib.load(q).get_fdata(dtype=np.float32), ref)
    with pytest.raises(NiftiError, match=problem) as info:
        load_nifti(q)
    assert str(q) in str(info.value)


def test_label_dtype_rounds(tmp_path):
    data = np.zeros((3, 4, 5), np.float32)
    data[0, 0, 0] = 0.9999
    data[1, 1, 1] = 2.0001
    data[2, 2, 2] = 1.49
    data[2, 3, 4] = 254.6
    p = write(tmp_path / "labels.nii.gz", data, np.eye(4))
    vol = load_nifti(p, dtype="int32", canonical=False)
    assert vol.array.dtype == np.int32
    got = vol.array[..., 0]
    assert (got[0, 0, 0], got[1, 1, 1], got[2, 2, 2], got[2, 3, 4]) == (1, 2, 1, 255)
    assert np.count_nonzero(got) == 4
    assert load_nifti(p, dtype="uint8").array.max() == 255
    with pytest.raises(NiftiError) as info:
        load_nifti(p, dtype="int8")
    assert str(p) in str(info.value) and "int8" in str(info.value)
    neg = write(tmp_path / "neg.nii", -data, np.eye(4))
    with pytest.raises(NiftiError, match="uint8"):
        load_nifti(neg, dtype="uint8")
    assert load_nifti(p, dtype=bool).array.sum() == 4


def test_bad_load_arguments(tmp_path):
    p = write(tmp_path / "a.nii", np.zeros((3, 4, 5), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="dtype"):
        load_nifti(p, dtype="complex64")
    with pytest.raises(ValueError, match="nonfinite"):
        load_nifti(p, nonfinite="nan")


# --------------------------------------------------------------------------- orientation

ORIENTATIONS = {
    "LPS": dict(codes="LPS", zooms=(1.0, 2.0, 3.0)),
    "LAS": dict(codes="LAS", zooms=(0.5, 1.0, 1.5)),
    "PSR": dict(codes="PSR", zooms=(1.0, 2.0, 3.0)),
    "oblique": dict(codes="LAS", zooms=(1.0, 1.5, 2.5), degrees=20.0),
}


def make_oriented(tmp_path, key, channels=None, suffix=".nii.gz", klass=nib.Nifti1Image):
    spec = ORIENTATIONS[key]
    affine = axcodes_affine(
        spec["codes"], spec["zooms"], origin=(-10.0, 20.0, 5.5), degrees=spec.get("degrees", 0)
    )
    shape = (5, 6, 7) if channels is None else (5, 6, 7, channels)
    data = unique_data(shape, "int16", seed=len(key))
    return write(tmp_path / f"{key}{suffix}", data, affine, klass=klass), data, affine


@pytest.mark.parametrize("key", list(ORIENTATIONS))
@pytest.mark.parametrize("channels", [None, 2])
def test_canonical_keeps_world_positions(tmp_path, key, channels):
    p, data, _ = make_oriented(tmp_path, key, channels)
    stored_affine = nib.load(p).affine  # float32 sform, as read back
    vol = load_nifti(p)
    assert vol.axcodes == ("R", "A", "S")
    assert_world_positions_kept(vol, data, stored_affine)
    # without canonical: the file's own order and affine
    raw = load_nifti(p, canonical=False)
    np.testing.assert_array_equal(raw.affine, stored_affine)
    np.testing.assert_array_equal(raw.array, data.reshape(raw.shape))
    assert raw.axcodes == nib.aff2axcodes(stored_affine)
    if key != "oblique":
        assert raw.axcodes == tuple(ORIENTATIONS[key]["codes"])


def test_spacing_follows_axes(tmp_path):
    p, _, _ = make_oriented(tmp_path, "PSR")
    # P has 1 mm, S 2 mm, R 3 mm: in RAS order that is (3, 1, 2)
    np.testing.assert_allclose(load_nifti(p).spacing, (3.0, 1.0, 2.0), rtol=1e-6)
    np.testing.assert_allclose(load_nifti(p, canonical=False).spacing, (1.0, 2.0, 3.0), rtol=1e-6)
    assert load_nifti(p).shape == (7, 5, 6, 1)


def test_to_source_undoes_canonical(tmp_path):
    p, data, _ = make_oriented(tmp_path, "PSR", channels=2)
    vol = load_nifti(p)
    np.testing.assert_array_equal(vol.to_source(vol.array), data)
    with pytest.raises(ValueError, match="spatial shape"):
        vol.to_source(np.zeros((5, 6, 7, 2)))
    with pytest.raises(ValueError, match="3 dimensions"):
        vol.to_source(np.zeros((5, 6)))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".hdr"])
@pytest.mark.parametrize("name", READABLE)
def test_round_trip_real_files(nibabel_data, tmp_path, name, suffix):
    p = nibabel_data / name
    q = tmp_path / f"out{suffix}"
    round_trip(p, q, nonfinite="keep")
    assert_same_file(p, q)
    if suffix == ".hdr":
        assert (tmp_path / "out.img").is_file()
    # the TR and units of a series survive too
    assert nib.load(q).header.get_zooms() == nib.load(p).header.get_zooms()


@pytest.mark.parametrize("out_suffix", [".nii", ".nii.gz", ".hdr"])
@pytest.mark.parametrize("key", list(ORIENTATIONS))
def test_round_trip_synthetic_orientations(tmp_path, key, out_suffix):
    p, _, _ = make_oriented(tmp_path, key, channels=2)
    q = tmp_path / f"back{out_suffix}"
    round_trip(p, q)
    assert_same_file(p, q)


@pytest.mark.parametrize("klass", [nib.Nifti1Pair, nib.Nifti2Pair, nib.Nifti2Image])
def test_pair_and_nifti2_sources(tmp_path, klass):
    suffix = ".hdr" if klass in (nib.Nifti1Pair, nib.Nifti2Pair) else ".nii"
    p, data, affine = make_oriented(tmp_path, "LPS", suffix=suffix, klass=klass)
    vol = load_nifti(p)
    assert_world_positions_kept(vol, data, nib.load(p).affine)
    if suffix == ".hdr":
        via_img = load_nifti(p.with_suffix(".img"))
        np.testing.assert_array_equal(via_img.array, vol.array)
    for out in (".nii.gz", ".hdr"):
        q = tmp_path / f"out{out}"
        save_nifti(vol.array, q, like=vol)
        assert_same_file(p, q)


def test_pair_missing_hdr_names_it(tmp_path):
    p, _, _ = make_oriented(tmp_path, "LPS", suffix=".hdr", klass=nib.Nifti1Pair)
    p.unlink()
    img = p.with_suffix(".img")
    with pytest.raises(NiftiError) as info:
        load_nifti(img)
    assert str(img) in str(info.value)


@settings(max_examples=20, deadline=None)
@given(
    perm=st.permutations([0, 1, 2]),
    flips=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    zooms=st.tuples(*[st.sampled_from([0.5, 1.0, 1.25, 2.0, 3.0])] * 3),
    channels=st.sampled_from([None, 1, 3]),
    suffix=st.sampled_from([".nii", ".nii.gz"]),
)
def test_property_any_axis_order_round_trips(perm, flips, zooms, channels, suffix):
    codes = "".join(("LPI" if f else "RAS")[a] for a, f in zip(perm, flips, strict=True))
    affine = axcodes_affine(codes, zooms, origin=(3.0, -4.0, 5.0))
    shape = (3, 4, 5) if channels is None else (3, 4, 5, channels)
    data = unique_data(shape, "float32", seed=sum(perm) + sum(flips))
    with tempfile.TemporaryDirectory() as tmp:
        p = write(Path(tmp) / f"src{suffix}", data, affine)
        vol = load_nifti(p)
        assert vol.axcodes == ("R", "A", "S")
        assert_world_positions_kept(vol, data, affine)
        expected_spacing = [zooms[perm.index(axis)] for axis in range(3)]
        np.testing.assert_allclose(vol.spacing, expected_spacing, rtol=1e-6)
        q = Path(tmp) / f"dst{suffix}"
        round_trip(p, q)
        assert_same_file(p, q)


# --------------------------------------------------------------------------- bad inputs


def _missing(tmp_path):
    return tmp_path / "does_not_exist.nii.gz"


def _directory(tmp_path):
    d = tmp_path / "folder.nii"
    d.mkdir()
    return d


def _text(tmp_path):
    p = tmp_path / "x.nii"
    p.write_text("this is not a NIfTI file\n" * 40)
    return p


def _empty(tmp_path):
    p = tmp_path / "empty.nii"
    p.write_bytes(b"")
    return p


def _random_gz(tmp_path):
    p = tmp_path / "random.nii.gz"
    p.write_bytes(np.random.default_rng(1).bytes(4000))
    return p


def _random_gz_with_magic(tmp_path):
    p = tmp_path / "random_magic.nii.gz"
    p.write_bytes(b"\x1f\x8b\x08\x00" + np.random.default_rng(2).bytes(4000))
    return p


def _good_gz_bytes(tmp_path):
    data = np.random.default_rng(3).normal(size=(16, 16, 16)).astype(np.float32)
    p = write(tmp_path / "good.nii.gz", data, np.eye(4))
    return p.read_bytes()


def _truncated_gz(tmp_path):
    blob = _good_gz_bytes(tmp_path)
    p = tmp_path / "truncated.nii.gz"
    p.write_bytes(blob[: len(blob) // 2])
    return p


def _corrupt_gz(tmp_path):
    blob = bytearray(_good_gz_bytes(tmp_path))
    middle = len(blob) // 2
    for i in range(middle, middle + 32):
        blob[i] ^= 0xFF
    p = tmp_path / "corrupt.nii.gz"
    p.write_bytes(bytes(blob))
    return p


def _truncated_nii(tmp_path):
    data = np.random.default_rng(4).normal(size=(10, 10, 10)).astype(np.float32)
    p = write(tmp_path / "short.nii", data, np.eye(4))
    blob = p.read_bytes()
    p.write_bytes(blob[: 352 + 1000])  # header intact, data cut
    return p


def _bad_header_datatype(tmp_path):
    p = write(tmp_path / "badtype.nii", np.zeros((3, 4, 5), np.float32), np.eye(4))
    blob = bytearray(p.read_bytes())
    blob[70:72] = (9999).to_bytes(2, "little")  # datatype code nibabel does not know
    p.write_bytes(bytes(blob))
    return p


def _bad_vox_offset(tmp_path):
    p = write(tmp_path / "badoffset.nii", np.zeros((3, 4, 5), np.float32), np.eye(4))
    blob = bytearray(p.read_bytes())
    blob[108:112] = np.float32(-100).tobytes()
    p.write_bytes(bytes(blob))
    return p


def _rank_2(tmp_path):
    return write(tmp_path / "flat.nii.gz", np.zeros((6, 7), np.float32), np.eye(4))


def _complex(tmp_path):
    return write(tmp_path / "complex.nii", np.ones((3, 4, 5), np.complex64), np.eye(4))


BAD_INPUTS = [
    _missing,
    _directory,
    _text,
    _empty,
    _random_gz,
    _random_gz_with_magic,
    _truncated_gz,
    _corrupt_gz,
    _truncated_nii,
    _bad_header_datatype,
    _bad_vox_offset,
    _rank_2,
    _complex,
]


@pytest.mark.parametrize("make", BAD_INPUTS, ids=[f.__name__.strip("_") for f in BAD_INPUTS])
@pytest.mark.parametrize("as_str", [False, True])
def test_bad_inputs_raise_nifti_error_naming_file(tmp_path, make, as_str):
    p = make(tmp_path)
    with pytest.raises(NiftiError) as info:
        load_nifti(str(p) if as_str else p)
    assert isinstance(info.value, ValueError)
    assert str(p) in str(info.value)
    # and the same for label maps
    with pytest.raises(NiftiError):
        load_nifti(p, dtype="int32", nonfinite="zero")


# --------------------------------------------------------------------------- save_nifti


def test_refuses_to_overwrite_like(nibabel_data, tmp_path):
    p = Path(shutil.copy(nibabel_data / "anatomical.nii", tmp_path / "anat.nii"))
    before = sha(p)
    vol = load_nifti(p)
    for target in (p, str(p), tmp_path / "." / "anat.nii"):
        with pytest.raises(ValueError, match="refusing"):
            save_nifti(vol.array * 0, target, like=vol)
    link = tmp_path / "link.nii"
    link.symlink_to(p)
    with pytest.raises(ValueError, match="refusing"):
        save_nifti(vol.array * 0, link, like=vol)
    assert sha(p) == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["anat.nii", "link.nii"]


def test_refuses_to_overwrite_pair_twin(tmp_path):
    p, _, _ = make_oriented(tmp_path, "LAS", suffix=".hdr", klass=nib.Nifti1Pair)
    img_file = p.with_suffix(".img")
    before = (sha(p), sha(img_file))
    vol = load_nifti(p)
    for target in (p, img_file):
        with pytest.raises(ValueError, match="refusing"):
            save_nifti(vol.array + 1, target, like=vol)
    assert (sha(p), sha(img_file)) == before


def test_missing_folder_is_nifti_error(tmp_path):
    target = tmp_path / "no" / "such" / "folder" / "out.nii.gz"
    with pytest.raises(NiftiError) as info:
        save_nifti(np.zeros((3, 4, 5)), target)
    assert str(target) in str(info.value)
    assert not target.parent.exists()


@pytest.mark.parametrize("name", ["out.txt", "out.nii.bz2", "out", "out.npy"])
def test_wrong_suffix(tmp_path, name):
    with pytest.raises(ValueError, match="must end with"):
        save_nifti(np.zeros((3, 4, 5)), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_shape_mismatch_with_like(tmp_path):
    p, _, _ = make_oriented(tmp_path, "PSR")
    vol = load_nifti(p)
    with pytest.raises(ValueError, match="spatial shape"):
        save_nifti(np.zeros((5, 6, 7)), tmp_path / "out.nii", like=vol)
    with pytest.raises(ValueError):
        save_nifti(np.zeros((7, 5)), tmp_path / "out.nii", like=vol)
    with pytest.raises(ValueError, match="not both"):
        save_nifti(vol.array, tmp_path / "out.nii", like=vol, affine=np.eye(4))
    assert not (tmp_path / "out.nii").exists()


def test_bad_arrays_and_affines(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        save_nifti(np.zeros((3, 4)), tmp_path / "a.nii")
    with pytest.raises(ValueError, match="shape"):
        save_nifti(np.zeros((3, 4, 5, 2, 2)), tmp_path / "a.nii")
    with pytest.raises(ValueError, match="affine"):
        save_nifti(np.zeros((3, 4, 5)), tmp_path / "a.nii", affine=np.eye(3))
    bad = np.eye(4)
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="affine"):
        save_nifti(np.zeros((3, 4, 5)), tmp_path / "a.nii", affine=bad)
    with pytest.raises(ValueError, match="dtype"):
        save_nifti(np.array([["a"] * 5] * 4 * 3).reshape(3, 4, 5), tmp_path / "a.nii")
    assert list(tmp_path.iterdir()) == []


def test_multichannel_writes_4d_in_source_order(tmp_path):
    p, _, _ = make_oriented(tmp_path, "PSR")
    vol = load_nifti(p)
    pred = np.stack([vol.array[..., 0], -vol.array[..., 0], vol.array[..., 0] * 0.5], axis=-1)
    q = save_nifti(pred, tmp_path / "pred.nii.gz", like=vol)
    img = nib.load(q)
    assert img.shape == (5, 6, 7, 3)
    np.testing.assert_array_equal(img.affine, nib.load(p).affine)
    back = load_nifti(q)
    np.testing.assert_array_equal(back.array, pred)
    np.testing.assert_array_equal(back.affine, vol.affine)
    # without like: a plain 4D file with the given affine
    affine = axcodes_affine("RAS", (2, 2, 2), (1, 2, 3))
    q2 = save_nifti(pred, tmp_path / "plain.nii", affine=affine)
    assert nib.load(q2).shape == (7, 5, 6, 3)
    np.testing.assert_array_equal(nib.load(q2).affine, affine)


def test_float_prediction_with_int_like_is_not_quantized(nibabel_data, tmp_path):
    vol = load_nifti(nibabel_data / "functional.nii")
    probs = np.random.default_rng(0).random(vol.shape, dtype=np.float32)
    q = save_nifti(probs, tmp_path / "probs.nii.gz", like=vol)
    img = nib.load(q)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(load_nifti(q).array, probs)


@pytest.mark.parametrize(
    "dtype, stored",
    [("bool", "uint8"), ("float16", "float32"), ("int64", "int32"), ("uint64", "uint32")],
)
def test_save_dtype_policy(tmp_path, dtype, stored):
    data = (np.arange(60).reshape(3, 4, 5) % 2).astype(dtype)
    q = save_nifti(data, tmp_path / "m.nii.gz")
    assert nib.load(q).get_data_dtype() == np.dtype(stored)
    np.testing.assert_array_equal(load_nifti(q, canonical=False).array[..., 0], data)


def test_save_int64_too_large_and_explicit(tmp_path):
    big = np.full((3, 4, 5), 2**40, dtype=np.int64)
    with pytest.raises(ValueError, match="int64"):
        save_nifti(big, tmp_path / "big.nii")
    q = save_nifti(big, tmp_path / "big.nii", dtype="int64")
    assert nib.load(q).get_data_dtype() == np.int64
    assert int(nib.load(q).dataobj[0, 0, 0]) == 2**40


def test_written_file_gets_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    q = save_nifti(np.zeros((3, 4, 5), np.float32), tmp_path / "perm.nii.gz")
    assert q.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_leaves_existing_file(tmp_path, monkeypatch):
    target = tmp_path / "result.nii.gz"
    save_nifti(np.ones((3, 4, 5), np.float32), target)
    before = sha(target)

    def broken(self, filename, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", broken)
    with pytest.raises(NiftiError) as info:
        save_nifti(np.zeros((3, 4, 5), np.float32), target)
    assert str(target) in str(info.value)
    assert sha(target) == before
    assert [x.name for x in tmp_path.iterdir()] == ["result.nii.gz"]  # no temp file left


def test_save_without_like_round_trips_values_and_affine(tmp_path):
    affine = axcodes_affine("LPS", (0.8, 0.8, 2.0), (90.0, 120.0, -60.0), degrees=20.0)
    data = np.random.default_rng(5).normal(size=(6, 7, 8)).astype(np.float32)
    q = save_nifti(data, tmp_path / "x.nii.gz", affine=affine)
    vol = load_nifti(q, canonical=False)
    np.testing.assert_array_equal(vol.array[..., 0], data)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    assert isinstance(save_nifti(data, str(tmp_path / "y.nii")), Path)


def test_public_names():
    assert set(knio.__all__) >= {"NiftiError", "Volume", "load_nifti", "save_nifti"}
    assert issubclass(NiftiError, ValueError)
