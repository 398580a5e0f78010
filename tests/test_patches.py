"""Patches in the feed: NiftiDataset(patch_size=, patches_per_volume=, label_probabilities=,
queue_length=) and keras_nii.patches."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from keras_nii import data as kdata
from keras_nii import patches as kpatches
from keras_nii.data import NiftiDataset

PATCH = (12, 12, 12)
# every subject a different shape; the last is smaller than the patch along x
SHAPES = [(30, 24, 20), (22, 34, 16), (9, 28, 25), (26, 20, 30)]


def write(path, data) -> str:
    img = nib.Nifti1Image(np.asarray(data), np.eye(4))
    img.header.set_data_dtype(np.asarray(data).dtype)
    nib.save(img, os.fspath(path))
    return os.fspath(path)


def label_map(shape, seed) -> np.ndarray:
    """Background 0, a box of class 1, a small box of class 2 (the rare class)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int16)
    lo = [int(rng.integers(0, n - 6)) for n in shape]
    lab[lo[0] : lo[0] + 6, lo[1] : lo[1] + 6, lo[2] : lo[2] + 6] = 1
    lab[tuple(slice(n - 4, n - 2) for n in shape)] = 2
    return lab


@pytest.fixture(scope="module")
def own_masks(tmp_path_factory) -> tuple[list[str], list[str], list[np.ndarray]]:
    """Images that are their own label maps (the image's voxel value is its label),
    each value marked with the subject (so that a patch tells where it came from)."""
    folder = tmp_path_factory.mktemp("own")
    images, masks, arrays = [], [], []
    for i, shape in enumerate(SHAPES):
        lab = label_map(shape, i)
        images.append(write(folder / f"img{i}.nii.gz", lab.astype(np.float32)))
        masks.append(write(folder / f"lab{i}.nii.gz", lab))
        arrays.append(lab)
    return images, masks, arrays


def dataset(files, **kwargs) -> NiftiDataset:
    images, masks, _ = files
    options = dict(batch_size=2, patch_size=PATCH, patches_per_volume=3, seed=0)
    options.update(kwargs)
    return NiftiDataset(images, masks, **options)


def epoch(ds) -> list:
    return [ds[i] for i in range(len(ds))]


def reference_patch(array: np.ndarray, start, patch=PATCH) -> np.ndarray:
    """The window of ``array`` at ``start``, zero outside (NumPy, by padding)."""
    pad = [(patch[a], patch[a]) for a in range(3)]
    padded = np.pad(array, pad)
    return padded[tuple(slice(s + p, s + 2 * p) for s, p in zip(start, patch, strict=True))]


@pytest.mark.parametrize("cache", [None, "memory", "dir"])
def test_image_mask_and_plan_agree_on_every_window(own_masks, cache, tmp_path) -> None:
    ds = dataset(
        own_masks,
        label_probabilities={0: 1, 1: 1, 2: 1},
        cache=str(tmp_path / "c") if cache == "dir" else cache,
        shuffle=True,
    )
    arrays = own_masks[2]
    assert len(ds) == int(np.ceil(len(SHAPES) * 3 / 2))
    for _ in range(2):
        plan = ds.patches.plan(ds)
        assert [len(b) for b in plan] == [2] * len(ds)
        for batch, windows in zip(epoch(ds), plan, strict=True):
            x, y = batch
            assert x.shape == (2, *PATCH, 1) and x.dtype == np.float32
            assert y.shape == (2, *PATCH, 1) and y.dtype == np.int32
            np.testing.assert_array_equal(x, y.astype(np.float32))  # the same window
            for i, patch in enumerate(windows):
                expected = reference_patch(arrays[patch.subject], patch.start)
                np.testing.assert_array_equal(y[i, ..., 0], expected)
                offset = np.subtract(patch.voxel, patch.start)
                assert y[(i, *offset, 0)] == patch.label  # centred on a voxel of its class
        ds.on_epoch_end()


def test_patches_at_a_voxel_spacing(own_masks) -> None:
    # resampled on read to 2 mm along x (label maps per label): windows on the new grid
    ds = dataset(own_masks, spacing=(2.0, 1.0, 1.0), label_probabilities={1: 1, 2: 1})
    arrays, mask = ds._sample(0)
    assert arrays[0].shape[:3] == ((SHAPES[0][0] + 1) // 2, *SHAPES[0][1:])
    for (x, y), windows in zip(epoch(ds), ds.patches.plan(ds), strict=True):
        assert x.shape == (2, *PATCH, 1)
        for i, patch in enumerate(windows):
            offset = np.subtract(patch.voxel, patch.start)
            assert y[(i, *offset, 0)] == patch.label


def test_a_volume_smaller_than_the_patch_is_centred_and_zero_padded(own_masks) -> None:
    ds = dataset(own_masks, patches_per_volume=4)
    small = SHAPES.index((9, 28, 25))
    windows = [p for batch in ds.patches.plan(ds) for p in batch if p.subject == small]
    assert windows and all(p.start[0] == -((12 - 9) // 2) for p in windows)
    assert all(0 <= p.start[1] <= 28 - 12 and 0 <= p.start[2] <= 25 - 12 for p in windows)


def test_class_fractions_follow_the_weights_among_the_classes_present(tmp_path) -> None:
    lab = np.zeros((40, 40, 40), np.int16)
    lab[5:15, 5:15, 5:15] = 1
    lab[30:32, 30:32, 30:32] = 2  # 8 voxels
    without_2 = lab.copy()
    without_2[lab == 2] = 0
    images = [
        write(tmp_path / "a.nii.gz", lab.astype(np.float32)),
        write(tmp_path / "b.nii.gz", without_2.astype(np.float32)),
    ]
    masks = [write(tmp_path / "la.nii.gz", lab), write(tmp_path / "lb.nii.gz", without_2)]
    k = 1500
    ds = NiftiDataset(
        images,
        masks,
        batch_size=10,
        patch_size=PATCH,
        patches_per_volume=k,
        label_probabilities={0: 1.0, 1: 2.0, 2: 5.0},
        seed=3,
    )
    counts = {0: collections.Counter(), 1: collections.Counter()}
    for batch in ds.patches.plan(ds):
        for patch in batch:
            counts[patch.subject][patch.label] += 1
    # subject 0 holds the three classes: 1/8, 2/8, 5/8
    for label, share in {0: 1 / 8, 1: 2 / 8, 2: 5 / 8}.items():
        assert abs(counts[0][label] / k - share) < 4 * np.sqrt(share * (1 - share) / k)
    # subject 1 lacks class 2: its weight is dropped and the others renormalized
    assert counts[1][2] == 0
    assert abs(counts[1][1] / k - 2 / 3) < 4 * np.sqrt(2 / 9 / k)
    # the patches really hold their class: the rare class at the centre voxel or,
    # clamped at the edge, inside the window
    x, y = ds[0]
    assert (y == 2).any()


def test_uniform_windows_cover_every_position(own_masks) -> None:
    ds = dataset(own_masks, patches_per_volume=400, batch_size=50)
    starts = collections.defaultdict(list)
    for batch in ds.patches.plan(ds):
        for p in batch:
            assert p.label is None and p.voxel is None
            starts[p.subject].append(p.start)
    for subject, shape in enumerate(SHAPES):
        s = np.asarray(starts[subject])
        for axis in range(3):
            span = shape[axis] - PATCH[axis]
            if span < 0:
                continue
            values = np.bincount(s[:, axis], minlength=span + 1)
            assert s[:, axis].min() == 0 and s[:, axis].max() == span
            assert len(values) == span + 1 and values.min() > 0  # every position drawn
            # uniform: each of the span + 1 positions about 400 / (span + 1) times
            assert abs(s[:, axis].mean() - span / 2) < 0.15 * (span + 1)


def test_reproducible_with_a_seed_and_reshuffled_every_epoch(own_masks) -> None:
    def two_epochs(seed):
        ds = dataset(own_masks, seed=seed, shuffle=True, label_probabilities=[1, 1, 1])
        first = epoch(ds)
        ds.on_epoch_end()
        return first, epoch(ds)

    a0, a1 = two_epochs(7)
    b0, b1 = two_epochs(7)
    c0, _ = two_epochs(8)
    for one, two in zip(a0 + a1, b0 + b1, strict=True):
        np.testing.assert_array_equal(one[0], two[0])
        np.testing.assert_array_equal(one[1], two[1])
    assert not all(np.array_equal(u[0], v[0]) for u, v in zip(a0, a1, strict=True))
    assert not all(np.array_equal(u[0], v[0]) for u, v in zip(a0, c0, strict=True))


def test_requests_follow_the_stream_whatever_the_index(own_masks) -> None:
    ds, ref = dataset(own_masks), dataset(own_masks)
    expected = [ref.patches.batch_at(ref, i) for i in range(len(ref))]
    got = [ds[i] for i in reversed(range(len(ds)))]  # fit shuffles the indices of a PyDataset
    for one, two in zip(got, expected, strict=True):
        np.testing.assert_array_equal(one[0], two[0])
    # a request past the end of the stream starts it again
    np.testing.assert_array_equal(ds[0][0], expected[0][0])


def test_the_queue_mixes_subjects_of_one_window_only(own_masks) -> None:
    # 2 subjects a window (queue_length 6 = 2 subjects x 3 patches), batches of 2
    ds = dataset(own_masks, queue_length=6, shuffle=True, seed=1)
    pairs, windows = ds.patches.stream(ds)
    order = ds.order
    assert ds.patches.window == 2
    np.testing.assert_array_equal(windows[order], [0, 0, 1, 1])
    first = {int(s) for s in pairs[:6, 0]}
    assert first == {int(order[0]), int(order[1])}
    # each subject gives patches_per_volume patches, each once
    assert collections.Counter(map(tuple, pairs.tolist())) == collections.Counter(
        (s, j) for s in range(4) for j in range(3)
    )
    # batches mix subjects: not k crops of one scan
    subjects = [tuple(p.subject for p in batch) for batch in ds.patches.plan(ds)]
    assert any(len(set(s)) > 1 for s in subjects)


def test_a_scan_is_decoded_once_per_epoch_and_class_voxels_found_once(
    own_masks, monkeypatch, tmp_path
) -> None:
    loads = collections.Counter()
    real_load, real_voxels = kdata.load_nifti, kpatches.class_voxels
    found = collections.Counter()

    def load(path, **kwargs):
        loads[os.fspath(path)] += 1
        return real_load(path, **kwargs)

    def voxels(mask, label, seed):
        found[(mask.shape, label)] += 1
        return real_voxels(mask, label, seed)

    monkeypatch.setattr(kdata, "load_nifti", load)
    monkeypatch.setattr(kpatches, "class_voxels", voxels)
    ds = dataset(own_masks, label_probabilities={1: 1, 2: 1}, queue_length=6, shuffle=True)
    for e in range(2):
        epoch(ds)
        ds.on_epoch_end()
        assert sorted(loads.values()) == [e + 1] * 8  # every image and label map, once an epoch
    assert sorted(found.values()) == [1] * 8  # 4 subjects x 2 classes, the first epoch only
    # a directory cache keeps the class voxels for later datasets
    cache = str(tmp_path / "cache")
    epoch(dataset(own_masks, label_probabilities={1: 1, 2: 1}, cache=cache))
    found.clear()
    loads.clear()
    epoch(dataset(own_masks, label_probabilities={1: 1, 2: 1}, cache=cache))
    assert not found and not loads


def test_stored_class_voxels_are_checked_before_use(own_masks, tmp_path) -> None:
    cache = str(tmp_path / "cache")
    options = dict(label_probabilities={1: 1, 2: 1}, cache=cache)
    first = dataset(own_masks, **options)
    epoch(first)
    stored = sorted(Path(cache).glob("*.class1.npz"))
    assert len(stored) == len(SHAPES)
    # voxels that do not hold their class (a damaged or forged entry) are found again
    with np.load(stored[0]) as entry:
        fingerprint = entry["fingerprint"]
    np.savez(stored[0], voxels=np.zeros((5, 3), np.uint16), fingerprint=fingerprint)
    stored[1].write_bytes(b"not a zip file")
    second = dataset(own_masks, **options)
    for batch in second.patches.plan(second):
        for patch in batch:
            offset = np.subtract(patch.voxel, patch.start)
            assert own_masks[2][patch.subject][patch.voxel] == patch.label
            assert (offset >= 0).all()
    voxels = second.patches._voxels
    for subject, lab in enumerate(own_masks[2]):
        np.testing.assert_array_equal(
            np.sort(voxels[subject][1], axis=0), np.sort(np.argwhere(lab == 1), axis=0)
        )


@pytest.mark.parametrize("layout", ["C", "F", "flipped"])
def test_class_voxels_in_any_memory_layout(layout: str) -> None:
    mask = label_map((30, 24, 20), 0).astype(np.int32)
    view = {
        "C": mask,
        "F": np.asfortranarray(mask),
        "flipped": np.asfortranarray(mask)[::-1, :, ::-1],
    }
    array = view[layout]
    for label in (1, 2):
        found = kpatches.class_voxels(array, label, seed=0).astype(np.int64)
        found = found[np.lexsort(found.T[::-1])]  # in the order np.argwhere lists them
        np.testing.assert_array_equal(found, np.argwhere(array == label))


def test_class_voxels_subsample_a_large_class_uniformly() -> None:
    mask = np.zeros((64, 64, 64), np.int32)
    mask[:, :, :32] = 1  # half the volume: subsampled by rejection
    mask[3, 4, 5] = 2
    one = kpatches.class_voxels(mask, 1, seed=0)
    assert one.shape == (kpatches.MAX_CLASS_VOXELS, 3) and one.dtype == np.uint16
    assert len(np.unique(one, axis=0)) == len(one)
    assert (mask[tuple(one.T.astype(np.intp))] == 1).all()
    assert abs(one[:, 2].astype(float).mean() - 15.5) < 0.5  # uniform over z in [0, 32)
    np.testing.assert_array_equal(kpatches.class_voxels(mask, 2, seed=0), [[3, 4, 5]])
    assert kpatches.class_voxels(mask, 3, seed=0).shape == (0, 3)
    np.testing.assert_array_equal(one, kpatches.class_voxels(mask, 1, seed=0))  # seeded


@pytest.mark.parametrize("multiprocessing", [False, True])
def test_workers_give_each_batch_of_the_stream_once(own_masks, multiprocessing, tmp_path) -> None:
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    options = dict(label_probabilities={0: 1, 1: 1, 2: 1}, shuffle=True, seed=5)
    if multiprocessing:
        options["cache"] = str(tmp_path / "cache")
    ref = dataset(own_masks, **options)
    ds = dataset(own_masks, workers=2, use_multiprocessing=multiprocessing, **options)
    for _ in range(2):
        expected = sorted(ref.patches.batch_at(ref, i)[0].tobytes() for i in range(len(ref)))
        adapter = PyDatasetAdapter(ds, shuffle=True)
        adapter.on_epoch_begin()
        got = sorted(x.tobytes() for x, _ in adapter.get_numpy_iterator())
        adapter.on_epoch_end()
        ref.on_epoch_end()
        assert got == expected


def test_bad_arguments(own_masks) -> None:
    images, masks, _ = own_masks
    with pytest.raises(ValueError, match="patch_size"):
        NiftiDataset(images, masks, patch_size=(12, 12))
    with pytest.raises(ValueError, match="patch_size"):
        NiftiDataset(images, masks, patch_size=(12, 0, 12))
    with pytest.raises(ValueError, match="patches_per_volume"):
        NiftiDataset(images, masks, patch_size=PATCH, patches_per_volume=0)
    with pytest.raises(ValueError, match="need patch_size"):
        NiftiDataset(images, masks, label_probabilities={1: 1})
    with pytest.raises(ValueError, match="not both"):
        NiftiDataset(images, masks, patch_size=PATCH, shape=(8, 8, 8))
    with pytest.raises(ValueError, match="needs label maps"):
        NiftiDataset(images, patch_size=PATCH, label_probabilities={1: 1})
    with pytest.raises(ValueError, match=r"label_probabilities\[1\] must be >= 0"):
        NiftiDataset(images, masks, patch_size=PATCH, label_probabilities={1: -1})
    with pytest.raises(ValueError, match="positive weight"):
        NiftiDataset(images, masks, patch_size=PATCH, label_probabilities={1: 0})
    with pytest.raises(ValueError, match="queue_length"):
        NiftiDataset(images, masks, patch_size=PATCH, queue_length=0)


_RSS_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time
    from keras_nii.data import NiftiDataset

    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def peak_growth(ds):
        ds[0]  # imports and first allocations out of the way
        ds.on_epoch_end()
        base, peak, done = rss(), [0], threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        batches = [ds[i] for i in range(len(ds))]  # kept: what the queue holds is measured
        del batches
        done.set()
        watcher.join()
        return max(peak[0], rss()) - base

    images, masks = sys.argv[1].split(","), sys.argv[2].split(",")
    for cache in (None, "memory"):
        ds = NiftiDataset(images, masks, batch_size=2, patch_size=(16, 16, 16),
                          patches_per_volume=2, queue_length=4, shuffle=True, seed=0,
                          cache=cache)
        print(cache, peak_growth(ds))
    """
)


def test_peak_memory_is_bounded_by_the_queue_not_the_dataset(tmp_path) -> None:
    # 16 subjects of 96 x 96 x 64 (2.4 MB float32 + 2.4 MB int32 each, 75 MB in all);
    # the queue holds 2 subjects' patches, the feed at most a few scans at a time
    shape = (96, 96, 64)
    images, masks = [], []
    for i in range(16):
        lab = label_map(shape, i)
        images.append(write(tmp_path / f"i{i}.nii", lab.astype(np.float32) + i))
        masks.append(write(tmp_path / f"l{i}.nii", lab.astype(np.int32)))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env["KERAS_BACKEND"] = "numpy"  # the feed needs no framework: the quickest import
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, ",".join(images), ",".join(masks)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    growth = dict(line.split() for line in proc.stdout.splitlines()[-2:])
    scan = np.prod(shape) * 4 * 2  # one subject's image + label map
    dataset_bytes = 16 * scan
    # the feed holds a couple of scans at a time, not the dataset
    assert int(growth["None"]) < 4 * scan, (growth, scan)
    # the measure sees a feed that keeps every scan: a memory cache
    assert int(growth["memory"]) > 0.8 * dataset_bytes, (growth, dataset_bytes)
