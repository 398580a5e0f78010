"""Writing never destroys an input: files are compared as files, pairs are written atomically."""

from __future__ import annotations

import errno
import hashlib
import os

import nibabel as nib
import numpy as np
import pytest

from keras_nii import predict_nifti, storage
from keras_nii.io import load_nifti, save_nifti


def digest(*paths):
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def scan(path, klass=nib.Nifti1Image, seed=0):
    data = np.random.default_rng(seed).integers(0, 1000, (6, 5, 4)).astype(np.int16)
    nib.save(klass(data, np.diag([1.5, 1.0, 2.0, 1.0])), os.fspath(path))
    return path


def pair_on_disk(folder, stem, upper):
    """A .hdr/.img pair whose suffixes are spelled in upper or lower case."""
    hdr, img = (f"{stem}.HDR", f"{stem}.IMG") if upper else (f"{stem}.hdr", f"{stem}.img")
    scan(folder / "tmp.hdr", nib.Nifti1Pair)
    os.replace(folder / "tmp.hdr", folder / hdr)
    os.replace(folder / "tmp.img", folder / img)
    return folder / hdr, folder / img


class Spy:
    """A model that records whether it ran."""

    calls = 0

    def __call__(self, batch):
        Spy.calls += 1
        return batch


# --------------------------------------------------------------------------- identity


def test_case_variants_of_a_pair_are_refused(tmp_path):
    """nibabel opens IN.HDR with IN.IMG; main built the twin IN.img and overwrote IN.IMG."""
    hdr, img = pair_on_disk(tmp_path, "IN", upper=True)
    before = digest(hdr, img)
    vol = load_nifti(hdr)
    for target in (img, hdr, tmp_path / "IN.IMG"):
        with pytest.raises(ValueError, match="refusing to write"):
            save_nifti(vol.array * 0, target, like=vol)
    assert digest(hdr, img) == before
    Spy.calls = 0
    for output in (img, hdr):
        with pytest.raises(ValueError, match="input scan"):
            predict_nifti(Spy(), hdr, output)
        with pytest.raises(ValueError, match="input scan"):
            predict_nifti(Spy(), img, output)
    assert Spy.calls == 0  # refused before the model ran
    assert digest(hdr, img) == before
    # another stem is written, as a pair spelled like the name given
    out = save_nifti(vol.array, tmp_path / "OUT.IMG", like=vol)
    assert sorted(p.name for p in tmp_path.glob("OUT.*")) == ["OUT.HDR", "OUT.IMG"]
    np.testing.assert_array_equal(load_nifti(out).array, vol.array)


def test_a_volume_keeps_its_source_across_chdir(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    source = scan(tmp_path / "a" / "scan.nii")
    before = digest(source)
    monkeypatch.chdir(tmp_path / "a")
    vol = load_nifti("scan.nii")
    assert vol.path == os.fspath(source)
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(ValueError, match="refusing to write"):
        save_nifti(vol.array * 0, source, like=vol)
    with pytest.raises(ValueError, match="refusing to write"):
        save_nifti(vol.array * 0, "../a/scan.nii", like=vol)
    assert digest(source) == before
    save_nifti(vol.array, "scan.nii", like=vol)  # b/scan.nii is another file
    assert (tmp_path / "b" / "scan.nii").is_file() and digest(source) == before


def test_every_name_of_the_input_is_refused(tmp_path, monkeypatch):
    source = scan(tmp_path / "scan.nii.gz")
    before = digest(source)
    (tmp_path / "sub").mkdir()
    os.symlink(source, tmp_path / "link.nii.gz")
    os.link(source, tmp_path / "hard.nii.gz")
    os.symlink(tmp_path, tmp_path / "sub" / "up")
    monkeypatch.chdir(tmp_path / "sub")
    vol = load_nifti("../scan.nii.gz")
    names = [
        "../scan.nii.gz",
        tmp_path / "sub" / ".." / "scan.nii.gz",
        tmp_path / "link.nii.gz",
        tmp_path / "hard.nii.gz",
        tmp_path / "sub" / "up" / "scan.nii.gz",
    ]
    for name in names:
        with pytest.raises(ValueError, match="refusing to write"):
            save_nifti(vol.array * 0, name, like=vol)
        Spy.calls = 0
        with pytest.raises(ValueError, match="input scan"):
            predict_nifti(Spy(), source, name)
        assert Spy.calls == 0
    assert digest(source) == before


def test_a_renamed_source_is_still_refused(tmp_path):
    source = scan(tmp_path / "scan.nii")
    vol = load_nifti(source)
    moved = tmp_path / "moved.nii"
    os.replace(source, moved)
    before = digest(moved)
    with pytest.raises(ValueError, match="refusing to write"):
        save_nifti(vol.array * 0, moved, like=vol)
    assert digest(moved) == before


def test_twins_of_pairs_are_compared_as_files(tmp_path):
    hdr, img = pair_on_disk(tmp_path, "a", upper=False)
    before = digest(hdr, img)
    vol = load_nifti(img)  # loaded through the .img: the .hdr is its twin
    with pytest.raises(ValueError, match="refusing to write"):
        save_nifti(vol.array * 0, hdr, like=vol)
    # a pair whose .img is a hard link to the input's .img
    os.link(img, tmp_path / "b.img")
    scan(tmp_path / "b-src.hdr", nib.Nifti1Pair, seed=3)
    os.replace(tmp_path / "b-src.hdr", tmp_path / "b.hdr")
    with pytest.raises(ValueError, match="refusing to write"):
        save_nifti(vol.array * 0, tmp_path / "b.hdr", like=vol)
    # a single file named like the twin of the input's .hdr
    with pytest.raises(ValueError, match="input scan"):
        predict_nifti(Spy(), [hdr], tmp_path / "b.hdr")
    assert digest(hdr, img) == before


def test_overwritten_input_reports_the_file(tmp_path):
    hdr, img = pair_on_disk(tmp_path, "x", upper=False)
    assert storage.overwritten_input([os.fspath(img)], [os.fspath(hdr)]) == os.fspath(img)
    assert storage.overwritten_input([os.fspath(tmp_path / "y.nii")], [os.fspath(hdr)]) is None
    assert storage.pair_twin("a/B.HDR") == "a/B.IMG"
    assert storage.pair_twin("a/b.Img") == "a/b.hdr"
    assert storage.pair_twin("a/b.nii.gz") is None


# --------------------------------------------------------------------------- atomic pairs


def _full_disk_after(fraction, original):
    """nibabel's write, cut short like a full disk: part of the .img, then ENOSPC."""

    def write(self, filename):
        original(self, filename)
        twin = storage.pair_twin(os.fspath(filename))
        for name in (os.fspath(filename), twin):
            if name and os.path.exists(name):
                with open(name, "r+b") as file:
                    file.truncate(int(os.path.getsize(name) * fraction))
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


@pytest.mark.parametrize("target", ["a.hdr", "a.img", "b.nii.gz"])
def test_a_failed_write_leaves_the_old_files_and_no_partial_ones(tmp_path, monkeypatch, target):
    """Main wrote pairs in place: a full disk left a 0-byte .hdr where a good one was."""
    source = scan(tmp_path / "src.nii")
    vol = load_nifti(source)
    first = save_nifti(vol.array, tmp_path / target, like=vol)
    written = sorted(os.listdir(tmp_path))
    before = digest(*(tmp_path / n for n in written))
    good = load_nifti(first).array
    for klass in (nib.Nifti1Pair, nib.Nifti1Image):
        monkeypatch.setattr(klass, "to_filename", _full_disk_after(0.0, klass.to_filename))
    with pytest.raises(Exception, match="No space left"):
        save_nifti(vol.array * 0 + 7, tmp_path / target, like=vol)
    assert sorted(os.listdir(tmp_path)) == written  # no temporaries, no partial files
    assert digest(*(tmp_path / n for n in written)) == before
    monkeypatch.undo()
    np.testing.assert_array_equal(load_nifti(first).array, good)


def test_a_failed_second_rename_puts_the_first_back(tmp_path, monkeypatch):
    source = scan(tmp_path / "src.nii")
    vol = load_nifti(source)
    save_nifti(vol.array, tmp_path / "a.hdr", like=vol)
    before = digest(tmp_path / "a.hdr", tmp_path / "a.img")
    names = sorted(os.listdir(tmp_path))
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the second move of the pair
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", flaky_replace)
    with pytest.raises(Exception, match="I/O error"):
        save_nifti(np.zeros(vol.shape, np.float32), tmp_path / "a.hdr", like=vol)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == names
    assert digest(tmp_path / "a.hdr", tmp_path / "a.img") == before
