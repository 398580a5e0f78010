"""Read and write NIfTI volumes with their geometry.

`load_nifti` turns a ``.nii``, ``.nii.gz`` or ``.hdr``/``.img`` file (NIfTI-1 or
NIfTI-2) into a :class:`Volume`: a channels-last array ``(x, y, z, c)`` plus the
affine of that array and what is needed to write a result back in the source
file's own voxel order. `save_nifti` is the way back.

Everything format-related is nibabel's: scaling comes from ``dataobj``
(slope/intercept, applied once), reorientation from ``nibabel.orientations``
(axis flips and transposes only, never a resampling).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import mmap
import os
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt_tools
from nibabel.arrayproxy import ArrayProxy
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from keras_nii import remote, storage
from keras_nii.spacing import check_interpolation, check_spacing, resample_to_spacing
from keras_nii.storage import NiftiError

__all__ = ["NiftiError", "Volume", "load_nifti", "save_nifti", "NIFTI_SUFFIXES"]

NIFTI_SUFFIXES = (".nii.gz", ".nii", ".hdr", ".img")
NonFinitePolicy = Literal["raise", "zero", "keep"]
_NIFTI_TYPES = (nib.Nifti1Image, nib.Nifti2Image, nib.Nifti1Pair, nib.Nifti2Pair)
_RAS = ornt_tools.axcodes2ornt(("R", "A", "S"))


def _identity_ornt() -> np.ndarray:
    return np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


@dataclass(frozen=True, eq=False)
class Volume:
    """A NIfTI volume as a channels-last array, with its geometry.

    Attributes:
        array: ``(x, y, z, c)`` array. 3D files have ``c == 1``; for 4D files the
            4th axis (time, or modalities) becomes the channels. As read by
            :func:`load_nifti` it is in memory, writable, and laid out as
            nibabel decoded it -- Fortran order (NIfTI stores x fastest),
            seen through the flips and axis swaps of the reorientation -- so
            it is generally *not* C-contiguous: reordering every volume would
            cost a full transposing copy that most uses do not need (batches
            of :class:`keras_nii.data.NiftiDataset` are C-ordered). Call
            ``np.ascontiguousarray(volume.array)`` where C order matters.
        affine: 4x4 voxel-to-world (RAS+ mm) matrix of ``array`` as returned,
            so ``affine @ [i, j, k, 1]`` is the world position of
            ``array[i, j, k]``.
        header: the source file's header (a copy), or ``None`` for a volume
            made in memory.
        path: the source file as an absolute path (so that a later
            ``os.chdir`` does not change which file it names), or ``None``.
        source_affine: the affine stored in the source file.
        source_shape: the data shape stored in the source file.
        orientation: the nibabel orientation transform (``(3, 2)`` array) that
            took the source voxel axes to the axes of ``array``; the identity
            when the file was read with ``canonical=False``.
        resampling: for a volume read with ``load_nifti(..., spacing=...)``,
            the :class:`keras_nii.spacing.Resampling` from the file's grid
            (reoriented) to the grid of ``array``, else ``None``.
    """

    array: np.ndarray
    affine: np.ndarray
    header: Any = None
    path: str | None = None
    source_affine: np.ndarray | None = None
    source_shape: tuple[int, ...] | None = None
    orientation: np.ndarray = field(default_factory=_identity_ornt)
    resampling: Any = None
    #: ``(st_dev, st_ino)`` of the source file (and its pair twin) when it was
    #: read: save_nifti(..., like=) refuses to write over them, even renamed
    source_files: tuple[tuple[int, int], ...] = field(default=(), repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``array``: ``(x, y, z, c)``."""
        return tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes in mm along the three axes of ``array``."""
        return tuple(float(v) for v in nib.affines.voxel_sizes(self.affine))

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Orientation codes of ``array``'s axes, e.g. ``('R', 'A', 'S')``."""
        return tuple(nib.aff2axcodes(self.affine))

    def to_source(self, array: np.ndarray, interpolation: str | None = None) -> np.ndarray:
        """Put an array laid out like ``self.array`` back in the source voxel order.

        For a volume read with ``spacing=``, the array is first resampled back
        onto the file's own grid (see :meth:`keras_nii.spacing.Resampling.invert`;
        ``interpolation`` defaults to ``"label"`` for integer and bool arrays,
        ``"linear"`` for float ones).
        """
        array = np.asarray(array)
        if array.ndim < 3:
            raise ValueError(f"array must have at least 3 dimensions, got shape {array.shape}")
        if tuple(array.shape[:3]) != tuple(self.array.shape[:3]):
            raise ValueError(
                f"array of spatial shape {tuple(array.shape[:3])} does not match the volume's "
                f"spatial shape {tuple(self.array.shape[:3])}"
                + (f" ({self.path})" if self.path else "")
            )
        if self.resampling is not None:
            array = self.resampling.invert(array, interpolation)
        return ornt_tools.apply_orientation(array, _invert_ornt(self.orientation))


def _invert_ornt(transform: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``transform``."""
    transform = np.asarray(transform)
    inverse = np.empty_like(transform)
    for axis, (new_axis, flip) in enumerate(transform):
        inverse[int(new_axis)] = (axis, flip)
    return inverse


_fail = storage.fail


def _has_nifti_suffix(path: str) -> bool:
    return path.lower().endswith(NIFTI_SUFFIXES)


def _read_image(path: str):
    """nibabel's image of a NIfTI file, its header read and checked, its data not."""
    storage.regular_file(path, "NIfTI file")
    twin = storage.pair_twin(path)
    if twin is not None and os.path.lexists(twin):
        # a FIFO as the twin would block nibabel's read forever
        storage.regular_file(twin, "NIfTI file")
    _check_extension_size(path, twin)  # before nibabel reads them
    try:
        img = nib.load(path)
    except ImageFileError as err:
        raise _fail(path, f"not a NIfTI file ({err})") from err
    except MemoryError as err:
        raise _fail(path, "not enough memory to read its header") from err
    except Exception as err:  # OSError, EOFError, zlib.error, HeaderDataError, struct.error ...
        raise _fail(path, f"unreadable or corrupt header ({type(err).__name__}: {err})") from err
    if isinstance(img, nib.Cifti2Image):
        raise _fail(path, "is a CIFTI-2 file (surface/grayordinate data), not a volume")
    if not isinstance(img, _NIFTI_TYPES):
        raise _fail(path, f"not a NIfTI file (nibabel reads it as {type(img).__name__})")
    if twin is not None and not os.path.lexists(twin):
        # nibabel opens the twin spelled like this (the case of the suffix kept)
        others = storage.twin_variants(path)[1:]
        hint = (
            f" ({others[0]} exists, but the suffixes of a pair must match in case)"
            if others
            else ""
        )
        raise _fail(path, f"its pair file {twin} is missing (a .hdr/.img pair needs both){hint}")
    return img


#: header extensions (DICOM, AFNI, JSON ... between the header and the data)
#: larger than this are refused before nibabel reads them
MAX_EXTENSION_BYTES = 64 << 20


def _check_extension_size(path: str, twin: str | None) -> None:
    """Refuse a header whose extensions, as its ``vox_offset`` says, are huge.

    nibabel reads a flagged extension whole, as long as it says it is; in a
    ``.nii.gz`` a decompression bomb can make that any size (1 GiB took 15 s
    and 1 GB). So the header is peeked at, inflating no more than its own
    bytes, before nibabel is given the file.
    """
    if twin is not None:  # a pair's extensions are the rest of its .hdr: bounded by it
        return
    if path.lower().endswith(".gz"):
        block = storage.gunzip_peek(path, 544)
    else:
        try:
            with open(path, "rb") as file:
                block = file.read(544)
        except OSError:
            return  # nibabel reports it
    for klass, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
        for order in "<>":
            if len(block) < size + 4 or int(np.frombuffer(block[:4], f"{order}i4")[0]) != size:
                continue
            fields = np.frombuffer(block[:size], klass.template_dtype.newbyteorder(order))[0]
            flagged = block[size] != 0
            extensions = float(fields["vox_offset"]) - size - 4
            if flagged and np.isfinite(extensions) and extensions > MAX_EXTENSION_BYTES:
                raise _fail(
                    path,
                    f"its header extensions take {extensions:.0f} bytes (vox_offset "
                    f"{float(fields['vox_offset']):.0f}), more than the "
                    f"{MAX_EXTENSION_BYTES} keras-nii reads",
                )
            return


#: voxel sizes (mm) outside this range are a header error, not a scan
VOXEL_SIZE_RANGE = (1e-6, 1e6)


def _affine_problem(affine: np.ndarray) -> str | None:
    """What is wrong with a voxel-to-world affine, or ``None``."""
    affine = np.asarray(affine, dtype=np.float64)
    rows = ("srow_x", "srow_y", "srow_z")
    for i in range(3):
        if not np.all(np.isfinite(affine[i])):
            return f"row {i} ({rows[i]}) {affine[i].tolist()} is not finite"
    linear = affine[:3, :3]
    zero = [rows[i] for i in range(3) if not np.any(linear[i])]
    if zero:
        return (
            f"{', '.join(zero)} {'is' if len(zero) == 1 else 'are'} zero (no voxel axis spans it)"
        )
    sizes = np.sqrt(np.sum(linear**2, axis=0))
    low, high = VOXEL_SIZE_RANGE
    for axis, size in enumerate(sizes):
        if not low <= size <= high:
            return f"voxel size {size:.6g} mm along voxel axis {axis} is outside [{low}, {high}] mm"
    singular = np.linalg.svd(linear, compute_uv=False)
    if singular[-1] < 1e-6 * singular[0]:
        return "its voxel axes do not span 3D space (the 3x3 part is singular)"
    return None


def _checked_affine(img: Any, path: str) -> np.ndarray:
    """The voxel-to-world affine of ``img``, checked; a :class:`NiftiError` naming the field.

    nibabel's rule picks the sform when ``sform_code > 0``, else the qform when
    ``qform_code > 0``, else the voxel sizes (``pixdim``). An sform that is
    unusable (not finite, voxel sizes outside :data:`VOXEL_SIZE_RANGE`, axes
    that do not span space) beside a usable qform gives way to the qform, with
    a warning; with no usable transform the file is an error.
    """
    header = img.header
    if not isinstance(header, nib.Nifti1Header):  # NIfTI-2 headers are Nifti1Headers too
        affine = np.asarray(img.affine, dtype=np.float64)
        problem = _affine_problem(affine)
        if problem:
            raise _fail(path, f"unusable affine: {problem}")
        return affine
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    problems = []
    if sform_code:
        sform = header.get_sform()
        problem = _affine_problem(sform)
        if problem is None:
            return np.asarray(sform, dtype=np.float64)
        problems.append(f"sform (sform_code {sform_code}): {problem}")
    if qform_code:
        try:
            qform = header.get_qform()
            problem = _affine_problem(qform)
        except (HeaderDataError, ValueError, FloatingPointError) as err:
            problem = str(err)
        if problem is None:
            if problems:
                warnings.warn(
                    f"{path}: {problems[0]}; using the qform (qform_code {qform_code}) instead",
                    stacklevel=4,  # _checked_affine, load_nifti, its wrapper, the caller
                )
            return np.asarray(qform, dtype=np.float64)
        problems.append(
            f"qform (qform_code {qform_code}, quatern_b/c/d, qoffset, pixdim): {problem}"
        )
    if not problems:
        base = np.asarray(header.get_base_affine(), dtype=np.float64)
        problem = _affine_problem(base)
        if problem is None:
            return base
        problems.append(f"pixdim (no sform or qform): {problem}")
    raise _fail(path, "no usable voxel-to-world transform: " + "; ".join(problems))


def _spatial_layout(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return the (x, y, z, c) shape that a stored shape maps to, or raise."""
    if len(shape) == 3:
        return (*shape, 1)
    if len(shape) == 4:
        return shape
    if len(shape) == 5 and shape[3] == 1:
        return (shape[0], shape[1], shape[2], shape[4])
    raise _fail(
        path,
        f"unsupported data shape {shape}: keras-nii reads 3D volumes, 4D series (the 4th axis "
        "becomes channels) and 5D files whose 4th axis has length 1",
    )


def _memory_errors_name_the_file(load: Any) -> Any:
    """Turn a ``MemoryError`` anywhere in ``load`` into a NiftiError naming the file."""

    @functools.wraps(load)
    def wrapper(path: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return load(path, *args, **kwargs)
        except MemoryError as err:
            raise _fail(
                path, "too large for the memory at hand (the file itself may be fine)"
            ) from err

    return wrapper


@_memory_errors_name_the_file
def load_nifti(
    path: str | os.PathLike,
    *,
    canonical: bool = True,
    dtype: str | np.dtype = "float32",
    nonfinite: NonFinitePolicy = "raise",
    spacing: Any = None,
    interpolation: str | None = None,
) -> Volume:
    """Read a NIfTI file into a :class:`Volume`.

    Args:
        path: a ``.nii``, ``.nii.gz``, ``.hdr`` or ``.img`` file (NIfTI-1 or NIfTI-2),
            or a URL that fsspec understands (``s3://``, ``gs://``,
            ``http(s)://``, ``memory://`` ...; extra ``[cloud]``): the object
            is fetched whole into a temporary local file and read with the
            same checks and bounds; ``Volume.path`` is then the URL.
        canonical: reorient the voxel axes to RAS+ (axis 0 left->right,
            1 posterior->anterior, 2 inferior->superior) with flips and
            transposes only. ``False`` keeps the file's voxel order.
        dtype: dtype of the returned array. The file's scaling
            (``scl_slope``/``scl_inter``) is applied once, in floating point.
            An integer dtype (for label maps) rounds to the nearest integer
            before casting, so a label stored as 0.9999 becomes 1; values out
            of the dtype's range are an error.
        nonfinite: what to do with NaN / inf voxels: ``"raise"`` (default) a
            :class:`NiftiError` that counts them, ``"zero"`` replace them with
            0, ``"keep"`` pass them on unchanged (float dtypes only).
        spacing: ``(sx, sy, sz)`` in mm (a single number: isotropic; an entry
            ``None`` keeps that axis): resample the volume, after the
            reorientation, onto a grid of that spacing that keeps the file's
            direction cosines and covers its field of view (see
            :mod:`keras_nii.spacing`). ``Volume.affine`` is the new grid's,
            exactly; ``Volume.resampling`` records the map, and
            ``save_nifti(..., like=volume)`` resamples back onto the file's
            own grid. ``None`` (default): no resampling.
        interpolation: with ``spacing``: ``"linear"`` (the default for float
            dtypes), ``"label"`` (per-label linear interpolation then argmax:
            the default for integer and bool dtypes, i.e. label maps) or
            ``"nearest"``.

    Returns:
        A :class:`Volume` whose ``array`` is ``(x, y, z, c)``, in memory (never
        a memory map of the file), usually not C-contiguous (see
        :class:`Volume`).

    Raises:
        NiftiError: the file is missing, not NIfTI, truncated or corrupt, its
            header does not match its data, its rank is not supported, or it
            holds non-finite values under ``nonfinite="raise"``.
        ValueError: a bad argument.

    Example:

    >>> vol = load_nifti("sub-01_T1w.nii.gz")          # doctest: +SKIP
    >>> vol.shape, vol.spacing, vol.axcodes             # doctest: +SKIP
    ((176, 256, 256, 1), (1.0, 1.0, 1.0), ('R', 'A', 'S'))
    """
    path = remote.local_path(os.fspath(path))
    if remote.is_url(path):
        return _load_url(
            path,
            canonical=canonical,
            dtype=dtype,
            nonfinite=nonfinite,
            spacing=spacing,
            interpolation=interpolation,
        )
    dtype = np.dtype(dtype)
    if dtype.kind not in "fiub":
        raise ValueError(f"dtype must be a float, integer or bool dtype, got {dtype}")
    if nonfinite not in ("raise", "zero", "keep"):
        raise ValueError(f"nonfinite must be 'raise', 'zero' or 'keep', got {nonfinite!r}")
    if nonfinite == "keep" and dtype.kind != "f":
        raise ValueError("nonfinite='keep' needs a float dtype: NaN has no integer value")
    if spacing is not None:
        spacing = check_spacing(spacing)
        check_interpolation(interpolation, dtype)
    elif interpolation is not None:
        raise ValueError("interpolation= is for resampling: pass spacing= with it")

    img = _read_image(path)
    shape = tuple(int(s) for s in img.shape)
    layout = _spatial_layout(path, shape)
    if 0 in shape:
        raise _fail(path, f"empty volume: its header says the data shape is {shape}")
    affine = _checked_affine(img, path)

    on_disk = img.get_data_dtype()
    if on_disk.kind not in "fiub":
        raise _fail(
            path,
            f"unsupported on-disk data type {on_disk} (complex, RGB and other compound "
            "types are not volumes of real numbers)",
        )
    slope, inter = img.dataobj.slope, img.dataobj.inter
    work = dtype if dtype.kind == "f" else np.dtype("float64")
    if dtype.kind == "f" and dtype.itemsize < 4:
        work = np.dtype("float32")
    # integers scaled by finite factors are finite, unless they overflow ``work``
    exact_ints = on_disk.kind in "iub" and _scaled_range_is_finite(on_disk, slope, inter, work)
    try:
        # overflow to inf in scaling is counted below, under the nonfinite policy
        with np.errstate(over="ignore", invalid="ignore"):
            data = np.asarray(_data_proxy(img, path, work).__array__(work))
            if data.dtype != work:  # nibabel widens for large scale factors
                data = data.astype(work)
    except NiftiError:
        raise
    except MemoryError as err:
        raise _fail(path, "too large for the memory at hand (the file itself may be fine)") from err
    except Exception as err:  # nibabel/numpy report damage in many ways
        raise _fail(
            path,
            f"data cannot be read: truncated, corrupt, or smaller than its header says "
            f"({type(err).__name__}: {err})",
        ) from err
    if data.shape != shape:
        raise _fail(path, f"header shape {shape} does not match the data read {data.shape}")
    if _maps_a_file(data):
        # an uncompressed file with nothing to scale comes back as a memory map
        # of the file: read it into memory (the file may change or go away)
        data = data.copy(order="K")
    data = data.reshape(layout)  # a view: a trailing or inner axis of length 1

    # one cheap pass (no count, no index) for the usual all-finite volume
    if not exact_ints and not np.isfinite(data).all():
        bad = ~np.isfinite(data)
        n_bad = int(np.count_nonzero(bad))
        if n_bad:
            if nonfinite == "raise" or (nonfinite == "keep" and dtype.kind != "f"):
                raise _fail(
                    path,
                    f"{n_bad} non-finite voxel(s) (NaN or inf); pass nonfinite='zero' to "
                    "replace them with 0 or nonfinite='keep' to keep them",
                )
            if nonfinite == "zero":
                data = np.where(bad, 0, data).astype(data.dtype, copy=False)

    if dtype.kind in "iu":
        data = np.rint(data)
        info = np.iinfo(dtype)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise _fail(
                path,
                f"values in [{data.min()}, {data.max()}] do not fit dtype {dtype.name}",
            )
    elif dtype.kind == "b":
        data = data != 0
    data = data.astype(dtype, copy=False)

    if canonical:
        transform = ornt_tools.ornt_transform(ornt_tools.io_orientation(affine), _RAS)
        data = ornt_tools.apply_orientation(data, transform)
        array_affine = affine @ ornt_tools.inv_ornt_aff(transform, shape[:3])
    else:
        transform = _identity_ornt()
        array_affine = affine.copy()
    header = img.header.copy()
    # nibabel moves the scaling from the header to the data proxy on load; keep
    # it in our copy so save_nifti(..., like=) can write the source's encoding
    header.set_slope_inter(slope, inter)
    resampling = None
    if spacing is not None:
        data, resampling = resample_to_spacing(
            data, array_affine, spacing, interpolation=interpolation
        )
        array_affine = resampling.affine
    # no np.ascontiguousarray: the reoriented array stays a view of nibabel's
    # Fortran-ordered data (see Volume.array); a C-ordered copy here cost
    # ~6 ms per 128^3 volume, a third of the decompression itself
    return Volume(
        array=data,
        affine=array_affine,
        header=header,
        path=os.path.abspath(path),  # chdir-safe
        source_affine=affine,
        source_shape=shape,
        orientation=transform,
        resampling=resampling,
        source_files=tuple(
            key
            for key in (storage.identity(path), storage.identity(img.file_map["image"].filename))
            if key is not None
        ),
    )


def _scaled_range_is_finite(on_disk: np.dtype, slope: float, inter: float, work: np.dtype) -> bool:
    """Whether every value of ``on_disk`` integers, scaled, is finite in ``work``."""
    if not (np.isfinite(slope) and np.isfinite(inter)):
        return False
    info = np.iinfo(np.uint8 if on_disk.kind == "b" else on_disk)
    largest = max(abs(int(info.min)), abs(int(info.max))) * abs(float(slope)) + abs(float(inter))
    return largest < float(np.finfo(work).max)


def _data_proxy(img: Any, path: str, work: np.dtype) -> Any:
    """The array proxy to read ``img``'s data through, once the file is known to hold it.

    Before anything is allocated, the file must be large enough for the data
    its header describes, and the memory at hand must be enough to read it:
    a 2 KB file whose header claims 1000^3 voxels fails at once.

    nibabel reads a ``.nii.gz`` through :mod:`gzip`, which decompresses in
    small blocks with Python-level work around each, reads as many bytes as
    the header asks for (zero-filling them first, however many that is), and
    does not check the CRC. So a gzip-compressed data file is inflated here,
    by :func:`keras_nii.storage.gunzip_head`: in a few calls, no further than
    the header needs (a decompression bomb is not inflated), its CRC and
    length checked; nibabel's own :class:`~nibabel.arrayproxy.ArrayProxy`,
    with the shape, dtype, offset and scaling of the image's proxy, then reads
    the bytes in memory, so values, dtype and scaling are nibabel's by
    construction. Uncompressed files go through the image's proxy as nibabel
    opened it.
    """
    proxy = img.dataobj
    n_voxels = math.prod(img.shape)
    out_bytes = n_voxels * work.itemsize
    image_file = img.file_map["image"].filename
    if not (isinstance(proxy, ArrayProxy) and isinstance(image_file, str)):
        storage.check_memory(path, out_bytes, f"{n_voxels} voxels as {work.name}")
        return proxy
    data_bytes = n_voxels * proxy.dtype.itemsize
    end = int(proxy.offset) + data_bytes
    scaled = proxy.dtype != work or proxy.slope != 1 or proxy.inter != 0
    what = f"{n_voxels} voxels of {proxy.dtype.name}" + (f" as {work.name}" if scaled else "")
    if not image_file.lower().endswith(".gz"):
        size = storage.regular_file(image_file, "NIfTI file").st_size
        if size < end:
            where = "" if os.path.samefile(image_file, path) else f" ({image_file})"
            raise _fail(
                path,
                f"truncated or smaller than its header says: the data file{where} holds "
                f"{size} bytes, the header describes {end} ({data_bytes} bytes of voxel data "
                f"from offset {int(proxy.offset)})",
            )
        storage.check_memory(path, out_bytes, what)
        return proxy
    # besides the inflated bytes: nibabel's copy of the voxel data, the scaled array
    decoded = storage.gunzip_head(
        image_file, end, memory=data_bytes + (out_bytes if scaled else 0), what=what
    )
    spec = (proxy.shape, proxy.dtype, proxy.offset, proxy.slope, proxy.inter)
    return ArrayProxy(storage.MemoryFile(decoded), spec, mmap=False, order=proxy.order)


def _maps_a_file(array: np.ndarray) -> bool:
    """Whether ``array``'s memory is a memory map (nibabel maps uncompressed files)."""
    base: Any = array
    while base is not None:
        if isinstance(base, (mmap.mmap, np.memmap)):
            return True
        base = getattr(base, "base", None)
    return False


def _requantize(data: np.ndarray, header: Any) -> tuple[np.ndarray, float, float] | None:
    """Express float ``data`` in the header's integer dtype and scaling, if that is lossless.

    A volume read from an integer file with scl_slope/scl_inter and written back
    unchanged then reproduces the source file itself, not a float copy of it.
    """
    on_disk = header.get_data_dtype()
    if data.dtype.kind != "f" or on_disk.kind not in "iu" or data.size == 0:
        return None
    slope, inter = header.get_slope_inter()
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if not np.all(np.isfinite(data)):
        return None
    raw = np.rint((data.astype(np.float64) - inter) / slope)
    info = np.iinfo(on_disk)
    if raw.min() < info.min or raw.max() > info.max:
        return None
    back = (raw * slope + inter).astype(data.dtype)
    tolerance = 2 * np.finfo(data.dtype).eps * np.maximum(np.abs(data), abs(inter) + 1.0)
    if not np.all(np.abs(back - data) <= tolerance):
        return None
    return raw.astype(on_disk), slope, inter


def _load_url(url: str, *, cache: str | None = None, **kwargs: Any) -> Volume:
    """:func:`load_nifti` of a URL: the object (and its pair twin) fetched whole
    into a local file (in ``cache``, or a temporary folder removed afterwards),
    read with every check of a local file, errors naming the URL."""
    with tempfile.TemporaryDirectory(prefix="keras-nii-fetch-") as tmp:
        local = remote.fetch(url, cache or tmp)
        try:
            volume = load_nifti(local, **kwargs)
        except NiftiError as err:
            raise NiftiError(str(err).replace(local, remote.display(url))) from None
    # the array is in memory (never a map of the file): the local copy may go
    return dataclasses.replace(volume, path=url, source_files=())


def _save_url(array: Any, url: str, like: Volume | None, **kwargs: Any) -> str:
    """:func:`save_nifti` to a URL: written to a finished local file (and twin)
    first, then uploaded as whole objects, so no partial object is visible."""
    if like is not None and like.path is not None:
        source = remote.overwritten_url(url, [like.path])
        if source is not None:
            raise ValueError(
                f"refusing to write {remote.display(url)}: it would overwrite "
                f"{remote.display(source)}, the source file of like="
            )
    if like is not None and remote.is_url(like.path or ""):
        like = dataclasses.replace(like, path=None, source_files=())
    name = remote.basename(url)
    with tempfile.TemporaryDirectory(prefix="keras-nii-upload-") as tmp:
        local = os.path.join(tmp, name)
        save_nifti(array, local, like=like, **kwargs)
        twin = storage.pair_twin(local)
        files = [local] if twin is None else [local, twin]
        urls = [url] if twin is None else [url, remote.twin(url)]
        remote.upload(files, urls)
    return url


def save_nifti(
    array: Any,
    path: str | os.PathLike,
    *,
    like: Volume | None = None,
    affine: np.ndarray | None = None,
    dtype: str | np.dtype | None = None,
    interpolation: str | None = None,
) -> Path | str:
    """Write an array as a NIfTI file.

    Args:
        array: ``(x, y, z)`` or ``(x, y, z, c)`` (a NumPy array or anything
            ``np.asarray`` takes, such as a tensor). A single channel is
            written as a 3D volume, several as a 4D one.
        path: where to write; the suffix picks the format (``.nii``,
            ``.nii.gz``, or a ``.hdr``/``.img`` pair). A URL that fsspec
            understands (``s3://``, ``gs://``, ``memory://`` ...; extra
            ``[cloud]``) is written as a finished local file first, then
            uploaded as one whole object (and its twin, for a pair).
        like: a :class:`Volume` from :func:`load_nifti` whose array ``array``
            is laid out like. The reorientation done at load time is undone,
            and the file is written in the source's own voxel order, with its
            affine and header (units, TR, codes), so it overlays the source
            exactly. Writing over ``like``'s own file is refused. For a
            ``like`` read with ``spacing=``, ``array`` (on ``like``'s grid) is
            first resampled back onto the file's own grid, so the file written
            has the source's shape, affine and voxel order.
        affine: the 4x4 voxel-to-world matrix, when ``like`` is not given
            (default: identity).
        dtype: the on-disk dtype. Default: the array's, except that bool is
            written as uint8, float16 as float32 (NIfTI has no half type) and
            64-bit integers as 32-bit ones when the values fit (an error
            otherwise; pass ``dtype="int64"`` to write 64-bit integers).
        interpolation: how an array is resampled back when ``like`` was read
            with ``spacing=``: ``"label"`` (default for integer and bool
            arrays: per-label linear interpolation then argmax) or
            ``"nearest"``; ``"linear"`` (default for float arrays).

    Returns:
        The path written (a ``Path``; the URL as given for a URL).

    Raises:
        ValueError: bad arguments (shapes, suffix, writing over the source).
        NiftiError: the file cannot be written.
    """
    path = remote.local_path(os.fspath(path))
    if not _has_nifti_suffix(path):
        raise ValueError(f"path must end with one of {NIFTI_SUFFIXES}, got {path!r}")
    if remote.is_url(path):
        return _save_url(array, path, like, affine=affine, dtype=dtype, interpolation=interpolation)
    data = np.asarray(array)
    source_rank = None if like is None or like.source_shape is None else len(like.source_shape)
    if data.ndim == 4 and data.shape[-1] == 1 and source_rank in (None, 3):
        # one channel is a 3D volume, unless the source was a 4D/5D file of one volume
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise ValueError(
            f"array must be (x, y, z) or (x, y, z, c), got shape {data.shape} for {path}"
        )
    resampled_back = like is not None and like.resampling is not None
    if dtype is not None and not resampled_back:
        data = data.astype(np.dtype(dtype), copy=False)
    elif dtype is not None:
        pass  # cast once back on the file's grid: a float image is resampled as one
    elif data.dtype == bool:
        data = data.astype(np.uint8)
    elif data.dtype == np.float16:
        # NIfTI has no half-precision type (mixed-precision model outputs)
        data = data.astype(np.float32)
    elif data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        # e.g. np.argmax output; most NIfTI tools do not read 64-bit integers
        small = np.dtype(data.dtype.kind + "4")
        info = np.iinfo(small)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise ValueError(
                f"cannot write {data.dtype} values in [{data.min()}, {data.max()}] to {path} as "
                f"{small.name}; pass dtype={data.dtype.name!r} to write 64-bit integers"
            )
        data = data.astype(small)
    elif data.dtype.kind not in "fiuc":
        raise ValueError(f"cannot write an array of dtype {data.dtype} to {path}")

    header = None
    scaling = None
    if like is not None:
        if affine is not None:
            raise ValueError("pass either like= or affine=, not both")
        if like.path is not None or like.source_files:
            source = storage.overwritten_input(
                [path], [like.path] if like.path is not None else [], like.source_files
            )
            if source is not None:
                raise ValueError(
                    f"refusing to write {path}: it would overwrite {source}, the source file "
                    f"of like= ({like.path})"
                )
        data = like.to_source(data, interpolation)
        if dtype is not None and resampled_back:
            data = data.astype(np.dtype(dtype), copy=False)
        if dtype is None and isinstance(like.header, nib.Nifti1Header):
            scaling = _requantize(data, like.header)
        affine = like.source_affine if like.source_affine is not None else like.affine
        if like.source_shape is not None and len(like.source_shape) == 5 and data.ndim == 4:
            data = data[:, :, :, None, :]
        if isinstance(like.header, nib.Nifti1Header):
            header = like.header.copy()
    if affine is None:
        affine = np.eye(4)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got {affine!r}")

    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    if path.lower().endswith((".hdr", ".img")):
        klass = nib.Nifti2Pair if klass is nib.Nifti2Image else nib.Nifti1Pair
    if header is not None and not isinstance(header, klass.header_class):
        endianness = header.endianness
        header = klass.header_class.from_header(header)
        if header.endianness != endianness:
            # from_header makes a native-endian header; keep the source's byte order
            header = header.as_byteswapped(endianness)
    if scaling is not None:
        data = scaling[0]
    try:
        img = klass(data, affine, header=header, dtype=data.dtype)
        img.header.set_data_dtype(data.dtype)
    except (HeaderDataError, ValueError) as err:
        raise ValueError(f"cannot write an array of dtype {data.dtype} to {path}: {err}") from err
    if scaling is not None:
        # written as stored in the source: same integers, same slope and intercept
        img.header.set_slope_inter(scaling[1], scaling[2])
    if header is not None and not np.allclose(img.header.get_best_affine(), affine, atol=1e-6):
        # keep the source's sform/qform codes (scanner, aligned, MNI ...)
        img.set_sform(affine, int(header["sform_code"]) or 2)
        img.set_qform(affine, int(header["qform_code"]) or 1)
    # otherwise the source header's own sform, qform and pixdim already say
    # this affine: they are kept bit for bit (recomputing the qform from the
    # affine would change pixdim in the last digits)

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise NiftiError(f"{path}: cannot write: folder {directory} does not exist")
    # write next to the target, then move into place: a failed write never
    # leaves a half-written file, or half of a new .hdr/.img pair, where a good
    # one was (nibabel creates the temporary files itself, so they get the
    # usual permissions under the umask, not mkstemp's owner-only 0600)
    twin = storage.pair_twin(path)
    if twin is not None:
        suffix = ".hdr"
    else:
        suffix = ".nii.gz" if path.lower().endswith(".nii.gz") else ".nii"
    tmp = os.path.join(directory, f".keras-nii-{uuid.uuid4().hex}{suffix}")
    moves = [(tmp, path)]
    if twin is not None:
        moves = [(tmp[: -len(".hdr")] + ".img", path if path.lower().endswith(".img") else twin)]
        moves.append((tmp, twin if path.lower().endswith(".img") else path))
    try:
        img.to_filename(tmp)
        storage.replace_together(moves)
    except OSError as err:
        for name, _ in moves:
            if os.path.exists(name):
                os.unlink(name)
        raise NiftiError(f"{path}: cannot write: {err}") from err
    return Path(path)
