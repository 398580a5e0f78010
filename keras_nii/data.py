"""Feed NIfTI files to Keras: `NiftiDataset`, a `keras.utils.PyDataset`.

A `NiftiDataset` turns lists of files (one or several modalities per subject,
plus optional label maps or per-subject targets) into batches of
channels-last arrays ``(batch, x, y, z, channels)``. Volumes are read with
:func:`keras_nii.io.load_nifti` (RAS+ by default), optionally center
cropped / zero padded to one shape, and optionally cached in memory or as
``.npy`` files so that epochs after the first do not decode ``.nii.gz`` again.

This module uses NumPy and ``keras.utils.PyDataset`` only; the model graph
(augmentation, normalization) is the business of :mod:`keras_nii.layers`.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_nii import _pydataset_spec, remote, storage
from keras_nii.cache import DirectoryCache, MemoryCache, source_fingerprint
from keras_nii.io import NiftiError, _read_image, load_nifti
from keras_nii.sharding import Shard, check_shard, detect_shard, share
from keras_nii.spacing import check_spacing, resample_onto

__all__ = ["NiftiDataset", "center_crop_or_pad", "NIFTI_FILE_SUFFIXES"]

#: Suffixes that :meth:`NiftiDataset.from_folder` lists (case-insensitive).
NIFTI_FILE_SUFFIXES = (".nii.gz", ".nii")

# affines of modalities, and of an image and its mask, must agree this closely (mm)
_AFFINE_ATOL = 1e-4

PathLike = str | os.PathLike


def center_crop_or_pad(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Center crop and/or zero pad the first three axes of an array to ``shape``.

    Each axis is handled on its own: an axis longer than its target is cropped
    to a centered window starting at ``(size - target) // 2``; a shorter one
    is padded with zeros, ``(target - size) // 2`` before and the rest after.
    With an odd difference the extra voxel is thus cropped from, or padded at,
    the end. This is the same convention as the ``CenterCropOrPad3D`` layer,
    so an image and its mask cropped by either stay aligned.

    Args:
        array: an array of at least 3 dimensions, ``(x, y, z, ...)``.
        shape: the target ``(x, y, z)``.

    Returns:
        A new C-ordered array of shape ``(*shape, *array.shape[3:])`` and
        ``array``'s dtype.

    Example:

    >>> center_crop_or_pad(np.ones((5, 4, 3)), (3, 4, 6)).shape
    (3, 4, 6)
    """
    array = np.asarray(array)
    target = tuple(int(s) for s in shape)
    if len(target) != 3 or any(s < 1 for s in target):
        raise ValueError(f"shape must be 3 positive integers (x, y, z), got {shape!r}")
    if array.ndim < 3:
        raise ValueError(f"array must have at least 3 dimensions, got shape {array.shape}")
    source, destination, padded = _crop_or_pad_windows(array.shape[:3], target)
    out = (np.zeros if padded else np.empty)((*target, *array.shape[3:]), array.dtype)
    _copy_reordered(out[destination], array[source])
    return out


def _crop_or_pad_windows(
    size: Sequence[int], target: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...], bool]:
    """The windows of :func:`center_crop_or_pad`: ``out[destination] =
    array[source]``, the rest of ``out`` zeros; and whether anything is padded."""
    source, destination, padded = [], [], False
    for have, want in zip(size, target, strict=True):
        if have >= want:
            start = (have - want) // 2
            source.append(slice(start, start + want))
            destination.append(slice(None))
        else:
            before = (want - have) // 2
            source.append(slice(None))
            destination.append(slice(before, before + have))
            padded = True
    return tuple(source), tuple(destination), padded


#: _copy_reordered copies slabs of this many z planes ...
_SLAB = 16
#: ... cut along y so that the part of a slab read from the source stays in cache
_SLAB_BYTES = 64 * 1024


def _copy_reordered(destination: np.ndarray, source: np.ndarray) -> None:
    """``destination[...] = source`` for a C-ordered destination and a source in
    any memory layout (at least 3 dimensions, the spatial axes first).

    nibabel decodes NIfTI data in Fortran order (x fastest; see
    :class:`keras_nii.io.Volume`), while batches are C-ordered (z fastest):
    copying one into the other is a 3D transpose, which NumPy does element by
    element, striding through the source a whole plane at a time: ~6 ms for a
    128^3 float32 volume, ~9 ms when reorientation flipped it. Copied by
    blocks of 16 z planes (cut along y to ~64 KB of source), every block's
    source and destination lines stay in cache: ~1.6 ms, whatever the flips;
    ~8 ms instead of ~80 ms for 256 x 256 x 160 (blocks of 256 KB took ~2.3
    and ~10 ms on the 2-core CI machine). Sources already laid out like the
    destination (z fastest) are copied in one go.
    """
    shape = source.shape
    spatial = zip(source.strides[:3], shape[:3], strict=True)
    strides = [abs(stride) if n > 1 else np.inf for stride, n in spatial]
    if source.flags.c_contiguous or int(np.argmin(strides)) == 2 or 0 in shape:
        destination[...] = source
        return
    row_bytes = shape[0] * _SLAB * source.itemsize * math.prod(shape[3:])
    rows = max(1, min(shape[1], _SLAB_BYTES // row_bytes))
    for j in range(0, shape[1], rows):
        for k in range(0, shape[2], _SLAB):
            block = (slice(None), slice(j, j + rows), slice(k, k + _SLAB))
            destination[block] = source[block]


def _c_ordered(array: np.ndarray) -> np.ndarray:
    """``array`` in C order: itself if it is, else a copy made by tiles."""
    if array.flags.c_contiguous:
        return array
    out = np.empty(array.shape, array.dtype)
    _copy_reordered(out, array)
    return out


def _is_pathlike(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _normalize_images(images: Any) -> list[tuple[str, ...]]:
    if _is_pathlike(images) or not isinstance(images, Sequence):
        raise ValueError(
            "images must be a list of paths or a list of lists of paths (one list of "
            f"modalities per subject), got {type(images).__name__}: {images!r}"
        )
    if len(images) == 0:
        raise ValueError("images must not be empty")
    subjects = []
    for i, entry in enumerate(images):
        if _is_pathlike(entry):
            subjects.append((os.fspath(entry),))
        elif isinstance(entry, Sequence) and entry and all(_is_pathlike(p) for p in entry):
            subjects.append(tuple(os.fspath(p) for p in entry))
        else:
            raise ValueError(
                f"images[{i}] must be a path or a non-empty list of paths, got {entry!r}"
            )
    counts = {len(s) for s in subjects}
    if len(counts) > 1:
        first = len(subjects[0])
        bad = next(i for i, s in enumerate(subjects) if len(s) != first)
        raise ValueError(
            f"every subject must have the same number of modalities: images[0] has {first}, "
            f"images[{bad}] has {len(subjects[bad])} ({list(subjects[bad])})"
        )
    return subjects


def _normalize_labels(labels: Any, n: int) -> tuple[str, Any]:
    """Return (kind, labels): kind is "none", "masks" (list of paths) or "targets" (array)."""
    if labels is None:
        return "none", None
    if _is_pathlike(labels) or not isinstance(labels, (Sequence, np.ndarray)):
        raise ValueError(
            "labels must be None, a list of label-map paths or a list of numbers / vectors, "
            f"got {type(labels).__name__}: {labels!r}"
        )
    if len(labels) != n:
        raise ValueError(
            f"labels must have one entry per subject: len(labels) is {len(labels)}, "
            f"len(images) is {n}"
        )
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "US":
        labels = labels.tolist()
    if isinstance(labels, Sequence) and any(_is_pathlike(v) for v in labels):
        if not all(_is_pathlike(v) for v in labels):
            raise ValueError("labels mixes paths and non-paths; give all paths or all numbers")
        return "masks", [os.fspath(v) for v in labels]
    try:
        targets = np.asarray(labels)
    except ValueError as err:  # ragged vectors
        raise ValueError(f"labels: vectors must all have the same length ({err})") from err
    if targets.dtype.kind in "biu":
        targets = targets.astype(np.int32)
    elif targets.dtype.kind == "f":
        targets = targets.astype(np.float32)
    else:
        raise ValueError(f"labels must be paths or numbers, got an array of dtype {targets.dtype}")
    return "targets", targets


def _normalize_cache(cache: Any) -> str | None:
    """Return None, "memory", or an absolute directory path (created if missing)."""
    if cache is None or cache == "memory":
        return cache
    if isinstance(cache, (str, os.PathLike)) and os.fspath(cache):
        directory = os.path.abspath(os.fspath(cache))
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(f"cache must be 'memory' or a directory, and {directory} is a file")
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cache directory {directory} cannot be created: {err}") from err
        return directory
    raise ValueError(f"cache must be None, 'memory' or a directory path, got {cache!r}")


class NiftiDataset(keras.utils.PyDataset):
    """Batches of NIfTI volumes for ``model.fit``, ``evaluate`` and ``predict``.

    Each subject is one image file or several (modalities, stacked as channels
    in the given order), read with :func:`keras_nii.io.load_nifti` as float32
    ``(x, y, z, c)`` arrays, in RAS+ voxel order unless ``canonical=False``.
    The modalities of a subject, and a subject's label map, must have the same
    spatial shape and affine; anything else is an error naming the files.

    Labels can be:

    - ``None``: batches are just ``x`` (for ``predict``).
    - a list of label-map paths (segmentation): ``y`` is an int32 batch
      ``(b, x, y, z, 1)``, read with ``load_nifti(..., dtype="int32")`` (so a
      label stored as 0.9999 is 1), cropped/padded exactly like its image.
    - a list of numbers or of equal-length vectors (classification,
      regression): ``y`` is ``(b,)`` or ``(b, k)``, int32 when every label is
      an integer (or bool), float32 otherwise.

    With ``shuffle=True`` the subjects are put in a new random order at the
    start (epoch 0) and after every epoch (``on_epoch_end``), drawn from
    ``np.random.default_rng(seed)``: the same seed gives the same sequence of
    orders. Without it, batches follow the given order (the last batch may be
    smaller), so ``predict`` outputs line up with ``images``.

    Every batch is a new C-ordered array, filled with one copy of each volume
    (cropped or padded, and reordered from nibabel's Fortran order, on the
    way).

    Caching keeps decoded volumes (after reorientation, before cropping):

    - ``cache="memory"``: in this process, at most ``cache_bytes`` of
      arrays, the least recently used dropped first. With
      ``use_multiprocessing=True`` each worker process has its own short-lived
      copy, so prefer a directory cache there.
    - ``cache=<directory>``: as uncompressed ``.npy`` files plus a small
      ``.json`` (the affine, shape, dtype, a CRC-32 of the array, and what the
      entry was made from), written atomically, shared by worker processes
      and by later runs. Entries are named by the file's absolute path,
      ``canonical``, dtype and ``spacing`` (datasets at two spacings can share
      a cache folder), and each is checked before use (see
      :mod:`keras_nii.cache`); a damaged entry is read again from the source
      and replaced.

    Either cache serves an entry only while its source file is the one it was
    made from (device, inode, size, modification and status-change times, of
    both files of a ``.hdr``/``.img`` pair), so a changed file is read (and its
    geometry checked) again, and its old entry dropped or replaced.

    Args:
        images: a list of paths (one image per subject), or a list of lists
            of paths (the modalities of each subject, become channels).
        labels: ``None``, a list of label-map paths, or a list of numbers /
            vectors, one per subject.
        batch_size: subjects per batch.
        shape: ``(x, y, z)``: center crop and/or zero pad every volume to
            this spatial shape (see :func:`center_crop_or_pad`). Without it,
            the volumes in one batch must have the same shape.
        pad_to_multiple: an int, or one per axis ``(x, y, z)``: zero pad every
            volume (image and label map alike, centred like ``shape``, after
            it) to the next multiple, for networks that take only such sizes
            (a :func:`keras_nii.models.unet3d` of ``levels`` poolings:
            ``2**levels``). With ``batch_size=1`` volumes of any size then
            train and validate; a batch still needs one shape (``shape=``).
        shuffle: reshuffle the subjects every epoch.
        seed: seed of the shuffling.
        cache: ``None``, ``"memory"`` or a directory (``str`` or
            ``os.PathLike``; created if missing).
        cache_bytes: the most bytes of arrays that ``cache="memory"`` keeps.
            Default: a quarter of the memory available when the dataset is
            made (:func:`keras_nii.storage.available_memory`), 4 GiB when that
            is unknown.
        canonical: reorient volumes to RAS+ (flips and transposes only).
        spacing: ``(sx, sy, sz)`` in mm (a single number: isotropic; an entry
            ``None`` keeps that axis): resample every volume to this voxel
            spacing after the reorientation, as ``load_nifti(...,
            spacing=...)`` does: images linearly, label maps per label then
            argmax (see :mod:`keras_nii.spacing`). A subject's modalities and
            label map, which share a grid in their files, share the new grid
            too; one whose file grid differs from the first modality's but
            has parallel voxel axes (another resolution or field of view) is
            resampled from its own grid onto the first modality's new grid.
            Caches hold the resampled volumes. ``None``: no resampling.
        patch_size: ``(px, py, pz)``: yield patches of this shape instead of
            whole volumes (see :mod:`keras_nii.patches`): every epoch, each
            subject gives ``patches_per_volume`` windows, the same window cut
            from its image, modalities and label map, mixed with other
            subjects' patches in every batch; the volumes may all differ in
            shape. ``len()`` is ``ceil(subjects * patches_per_volume /
            batch_size)``, and each request returns the next batch of the
            epoch's patch stream, whatever its index.
        patches_per_volume: patches per subject and epoch (with ``patch_size``).
        label_probabilities: ``{label: weight}`` (or weights indexed by label):
            centre each patch on a voxel of a class drawn by weight among
            those the subject holds (with ``patch_size`` and label maps);
            ``None``: uniform patches.
        queue_length: patches mixed together: the patches of
            ``queue_length // patches_per_volume`` subjects at a time are
            shuffled together (default: ``max(batch_size, 4)`` subjects).
        workers: passed to ``keras.utils.PyDataset``: the number of threads
            or processes that build batches during ``fit``.
        use_multiprocessing: passed to ``keras.utils.PyDataset``: processes
            instead of threads. The dataset is picklable.
        max_queue_size: passed to ``keras.utils.PyDataset``.
        shard: which subjects this process reads in a multi-process job.
            ``"auto"`` (default): its share when a ``keras.distribution``
            distribution is set on the JAX backend with several processes,
            everything otherwise. ``(index, count)``: share ``index`` of
            ``count``. ``None``: everything. Every process draws the same
            global order from ``seed`` and reads every ``count``-th subject of
            it; the order is padded by repeating subjects so that every
            process runs the same number of steps. ``batch_size`` is per
            process: a step's global batch is ``count * batch_size``.

    Example:

    ```python
    ds = NiftiDataset(
        [["sub-01_T1w.nii.gz", "sub-01_FLAIR.nii.gz"], ...],
        ["sub-01_mask.nii.gz", ...],
        batch_size=2, shape=(128, 128, 128), shuffle=True, seed=0,
        cache="/tmp/nii-cache", workers=4,
    )
    x, y = ds[0]          # (2, 128, 128, 128, 2) float32, (2, 128, 128, 128, 1) int32
    model.fit(ds, epochs=10)
    ```
    """

    def __init__(
        self,
        images: Sequence[PathLike] | Sequence[Sequence[PathLike]],
        labels: Sequence[PathLike] | Sequence[Any] | np.ndarray | None = None,
        *,
        batch_size: int = 1,
        shape: Sequence[int] | None = None,
        pad_to_multiple: int | Sequence[int] | None = None,
        shuffle: bool = False,
        seed: int | None = None,
        cache: str | os.PathLike | None = None,
        canonical: bool = True,
        spacing: Sequence[float | None] | float | None = None,
        cache_bytes: int | None = None,
        patch_size: Sequence[int] | None = None,
        patches_per_volume: int = 1,
        label_probabilities: Any = None,
        queue_length: int | None = None,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
        shard: Shard | str | None = "auto",
    ) -> None:
        super().__init__(
            workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size
        )
        self.images = _normalize_images(images)
        self.label_kind, self.labels = _normalize_labels(labels, len(self.images))
        self.batch_size = _check_positive_int("batch_size", batch_size)
        if shape is not None:
            if _is_pathlike(shape) or not isinstance(shape, (Sequence, np.ndarray)):
                raise ValueError(f"shape must be None or (x, y, z), got {shape!r}")
            if len(shape) != 3:
                raise ValueError(f"shape must be None or (x, y, z), got {shape!r}")
            shape = tuple(_check_positive_int("shape", s) for s in shape)
        self.shape = shape
        self.pad_to_multiple = _check_multiple(pad_to_multiple)
        self.shuffle = bool(shuffle)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ValueError(f"seed must be None or an integer, got {seed!r}")
        self.seed = seed
        missing = [
            path
            for files in self.images
            + [(m,) for m in (self.labels if self.label_kind == "masks" else [])]
            for path in files
            if not (remote.exists(path) if remote.is_url(path) else os.path.isfile(path))
        ]
        if missing:
            raise NiftiError(
                f"{len(missing)} file(s) not found: {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else "")
            )
        self.cache = _normalize_cache(cache)
        self.canonical = bool(canonical)
        self.spacing = None if spacing is None else check_spacing(spacing)
        if cache_bytes is None:
            available = storage.available_memory()
            cache_bytes = 4 << 30 if available is None else available // 4
        self.cache_bytes = _check_positive_int("cache_bytes", cache_bytes)
        self._memory = MemoryCache(self.cache_bytes)
        self._directory = None if self.cache in (None, "memory") else DirectoryCache(self.cache)
        self._rng = np.random.default_rng(seed)
        n = len(self.images)
        self.shard = check_shard(shard)
        if self.shuffle and seed is None and isinstance(self.shard, tuple) and self.shard[1] > 1:
            raise ValueError(
                f"shard={self.shard} with shuffle=True needs a seed: every process must draw "
                "the same global order of subjects"
            )
        # the epoch's order over all processes; each reads its share (see _order)
        self._global_order = self._rng.permutation(n) if self.shuffle else np.arange(n)
        self._patches = self._patch_queue(
            patch_size, patches_per_volume, label_probabilities, queue_length
        )

    # ------------------------------------------------------------------ PyDataset

    def __len__(self) -> int:
        """Number of batches: ``ceil(len(images) / batch_size)``, or, when
        sharded over ``count`` processes, ``ceil(ceil(len(images) / count) /
        batch_size)`` in every process; with ``patch_size``, the subjects times
        ``patches_per_volume`` over ``batch_size``."""
        if self._patches is not None:
            return self._patches.num_batches(len(self._order))
        return math.ceil(len(self._order) / self.batch_size)

    def __getitem__(self, index: int):
        """Batch ``index``: ``x``, or ``(x, y)`` when there are labels."""
        n_batches = len(self)
        if not isinstance(index, numbers.Integral) or isinstance(index, bool):
            raise TypeError(f"batch index must be an integer, got {index!r}")
        if index < 0:
            index += n_batches
        if not 0 <= index < n_batches:
            raise IndexError(f"batch index {index} out of range for {n_batches} batches")
        if self._patches is not None:
            return self._patches.next_batch(self)
        return self._batch(self._order[index * self.batch_size : (index + 1) * self.batch_size])

    def _batch(self, subjects: np.ndarray):
        """The batch of these subjects: ``x``, or ``(x, y)`` when there are labels."""
        xs, ys = [], []
        for subject in subjects:
            modalities, y = self._sample(int(subject))
            xs.append(modalities)
            ys.append([y])
        x = self._assemble(xs, subjects, [self.images[int(s)][0] for s in subjects], np.float32)
        if self.label_kind == "none":
            return x
        if self.label_kind == "masks":
            y = self._assemble(ys, subjects, [self.labels[int(s)] for s in subjects], np.int32)
        else:
            y = self.labels[subjects]
        return x, y

    def _sizes_vary(self) -> bool:
        """Whether batches of this dataset may differ in spatial size.

        ``False`` only when that is certain from the headers: ``shape=`` or
        patches fix the size, or every subject's first image has the same
        grid (shape and affine, so that reorientation and ``spacing=`` give
        the same size). Remote files and unreadable headers count as varying;
        the read itself reports a bad file. Keras's ``tf.data`` pipeline asks
        (see :mod:`keras_nii._pydataset_spec`).
        """
        if self.shape is not None or self._patches is not None or len(self) < 2:
            return False
        grids = set()
        for files in self.images:
            if remote.is_url(files[0]):
                return True
            try:  # the header only, through the reader's guards (FIFOs, extension bombs)
                header = _read_image(files[0]).header
                grids.add(
                    (header.get_data_shape()[:3], header.get_best_affine().round(6).tobytes())
                )
            except Exception:  # noqa: BLE001 - any unreadable header: not certain
                return True
            if len(grids) > 1:
                return True
        return False

    def on_epoch_end(self) -> None:
        """Draw a new subject order (with ``shuffle=True``); start the next patch stream."""
        if self._patches is not None:
            self._patches.next_epoch()
        if self.shuffle:
            self._global_order = self._rng.permutation(len(self.images))

    # ------------------------------------------------------------------ helpers

    @property
    def order(self) -> np.ndarray:
        """The subject indices this process reads this epoch, in batch order (a copy)."""
        return self._order.copy()

    def as_grain(
        self,
        *,
        num_epochs: int | None = 1,
        worker_count: int = 0,
        worker_buffer_size: int = 1,
        drop_remainder: bool = False,
    ) -> Any:
        """The same feed as a ``grain.DataLoader`` (optional extra ``[grain]``).

        Each record is one subject's sample, read exactly as in this dataset's
        batches (crop / pad to ``shape``, modalities as channels, label maps,
        caches); Grain batches ``batch_size`` of them. Grain's sampler draws
        the order from ``seed`` (a new permutation every epoch with
        ``shuffle=True``; not the same permutation as the PyDataset's) and, in
        a multi-process job (``shard``), gives each process an equal share
        (``grain.sharding.ShardByJaxProcess(drop_remainder=True)``). The
        loader's iterators are checkpointable: ``state = it.get_state()``
        after step ``n``, then ``it = iter(loader); it.set_state(state)`` in a
        new process continues with batch ``n + 1``.

        With ``patch_size`` the records are the patch stream's batches (a
        batch mixes the patches of several subjects), epoch by epoch: the
        loader then yields exactly this dataset's batches of its epochs
        ``0 .. num_epochs - 1`` (a shuffled patch dataset needs a ``seed``).

        Args:
            num_epochs: passes over the data before the iterator ends (``None``:
                endless). For ``model.fit(loader, epochs=E)`` pass
                ``num_epochs=E`` and ``steps_per_epoch=len(dataset)``, so the
                epochs are the sampler's (reshuffled) passes.
            worker_count: Grain worker processes (0: read in this process).
            worker_buffer_size: batches each worker prepares ahead.
            drop_remainder: drop a last, smaller batch of each pass.

        Example:

        ```python
        ds = NiftiDataset(images, labels, batch_size=2, shape=(96, 96, 96),
                          shuffle=True, seed=0)
        loader = ds.as_grain(num_epochs=10, worker_count=4)
        model.fit(loader, epochs=10, steps_per_epoch=len(ds))
        ```
        """
        from keras_nii.grain import grain_loader

        return grain_loader(
            self,
            num_epochs=num_epochs,
            worker_count=worker_count,
            worker_buffer_size=worker_buffer_size,
            drop_remainder=drop_remainder,
        )

    @property
    def process_shard(self) -> Shard | None:
        """``(index, count)`` of the share this process reads, or ``None`` for all.

        ``shard="auto"`` is resolved when asked (a distribution may be set
        after the dataset is made): see :func:`keras_nii.sharding.detect_shard`.
        """
        if self.shard != "auto":
            return self.shard
        shard = detect_shard()
        if shard is not None and self.shuffle and self.seed is None:
            raise ValueError(
                f"NiftiDataset is sharded over {shard[1]} processes and shuffles: pass a seed, "
                "so that every process draws the same global order of subjects"
            )
        return shard

    @property
    def _order(self) -> np.ndarray:
        return share(self._global_order, self.process_shard)

    @property
    def patches(self) -> Any:
        """The :class:`keras_nii.patches.PatchQueue` (with ``patch_size``), else ``None``."""
        return self._patches

    def _patch_queue(self, patch_size, patches_per_volume, label_probabilities, queue_length):
        if patch_size is None:
            if label_probabilities is not None or queue_length is not None:
                raise ValueError("label_probabilities and queue_length need patch_size=(x, y, z)")
            if patches_per_volume != 1:
                raise ValueError("patches_per_volume needs patch_size=(x, y, z)")
            return None
        if self.shape is not None:
            raise ValueError("pass shape= (whole volumes) or patch_size= (patches), not both")
        if label_probabilities is not None and self.label_kind != "masks":
            raise ValueError(
                "label_probabilities needs label maps: labels= must be a list of paths"
            )
        from keras_nii.patches import PatchQueue

        return PatchQueue(
            patch_size,
            patches_per_volume,
            label_probabilities,
            queue_length,
            self.batch_size,
            self.seed,
            shared=self.use_multiprocessing and self.workers > 1,
        )

    @classmethod
    def from_folder(
        cls,
        images_dir: PathLike,
        labels_dir: PathLike | None = None,
        *,
        pair_by: Any = "stem",
        **kwargs: Any,
    ) -> NiftiDataset:
        """A dataset of the NIfTI files in a folder, paired with label maps by subject.

        Lists the ``.nii`` and ``.nii.gz`` files of ``images_dir`` (not its
        subfolders; hidden files are ignored). Files are grouped and paired
        by a subject key taken from their names (see :mod:`keras_nii.pairing`):

        - ``pair_by="stem"`` (default): the whole name stem, ``sub-01.nii.gz``
          with ``sub-01.nii.gz`` or ``sub-01.nii``;
        - ``"bids"``: ``sub-<label>[_ses-<label>]``, ``sub-01_T1w.nii.gz`` with
          ``sub-01_mask.nii.gz``; several images of a subject
          (``sub-01_FLAIR``, ``sub-01_T1w``) are its modalities, in name order;
        - ``"nnunet"``: ``case_00000_0000.nii.gz`` (channel ``0000``) with
          ``case_00000.nii.gz``, channels in index order;
        - a regular expression (the key is its group ``key``, or its first
          group; a group ``channel`` orders modalities), or a function of the
          name stem returning the key.

        Subjects come sorted by key. An image without a label map, a label
        map without an image, a name the rule does not match, two label maps
        of one subject and subjects with different numbers of modalities are
        errors that list the files.

        Args:
            images_dir: folder of images.
            labels_dir: folder of label maps, or ``None``.
            pair_by: the pairing rule, as above.
            **kwargs: the other arguments of :class:`NiftiDataset`.

        Returns:
            A :class:`NiftiDataset`.

        Example:

        ```python
        ds = NiftiDataset.from_folder("data/images", "data/labels", batch_size=2)
        ds = NiftiDataset.from_folder("imagesTr", "labelsTr", pair_by="nnunet")
        ```
        """
        from keras_nii.pairing import pair_files

        images = _list_nifti(images_dir, "images_dir")
        if labels_dir is not None and "labels" in kwargs:
            raise ValueError("pass either labels_dir or labels=, not both")
        labels = None if labels_dir is None else _list_nifti(labels_dir, "labels_dir")
        paired_images, paired_labels = pair_files(
            images, labels, pair_by, images_dir=images_dir, labels_dir=labels_dir
        )
        if paired_labels is None:
            return cls(paired_images, **kwargs)
        return cls(paired_images, paired_labels, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # a memory cache is not worth copying to a worker process
        state = self.__dict__.copy()
        state["_memory"] = MemoryCache(self.cache_bytes)
        return state

    def _load(
        self, path: str, dtype: str, spacing: Any = "dataset"
    ) -> tuple[np.ndarray, np.ndarray]:
        """The decoded (reoriented, uncropped) array and affine of one file.

        Without a cache the array is load_nifti's, in nibabel's layout: the
        batch assembly reorders it once, into the batch. Cached arrays are
        kept C-ordered, so that a cached batch is a plain copy. Directory
        entries are memory-mapped read-only, so that the page cache is copied
        straight into the batch (a plain ``np.load`` read each entry into a
        new array first: ~1.5 against ~0.9 ms per 128^3 volume); an entry
        shorter than its header says is not mapped but read again.
        ``spacing`` is the dataset's unless given (``None``: the file's grid).
        """
        spacing = self.spacing if isinstance(spacing, str) else spacing
        if self.cache not in (None, "memory") and remote.is_url(path):
            # a local copy in the cache folder, named by the URL and the object's
            # version (ETag ...): a changed object is fetched again, an unchanged
            # one never is; its decoded entry is then cached like a local file's
            path = remote.fetch(path, os.path.join(self.cache, "remote"))
        if self.cache is None:
            vol = load_nifti(path, canonical=self.canonical, dtype=dtype, spacing=spacing)
            return vol.array, vol.affine
        if remote.is_url(path):
            # the memory cache: an object's fingerprint is its version (ETag ...)
            fingerprint: tuple = (remote.version(remote.object_info(path)),)
        else:
            try:
                fingerprint = source_fingerprint(path)
            except OSError:
                load_nifti(path)  # reports the missing file with its usual message
                raise
        settings = (self.canonical, dtype, spacing)
        if self.cache == "memory":
            key = (path if remote.is_url(path) else os.path.abspath(path), settings)
            hit = self._memory.get(key, fingerprint)
            if hit is None:
                vol = load_nifti(path, canonical=self.canonical, dtype=dtype, spacing=spacing)
                hit = (_c_ordered(vol.array), vol.affine)
                self._memory.put(key, fingerprint, *hit)
            return hit
        directory = self._directory
        hit = directory.get(path, settings, fingerprint, dtype)
        if hit is not None:
            return hit
        vol = load_nifti(path, canonical=self.canonical, dtype=dtype, spacing=spacing)
        array = _c_ordered(vol.array)
        directory.put(path, settings, fingerprint, array, vol.affine)
        return array, vol.affine

    def _sample(self, subject: int) -> tuple[list[np.ndarray], np.ndarray | None]:
        """The arrays of one subject, as loaded (uncropped, in any layout): its
        modalities (checked to share a grid) and its label map or ``None``."""
        files = self.images[subject]
        arrays = []
        ref_array, ref_affine = None, None
        for path in files:
            array, affine = self._load(path, "float32")
            if ref_array is None:
                ref_array, ref_affine = array, affine
            else:
                array = self._on_grid(subject, files[0], ref_array, ref_affine, path, array, affine)
            arrays.append(array)
        y = None
        if self.label_kind == "masks":
            mask_path = self.labels[subject]
            y, mask_affine = self._load(mask_path, "int32")
            y = self._on_grid(subject, files[0], ref_array, ref_affine, mask_path, y, mask_affine)
        return arrays, y

    def _on_grid(self, subject, ref_path, ref_array, ref_affine, path, array, affine):
        """``array`` (of ``path``), checked to be on the first modality's grid. With
        ``spacing=``, a file whose own grid differs (another resolution, another
        field of view, parallel voxel axes) is resampled from its own grid onto
        the first modality's new grid instead: one interpolation, not two."""
        what = "modality" if array.dtype.kind == "f" else "label map"
        if self.spacing is None or _same_grid(ref_array, ref_affine, array, affine):
            _check_same_grid(subject, ref_path, ref_array, ref_affine, path, array, affine, what)
            return array
        source, source_affine = self._load(path, array.dtype.name, spacing=None)
        try:
            return resample_onto(source, source_affine, ref_array.shape[:3], ref_affine)
        except ValueError as err:
            raise NiftiError(
                f"subject {subject}: the {what} {path} cannot be resampled onto the grid of "
                f"{ref_path}: {err}"
            ) from err

    def _assemble(
        self, samples: list[list[np.ndarray]], subjects, paths: list[str], dtype: Any
    ) -> np.ndarray:
        """One C-ordered batch from each sample's arrays (modalities become
        channels, in order), center cropped / zero padded to ``shape``.

        The batch is allocated once and every volume is copied into it once,
        cropping and reordering (see :func:`_copy_reordered`) on the way: no
        concatenated, cropped or stacked intermediates.
        """
        shapes = [(*parts[0].shape[:3], sum(p.shape[3] for p in parts)) for parts in samples]
        if self.shape is not None:
            shapes = [(*self.shape, shape[3]) for shape in shapes]
        if self.pad_to_multiple is not None:
            multiple = self.pad_to_multiple
            shapes = [
                (*(-(-s // m) * m for s, m in zip(shape[:3], multiple, strict=True)), shape[3])
                for shape in shapes
            ]
        first = shapes[0]
        for shape, path, subject in zip(shapes, paths, subjects, strict=True):
            if shape != first:
                raise ValueError(
                    f"volumes of different shapes in one batch: {paths[0]} is {first[:3]} with "
                    f"{first[3]} channel(s), {path} (subject {int(subject)}) is "
                    f"{shape[:3]} with {shape[3]} channel(s); pass shape=(x, y, z) "
                    "to crop/pad them to one shape, or use batch_size=1"
                )
        windows = [_crop_or_pad_windows(parts[0].shape[:3], first[:3]) for parts in samples]
        padded = any(window[2] for window in windows)
        batch = (np.zeros if padded else np.empty)((len(samples), *first), dtype)
        for i, (parts, (source, destination, _)) in enumerate(zip(samples, windows, strict=True)):
            channel = 0
            for part in parts:
                channels = slice(channel, channel + part.shape[3])
                _copy_reordered(batch[(i, *destination, channels)], part[source])
                channel = channels.stop
        return batch


def _check_multiple(value: Any) -> tuple[int, int, int] | None:
    if value is None:
        return None
    values = [value] * 3 if isinstance(value, numbers.Integral) else value
    if _is_pathlike(values) or not isinstance(values, (Sequence, np.ndarray)) or len(values) != 3:
        raise ValueError(f"pad_to_multiple must be None, an int or (x, y, z), got {value!r}")
    return tuple(_check_positive_int("pad_to_multiple", v) for v in values)


def _same_grid(array_a, affine_a, array_b, affine_b) -> bool:
    return array_a.shape[:3] == array_b.shape[:3] and np.allclose(
        affine_a, affine_b, rtol=0, atol=_AFFINE_ATOL
    )


def _check_same_grid(subject, path_a, array_a, affine_a, path_b, array_b, affine_b, what):
    if not _same_grid(array_a, affine_a, array_b, affine_b):
        raise NiftiError(
            f"subject {subject}: the {what} {path_b} is not on the same voxel grid as "
            f"{path_a}: spatial shapes {array_b.shape[:3]} vs {array_a.shape[:3]}, affines\n"
            f"{np.array2string(affine_b, precision=4)}\nvs\n"
            f"{np.array2string(affine_a, precision=4)}"
        )


def _list_nifti(folder: PathLike, argument: str) -> dict[str, Any]:
    """{stem: path} of the NIfTI files in a folder (or under a URL), sorted by file name."""
    return storage.list_nifti(folder, argument, NIFTI_FILE_SUFFIXES)


# Keras's tf.data pipeline of a PyDataset learns from NiftiDataset._sizes_vary
# which spatial sizes are not fixed (under TensorFlow only)
_pydataset_spec.install()
