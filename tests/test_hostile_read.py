"""Reading hostile files: lying headers, bombs, corrupt streams, bad geometry, FIFOs.

Each test builds the file it needs (tiny, or mostly zeros that compress to
almost nothing). Time and memory are measured in a child process under an
address-space cap (tests/isolated_load.py), so a regression fails the test
instead of taking the test run down.
"""

from __future__ import annotations

import gzip
import os
import threading
import time
import types
import zlib

import nibabel as nib
import numpy as np
import pytest

from keras_nii import storage
from keras_nii.io import NiftiError, load_nifti
from tests.isolated_load import run_cases


def header_bytes(shape, dtype, affine=None, offset=352, klass=nib.Nifti1Header):
    header = klass()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    affine = np.eye(4) if affine is None else affine
    header.set_qform(affine, 1)
    header.set_sform(affine, 2)
    header["vox_offset"] = offset
    block = header.binaryblock
    return block + bytes(max(0, offset - len(block)))


# --------------------------------------------------------------------------- lying headers


@pytest.fixture
def lying_files(tmp_path):
    files = {}
    for name, shape, dtype in [
        ("f32-1000", (1000,) * 3, np.float32),
        ("f64-1200", (1200,) * 3, np.float64),
        ("f64-2000", (2000,) * 3, np.float64),
    ]:
        path = tmp_path / f"{name}.nii.gz"
        path.write_bytes(gzip.compress(header_bytes(shape, dtype)))
        files[name] = path
    # a 2 KB .nii, a .hdr/.img pair, a gzip of real bytes claiming far more
    plain = tmp_path / "f32-1000-2k.nii"
    plain.write_bytes(header_bytes((1000,) * 3, np.float32) + bytes(2048 - 352))
    files["nii-2k"] = plain
    pair = tmp_path / "pair.hdr"
    pair.write_bytes(
        header_bytes((1000,) * 3, np.float32, offset=0, klass=nib.nifti1.Nifti1PairHeader)
    )
    (tmp_path / "pair.img").write_bytes(bytes(4096))
    files["pair"] = pair
    noise = np.random.default_rng(0).integers(0, 255, 3 << 20, dtype=np.uint8).tobytes()
    # 3 MB of gzip could inflate to the 256 MB claimed: it holds 3 MB
    plausible = tmp_path / "plausible.nii.gz"
    plausible.write_bytes(gzip.compress(header_bytes((400,) * 3, np.float32) + noise, 1))
    files["plausible"] = plausible
    return files


def test_lying_headers_fail_fast_and_small(lying_files):
    """Each file fails as a NiftiError in under a second, with under 200 MB of
    RSS above the child's baseline (main took up to 35 s and 13.5 GB, or
    raised a bare MemoryError)."""
    # the cap leaves room for the 256 MB claim to pass the memory check: it
    # fails as truncated, having inflated only what the file holds
    records = run_cases([{"path": str(p)} for p in lying_files.values()], cap_mb=4096)
    for record in records:
        assert record["kind"] == "NiftiError", record
        assert record["path"] in record["message"]
        assert (
            "smaller than its header says" in record["message"] or "can hold" in record["message"]
        ), record
        assert record["seconds"] < 1.0, record
        assert record["peak_mb"] < 200, record
    # the plausible claim was inflated as far as the stream went, no further
    assert "the gzip stream holds" in records[-1]["message"], records[-1]


def test_gzip_that_cannot_hold_its_claim_fails_before_inflating(lying_files, monkeypatch):
    class HeaderOnly:
        """zlib's inflater, refusing to inflate more than a header."""

        def __init__(self, wbits):
            self._inflater = zlib.decompressobj(wbits)

        def __getattr__(self, name):
            return getattr(self._inflater, name)

        def decompress(self, data, max_length=0):
            if not 0 < max_length <= 544:
                raise AssertionError("inflated a stream that cannot hold what its header claims")
            return self._inflater.decompress(data, max_length)

    fake = types.SimpleNamespace(decompressobj=HeaderOnly, error=zlib.error)
    monkeypatch.setattr(storage, "zlib", fake)  # nibabel's own header read keeps zlib
    with pytest.raises(NiftiError, match="can hold"):
        load_nifti(lying_files["f64-2000"])


def test_valid_file_too_large_for_the_memory_at_hand(tmp_path):
    """A valid 64 MB volume under a 40 MB address-space allowance: a
    NiftiError that says it is memory, not damage."""
    data = np.zeros((256, 256, 256), np.float32)
    data[::7, ::5, ::3] = 1.5
    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    plain = tmp_path / "big.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), plain)
    records = run_cases([{"path": str(path)}, {"path": str(plain)}], cap_mb=40)
    for record in records:
        assert record["kind"] == "NiftiError", record
        assert "too large for the memory at hand" in record["message"], record
    assert load_nifti(path).array.sum() == pytest.approx(data.sum())


def test_memory_error_never_escapes(tmp_path, monkeypatch):
    path = tmp_path / "a.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), path)

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    from keras_nii import io as knio

    monkeypatch.setattr(knio, "_maps_a_file", out_of_memory)
    with pytest.raises(NiftiError, match="too large for the memory") as info:
        load_nifti(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- gzip


def _bomb(path, trailing_mib):
    body = header_bytes((4, 4, 4), np.float32) + np.arange(64, dtype=np.float32).tobytes()
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(path, "wb") as file:
        file.write(compressor.compress(body))
        zeros = bytes(1 << 20)
        for _ in range(trailing_mib):
            file.write(compressor.compress(zeros))
        file.write(compressor.flush())
    return path


def test_decompression_bomb_is_not_inflated(tmp_path):
    """A 4^3 volume followed by 512 MiB of zeros (a 500 KB file): read in
    milliseconds with a few MB, as nibabel reads it (main inflated it all)."""
    bomb = _bomb(tmp_path / "bomb.nii.gz", 512)
    assert bomb.stat().st_size < 1 << 20
    (record,) = run_cases([{"path": str(bomb), "kwargs": {"canonical": False}}], cap_mb=1024)
    assert record["kind"] == "ok", record
    assert record["shape"] == [4, 4, 4, 1]
    assert record["seconds"] < 1.0 and record["peak_mb"] < 64, record
    got = load_nifti(bomb, canonical=False).array[..., 0]
    np.testing.assert_array_equal(got, np.arange(64, dtype=np.float32).reshape(4, 4, 4, order="F"))


def test_body_damage_is_never_loaded_silently(tmp_path):
    """Bytes flipped inside the deflate stream: zlib's error or the CRC check,
    every time (main fell back to nibabel, which loads many such files)."""
    rng = np.random.default_rng(7)
    data = rng.normal(100, 20, (24, 24, 24)).astype(np.float32)
    path = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    blob = path.read_bytes()
    silently_loaded_by_nibabel = 0
    for i in range(24):
        damaged = bytearray(blob)
        at = int(rng.integers(200, len(blob) - 16))
        damaged[at] ^= 1 << int(rng.integers(0, 8))
        bad = tmp_path / f"bad{i}.nii.gz"
        bad.write_bytes(bytes(damaged))
        try:
            nib.load(bad).get_fdata()
            silently_loaded_by_nibabel += 1
        except Exception:
            pass
        with pytest.raises(NiftiError) as info:
            load_nifti(bad)
        assert str(bad) in str(info.value)
    assert silently_loaded_by_nibabel > 0  # the test covers what nibabel misses


def test_truncated_gzip_is_an_error(tmp_path):
    data = np.arange(16**3, dtype=np.float32).reshape(16, 16, 16)
    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    blob = path.read_bytes()
    for cut in (len(blob) - 4, len(blob) - 9, len(blob) // 2, 40):
        short = tmp_path / f"cut{cut}.nii.gz"
        short.write_bytes(blob[:cut])
        with pytest.raises(NiftiError, match="truncated|corrupt|unreadable"):
            load_nifti(short)


# --------------------------------------------------------------------------- geometry


def _with_header(tmp_path, name, edit, data=None):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) if data is None else data
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.set_qform(img.affine, 1)
    img.set_sform(img.affine, 2)
    edit(img.header)
    path = tmp_path / name
    # write the header as edited: nibabel's to_filename would recompute it
    path.write_bytes(img.header.binaryblock + bytes(4) + data.tobytes(order="F"))
    return path


def _set_rows(**rows):
    def edit(header):
        for row, values in rows.items():
            header[row] = values

    return edit


def _set_row(row, values):
    return _set_rows(**{row: values})


@pytest.mark.parametrize(
    "edit, problem",
    [
        (_set_row("srow_x", [np.nan, 0, 0, 0]), "srow_x"),
        (_set_row("srow_y", [0, 0, 0, 0]), "srow_y is zero"),
        (_set_rows(srow_x=[2, 2, 0, 0], srow_y=[2, 2, 0, 0]), "do not span"),
        (_set_row("srow_x", [1e30, 0, 0, 0]), "voxel size"),
        (_set_row("srow_z", [0, 0, 2, np.inf]), "srow_z"),
        (_set_row("srow_x", [1e-7, 0, 0, 0]), "voxel size"),
    ],
)
def test_bad_sform_without_qform_is_an_error_naming_the_field(tmp_path, edit, problem):
    def both(header):
        edit(header)
        header["qform_code"] = 0

    path = _with_header(tmp_path, "bad.nii", both)
    with pytest.raises(NiftiError, match=problem) as info:
        load_nifti(path)
    assert str(path) in str(info.value) and "sform" in str(info.value)


def test_bad_sform_beside_a_good_qform_falls_back_to_the_qform(tmp_path):
    path = _with_header(tmp_path, "bad.nii", _set_row("srow_y", [0, 0, 0, 0]))
    with pytest.warns(UserWarning, match="using the qform") as caught:
        vol = load_nifti(path, canonical=False)
    assert "srow_y" in str(caught[0].message)
    np.testing.assert_allclose(vol.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert vol.spacing == (2.0, 2.0, 2.0)
    # written back, the file has a usable sform again: it loads without a warning
    out = path.parent / "out.nii"
    from keras_nii.io import save_nifti

    save_nifti(vol.array, out, like=vol)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_nifti(out, canonical=False)
    np.testing.assert_allclose(again.affine, vol.affine)
    np.testing.assert_array_equal(again.array, vol.array)


def test_bad_qform_and_bad_pixdim(tmp_path):
    def bad_quaternion(header):
        header["sform_code"] = 0
        header["quatern_b"] = np.nan

    path = _with_header(tmp_path, "q.nii", bad_quaternion)
    with pytest.raises(NiftiError, match="qform"):
        load_nifti(path)

    def zero_pixdim(header):
        header["sform_code"] = 0
        header["qform_code"] = 0
        header["pixdim"][2] = 1e9

    path = _with_header(tmp_path, "p.nii", zero_pixdim)
    with pytest.raises(NiftiError, match="pixdim"):
        load_nifti(path)


# --------------------------------------------------------------------------- non-finite


def test_scaling_that_overflows_float32_is_caught_on_the_integer_path(tmp_path):
    """int16 * 1e38 overflows float32: main returned 57/60 voxels inf under
    nonfinite='raise' (its integer shortcut skipped the check)."""
    data = np.arange(-30, 30, dtype=np.int16).reshape(3, 4, 5)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(1e38, 0)
    path = tmp_path / "big-slope.nii"
    nib.save(img, path)
    with np.errstate(over="ignore"):
        reference = (data.astype(np.float64) * 1e38).astype(np.float32)  # NumPy's float32 cast
    n_inf = int(np.count_nonzero(np.isinf(reference)))
    assert n_inf == 60 - 7  # only -3 ... 3 fit
    with pytest.raises(NiftiError, match=f"{n_inf} non-finite"):
        load_nifti(path)
    zeroed = load_nifti(path, nonfinite="zero", canonical=False).array[..., 0]
    np.testing.assert_array_equal(zeroed, np.where(np.isinf(reference), 0, reference))
    kept = load_nifti(path, dtype="float64", canonical=False).array[..., 0]  # fits in float64
    np.testing.assert_allclose(kept, data.astype(np.float64) * 1e38, rtol=1e-6)


# --------------------------------------------------------------------------- no hangs


def _unblock_later(fifo, seconds=5.0):
    """Open the FIFO's write end after a while, so a reader blocked on it ends."""

    def writer():
        time.sleep(seconds)
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("fifo_name", ["pair.img", "pair.hdr", "scan.nii"])
def test_fifos_are_refused_without_blocking(tmp_path, fifo_name):
    data = np.ones((4, 4, 4), np.int16)
    nib.save(nib.Nifti1Pair(data, np.eye(4)), tmp_path / "pair.hdr")
    fifo = tmp_path / fifo_name
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    thread = _unblock_later(fifo)
    start = time.perf_counter()
    target = tmp_path / ("scan.nii" if fifo_name == "scan.nii" else "pair.hdr")
    with pytest.raises(NiftiError, match="FIFO") as info:
        load_nifti(target)
    assert time.perf_counter() - start < 1.0
    assert str(fifo) in str(info.value)
    thread.join()


def test_regular_file_names_what_it_refuses(tmp_path):
    with pytest.raises(NiftiError, match="no such file"):
        storage.regular_file(str(tmp_path / "missing.nii"))
    with pytest.raises(NiftiError, match="directory"):
        storage.regular_file(str(tmp_path))
    assert storage.regular_file(__file__).st_size > 0
    with pytest.raises(NiftiError, match="character device"):
        storage.regular_file("/dev/null")


# --------------------------------------------------------------------------- keras-nii info


def test_info_is_one_line_for_every_bad_file(tmp_path, capsys):
    """No MemoryError or TypeError traceback: one error line per bad file, a
    summary line, exit status 1."""
    from keras_nii.cli import main

    bad = {}
    bad["lying.nii.gz"] = gzip.compress(header_bytes((512,) * 3, np.float32))
    bad["lying.nii"] = header_bytes((512,) * 3, np.float32) + bytes(1700)
    good = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    for name, blob in bad.items():
        (tmp_path / name).write_bytes(blob)
    paths = [tmp_path / name for name in bad]
    paths.append(
        _with_header(tmp_path, "zero-row.nii", _set_rows(srow_y=[0, 0, 0, 0], qform_code=0))
    )
    paths.append(
        _with_header(tmp_path, "nan-sform.nii", _set_rows(srow_x=[np.nan, 0, 0, 0], qform_code=0))
    )
    nib.save(nib.Nifti1Image(good, np.eye(4)), tmp_path / "good.nii.gz")
    blob = bytearray((tmp_path / "good.nii.gz").read_bytes())
    blob[-8] ^= 1
    (tmp_path / "crc.nii.gz").write_bytes(bytes(blob))
    paths.append(tmp_path / "crc.nii.gz")
    nib.save(nib.Nifti1Pair(good, np.eye(4)), tmp_path / "fifo.hdr")
    (tmp_path / "fifo.img").unlink()
    os.mkfifo(tmp_path / "fifo.img")
    thread = _unblock_later(tmp_path / "fifo.img")
    paths.append(tmp_path / "fifo.hdr")
    code = main(["info", *map(str, paths)])
    thread.join()
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == len(paths) + 1, lines
    for line, path in zip(lines, paths, strict=False):
        assert line.startswith(f"keras-nii: error: {path}: "), line
    assert lines[-1] == f"keras-nii: error: {len(paths)} of {len(paths)} file(s) could not be read"


def test_huge_header_extensions_are_refused_before_nibabel_reads_them(tmp_path):
    """A flagged extension as long as a bomb's 256 MiB of zeros: nibabel read it
    whole (1 GiB: 15 s and 1 GB); refused from the header's own bytes."""
    import struct

    offset = 256 << 20
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = offset
    path = tmp_path / "extensions.nii.gz"
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(path, "wb") as file:
        file.write(compressor.compress(header.binaryblock + b"\x01\0\0\0"))
        file.write(compressor.compress(struct.pack("<ii", offset - 352, 0)))
        zeros = bytes(1 << 20)
        for _ in range(offset >> 20):
            file.write(compressor.compress(zeros))
        file.write(compressor.compress(np.arange(64, dtype=np.float32).tobytes()))
        file.write(compressor.flush())
    (record,) = run_cases([{"path": str(path)}], cap_mb=1024)
    assert record["kind"] == "NiftiError" and "extensions" in record["message"], record
    assert record["seconds"] < 1.0 and record["peak_mb"] < 64, record
    # small extensions are read as nibabel reads them
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment" * 100))
    small = tmp_path / "small.nii.gz"
    nib.save(img, small)
    np.testing.assert_array_equal(load_nifti(small).array[..., 0], np.ones((4, 4, 4)))
