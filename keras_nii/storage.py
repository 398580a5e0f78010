"""Where the bytes of NIfTI files come from and go to.

This module knows files, not the NIfTI format (that is :mod:`keras_nii.io`'s,
through nibabel), and imports neither Keras nor a backend:

- :func:`regular_file`: refuse what is not a regular file (a FIFO, a device,
  a socket) *before* opening it, since reading one can block forever.
- :func:`gunzip_head`: the first bytes of a gzip stream, inflated with a hard
  cap: a header that claims more data than the file holds fails at once or
  as soon as the stream ends, and a decompression bomb is inflated no further
  than the header needs. The stream's CRC and length are checked.
- :func:`check_memory`: a read that cannot fit in the memory at hand is an
  error that says so, before anything is allocated.
- file identity: :func:`identity`, :func:`fingerprint`, :func:`pair_twin`,
  :func:`twin_variants` and :func:`overwritten_input`, the overwrite guard:
  files are compared by ``(st_dev, st_ino)``, so that relative paths, ``..``,
  symbolic and hard links, case variants and the twins of ``.hdr``/``.img``
  pairs all name the file they are.
- :func:`replace_together`: move finished temporaries over their targets,
  undoing the first moves when a later one fails.

:class:`NiftiError` is defined here so that the functions of this module can
raise it; it is the public ``keras_nii.NiftiError`` (also
``keras_nii.io.NiftiError``).
"""

from __future__ import annotations

import io
import os
import resource
import stat
import uuid
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "NiftiError",
    "regular_file",
    "identity",
    "fingerprint",
    "pair_twin",
    "twin_variants",
    "overwritten_input",
    "available_memory",
    "check_memory",
    "gunzip_head",
    "gunzip_peek",
    "MemoryFile",
    "replace_together",
]


class NiftiError(ValueError):
    """A NIfTI file that cannot be read or written; the message names the file."""


NiftiError.__module__ = "keras_nii.io"  # documented (and pickled) as keras_nii.io.NiftiError


def fail(path: Any, problem: str) -> NiftiError:
    """A :class:`NiftiError` whose message starts with the file."""
    return NiftiError(f"{os.fspath(path)}: {problem}")


# --------------------------------------------------------------------------- files

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def regular_file(path: str, what: str = "file") -> os.stat_result:
    """``os.stat(path)`` (links followed) if it is a regular file, else a :class:`NiftiError`.

    Nothing is opened: a FIFO or a device in place of a data file or a cache
    entry is refused instead of blocking the reader forever.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise fail(path, "no such file") from None
    except OSError as err:
        raise fail(path, f"cannot be read: {err.strerror or err}") from err
    if stat.S_ISREG(info.st_mode):
        return info
    if stat.S_ISDIR(info.st_mode):
        raise fail(path, f"is a directory, not a {what}")
    kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
    raise fail(path, f"is {kind}, not a regular file: refused (reading it could block forever)")


def identity(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file ``path`` names (links followed), or ``None``."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def fingerprint(path: str) -> tuple[int, ...]:
    """What changes when a file is replaced or rewritten: device, inode, size,
    modification and status-change times (ns). ``OSError`` if it is missing.

    The status-change time (``st_ctime``) cannot be set back by a program, so
    a file rewritten with its size and modification time restored, or another
    file renamed over it, still gets a new fingerprint.
    """
    info = os.stat(path)
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


_TWIN = {".hdr": ".img", ".img": ".hdr"}


def pair_twin(path: str) -> str | None:
    """The other file of a ``.hdr``/``.img`` pair, spelled as nibabel opens it
    (an upper-case suffix gets an upper-case twin), or ``None``."""
    stem, ext = os.path.splitext(path)
    other = _TWIN.get(ext.lower())
    if other is None:
        return None
    return stem + (other.upper() if ext.isupper() else other)


def twin_variants(path: str) -> list[str]:
    """Every existing spelling of ``path``'s pair twin that differs only in the
    case of its suffix (``x.img``, ``x.IMG``, ``x.Img`` ...), nibabel's first."""
    twin = pair_twin(path)
    if twin is None:
        return []
    stem, ext = os.path.splitext(twin)
    letters = ext[1:].lower()
    spellings = [twin]
    for mask in range(1 << len(letters)):
        cased = "".join(c.upper() if mask >> i & 1 else c for i, c in enumerate(letters))
        spellings.append(f"{stem}.{cased}")
    found = []
    for name in dict.fromkeys(spellings):
        if name == twin or os.path.lexists(name):
            found.append(name)
    return found


def _spelled(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def overwritten_input(
    targets: Sequence[str], inputs: Sequence[str], identities: Iterable[tuple[int, int]] = ()
) -> str | None:
    """The input file that writing ``targets`` would destroy, or ``None``.

    Each target and each input counts with its pair twins (in every case
    spelling that exists). A target is an input when both are the same file
    (``(st_dev, st_ino)``: relative paths, ``..``, symbolic and hard links,
    case-insensitive file systems), when it is a file whose identity is in
    ``identities`` (an input as it was when it was read, in case it was
    renamed since), or when both resolve to the same name.
    """
    protected: dict[Any, str] = {}
    for source in inputs:
        for name in (source, *twin_variants(source)):
            key = identity(name)
            if key is not None:
                protected.setdefault(key, name)
            protected.setdefault(_spelled(name), name)
    for key in identities:
        protected.setdefault(tuple(key), "the file it was read from")
    for target in targets:
        for name in (target, *twin_variants(target)):
            for key in (identity(name), _spelled(name)):
                if key is not None and key in protected:
                    return protected[key]
    return None


def replace_together(moves: Sequence[tuple[str, str]]) -> None:
    """``os.replace(temporary, final)`` for each pair, all or none as far as
    the file system allows.

    Before the first move every existing final file gets a hard link (a
    backup that costs no copy); if a move fails, the files moved so far are
    put back from these links, so a failed write of a ``.hdr``/``.img`` pair
    never leaves a new ``.img`` beside an old ``.hdr``. Temporaries and
    backups are removed in every case.
    """
    backups: list[tuple[str, str | None]] = []
    moved: list[tuple[str, str | None]] = []
    try:
        for _, final in moves:
            backup = None
            if os.path.isfile(final):
                backup = os.path.join(
                    os.path.dirname(os.path.abspath(final)), f".keras-nii-{uuid.uuid4().hex}.bak"
                )
                try:
                    os.link(final, backup)
                except OSError:  # a file system without hard links: no undo for this file
                    backup = None
            backups.append((final, backup))
        for (tmp, final), (_, backup) in zip(moves, backups, strict=True):
            os.replace(tmp, final)
            moved.append((final, backup))
    except BaseException:
        for final, backup in reversed(moved):
            try:
                if backup is not None:
                    os.replace(backup, final)
                else:
                    os.unlink(final)
            except OSError:
                pass
        raise
    finally:
        for name in [tmp for tmp, _ in moves] + [b for _, b in backups if b is not None]:
            try:
                os.unlink(name)
            except OSError:
                pass


# --------------------------------------------------------------------------- memory


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as file:
            for line in file:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    try:
        with open("/proc/self/cgroup", encoding="ascii") as file:
            relative = next(
                (line.split(":", 2)[2].strip() for line in file if line.startswith("0::")), None
            )
        if relative is None:
            return None
        folder = os.path.join("/sys/fs/cgroup", relative.lstrip("/"))
        with open(os.path.join(folder, "memory.max"), encoding="ascii") as file:
            limit = file.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(folder, "memory.current"), encoding="ascii") as file:
            used = int(file.read())
        return max(0, int(limit) - used)
    except (OSError, ValueError, StopIteration):
        return None


def _address_space_available() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/statm", encoding="ascii") as file:
            used = int(file.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        used = 0
    return max(0, soft - used)


def available_memory() -> int | None:
    """Bytes this process can still allocate: the least of the system's
    available memory, the cgroup's limit and the address-space limit
    (``RLIMIT_AS``); ``None`` where none of them can be read."""
    known = [
        n
        for n in (_meminfo_available(), _cgroup_available(), _address_space_available())
        if n is not None
    ]
    return min(known) if known else None


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_memory(path: str, needed: int, what: str) -> None:
    """A :class:`NiftiError` if ``needed`` bytes exceed :func:`available_memory`."""
    available = available_memory()
    if available is not None and needed > available:
        raise fail(
            path,
            f"too large for the memory at hand: reading {what} needs about {_size(needed)}, "
            f"and {_size(available)} is available (the file itself may be fine)",
        )


# --------------------------------------------------------------------------- gzip

#: deflate cannot expand data more than 1032:1 (258-byte matches coded in
#: 2 bits), so a gzip file of n bytes never holds more than this many times n
_DEFLATE_MAX_RATIO = 1032
#: once the bytes a header asks for are inflated, at most this much more is
#: inflated to reach the end of the stream and check its CRC and length; a
#: stream longer than that (data after the volume) is not checked further
TRAILING_CHECK_BYTES = 1 << 20
_READ_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


def _zlib_problem(err: zlib.error) -> str:
    text = str(err)
    if "incorrect data check" in text:
        return "the gzip stream fails its CRC check: the data is corrupt"
    if "incorrect length check" in text:
        return "the gzip stream fails its length check: the data is corrupt"
    return f"corrupt gzip stream ({text})"


def gunzip_head(path: str, size: int, memory: int = 0, what: str = "") -> np.ndarray:
    """The first ``size`` decompressed bytes of the gzip file ``path``, as a uint8 array.

    Time and memory are bounded by what the file really holds, whatever a
    header claims: ``size`` is refused at once when the file is too small to
    inflate to it (deflate expands at most ~1032:1); the output is allocated
    once, uninitialised, so that only the pages written take memory; and
    inflating stops at ``size`` bytes (plus at most
    :data:`TRAILING_CHECK_BYTES` to reach the end of the stream), so trailing
    data, a decompression bomb included, is never inflated.

    A stream that ends before ``size`` bytes, that is damaged, or that fails
    its CRC or length check is a :class:`NiftiError`. Streams of several gzip
    members (as ``bgzip`` writes) are read across members.

    ``memory`` is what the caller will allocate besides these bytes (for
    :func:`check_memory`, with ``what`` saying for what), checked once the
    file is known to be able to hold ``size`` bytes: a lying header is
    reported as such, not as too large.
    """
    info = regular_file(path)
    if size > info.st_size * _DEFLATE_MAX_RATIO + 64 * 1024:
        raise fail(
            path,
            f"its header describes {size} bytes (header and voxel data), more than a gzip "
            f"file of {info.st_size} bytes can hold: the header is wrong or the file is "
            "truncated",
        )
    check_memory(path, size + memory, what or f"{size} bytes")
    buffer = np.empty(size, np.uint8)
    view = memoryview(buffer)
    position = 0
    inflater = zlib.decompressobj(31)
    pending = b""
    try:
        with open(path, "rb") as file:
            while position < size:
                if inflater.eof:  # one gzip member ended: another may follow
                    rest = inflater.unused_data
                    while len(rest) < 2:
                        more = file.read(_READ_CHUNK)
                        if not more:
                            break
                        rest += more
                    if rest[:2] != _GZIP_MAGIC:
                        break
                    inflater = zlib.decompressobj(31)
                    pending = rest
                    continue
                if not pending:
                    pending = file.read(_READ_CHUNK)
                    if not pending:
                        break
                out = inflater.decompress(pending, size - position)
                view[position : position + len(out)] = out
                position += len(out)
                pending = inflater.unconsumed_tail
            if position < size:
                raise fail(
                    path,
                    f"truncated or smaller than its header says: the gzip stream holds "
                    f"{position} bytes, the header describes {size}",
                )
            checked = 0
            while not inflater.eof and checked <= TRAILING_CHECK_BYTES:
                if not pending:
                    pending = file.read(_READ_CHUNK)
                    if not pending:
                        raise fail(
                            path,
                            "truncated: the gzip stream ends before its CRC and length check",
                        )
                out = inflater.decompress(pending, TRAILING_CHECK_BYTES + 1 - checked)
                checked += len(out)
                pending = inflater.unconsumed_tail
    except zlib.error as err:
        raise fail(path, _zlib_problem(err)) from err
    except OSError as err:
        raise fail(path, f"cannot be read: {err.strerror or err}") from err
    return buffer


def gunzip_peek(path: str, size: int) -> bytes:
    """Up to the first ``size`` decompressed bytes of a gzip file (fewer when
    the stream is shorter or damaged there): a look at a header, inflating no
    more than ``size`` bytes whatever follows. No CRC check."""
    inflater = zlib.decompressobj(31)
    out = b""
    try:
        with open(path, "rb") as file:
            while len(out) < size and not inflater.eof:
                chunk = inflater.unconsumed_tail or file.read(64 * 1024)
                if not chunk:
                    break
                out += inflater.decompress(chunk, size - len(out))
    except (OSError, zlib.error):
        pass
    return out


class MemoryFile(io.RawIOBase):
    """A read-only, seekable binary file over a buffer, without copying it
    (``io.BytesIO`` copies any buffer that is not ``bytes``)."""

    def __init__(self, buffer: Any) -> None:
        super().__init__()
        self._view = memoryview(buffer).cast("B")
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}
        self._position = max(0, base[whence] + int(offset))
        return self._position

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        chunk = self._view[self._position : self._position + len(target)]
        target[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)


def _folder_entries(folder: Any, argument: str, suffixes: Sequence[str]) -> list[tuple[str, Any]]:
    """(file name, path) of the regular, not hidden files in a folder or, for a
    URL, of the NIfTI objects directly under it (``path`` is then the URL)."""
    from pathlib import Path

    from keras_nii import remote

    if remote.is_url(os.fspath(folder)):
        urls = remote.list_folder(os.fspath(folder), suffixes)
        return [(remote.basename(url), url) for url in urls]
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{argument}: {folder} is not a directory")
    return [
        (path.name, path)
        for path in folder.iterdir()
        if not path.name.startswith(".") and path.is_file()
    ]


def list_nifti(
    folder: Any, argument: str, suffixes: Sequence[str] = (".nii.gz", ".nii")
) -> dict[str, Any]:
    """``{name stem: path}`` of the NIfTI files in a folder (a local ``Path``) or
    under a URL (the URL), sorted by file name; two files of one stem, or none,
    are a ``ValueError`` naming ``argument``."""
    found: dict[str, Any] = {}
    for name, path in sorted(_folder_entries(folder, argument, suffixes), key=lambda e: e[0]):
        suffix = next((s for s in suffixes if name.lower().endswith(s)), None)
        if suffix is None:
            continue
        stem = name[: -len(suffix)]
        if stem in found:
            raise ValueError(
                f"{argument}: two files with the name stem {stem!r}: {found[stem]} and {path}"
            )
        found[stem] = path
    if not found:
        raise ValueError(f"{argument}: no .nii or .nii.gz files in {folder}")
    return found
