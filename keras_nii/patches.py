"""Patches in the feed: the windows :class:`~keras_nii.data.NiftiDataset` cuts from its scans.

Whole CT scans (512 x 512 x 100-600 voxels, every one a different size) do not
fit a GPU batch. With ``patch_size=`` a :class:`~keras_nii.data.NiftiDataset`
yields fixed-size patches instead: every epoch, each subject gives
``patches_per_volume`` windows, cut by the same window from its image, every
modality and its label map. This module holds the sampler and the queue.

Sampling
--------
- Uniform (the default): every position of the patch inside the volume is
  equally likely, along each axis independently.
- Class-balanced, with ``label_probabilities={label: weight}``: for each
  patch a class is drawn by weight among the weighted classes the subject
  holds (weights renormalized over those present; a subject that holds none of
  them gets uniform patches), then a voxel of that class, uniformly; the patch
  is centred on it (the voxel at index ``patch_size // 2``) and shifted inside
  the volume where the centre is too close to an edge. Along an axis where the
  volume is smaller than the patch, the volume is centred in the patch and
  zero padded (the :func:`~keras_nii.data.center_crop_or_pad` convention).

The voxels of each class are found once per subject (on the grid the dataset
reads: after reorientation and ``spacing=``) and kept: in memory, and with
``cache=DIR`` as small ``.npz`` files beside the label map's entry (used only
while the label map's fingerprint matches and every stored voxel holds its
class), so that later runs and worker processes do not scan the label map
again. A class of more
than :data:`MAX_CLASS_VOXELS` voxels keeps a uniform random subset of that
many (nnU-Net keeps 10,000 per class): centres are drawn from the subset.

Other libraries' settings, in these terms:

- nnU-Net's "a third of the patches hold foreground" (its
  ``oversample_foreground_percent = 0.33``: one patch in three centred on a
  voxel of a foreground class, chosen uniformly among the classes present,
  the others anywhere) is, for labels 0 (background), 1 and 2,
  ``label_probabilities={0: 2/3, 1: 1/6, 2: 1/6}``; the two thirds are
  centred on background voxels rather than anywhere, which on CT, where
  background is most of the volume, is nearly the same.
- MONAI's ``RandCropByLabelClasses(ratios=[r0, r1, r2], num_classes=3,
  num_samples=k)`` is ``label_probabilities={0: r0, 1: r1, 2: r2}`` with
  ``patches_per_volume=k`` (MONAI also drops the classes a volume lacks and
  renormalizes).

The queue
---------
As TorchIO's ``Queue``, patches of several subjects are mixed in every batch:
the epoch's subjects (in a new random order every epoch with
``shuffle=True``) are taken ``queue_length // patches_per_volume`` at a time,
and the patches of those subjects are shuffled together before they are cut
into batches. The epoch's stream of patches is a function of ``seed`` and the
epoch number only, so it is the same with any number of workers.

The dataset is then a stream: each request returns the next batch of the
epoch's stream, whatever its index (as TorchIO's ``Queue`` does), so that the
order in which Keras asks for batches (``fit`` shuffles the batch indices of
a ``PyDataset``) does not matter; a request past the end starts the epoch's
stream again (Keras's TensorFlow adapter reads two batches to learn their
shapes before training). :meth:`PatchQueue.batch_at` returns any batch by its
position, without moving the stream.

Memory and I/O: the first patch needed from a subject loads the subject and
cuts all of its patches of the epoch at once; the volume is then dropped, so a
scan is decoded once per epoch (with a cache: once) and the feed holds the
patches of at most two queue windows, not the dataset. With a directory cache
the volumes are memory-mapped and a patch reads only its window. Threads
(``workers > 1``) share one queue; with ``use_multiprocessing=True`` the
stream position is shared between the worker processes, and each process
keeps its own patches (a scan may then be loaded once by each process that
cuts one of its patches: use ``cache=DIR`` with processes).
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.context
import numbers
import os
import threading
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MAX_CLASS_VOXELS", "Patch", "PatchQueue", "draw_patches", "cut_patch"]

#: voxels kept per class and subject to draw patch centres from (a uniform subset of larger classes)
MAX_CLASS_VOXELS = 10_000
# a class holding at least this fraction of the volume is subsampled by rejection
_COMMON_FRACTION = 0.05


@dataclass(frozen=True)
class Patch:
    """One window of the stream: which subject, where, and why.

    ``start`` is the window's first voxel (negative along an axis where the
    volume is smaller than the patch and is padded); ``label`` is the class
    the patch was centred on and ``voxel`` that voxel, or ``None`` for a
    uniform patch.
    """

    subject: int
    start: tuple[int, int, int]
    label: int | None = None
    voxel: tuple[int, int, int] | None = None


def _check_patch_size(patch_size: Any) -> tuple[int, int, int]:
    if isinstance(patch_size, (str, bytes)) or not isinstance(patch_size, (Sequence, np.ndarray)):
        raise ValueError(f"patch_size must be (x, y, z) positive integers, got {patch_size!r}")
    if len(patch_size) != 3 or any(
        isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1 for p in patch_size
    ):
        raise ValueError(f"patch_size must be (x, y, z) positive integers, got {patch_size!r}")
    return tuple(int(p) for p in patch_size)


def check_label_probabilities(value: Any) -> dict[int, float] | None:
    """``{label: weight}`` from a mapping or a sequence (indexed by label), checked."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)):
        items = list(enumerate(value))
    else:
        raise ValueError(
            f"label_probabilities must be None, a {{label: weight}} mapping or a sequence of "
            f"weights indexed by label, got {value!r}"
        )
    out: dict[int, float] = {}
    for label, weight in items:
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise ValueError(f"label_probabilities: labels must be integers, got {label!r}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise ValueError(f"label_probabilities[{label}] must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"label_probabilities[{label}] must be >= 0, got {weight!r}")
        if weight > 0:
            out[int(label)] = float(weight)
    if not out:
        raise ValueError(f"label_probabilities needs a positive weight, got {value!r}")
    return out


def _window(start: int, size: int, patch: int) -> tuple[slice, slice]:
    """(source, destination) slices of one axis for a window at ``start``."""
    lo, hi = max(start, 0), min(start + patch, size)
    return slice(lo, hi), slice(lo - start, hi - start)


def padded(start: Sequence[int], shape: Sequence[int], patch: Sequence[int]) -> bool:
    """Whether the window at ``start`` reaches outside a volume of ``shape``."""
    return any(s < 0 or s + p > n for s, n, p in zip(start, shape, patch, strict=True))


def cut_patch(out: np.ndarray, arrays: Sequence[np.ndarray], start: Sequence[int]) -> None:
    """Copy the window at ``start`` of ``arrays`` (``(x, y, z, c)`` each, any
    layout; their channels in order) into ``out`` ``(px, py, pz, sum c)``.

    The part of ``out`` outside the volume is left as it is (zeros, for an
    ``out`` from ``np.zeros``).
    """
    from keras_nii.data import _copy_reordered

    shape, patch = arrays[0].shape[:3], out.shape[:3]
    windows = [_window(int(s), n, p) for s, n, p in zip(start, shape, patch, strict=True)]
    source = tuple(w[0] for w in windows)
    destination = tuple(w[1] for w in windows)
    channel = 0
    for array in arrays:
        channels = slice(channel, channel + array.shape[3])
        _copy_reordered(out[(*destination, channels)], array[source])
        channel = channels.stop


def class_voxels(mask: np.ndarray, label: int, seed: int) -> np.ndarray:
    """The voxels ``(n, 3)`` of ``label`` in ``mask`` ``(x, y, z[, 1])``, at most
    :data:`MAX_CLASS_VOXELS` of them (a uniform random subset of a larger class),
    as uint16 (int32 for a volume with an axis over 65,535)."""
    mask = mask.reshape(mask.shape[:3])
    dtype = np.uint16 if max(mask.shape) <= np.iinfo(np.uint16).max else np.int32
    rng = np.random.default_rng([seed, zlib.crc32(str(label).encode())])
    probes = 4 * MAX_CLASS_VOXELS
    if mask.size > probes:
        # a common class is subsampled by rejection, without listing all of its voxels
        draw = rng.integers(0, mask.shape, size=(probes, 3))
        hits = draw[mask[draw[:, 0], draw[:, 1], draw[:, 2]] == label]
        if len(hits) >= _COMMON_FRACTION * probes:
            found = [hits]
            while sum(len(f) for f in found) < 2 * MAX_CLASS_VOXELS:
                draw = rng.integers(0, mask.shape, size=(probes, 3))
                found.append(draw[mask[draw[:, 0], draw[:, 1], draw[:, 2]] == label])
            # distinct voxels (by flat index: a 1D unique), so that the subset is
            # uniform over the class
            index = np.unique(np.ravel_multi_index(tuple(np.concatenate(found).T), mask.shape))
            if len(index) > MAX_CLASS_VOXELS:
                index = np.sort(rng.choice(index, MAX_CLASS_VOXELS, replace=False))
            return np.stack(np.unravel_index(index, mask.shape), axis=-1).astype(dtype)
    # a rare class: its voxels listed from the flat array in memory order (a 1D
    # search is several times quicker than np.argwhere's), only those kept unravelled
    order = "F" if mask.flags.f_contiguous and not mask.flags.c_contiguous else "C"
    flat = mask.ravel(order=order) if mask.flags.forc else np.ascontiguousarray(mask).ravel()
    index = np.flatnonzero(flat == label)
    if len(index) > MAX_CLASS_VOXELS:
        index = np.sort(rng.choice(index, MAX_CLASS_VOXELS, replace=False))
    return np.stack(np.unravel_index(index, mask.shape, order=order), axis=-1).astype(dtype)


def draw_patches(
    rng: np.random.Generator,
    subject: int,
    shape: Sequence[int],
    patch_size: Sequence[int],
    count: int,
    label_probabilities: dict[int, float] | None = None,
    voxels: Mapping[int, np.ndarray] | None = None,
) -> list[Patch]:
    """``count`` windows of ``patch_size`` in a volume of spatial ``shape``.

    Uniform without ``label_probabilities``; else a class by weight among
    those with voxels in ``voxels`` (``{label: (n, 3) voxels}``), a voxel of
    it, and the window centred on it, kept inside the volume (see the module).
    """
    shape = np.asarray(shape[:3], np.int64)
    patch = np.asarray(patch_size, np.int64)
    span = shape - patch
    # an axis shorter than the patch: the volume centred in the patch
    fixed = -((-span) // 2)
    present = []
    if label_probabilities is not None:
        present = [c for c in label_probabilities if voxels is not None and len(voxels.get(c, ()))]
    if not present:
        starts = rng.integers(0, np.maximum(span, 0) + 1, size=(count, 3))
        starts = np.where(span >= 0, starts, fixed)
        return [Patch(subject, tuple(int(v) for v in s)) for s in starts]
    weights = np.asarray([label_probabilities[c] for c in present], np.float64)
    classes = rng.choice(len(present), size=count, p=weights / weights.sum())
    out = []
    for c in classes:
        label = present[int(c)]
        candidates = voxels[label]
        voxel = candidates[rng.integers(len(candidates))].astype(np.int64)
        start = np.clip(voxel - patch // 2, 0, np.maximum(span, 0))
        start = np.where(span >= 0, start, fixed)
        out.append(
            Patch(subject, tuple(int(v) for v in start), label, tuple(int(v) for v in voxel))
        )
    return out


class _Entry:
    """The patches of one subject in one epoch, built once by the first request."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.patches: list[Patch] = []
        self.images: np.ndarray | None = None  # (k, px, py, pz, c), cut at load
        self.masks: np.ndarray | None = None
        self.sources: tuple[list[np.ndarray], np.ndarray | None] | None = None  # cached volumes
        self.shape: tuple[int, ...] = ()  # the subject's spatial shape
        self.channels = 0
        self.used = 0


class PatchQueue:
    """The patch stream of a :class:`~keras_nii.data.NiftiDataset` (see the module).

    Built by the dataset from its ``patch_size``, ``patches_per_volume``,
    ``label_probabilities`` and ``queue_length`` arguments.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        patches_per_volume: int,
        label_probabilities: Any,
        queue_length: int | None,
        batch_size: int,
        seed: int | None,
        shared: bool,
    ) -> None:
        self.patch_size = _check_patch_size(patch_size)
        k = patches_per_volume
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"patches_per_volume must be a positive integer, got {k!r}")
        self.patches_per_volume = int(k)
        self.label_probabilities = check_label_probabilities(label_probabilities)
        if queue_length is None:
            queue_length = max(batch_size, 4) * self.patches_per_volume
        if isinstance(queue_length, bool) or not isinstance(queue_length, numbers.Integral):
            raise ValueError(f"queue_length must be a positive integer, got {queue_length!r}")
        if queue_length < 1:
            raise ValueError(f"queue_length must be a positive integer, got {queue_length!r}")
        self.queue_length = int(queue_length)
        #: subjects whose patches are mixed together
        self.window = max(1, self.queue_length // self.patches_per_volume)
        self.batch_size = int(batch_size)
        # one base seed for every process: an unseeded dataset draws it once, here
        self.seed = int(np.random.SeedSequence().entropy) if seed is None else int(seed)
        self.seed %= 2**64
        self.epoch = 0
        self._shared = multiprocessing.Value("q", 0) if shared else None
        self._reset_state()

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._position = 0
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._voxels: dict[int, dict[int, np.ndarray]] = {}
        self._streams: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_entries", "_streams"):
            del state[name]
        # a shared counter travels to the pool's processes only (it cannot be pickled otherwise)
        if multiprocessing.context.get_spawning_popen() is None:
            state["_shared"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        voxels = state.pop("_voxels", {})
        position = state.pop("_position", 0)
        self.__dict__.update(state)
        self._reset_state()
        self._voxels, self._position = voxels, position

    # ------------------------------------------------------------------ the stream

    def num_batches(self, subjects: int) -> int:
        """Batches per epoch: ``ceil(subjects * patches_per_volume / batch_size)``."""
        return math.ceil(subjects * self.patches_per_volume / self.batch_size)

    def stream(self, dataset: Any, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(pairs, windows): the epoch's patches in stream order as ``(subject,
        j)`` rows (the ``j``-th patch of the subject), and the queue window of
        each subject (``-1`` for a subject of another process's shard).

        The subjects come in the dataset's order of the epoch (reshuffled
        every epoch with ``shuffle=True``; this process's share when sharded).
        """
        epoch = self.epoch if epoch is None else epoch
        cached = self._streams.get(epoch)
        if cached is not None:
            return cached
        rng = np.random.default_rng([self.seed, epoch, 0])
        k = self.patches_per_volume
        order = np.asarray(dataset._order)
        windows = np.full(len(dataset.images), -1, np.int64)
        parts = []
        for w, begin in enumerate(range(0, len(order), self.window)):
            group = order[begin : begin + self.window]
            windows[group] = w
            pairs = np.stack(np.meshgrid(group, np.arange(k), indexing="ij"), -1).reshape(-1, 2)
            parts.append(pairs[rng.permutation(len(pairs))])
        result = (np.concatenate(parts), windows)
        with self._lock:
            self._streams = {epoch: result}
        return result

    def next_position(self, dataset: Any) -> int:
        """Take the next position of the epoch's stream (shared between workers)."""
        if self._shared is not None:
            with self._shared.get_lock():
                position = self._shared.value
                self._shared.value = position + 1
        else:
            with self._lock:
                position = self._position
                self._position += 1
        return position % self.num_batches(len(dataset._order))

    def next_epoch(self) -> None:
        """Start the next epoch's stream (called by the dataset's ``on_epoch_end``)."""
        with self._lock:
            self.epoch += 1
            self._position = 0
            self._entries.clear()
        if self._shared is not None:
            with self._shared.get_lock():
                self._shared.value = 0

    def plan(self, dataset: Any, epoch: int | None = None) -> list[list[Patch]]:
        """The windows of every batch of ``epoch`` (default: the current one).

        Loads every subject of the epoch (for its shape and class voxels); the
        stream does not move.
        """
        epoch = self.epoch if epoch is None else epoch
        pairs, _ = self.stream(dataset, epoch)
        drawn = {int(s): self._draw(dataset, epoch, int(s)) for s in np.unique(pairs[:, 0])}
        patches = [drawn[int(s)][int(j)] for s, j in pairs]
        return [patches[i : i + self.batch_size] for i in range(0, len(patches), self.batch_size)]

    # ------------------------------------------------------------------ batches

    def next_batch(self, dataset: Any) -> Any:
        """The next batch of the stream."""
        return self.batch_at(dataset, self.next_position(dataset))

    def batch_at(self, dataset: Any, position: int, epoch: int | None = None) -> Any:
        """The batch at ``position`` of the epoch's stream: ``x``, or ``(x, y)``."""
        epoch = self.epoch if epoch is None else epoch
        pairs, windows = self.stream(dataset, epoch)
        rows = pairs[position * self.batch_size : (position + 1) * self.batch_size]
        subjects = rows[:, 0]
        entries = [self._entry(dataset, epoch, int(s)) for s in subjects]
        patches = [e.patches[int(j)] for e, (_, j) in zip(entries, rows, strict=True)]
        # cached volumes are cut here: zeros first where a window reaches outside
        pad = any(
            e.sources is not None and padded(p.start, e.shape, self.patch_size)
            for e, p in zip(entries, patches, strict=True)
        )
        alloc = np.zeros if pad else np.empty
        shape = (len(rows), *self.patch_size)
        x = alloc((*shape, entries[0].channels), np.float32)
        masks = dataset.label_kind == "masks"
        y = alloc((*shape, 1), np.int32) if masks else None
        for i, (entry, patch, (_, j)) in enumerate(zip(entries, patches, rows, strict=True)):
            if entry.sources is None:  # cut when the subject was loaded
                x[i] = entry.images[j]
                if masks:
                    y[i] = entry.masks[j]
            else:  # memory or memory-mapped volumes: read the window only
                arrays, mask = entry.sources
                cut_patch(x[i], arrays, patch.start)
                if masks:
                    cut_patch(y[i], [mask], patch.start)
        self._release(epoch, subjects, windows)
        if dataset.label_kind == "none":
            return x
        if masks:
            return x, y
        return x, dataset.labels[subjects]

    def _release(self, epoch: int, subjects: np.ndarray, windows: np.ndarray) -> None:
        """Count the patches taken; drop the subjects all of whose patches were
        taken, and those of queue windows before the previous one."""
        window = windows[subjects].min()
        with self._lock:
            for s in subjects:
                entry = self._entries.get((epoch, int(s)))
                if entry is not None:
                    entry.used += 1
                    if entry.used >= self.patches_per_volume:
                        del self._entries[(epoch, int(s))]
            stale = [
                key for key in self._entries if key[0] != epoch or windows[key[1]] < window - 1
            ]
            for key in stale:
                del self._entries[key]

    def _entry(self, dataset: Any, epoch: int, subject: int) -> _Entry:
        key = (epoch, subject)
        with self._lock:
            entry = self._entries.get(key)
            build = entry is None
            if build:
                entry = self._entries[key] = _Entry()
        if build:
            try:
                self._build(dataset, epoch, subject, entry)
            except BaseException as err:
                entry.error = err
                with self._lock:
                    self._entries.pop(key, None)
                raise
            finally:
                entry.ready.set()
        else:
            entry.ready.wait()
            if entry.error is not None:
                raise entry.error
        return entry

    def _build(self, dataset: Any, epoch: int, subject: int, entry: _Entry) -> None:
        arrays, mask = dataset._sample(subject)
        entry.patches = self._draw(dataset, epoch, subject, arrays, mask)
        entry.shape = arrays[0].shape[:3]
        entry.channels = sum(a.shape[3] for a in arrays)
        if dataset.cache is not None:
            # the volumes are in memory or memory-mapped: cut each patch when it is asked for
            entry.sources = (arrays, mask)
            return
        # decoded for this epoch: cut all of the subject's patches now, then drop the volume
        k, channels = len(entry.patches), entry.channels
        pad = any(padded(p.start, entry.shape, self.patch_size) for p in entry.patches)
        alloc = np.zeros if pad else np.empty
        entry.images = alloc((k, *self.patch_size, channels), np.float32)
        for image, patch in zip(entry.images, entry.patches, strict=True):
            cut_patch(image, arrays, patch.start)
        if mask is not None:
            entry.masks = alloc((k, *self.patch_size, 1), np.int32)
            for out, patch in zip(entry.masks, entry.patches, strict=True):
                cut_patch(out, [mask], patch.start)

    def _draw(
        self,
        dataset: Any,
        epoch: int,
        subject: int,
        arrays: list[np.ndarray] | None = None,
        mask: np.ndarray | None = None,
    ) -> list[Patch]:
        """The subject's windows of ``epoch`` (a function of the seed, the epoch and the subject)."""
        if arrays is None:
            arrays, mask = dataset._sample(subject)
        voxels = None
        if self.label_probabilities is not None:
            voxels = self.class_voxels(dataset, subject, mask)
        rng = np.random.default_rng([self.seed, epoch, 1, subject])
        return draw_patches(
            rng,
            subject,
            arrays[0].shape[:3],
            self.patch_size,
            self.patches_per_volume,
            self.label_probabilities,
            voxels,
        )

    def class_voxels(self, dataset: Any, subject: int, mask: np.ndarray) -> dict[int, np.ndarray]:
        """``{label: voxels}`` of the weighted classes of one subject, found once (see the module)."""
        known = self._voxels.get(subject)
        if known is not None and all(c in known for c in self.label_probabilities):
            return known
        known = dict(known or {})
        path = dataset.labels[subject]
        seed = zlib.crc32(os.path.abspath(path).encode())
        stored = _StoredVoxels.of(dataset, path)
        for label in self.label_probabilities:
            if label in known:
                continue
            voxels = None if stored is None else stored.get(label, mask)
            if voxels is None:
                voxels = class_voxels(mask, label, seed)
                if stored is not None:
                    stored.put(label, voxels)
            known[label] = voxels
        with self._lock:
            self._voxels[subject] = known
        return known


class _StoredVoxels:
    """The class voxels of a label map in a directory cache, beside its entry.

    One ``.npz`` per class holds the voxels and the fingerprint of the label
    map they were found in; an entry is used only if the fingerprint matches,
    its voxels lie inside the mask and every one of them holds the class.
    """

    def __init__(self, base: str, fingerprint: tuple) -> None:
        self.base, self.fingerprint = base, repr(fingerprint)

    @classmethod
    def of(cls, dataset: Any, path: str) -> _StoredVoxels | None:
        directory = getattr(dataset, "_directory", None)
        if directory is None or "://" in path:
            return None
        from keras_nii.cache import source_fingerprint

        try:
            fingerprint = source_fingerprint(path)
        except OSError:
            return None
        settings = (dataset.canonical, "int32", dataset.spacing)
        return cls(directory.base(path, settings), fingerprint)

    def get(self, label: int, mask: np.ndarray) -> np.ndarray | None:
        try:
            with np.load(f"{self.base}.class{label}.npz", allow_pickle=False) as entry:
                if str(entry["fingerprint"]) != self.fingerprint:
                    return None
                voxels = entry["voxels"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        shape = np.asarray(mask.shape[:3])
        if voxels.ndim != 2 or voxels.shape[1] != 3 or voxels.dtype.kind not in "iu":
            return None
        if len(voxels) and ((voxels < 0).any() or (voxels >= shape).any()):
            return None
        index = tuple(voxels.T.astype(np.intp))
        if len(voxels) and not (mask.reshape(mask.shape[:3])[index] == label).all():
            return None
        return voxels

    def put(self, label: int, voxels: np.ndarray) -> None:
        from keras_nii.cache import _atomic_write

        def write(file: Any) -> None:
            np.savez(file, voxels=voxels, fingerprint=np.array(self.fingerprint))

        try:
            _atomic_write(f"{self.base}.class{label}.npz", write)
        except OSError:
            pass  # a read-only cache: the voxels are found again next time
