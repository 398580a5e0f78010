"""Caches of decoded volumes, for :class:`keras_nii.NiftiDataset`.

An entry is the decoded array and affine of one source file, read with given
settings (``canonical``, dtype, spacing). It is served only while the source
is the file it was made from: the source's *fingerprint* (device, inode,
size, modification and status-change times, of both files of a
``.hdr``/``.img`` pair; :func:`keras_nii.storage.fingerprint`) is stored with
the entry and compared on every use, so a file rewritten with its size and
modification time restored, or another file renamed over it, is read again.

- :class:`MemoryCache`: in this process, at most ``max_bytes`` of arrays; the
  least recently used entries go first, and an entry whose source changed is
  dropped as soon as it is looked up.
- :class:`DirectoryCache`: ``.npy`` + ``.json`` files in a folder, shared by
  worker processes and later runs. Each entry is checked before it is served:
  the shape and dtype of its ``.npy`` against its ``.json``, and a CRC-32 of
  its bytes (once per process and per version of the ``.npy``, so later epochs
  pay only a ``stat``). A damaged, truncated, swapped or foreign entry, or one
  that is not a regular file, is never served: the caller reads the source
  again and :meth:`DirectoryCache.put` replaces it.

No Keras here.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np

from keras_nii import storage

__all__ = ["source_fingerprint", "MemoryCache", "DirectoryCache"]

_VERSION = "keras-nii-cache-2"


def source_fingerprint(path: str) -> tuple:
    """What identifies the content of a source file (and of its pair twin);
    ``OSError`` if it is missing."""
    parts = [storage.fingerprint(path)]
    twin = storage.pair_twin(path)
    if twin is not None and os.path.exists(twin):
        parts.append(storage.fingerprint(twin))
    return tuple(parts)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


class MemoryCache:
    """Decoded volumes in memory, at most ``max_bytes`` of arrays, least recently used out.

    An array larger than ``max_bytes`` is not kept at all.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._entries: OrderedDict[Any, tuple[tuple, np.ndarray, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any, fingerprint: tuple) -> tuple[np.ndarray, np.ndarray] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] != fingerprint:  # the source changed: the entry is stale
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[1], entry[2]

    def put(self, key: Any, fingerprint: tuple, array: np.ndarray, affine: np.ndarray) -> None:
        if key in self._entries:
            self._drop(key)
        if array.nbytes > self.max_bytes:
            return
        while self._entries and self.nbytes + array.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = (fingerprint, array, affine)
        self.nbytes += array.nbytes

    def _drop(self, key: Any) -> None:
        _, array, _ = self._entries.pop(key)
        self.nbytes -= array.nbytes


class DirectoryCache:
    """Decoded volumes as ``.npy`` files plus a ``.json`` of what each holds.

    An entry is named by the source's absolute path and the read settings, not
    by its fingerprint, so a changed source replaces its entry rather than
    adding one.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._verified: dict[str, tuple] = {}  # .npy -> its fingerprint when its CRC matched

    def base(self, path: str, settings: Any) -> str:
        absolute = os.path.abspath(path)
        token = repr((_VERSION, absolute, _jsonable(settings)))
        digest = hashlib.sha256(token.encode()).hexdigest()[:32]
        name = os.path.basename(absolute)
        for suffix in (".nii.gz", ".nii", ".hdr", ".img"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:48]
        return os.path.join(self.directory, f"{stem}-{digest}")

    def get(
        self, path: str, settings: Any, fingerprint: tuple, dtype: Any
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The entry of ``path`` if it is there and sound, else ``None``."""
        base = self.base(path, settings)
        try:
            storage.regular_file(base + ".json")
            with open(base + ".json", encoding="utf-8") as file:
                meta = json.load(file)
            expected = {
                "version": _VERSION,
                "source": os.path.abspath(path),
                "settings": _jsonable(settings),
                "fingerprint": _jsonable(fingerprint),
                "dtype": np.dtype(dtype).str,
            }
            if any(meta.get(k) != v for k, v in expected.items()):
                return None  # another source, another version of it, other settings
            npy_print = storage.regular_file(base + ".npy")
            array = np.load(base + ".npy", mmap_mode="r", allow_pickle=False)
            if (
                array.dtype.str != meta["dtype"]
                or list(array.shape) != meta["shape"]
                or not array.flags.c_contiguous
            ):
                return None
            npy_id = (npy_print.st_dev, npy_print.st_ino, npy_print.st_size, npy_print.st_mtime_ns)
            if self._verified.get(base) != npy_id:
                if zlib.crc32(array.reshape(-1).view(np.uint8)) != meta["crc32"]:
                    return None
                self._verified[base] = npy_id
            affine = np.asarray(meta["affine"], dtype=np.float64).reshape(4, 4)
            return array, affine
        except (OSError, ValueError, KeyError, TypeError, EOFError):
            return None  # not cached yet, or damaged: the caller reads the source again

    def put(
        self,
        path: str,
        settings: Any,
        fingerprint: tuple,
        array: np.ndarray,
        affine: np.ndarray,
    ) -> None:
        """Write (or replace) the entry of ``path``; a failure is a warning, not an error."""
        base = self.base(path, settings)
        array = np.ascontiguousarray(array)
        meta = {
            "version": _VERSION,
            "source": os.path.abspath(path),
            "settings": _jsonable(settings),
            "fingerprint": _jsonable(fingerprint),
            "dtype": array.dtype.str,
            "shape": list(array.shape),
            "crc32": zlib.crc32(array.reshape(-1).view(np.uint8)),
            "affine": np.asarray(affine, dtype=np.float64).tolist(),
        }
        try:
            # a reader that sees the new .json beside the old .npy (or the
            # reverse) finds the CRC wrong and reads the source again
            _atomic_write(base + ".npy", lambda f: np.save(f, array, allow_pickle=False))
            _atomic_write(base + ".json", lambda f: f.write(json.dumps(meta).encode()))
        except OSError as err:
            warnings.warn(
                f"NiftiDataset: cannot write the cache entry of {path} in {self.directory}: {err}",
                stacklevel=3,
            )


def _atomic_write(final: str, write: Any) -> None:
    tmp = os.path.join(os.path.dirname(final), f".{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as file:
            write(file)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
