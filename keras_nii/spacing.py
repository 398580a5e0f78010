"""Resampling to a voxel spacing, and back.

Scans come at every voxel size (0.5 to 5 mm, often thin in-plane and thick
across slices); a network is trained at one. :func:`resample_to_spacing`
puts a volume on a grid of a given spacing, and :class:`Resampling`, which it
returns, takes arrays on that grid back onto the grid the volume came from.
``load_nifti(path, spacing=...)``, ``save_nifti(array, path, like=vol)``,
``NiftiDataset(..., spacing=...)`` and ``predict_nifti(..., spacing=...)``
use them; they are public for arrays that did not come from a file.

The geometry. The new grid keeps the volume's direction cosines (an oblique
scan stays oblique; only the voxel size changes, as MONAI's ``Spacing`` does),
so along each voxel axis the map from new indices to old ones is a scale and a
shift: ``old = shift + scale * new`` with ``scale = new spacing / old
spacing``. The new grid has ``ceil(n * old / new)`` voxels on an axis of
``n`` (an extent within 1e-3 voxel of a whole number is not rounded up), and
is centred on the old one, so its field of view covers the old field of view
(``n * old`` mm) and overhangs it by less than one new voxel. The new affine
is ``affine @ [[diag(scale), shift], [0, 1]]``: voxel ``(i, j, k)`` of the
result holds the value at ``new_affine @ (i, j, k, 1)``, exactly.

The sampling is separable -- one pass per axis, the axis that shrinks most
first -- and vectorised in NumPy (no SciPy, no Keras): each pass gathers the
two neighbours of every sample point along its axis and blends them, block by
block, so that the temporaries stay in the CPU's cache, the blocks spread over
the CPU's cores (NumPy releases the GIL). Sample points beyond
the outermost voxel centres take the edge value (``mode="nearest"`` in
SciPy's terms), never zeros: a voxel of the new grid that overhangs the old
field of view is a copy of its neighbour inside it.

Interpolation:

- ``"linear"`` (images): per-axis linear interpolation, i.e. trilinear.
  A field that is linear in world coordinates is reproduced, up to float32
  rounding, at every sample point inside the old grid. Cubic interpolation
  is not offered: it overshoots at edges (negative intensities next to
  bone or air, ringing at label borders) and would cost several times more;
  the peers this is measured against (``scipy.ndimage.zoom(order=1)``,
  MONAI's ``Spacing``, TorchIO's ``Resample``) are linear by default too.
- ``"label"`` (label maps, the default for integer and bool arrays): each
  label's indicator is interpolated linearly and every voxel takes the label
  of largest value (argmax; ties go to the smaller label), as nnU-Net and
  MONAI offer. Upsampling thick slices then gives smooth borders instead of
  nearest-neighbour staircases, and a structure is neither shifted nor
  thickened. Each label is resampled inside its own bounding box, so small
  structures cost little; the most frequent label (the background) is not
  resampled at all but follows from the others (the indicators of all labels
  sum to one, before and after linear interpolation), and outside the part
  of the new grid that some other label reaches everything is background.
- ``"nearest"``: the value of the nearest voxel, per axis (any dtype; a
  sample point halfway between two voxels takes the upper one).

:func:`resample_onto` puts an array onto another grid whose voxel axes are
parallel to its own (another resolution or field of view, as for two scans
of one session): the same separable sampler.

No anti-aliasing filter is applied when a grid is coarsened (as with the
peers above): smooth first if a large downsampling must not alias.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "Resampling",
    "resample_to_spacing",
    "spacing_grid",
    "resample_axes",
    "resample_onto",
    "check_spacing",
    "check_interpolation",
    "INTERPOLATIONS",
]

Interpolation = Literal["linear", "label", "nearest"]
INTERPOLATIONS = ("linear", "label", "nearest")

#: a new extent within this many voxels of a whole number is not rounded up
_EXTENT_TOLERANCE = 1e-3
#: two spacings closer than this (relative) are the same: that axis is kept as it is
_SAME_SPACING = 1e-6
#: largest cross term (relative) of a map between grids that still counts as per-axis
_PARALLEL_TOLERANCE = 1e-4
#: bytes of each temporary of a pass (two gathers and their blend stay in cache)
_BLOCK_BYTES = 1 << 20


def check_spacing(
    spacing: Any, name: str = "spacing"
) -> tuple[float | None, float | None, float | None]:
    """``spacing`` as three positive floats or ``None`` (keep that axis), or a ValueError.

    A single number is an isotropic spacing.
    """
    if isinstance(spacing, numbers.Real) and not isinstance(spacing, bool):
        spacing = (spacing,) * 3
    if isinstance(spacing, (str, bytes)) or not isinstance(spacing, (Sequence, np.ndarray)):
        raise ValueError(
            f"{name} must be a positive number or three of them (None keeps an axis), "
            f"got {spacing!r}"
        )
    values = list(spacing)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 entries (x, y, z) in mm, got {spacing!r}")
    out: list[float | None] = []
    for value in values:
        if value is None:
            out.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} entries must be numbers or None, got {spacing!r}")
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} entries must be positive and finite, got {spacing!r}")
        out.append(value)
    return tuple(out)  # type: ignore[return-value]


def check_interpolation(interpolation: Any, dtype: Any) -> str:
    """The interpolation for an array of ``dtype`` (``None``: its default), or a ValueError."""
    dtype = np.dtype(dtype)
    if interpolation is None:
        return "label" if dtype.kind in "iub" else "linear"
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {INTERPOLATIONS} or None, got {interpolation!r}"
        )
    if interpolation == "linear" and dtype.kind not in "f":
        raise ValueError(
            f"interpolation='linear' needs a float array, got {dtype}; use 'label' or "
            "'nearest' for label maps, or cast the array to float"
        )
    if interpolation == "label" and dtype.kind not in "iub":
        raise ValueError(
            f"interpolation='label' needs an integer or bool array (a label map), got {dtype}"
        )
    return interpolation


def spacing_grid(
    shape: Sequence[int], affine: np.ndarray, spacing: Any
) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray, np.ndarray]:
    """The grid of spacing ``spacing`` over a grid of ``shape`` and ``affine``.

    Args:
        shape: ``(x, y, z)`` of the old grid.
        affine: its 4x4 voxel-to-world matrix.
        spacing: the new voxel sizes in mm, ``(sx, sy, sz)``; an entry
            ``None`` keeps that axis as it is. See :func:`check_spacing`.

    Returns:
        ``(new_shape, new_affine, scale, shift)``: per axis, old index =
        ``shift + scale * new index``; ``new_affine = affine @ [[diag(scale),
        shift], [0, 1]]`` (float64).
    """
    spacing = check_spacing(spacing)
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive ints (x, y, z), got {shape!r}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got {affine!r}")
    old = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    if np.any(old == 0):
        raise ValueError(f"affine has a zero-length voxel axis: {affine!r}")
    new_shape, scale, shift = [], np.ones(3), np.zeros(3)
    for axis, (n, have, want) in enumerate(zip(shape, old, spacing, strict=True)):
        if want is None or abs(want - have) <= _SAME_SPACING * have:
            new_shape.append(n)
            continue
        ratio = want / have
        extent = n / ratio
        m = max(1, math.ceil(extent - _EXTENT_TOLERANCE))
        scale[axis] = ratio
        # centred: the middle of the new grid is the middle of the old one
        shift[axis] = (n - 1) / 2.0 - ratio * (m - 1) / 2.0
        new_shape.append(m)
    index = np.eye(4)
    index[:3, :3] = np.diag(scale)
    index[:3, 3] = shift
    return tuple(new_shape), affine @ index, scale, shift  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class Resampling:
    """How a volume was put on a grid of another spacing, and the way back.

    Along each voxel axis ``d``, index ``i`` of the new grid is index
    ``shift[d] + scale[d] * i`` of the old grid (see :func:`spacing_grid`).

    Attributes:
        source_shape: ``(x, y, z)`` of the old grid (for a volume from
            ``load_nifti(..., spacing=...)``: the file's grid, reoriented).
        source_affine: the old grid's affine.
        shape: ``(x, y, z)`` of the new grid.
        affine: the new grid's affine.
        scale: ``(3,)`` new spacing over old spacing, per axis.
        shift: ``(3,)`` old index of new voxel 0, per axis.
        spacing: the spacing asked for (``None``: an axis kept).
        interpolation: how the volume was resampled.
    """

    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    shape: tuple[int, int, int]
    affine: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    spacing: tuple[float | None, float | None, float | None]
    interpolation: str

    def apply(self, array: Any, interpolation: Interpolation | None = None) -> np.ndarray:
        """Resample an array on the old grid onto the new one.

        ``interpolation`` defaults to ``"label"`` for integer and bool arrays and
        to ``"linear"`` for float ones.
        """
        array = _check_grid(array, self.source_shape, "the old grid")
        return resample_axes(array, self.shape, self.scale, self.shift, interpolation=interpolation)

    def invert(self, array: Any, interpolation: Interpolation | None = None) -> np.ndarray:
        """Resample an array on the new grid back onto the old one.

        The exact inverse map (``new = (old - shift) / scale``), so the result
        lies on the old grid (``source_shape``, ``source_affine``).
        ``interpolation`` defaults to ``"label"`` for integer and bool arrays
        (labels) and to ``"linear"`` for float ones (images, probabilities).
        """
        array = _check_grid(array, self.shape, "the resampled grid")
        return resample_axes(
            array,
            self.source_shape,
            1.0 / self.scale,
            -self.shift / self.scale,
            interpolation=interpolation,
        )


def _check_grid(array: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim < 3 or tuple(array.shape[:3]) != tuple(shape):
        raise ValueError(
            f"array of shape {array.shape} is not on {what}: its spatial shape must be {shape}"
        )
    return array


def resample_to_spacing(
    array: Any,
    affine: np.ndarray,
    spacing: Any,
    *,
    interpolation: Interpolation | None = None,
) -> tuple[np.ndarray, Resampling]:
    """Resample an ``(x, y, z, ...)`` array to a voxel spacing.

    Args:
        array: the volume; axes after the third (channels) are carried along.
        affine: its 4x4 voxel-to-world matrix (mm).
        spacing: ``(sx, sy, sz)`` in mm, an entry ``None`` keeping that axis
            (a single number: isotropic).
        interpolation: ``"linear"``, ``"label"`` or ``"nearest"`` (see the
            module's documentation). Default: ``"label"`` for integer and bool
            arrays, ``"linear"`` for float ones.

    Returns:
        ``(resampled, resampling)``: the array on the new grid (same dtype,
        same memory order), and the :class:`Resampling` that holds the new
        affine (``resampling.affine``) and the way back
        (``resampling.invert``).

    Example:

    >>> image = np.zeros((64, 64, 20), np.float32)
    >>> out, how = resample_to_spacing(image, np.diag([0.7, 0.7, 5.0, 1.0]), 1.5)
    >>> out.shape, how.affine.diagonal().round(3).tolist()
    ((30, 30, 67), [1.5, 1.5, 1.5, 1.0])
    """
    array = np.asarray(array)
    if array.ndim < 3:
        raise ValueError(f"array must be (x, y, z) or (x, y, z, c), got shape {array.shape}")
    interpolation = check_interpolation(interpolation, array.dtype)
    shape, new_affine, scale, shift = spacing_grid(array.shape[:3], affine, spacing)
    out = resample_axes(array, shape, scale, shift, interpolation=interpolation)
    how = Resampling(
        source_shape=tuple(int(n) for n in array.shape[:3]),
        source_affine=np.asarray(affine, dtype=np.float64).copy(),
        shape=shape,
        affine=new_affine,
        scale=scale,
        shift=shift,
        spacing=check_spacing(spacing),
        interpolation=interpolation,
    )
    return out, how


def resample_onto(
    array: Any,
    affine: np.ndarray,
    shape: Sequence[int],
    target_affine: np.ndarray,
    *,
    interpolation: Interpolation | None = None,
) -> np.ndarray:
    """Resample an array onto another grid whose voxel axes are parallel to its own.

    Two scans of one session at different resolutions (a 1 mm T1 and a
    1 x 1 x 3 mm FLAIR, say) share their direction cosines: the map between
    their grids is a scale and a shift per voxel axis, which
    :func:`resample_axes` does. A rotation or an axis swap between the two
    grids is not such a map: that is a ValueError (register the scans first).

    Args:
        array: ``(x, y, z, ...)`` on the grid of ``affine``.
        affine: its 4x4 voxel-to-world matrix.
        shape: ``(x, y, z)`` of the target grid.
        target_affine: the target grid's 4x4 voxel-to-world matrix.
        interpolation: as for :func:`resample_to_spacing`.

    Returns:
        The array on the target grid.
    """
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    target_affine = np.asarray(target_affine, dtype=np.float64)
    for name, value in (("affine", affine), ("target_affine", target_affine)):
        if value.shape != (4, 4) or not np.all(np.isfinite(value)):
            raise ValueError(f"{name} must be a finite 4x4 matrix, got {value!r}")
    index_map = np.linalg.inv(affine) @ target_affine
    linear = index_map[:3, :3]
    scale = np.diag(linear).copy()
    across = np.abs(linear - np.diag(scale)).max()
    if across > _PARALLEL_TOLERANCE * np.abs(scale).max() or np.any(scale <= 0):
        raise ValueError(
            "the two grids' voxel axes are not parallel (the map between them is not a scale "
            f"and a shift per axis, but\n{np.array2string(linear, precision=4)}): register "
            "the volumes onto one grid first"
        )
    return resample_axes(array, shape, scale, index_map[:3, 3], interpolation=interpolation)


# --------------------------------------------------------------------------- #
# the separable sampler
# --------------------------------------------------------------------------- #


def resample_axes(
    array: Any,
    shape: Sequence[int],
    scale: Sequence[float],
    shift: Sequence[float],
    *,
    interpolation: Interpolation | None = None,
) -> np.ndarray:
    """Sample ``array`` at ``shift + scale * index`` along each of its first 3 axes.

    The separable resampler under :func:`resample_to_spacing` and
    :meth:`Resampling.invert`: ``out[i, j, k]`` is ``array`` interpolated at
    old index ``(shift[0] + scale[0] * i, shift[1] + scale[1] * j, shift[2] +
    scale[2] * k)``, positions beyond the edge voxels taking the edge value.
    An axis with ``scale == 1`` and ``shift == 0`` and its length unchanged is
    copied, not interpolated.

    Returns:
        An array of spatial shape ``shape``, with ``array``'s trailing axes and
        dtype, in ``array``'s memory order (Fortran-ordered in, Fortran out).
    """
    array = np.asarray(array)
    if array.ndim < 3:
        raise ValueError(f"array must have at least 3 dimensions, got shape {array.shape}")
    interpolation = check_interpolation(interpolation, array.dtype)
    shape = tuple(int(n) for n in shape)
    scale = np.asarray(scale, dtype=np.float64).reshape(3)
    shift = np.asarray(shift, dtype=np.float64).reshape(3)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive ints, got {shape!r}")
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0) and np.all(np.isfinite(shift))):
        raise ValueError(f"scale must be positive and shift finite, got {scale!r}, {shift!r}")
    if array.size == 0:
        raise ValueError(f"cannot resample an empty array (shape {array.shape})")
    axes = [
        (axis, shape[axis], float(scale[axis]), float(shift[axis]))
        for axis in range(3)
        if not (shape[axis] == array.shape[axis] and scale[axis] == 1 and shift[axis] == 0)
    ]
    if not axes:
        return array.copy(order="K")
    # the axis that shrinks most goes first: every later pass has less to do
    axes.sort(key=lambda a: a[1] / array.shape[a[0]])
    if interpolation == "label":
        return _resample_labels(array, axes)
    if interpolation == "nearest":
        return _resample_nearest(array, axes)
    if array.dtype.itemsize < 4:  # float16: compute in float32
        return _resample_linear(array.astype(np.float32), axes).astype(array.dtype)
    return _resample_linear(array, axes)


def _positions(n: int, m: int, scale: float, shift: float) -> np.ndarray:
    """Old indices of the ``m`` new ones, clamped to the edge voxel centres."""
    return np.clip(shift + scale * np.arange(m, dtype=np.float64), 0.0, n - 1.0)


def _linear_taps(n: int, m: int, scale: float, shift: float):
    """``(i0, i1, w)``: the new sample ``t`` is ``(1 - w[t]) * a[i0[t]] + w[t] * a[i1[t]]``."""
    x = _positions(n, m, scale, shift)
    i0 = np.minimum(np.floor(x).astype(np.intp), max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, x - i0


def _memory_order(array: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Axis permutation from slowest to fastest in memory, and the permuted view."""
    strides = [abs(s) if n > 1 else 0 for s, n in zip(array.strides, array.shape, strict=True)]
    # stable: among equal strides (length-1 axes) keep the C order
    order = sorted(range(array.ndim), key=lambda a: -strides[a])
    return order, array.transpose(order)


def _from_memory_order(result: np.ndarray, order: list[int]) -> np.ndarray:
    return result.transpose(np.argsort(order))


_POOL: ThreadPoolExecutor | None = None
_POOL_PID: int | None = None


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _map(function, items: list) -> None:
    """Run ``function`` on each item, on the CPU's cores (NumPy releases the GIL)."""
    global _POOL, _POOL_PID
    if len(items) < 2 or _threads() == 1:
        for item in items:
            function(item)
        return
    if _POOL is None or _POOL_PID != os.getpid():  # a fresh pool in a forked worker
        _POOL = ThreadPoolExecutor(_threads(), thread_name_prefix="keras-nii-resample")
        _POOL_PID = os.getpid()
    for future in [_POOL.submit(function, item) for item in items]:
        future.result()


def _blocks(length: int, unit_bytes: int) -> list[slice]:
    """Slices of ``range(length)`` holding about ``_BLOCK_BYTES`` each."""
    step = max(1, _BLOCK_BYTES // max(unit_bytes, 1))
    return [slice(a, min(a + step, length)) for a in range(0, length, step)]


def _lerp_pass(src: np.ndarray, axis: int, m: int, scale: float, shift: float) -> np.ndarray:
    """One linear pass along ``axis`` of ``src`` (axes in memory order), C-ordered out."""
    n = src.shape[axis]
    i0, i1, w = _linear_taps(n, m, scale, shift)
    out_shape = list(src.shape)
    out_shape[axis] = m
    out = np.empty(out_shape, dtype=src.dtype)
    weight_shape = [1] * src.ndim
    weight_shape[axis] = m
    w = w.astype(src.dtype)

    if axis == 0:
        # the slowest axis: each new plane blends two old planes
        plane_bytes = src[0].nbytes

        def planes(block: slice) -> None:
            tmp = np.empty(src.shape[1:], dtype=src.dtype)
            for t in range(block.start, block.stop):
                a, b, f = src[i0[t]], src[i1[t]], w[t]
                if f == 0 or i0[t] == i1[t]:
                    out[t] = a
                    continue
                np.subtract(b, a, out=tmp)
                tmp *= f
                np.add(a, tmp, out=out[t])

        _map(planes, _blocks(m, plane_bytes))
        return out

    wb = w.reshape(weight_shape[1:])
    unit = math.prod(out_shape[1:]) * src.itemsize

    def rows(block: slice) -> None:
        part = src[block]
        if not part.flags.c_contiguous:
            part = np.ascontiguousarray(part)
        lo = np.take(part, i0, axis=axis, mode="clip")
        hi = np.take(part, i1, axis=axis, mode="clip")
        np.subtract(hi, lo, out=hi)
        hi *= wb
        np.add(lo, hi, out=out[block])

    _map(rows, _blocks(src.shape[0], unit))
    return out


def _resample_linear(array: np.ndarray, axes) -> np.ndarray:
    order, view = _memory_order(array)
    where = {axis: order.index(axis) for axis in range(3)}
    current = view
    for axis, m, scale, shift in axes:
        current = _lerp_pass(current, where[axis], m, scale, shift)
    return _from_memory_order(current, order)


def _resample_nearest(array: np.ndarray, axes) -> np.ndarray:
    order, view = _memory_order(array)
    where = {axis: order.index(axis) for axis in range(3)}
    current = view
    for axis, m, scale, shift in axes:
        n = current.shape[where[axis]]
        # round half up, the same way on every axis
        index = np.minimum(np.floor(_positions(n, m, scale, shift) + 0.5).astype(np.intp), n - 1)
        current = np.take(current, index, axis=where[axis])
    return _from_memory_order(np.ascontiguousarray(current), order)


def _resample_labels(array: np.ndarray, axes) -> np.ndarray:
    """Per-label linear interpolation, then argmax (see the module's documentation)."""
    shape_in = array.shape
    out_spatial = list(shape_in[:3])
    for axis, m, _, _ in axes:
        out_spatial[axis] = m
    values, counts = _label_counts(array)
    background = values[int(np.argmax(counts))]
    out_shape = (*out_spatial, *shape_in[3:])
    order, _ = _memory_order(array)
    result = _empty(out_shape, array.dtype, order)
    result[...] = background
    taps = {axis: (m, scale, shift) for axis, m, scale, shift in axes}
    # where each label is, and which part of the new grid it can reach
    boxes = []
    for value in values:
        if value != background:
            source_box, target_box, sub_axes = _label_box(array == value, shape_in, taps)
            if source_box is not None:
                boxes.append((value, source_box, target_box, sub_axes))
    if not boxes:
        return result
    # outside the union of those parts every voxel is background: work inside it
    union = tuple(
        slice(min(b[2][d].start for b in boxes), max(b[2][d].stop for b in boxes)) for d in range(3)
    )
    inner = (*[u.stop - u.start for u in union], *shape_in[3:])
    best_label = _empty(inner, array.dtype, order)
    best_label[...] = background
    best = _empty(inner, np.float32, order)
    best[...] = 0
    total = _empty(inner, np.float32, order)
    total[...] = 0
    for value, source_box, target_box, sub_axes in boxes:
        here = tuple(
            slice(t.start - u.start, t.stop - u.start)
            for t, u in zip(target_box, union, strict=True)
        )
        indicator = (array[source_box] == value).astype(np.float32)
        p = _resample_linear(indicator, sub_axes) if sub_axes else indicator
        region = total[here]
        region += p
        region = best[here]
        # labels come in ascending order: on a tie the smaller one, already there, stays
        np.copyto(best_label[here], value, where=p > region)
        np.maximum(region, p, out=region)
    # the background's interpolated indicator is one minus the others'
    p_background = np.subtract(1.0, total, out=total)
    if background < values[-1] and background > values[0]:
        # ties go to the smaller label: the background against larger ones only
        wins = np.greater(p_background, best)
        wins |= (p_background == best) & (best_label > background)
    elif background == values[0]:  # the smallest label: it wins every tie
        wins = np.greater_equal(p_background, best)
    else:  # the largest: it loses every tie
        wins = np.greater(p_background, best)
    np.copyto(best_label, background, where=wins)
    result[union] = best_label
    return result


def _empty(shape: Sequence[int], dtype: Any, order: list[int]) -> np.ndarray:
    """An uninitialised array of ``shape`` laid out in memory in axis order ``order``."""
    return _from_memory_order(np.empty([shape[a] for a in order], dtype=dtype), order)


def _label_counts(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The label values of ``array`` (ascending) and their voxel counts."""
    if array.dtype.kind == "b":
        n_true = int(np.count_nonzero(array))
        values = np.array([False, True])
        counts = np.array([array.size - n_true, n_true])
        keep = counts > 0
        return values[keep], counts[keep]
    low, high = int(array.min()), int(array.max())
    if high - low < (1 << 20):
        flat = array.ravel(order="K")
        if low >= 0 and high < (1 << 20) and array.dtype.itemsize < 8:
            counts = np.bincount(flat, minlength=high + 1)[low:]  # no shifted copy
        else:
            counts = np.bincount(np.subtract(flat, low, dtype=np.intp), minlength=high - low + 1)
        values = np.nonzero(counts)[0]
        return (values + low).astype(array.dtype), counts[values]
    values, counts = np.unique(array, return_counts=True)
    return values, counts


def _label_box(mask: np.ndarray, shape_in: tuple[int, ...], taps: dict):
    """The part of the old grid a label's interpolation reads, the part of the new
    grid it can reach, and the per-axis resampling between the two."""
    source, target, sub_axes = [], [], []
    for axis in range(3):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(np.any(mask, axis=others))
        if present.size == 0:
            return None, None, None
        lo, hi = int(present[0]), int(present[-1])
        n = shape_in[axis]
        if axis not in taps:
            source.append(slice(lo, hi + 1))
            target.append(slice(lo, hi + 1))
            continue
        m, scale, shift = taps[axis]
        i0, i1, w = _linear_taps(n, m, scale, shift)
        # new samples that read an old voxel of the label with a non-zero weight
        reach = ((i0 >= lo) & (i0 <= hi) & (w < 1)) | ((i1 >= lo) & (i1 <= hi) & (w > 0))
        hits = np.flatnonzero(reach)
        if hits.size == 0:
            return None, None, None
        t0, t1 = int(hits[0]), int(hits[-1]) + 1
        s0 = int(i0[t0:t1].min())
        s1 = int(i1[t0:t1].max()) + 1
        source.append(slice(s0, s1))
        target.append(slice(t0, t1))
        # the same sample points, in the cropped grid's indices
        sub_axes.append((axis, t1 - t0, scale, shift + scale * t0 - s0))
    sub_axes.sort(key=lambda a: a[1] / (source[a[0]].stop - source[a[0]].start))
    return tuple(source), tuple(target), sub_axes
