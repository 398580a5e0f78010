"""NIfTI files in object storage and on web servers, through fsspec.

Any path that is a URL fsspec understands (``s3://``, ``gs://``, ``az://``,
``http(s)://``, ``memory://``, ...) is fetched whole into a local file and
then read by the same bounded, checked reader as any local file (so the
hostile-file bounds of :mod:`keras_nii.storage` hold for remote files too);
writes go to a finished local file first and are uploaded as one whole
object, so that no partial object is ever visible. fsspec does the
transport (the optional extra ``pip install "keras-nii[cloud]"`` brings it
with s3fs and gcsfs); credentials come from wherever the store's fsspec
implementation looks (environment variables, profiles, instance metadata),
and nothing of them is ever logged: messages show URLs without their
user-info part.

A local cache (``NiftiDataset(cache=DIR)``) keeps fetched files, keyed by
the URL and the object's version as the store reports it (its ETag, else
its size and modification time), so that a changed object is fetched again
and an unchanged one never is.

This module imports neither Keras nor a backend; fsspec is imported when a
URL is first used.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Sequence
from typing import Any

__all__ = [
    "is_url",
    "local_path",
    "twin",
    "basename",
    "overwritten_url",
    "display",
    "normalize",
    "object_info",
    "version",
    "fetch",
    "upload",
    "list_folder",
    "exists",
]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@]*@")
_TWIN = {".hdr": ".img", ".img": ".hdr"}


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL for fsspec (``file://`` URLs are local paths)."""
    if not isinstance(path, str):
        return False
    match = _SCHEME.match(path)
    return match is not None and match.group(1).lower() != "file"


def local_path(path: str) -> str:
    """A ``file://`` URL as a plain path; anything else unchanged."""
    return path[len("file://") :] if path.lower().startswith("file://") else path


def display(url: str) -> str:
    """``url`` as it may be shown: without a ``user:password@`` part."""
    return _USERINFO.sub(r"\1", url)


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError as err:
        raise ImportError(
            'reading or writing URLs needs fsspec: pip install "keras-nii[cloud]"'
        ) from err
    return fsspec


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path within it."""
    from keras_nii.storage import fail

    try:
        return _fsspec().core.url_to_fs(url)
    except ImportError as err:
        if "fsspec" in str(err):
            raise
        raise fail(display(url), f"cannot open this kind of URL: {err}") from err
    except ValueError as err:
        raise fail(display(url), f"not a URL fsspec can open: {err}") from err


def normalize(url: str) -> str:
    """A canonical spelling of ``url``, to compare two URLs for the overwrite guard.

    The scheme and host are lower-cased, ``.`` and ``..`` resolved, user-info
    and repeated slashes dropped. Object stores are case-sensitive: the
    rest of the path keeps its case.
    """
    url = display(url)
    match = _SCHEME.match(url)
    if match is None:
        return url
    scheme = match.group(1).lower()
    rest = url[match.end() :]
    host, _, path = rest.partition("/")
    path = posixpath.normpath("/" + path.lstrip("/")) if path else "/"
    return f"{scheme}://{host.lower()}{path}"


def object_info(url: str) -> dict:
    """fsspec's ``info`` of the object at ``url``; a :class:`NiftiError` when
    there is none or it is not a file."""
    from keras_nii.storage import fail

    fs, path = filesystem(url)
    try:
        # the store's word, not a listing fsspec cached earlier (a stale ETag
        # would serve a replaced object's old copy)
        fs.invalidate_cache(path)
        info = fs.info(path)
    except FileNotFoundError as err:
        raise fail(display(url), "no such object") from err
    except (OSError, ValueError) as err:
        raise fail(display(url), f"cannot reach the object ({type(err).__name__}: {err})") from err
    if info.get("type", "file") != "file":
        raise fail(display(url), f"is a {info.get('type')}, not a NIfTI file")
    return info


def exists(url: str) -> bool:
    """Whether an object is at ``url`` (a folder is not one)."""
    fs, path = filesystem(url)
    try:
        return bool(fs.isfile(path))
    except (OSError, ValueError):
        return False


def version(info: dict) -> str:
    """The object's version as its store reports it: the ETag, else size and mtime."""
    for key in ("ETag", "etag", "md5Hash", "generation", "version_id", "VersionId"):
        if info.get(key):
            return f"{key}={info[key]}"
    parts = [f"size={info.get('size')}"]
    for key in ("LastModified", "mtime", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            parts.append(f"{key}={info[key]}")
    return ";".join(parts)


def twin(url: str) -> str | None:
    """The other object of a ``.hdr``/``.img`` pair (the suffix's case kept), or ``None``."""
    suffix = url[-4:]
    other = _TWIN.get(suffix.lower())
    if other is None:
        return None
    return url[:-4] + (other.upper() if suffix[1:].isupper() else other)


def _twins(url: str) -> list[str]:
    other = twin(url)
    return [url] if other is None else [url, other]


def basename(url: str) -> str:
    """The last part of ``url``'s path (the file name)."""
    return posixpath.basename(normalize(url)) or "object.nii"


def overwritten_url(target: str, inputs: Sequence[str]) -> str | None:
    """The input that writing ``target`` (with its pair twin) would overwrite,
    comparing normalized URLs (and their twins); ``None`` if none."""
    targets = {normalize(u) for u in _twins(target)}
    for source in inputs:
        if not is_url(source):
            continue
        if any(normalize(u) in targets for u in _twins(source)):
            return source
    return None


def _download(url: str, info: dict, target: str) -> None:
    """Copy the object at ``url`` to the local file ``target``, atomically."""
    from keras_nii.storage import fail

    size = info.get("size")
    folder = os.path.dirname(target) or "."
    if isinstance(size, int):
        free = shutil.disk_usage(folder).free
        if size > free:
            raise fail(
                display(url),
                f"the object is {size} bytes, more than the {free} bytes free in {folder}",
            )
    fs, path = filesystem(url)
    tmp = os.path.join(folder, f".keras-nii-{uuid.uuid4().hex}.part")
    try:
        fs.get_file(path, tmp)
        os.replace(tmp, target)
    except OSError as err:
        raise fail(display(url), f"cannot fetch ({type(err).__name__}: {err})") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch(url: str, folder: str) -> str:
    """A local copy of the NIfTI file at ``url`` (and of its ``.hdr``/``.img``
    twin) in ``folder``; the local path of ``url``'s copy.

    Copies are named by a digest of the URL and of the objects' versions: a
    copy already in ``folder`` is the same object and is used as is (this is
    the download cache); a changed object gets a new name and is fetched.
    """
    urls = _twins(url)
    infos = [object_info(u) for u in urls]
    key = hashlib.sha256(
        "\n".join(
            f"{normalize(u)}\n{version(i)}" for u, i in zip(urls, infos, strict=True)
        ).encode()
    ).hexdigest()[:24]
    os.makedirs(folder, exist_ok=True)
    local = []
    for u, info in zip(urls, infos, strict=True):
        name = basename(u)
        target = os.path.join(folder, f"{key}-{name}")
        if not os.path.isfile(target) or os.path.getsize(target) != info.get("size"):
            _download(u, info, target)
        local.append(target)
    return local[0]


def upload(local_files: Sequence[str], urls: Sequence[str]) -> None:
    """Upload finished local files, each as one whole object."""
    from keras_nii.storage import fail

    for local, url in zip(local_files, urls, strict=True):
        fs, path = filesystem(url)
        parent = posixpath.dirname(path)
        try:
            if parent and not url.lower().startswith(("http://", "https://")):
                fs.makedirs(parent, exist_ok=True)
            fs.put_file(local, path)
        except (OSError, ValueError, NotImplementedError) as err:
            raise fail(display(url), f"cannot upload ({type(err).__name__}: {err})") from err


def list_folder(url: str, suffixes: Sequence[str]) -> list[str]:
    """The URLs of the objects directly in the folder ``url`` whose names end
    with one of ``suffixes`` (case-insensitive), hidden names left out, sorted."""
    from keras_nii.storage import fail

    fs, path = filesystem(url)
    try:
        fs.invalidate_cache(path)
        entries = fs.ls(path, detail=True)
    except FileNotFoundError as err:
        raise fail(display(url), "no such folder") from err
    except (OSError, ValueError) as err:
        raise fail(display(url), f"cannot list ({type(err).__name__}: {err})") from err
    found = []
    base = url.rstrip("/")
    for entry in entries:
        if entry.get("type", "file") != "file":
            continue
        name = posixpath.basename(entry["name"].rstrip("/"))
        if name.startswith(".") or not name.lower().endswith(tuple(suffixes)):
            continue
        found.append(f"{base}/{name}")
    return sorted(found)
