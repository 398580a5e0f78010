"""Fuzzing load_nifti with mutations of nibabel's real NIfTI files.

Every case is one of nibabel's test files (nibabel/tests/data), or a pair or
``.nii.gz`` made from one, damaged in one seeded way: bytes of the header
flipped, one header field set to a hostile value (zero, negative, huge, NaN,
inf), the file truncated, or the gzip stream damaged (bytes flipped in its
header, body or trailer; cut short; garbage appended). Each case must end,
in under 2 s and with a bounded RSS, as a ``NiftiError`` or as a sane volume
(finite voxels, finite affine, voxel sizes in range). Cases are loaded in
child processes under an address-space cap (tests/isolated_load.py), a batch
per child.

``KERAS_NII_FUZZ_CASES`` sets the number of cases (default 300, about 20 s
on two cores); ``KERAS_NII_FUZZ_SEED`` the seed.
"""

from __future__ import annotations

import gzip
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from keras_nii.io import VOXEL_SIZE_RANGE
from tests.isolated_load import run_cases

N_CASES = int(os.environ.get("KERAS_NII_FUZZ_CASES", "300"))
SEED = int(os.environ.get("KERAS_NII_FUZZ_SEED", "20261201"))
BATCH = 100
SOURCES = [
    "anatomical.nii",
    "functional.nii",
    "example4d.nii.gz",
    "example_nifti2.nii.gz",
    "standard.nii.gz",
    "reoriented_anat_moved.nii",
    "resampled_anat_moved.nii",
]
FIELDS = [
    ("dim", range(8)),
    ("datatype", [None]),
    ("bitpix", [None]),
    ("vox_offset", [None]),
    ("pixdim", range(8)),
    ("scl_slope", [None]),
    ("scl_inter", [None]),
    ("qform_code", [None]),
    ("sform_code", [None]),
    ("quatern_b", [None]),
    ("quatern_c", [None]),
    ("quatern_d", [None]),
    ("qoffset_x", [None]),
    ("srow_x", range(4)),
    ("srow_y", range(4)),
    ("srow_z", range(4)),
    ("magic", [None]),
    ("sizeof_hdr", [None]),
]
HOSTILE_INTS = [0, -1, 1, 2, 3, 5, 7, 255, 2**15 - 1, -(2**15), 2**31 - 1, 2**40]
HOSTILE_FLOATS = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e38, -1e38, 1e-38, 1e30, 1e-7, 1e7, -3.5]


def _header_class(raw: bytes):
    """(header class, byte order) of an uncompressed NIfTI file's bytes."""
    for klass, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
        for order in ("<", ">"):
            if int(np.frombuffer(raw[:4], order + "i4")[0]) == size:
                return klass, order
    raise ValueError("not a NIfTI-1 or NIfTI-2 header")


def _set_field(raw: bytearray, rng) -> str:
    klass, order = _header_class(bytes(raw))
    dtype = klass.template_dtype.newbyteorder(order)
    header = np.frombuffer(raw, dtype, count=1)  # a view: writes go into raw
    name, indices = FIELDS[rng.integers(len(FIELDS))]
    index = list(indices)[rng.integers(len(indices))]
    kind = dtype[name].base.kind
    if kind == "S":
        value = bytes(rng.integers(0, 256, dtype[name].itemsize, dtype=np.uint8))
        header[name] = value
        return f"{name}={value!r}"
    values = HOSTILE_INTS if kind in "iu" else HOSTILE_FLOATS
    value = values[rng.integers(len(values))]
    info = np.iinfo(dtype[name].base) if kind in "iu" else None
    if info is not None:
        value = int(np.clip(value, info.min, info.max))
    if index is None:
        header[name] = value
    else:
        header[name][0][index] = value
    return f"{name}[{index}]={value}"


def _flip_header(raw: bytearray, rng) -> str:
    klass, _ = _header_class(bytes(raw))
    size = 348 if klass is nib.Nifti1Header else 540
    where = rng.integers(0, size, rng.integers(1, 9))
    for at in where:
        raw[at] ^= int(rng.integers(1, 256))
    return f"flipped header bytes {sorted(int(w) for w in where)}"


def _damage_gzip(blob: bytearray, rng) -> tuple[bytes, str]:
    how = rng.integers(5)
    if how == 0:
        at = int(rng.integers(0, 10))
        blob[at] ^= int(rng.integers(1, 256))
        return bytes(blob), f"gzip header byte {at} flipped"
    if how == 1:
        at = int(rng.integers(10, len(blob) - 8))
        blob[at] ^= 1 << int(rng.integers(8))
        return bytes(blob), f"deflate byte {at} flipped"
    if how == 2:
        at = len(blob) - int(rng.integers(1, 9))
        blob[at] ^= int(rng.integers(1, 256))
        return bytes(blob), f"trailer byte {at} flipped"
    if how == 3:
        cut = int(rng.integers(1, len(blob)))
        return bytes(blob[:cut]), f"gzip cut at {cut} of {len(blob)}"
    extra = bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
    return bytes(blob) + extra, f"{len(extra)} garbage bytes appended"


def make_case(index: int, folder, data_dir) -> dict:
    """Write case ``index`` in ``folder``; return its load case, with what it is."""
    rng = np.random.default_rng([SEED, index])
    source = SOURCES[index % len(SOURCES)]
    blob = (data_dir / source).read_bytes()
    raw = bytearray(gzip.decompress(blob) if source.endswith(".gz") else blob)
    layout = ["as is", "gz", "pair"][rng.integers(3)]
    mutation = ["flip", "field", "field", "truncate", "gzip"][rng.integers(5)]
    if mutation == "gzip":
        layout = "gz"
    what = f"{source} as {layout}: "
    if mutation == "flip":
        what += _flip_header(raw, rng)
    elif mutation == "field":
        what += _set_field(raw, rng)
    elif mutation == "truncate":
        cut = int(rng.integers(0, len(raw)))
        what += f"cut at {cut} of {len(raw)}"
        raw = raw[:cut]
    stem = folder / f"case{index:05d}"
    if layout == "pair" and len(raw) >= 348:
        try:
            klass, order = _header_class(bytes(raw))
        except ValueError:  # sizeof_hdr itself was mutated
            klass, order = None, None
        size = 540 if klass is nib.Nifti2Header else 348
        offset = size + 4
        if klass is not None:
            header = np.frombuffer(raw, klass.template_dtype.newbyteorder(order), count=1)
            stored = float(header["vox_offset"][0])
            if np.isfinite(stored) and offset <= stored <= len(raw):
                offset = int(stored)
            header["magic"] = b"ni1" if klass is nib.Nifti1Header else b"ni2\x00\r\n\x1a\n"
            header["vox_offset"] = 0
        (stem.with_suffix(".hdr")).write_bytes(bytes(raw[:size]))
        (stem.with_suffix(".img")).write_bytes(bytes(raw[offset:]))
        path = stem.with_suffix(".hdr")
    elif layout == "gz" or (layout == "as is" and source.endswith(".gz")):
        packed = bytearray(gzip.compress(bytes(raw), 6))
        if mutation == "gzip":
            packed, damage = _damage_gzip(packed, rng)
            what += damage
        path = stem.with_suffix(".nii.gz")
        path.write_bytes(bytes(packed))
    else:
        path = stem.with_suffix(".nii")
        path.write_bytes(bytes(raw))
    nonfinite = ["raise", "zero"][index % 2]
    return {"path": str(path), "kwargs": {"nonfinite": nonfinite}, "what": what}


def check(record: dict, what: str) -> None:
    assert record["kind"] in ("ok", "NiftiError"), f"{what}:\n{record['message']}"
    assert record["seconds"] < 2.0, (what, record)
    assert record["peak_mb"] < 256, (what, record)
    if record["kind"] == "NiftiError":
        assert record["path"] in record["message"], (what, record)
        return
    low, high = VOXEL_SIZE_RANGE
    assert len(record["shape"]) == 4 and min(record["shape"]) >= 1, (what, record)
    assert record["finite"] and record["affine_finite"], (what, record)
    assert all(low <= s <= high for s in record["spacing"]), (what, record)
    assert record["axcodes"] == "RAS", (what, record)


@pytest.mark.parametrize("batch", range(max(1, -(-N_CASES // BATCH))))
def test_fuzzed_nibabel_files_load_or_fail_cleanly(tmp_path, nibabel_data, batch):
    indices = range(batch * BATCH, min(N_CASES, (batch + 1) * BATCH))
    cases = [make_case(i, tmp_path, nibabel_data) for i in indices]
    records = run_cases([{"path": c["path"], "kwargs": c["kwargs"]} for c in cases], cap_mb=1536)
    outcomes = {"ok": 0, "NiftiError": 0}
    for case, record in zip(cases, records, strict=True):
        check(record, case["what"])
        outcomes[record["kind"]] += 1
    # the mutations are not all fatal, nor all harmless
    assert outcomes["ok"] > 0 and outcomes["NiftiError"] > 0, outcomes


def test_unmutated_sources_load(tmp_path, nibabel_data):
    """The fuzz sources themselves are sane volumes (and the child loads them)."""
    for name in SOURCES:
        shutil.copy(nibabel_data / name, tmp_path / name)
    cases = [{"path": str(tmp_path / n), "kwargs": {"nonfinite": "zero"}} for n in SOURCES]
    records = run_cases(cases, cap_mb=1536)
    for name, record in zip(SOURCES, records, strict=True):
        check(record, name)
        assert record["kind"] == "ok", record
