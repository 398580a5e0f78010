"""The caches of NiftiDataset serve a volume only while it is what the source holds."""

from __future__ import annotations

import glob
import os
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from keras_nii import NiftiDataset
from keras_nii.cache import MemoryCache

SHAPE = (8, 7, 6)


def volume(seed):
    return np.random.default_rng(seed).normal(0, 1, SHAPE).astype(np.float32)


def write(path, seed):
    nib.save(nib.Nifti1Image(volume(seed), np.eye(4)), os.fspath(path))
    return path


def first(ds):
    return ds[0][0, ..., 0]


def replace_keeping_size_and_mtime(path, seed):
    """Rewrite ``path`` with other voxels, same size, modification time restored."""
    info = os.stat(path)
    write(path, seed)
    assert os.path.getsize(path) == info.st_size
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


@pytest.mark.parametrize("cache", ["memory", "dir"])
def test_a_rewritten_source_with_restored_mtime_is_read_again(tmp_path, cache):
    src = write(tmp_path / "a.nii", 0)
    ds = NiftiDataset([src], cache=tmp_path / "c" if cache == "dir" else "memory")
    np.testing.assert_array_equal(first(ds), volume(0))
    replace_keeping_size_and_mtime(src, 1)
    np.testing.assert_array_equal(first(ds), volume(1))
    # another file, same size and times, renamed over the source
    other = write(tmp_path / "b.nii", 2)
    os.utime(other, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns))
    os.replace(other, src)
    np.testing.assert_array_equal(first(ds), volume(2))
    if cache == "dir":  # replaced in place: one entry, not one per version
        assert len(glob.glob(os.fspath(tmp_path / "c" / "*.npy"))) == 1


def _entry(folder):
    (npy,) = glob.glob(os.fspath(folder / "*.npy"))
    return npy


def _damage_flip(npy):
    with open(npy, "r+b") as file:
        file.seek(-5, os.SEEK_END)
        byte = file.read(1)
        file.seek(-5, os.SEEK_END)
        file.write(bytes([byte[0] ^ 0x10]))


def _damage_zero(npy):
    size = os.path.getsize(npy)
    with open(npy, "r+b") as file:
        file.seek(128)
        file.write(bytes(size - 128))


def _damage_truncate(npy):
    with open(npy, "r+b") as file:
        file.truncate(os.path.getsize(npy) // 2)


def _damage_shape(npy):
    np.save(npy, np.zeros((6, 7, 8, 1), np.float32))


def _damage_dtype(npy):
    np.save(npy, np.zeros((*SHAPE, 1), np.float64))


@pytest.mark.parametrize(
    "damage", [_damage_flip, _damage_zero, _damage_truncate, _damage_shape, _damage_dtype]
)
def test_a_damaged_entry_is_never_served(tmp_path, damage):
    src = write(tmp_path / "a.nii", 0)
    folder = tmp_path / "c"
    ds = NiftiDataset([src], cache=folder)
    np.testing.assert_array_equal(first(ds), volume(0))
    npy = _entry(folder)
    damage(npy)
    for dataset in (ds, NiftiDataset([src], cache=folder)):  # this process, and a fresh one
        np.testing.assert_array_equal(first(dataset), volume(0))
    # the entry was replaced by a sound one
    np.testing.assert_array_equal(np.load(_entry(folder))[..., 0], volume(0))


def test_swapped_entries_are_not_served(tmp_path):
    a, b = write(tmp_path / "a.nii", 0), write(tmp_path / "b.nii", 1)
    folder = tmp_path / "c"
    ds = NiftiDataset([a, b], cache=folder)
    np.testing.assert_array_equal(ds[0][0, ..., 0], volume(0))
    np.testing.assert_array_equal(ds[1][0, ..., 0], volume(1))
    entry_a, entry_b = sorted(glob.glob(os.fspath(folder / "*.npy")))  # a-..., b-...
    blob_a, blob_b = open(entry_a, "rb").read(), open(entry_b, "rb").read()
    open(entry_a, "wb").write(blob_b)
    open(entry_b, "wb").write(blob_a)
    fresh = NiftiDataset([a, b], cache=folder)
    np.testing.assert_array_equal(fresh[0][0, ..., 0], volume(0))
    np.testing.assert_array_equal(fresh[1][0, ..., 0], volume(1))


def test_a_fifo_in_place_of_an_entry_does_not_block(tmp_path):
    src = write(tmp_path / "a.nii", 0)
    folder = tmp_path / "c"
    ds = NiftiDataset([src], cache=folder)
    first(ds)
    npy = _entry(folder)
    os.unlink(npy)
    os.mkfifo(npy)

    def unblock():  # ends a read blocked on the FIFO, so a failing test ends too
        time.sleep(5)
        try:
            os.close(os.open(npy, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    start = time.perf_counter()
    np.testing.assert_array_equal(first(NiftiDataset([src], cache=folder)), volume(0))
    assert time.perf_counter() - start < 2.0
    assert os.path.isfile(npy)  # replaced by a regular entry
    thread.join()


def test_memory_cache_drops_entries_of_changed_files(tmp_path):
    """Main kept one entry per version of each file: +602 MB after 20 epochs."""
    paths = [write(tmp_path / f"s{i}.nii", i) for i in range(3)]
    ds = NiftiDataset(paths, cache="memory")
    for epoch in range(6):
        for i, path in enumerate(paths):
            replace_keeping_size_and_mtime(path, 100 * epoch + i)
        for i in range(len(ds)):
            np.testing.assert_array_equal(ds[i][0, ..., 0], volume(100 * epoch + i))
        assert len(ds._memory) == 3
        assert ds._memory.nbytes == 3 * volume(0).nbytes


def test_memory_cache_is_bounded(tmp_path):
    paths = [write(tmp_path / f"s{i}.nii", i) for i in range(5)]
    one = volume(0).nbytes
    ds = NiftiDataset(paths, cache="memory", cache_bytes=2 * one)
    for _ in range(2):
        for i in range(len(ds)):
            np.testing.assert_array_equal(ds[i][0, ..., 0], volume(i))
            assert ds._memory.nbytes <= 2 * one and len(ds._memory) <= 2
    with pytest.raises(ValueError, match="cache_bytes"):
        NiftiDataset(paths, cache="memory", cache_bytes=0)
    assert NiftiDataset(paths, cache="memory").cache_bytes > 0  # the documented default


def test_memory_cache_is_least_recently_used():
    cache = MemoryCache(30)
    arrays = {k: np.zeros(10, np.uint8) for k in "abcd"}
    for key in "abc":
        cache.put(key, (1,), arrays[key], np.eye(4))
    assert cache.get("a", (1,)) is not None  # a is now the most recent
    cache.put("d", (1,), arrays["d"], np.eye(4))  # evicts b
    assert cache.get("b", (1,)) is None
    assert all(cache.get(k, (1,)) is not None for k in "acd")
    assert cache.get("a", (2,)) is None and len(cache) == 2  # a changed: dropped
    cache.put("big", (1,), np.zeros(31, np.uint8), np.eye(4))  # larger than the bound
    assert cache.get("big", (1,)) is None and cache.nbytes == 20
