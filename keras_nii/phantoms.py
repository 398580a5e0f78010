"""Synthetic NIfTI phantoms for demos, tests and benchmarks.

A phantom is a smooth textured ellipsoid "head" with a few bright ellipsoid
"lesions" inside it, a smooth multiplicative bias field and Gaussian noise,
plus the label map of the lesions. It is defined in world space and can be
stored in any voxel orientation, with any voxel size, so that every geometry
path of a reader is exercised: loading a phantom with
``keras_nii.load_nifti(path)`` (canonical RAS+) gives back the same arrays
whatever orientation it was stored in.

Intensities, on an MRI-like scale (before bias field and noise):

- background (outside the head): exactly 0, with no noise, so that
  "nonzero" normalization and foreground masks make sense;
- tissue: 300 to 500 (400 plus a smooth low-frequency texture);
- lesions: 800 to 1000 (one level per lesion, plus a faint texture).

The head (and only the head) is then multiplied by a smooth second-order
polynomial bias field in [0.85, 1.15] and gets Gaussian noise of standard
deviation 20; head voxels are kept >= 1, so the head is exactly the nonzero
voxels of the image.

Only NumPy and nibabel are used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt_tools

from keras_nii.io import Volume, save_nifti

__all__ = ["make_phantom", "make_dataset", "make_ct_phantom", "make_ct_dataset", "ORIENTATIONS"]

#: The named orientations; any other 3-letter axis code string such as
#: ``"LIA"`` is accepted too.
ORIENTATIONS = ("RAS", "LPS", "LAS", "PSR", "oblique")

#: Rotation (degrees) of the voxel axes of an ``"oblique"`` phantom: 20 about
#: the superior (z) axis, then 15 about the right (x) axis.
OBLIQUE_DEGREES = (15.0, 0.0, 20.0)

TISSUE_LEVEL = 400.0
TISSUE_TEXTURE = 100.0
LESION_LEVELS = (800.0, 1000.0)
BIAS_AMPLITUDE = 0.15
NOISE_STD = 20.0

_MIN_SIZE = 8
_RAS_ORNT = ornt_tools.axcodes2ornt(("R", "A", "S"))
_CASE_FILE = re.compile(r"^case_\d+\.nii(\.gz)?$")
SeedLike = int | np.random.Generator | None


# --------------------------------------------------------------------------- #
# argument parsing
# --------------------------------------------------------------------------- #


def _parse_shape(shape: Sequence[int], name: str = "shape") -> tuple[int, int, int]:
    try:
        values = tuple(shape)
    except TypeError:
        values = ()
    ok = len(values) == 3 and all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= _MIN_SIZE
        for v in values
    )
    if not ok:
        raise ValueError(f"{name} must be 3 integers, each >= {_MIN_SIZE}, got {shape!r}")
    return tuple(int(v) for v in values)


def _parse_spacing(spacing: Sequence[float], name: str = "spacing") -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{name} must be 3 positive finite voxel sizes in mm, got {spacing!r}")
    return values


def _parse_n_lesions(n_lesions: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(n_lesions, int | np.integer) and not isinstance(n_lesions, bool):
        bounds = (int(n_lesions), int(n_lesions))
    else:
        try:
            bounds = tuple(n_lesions)
        except TypeError:
            bounds = ()
        if len(bounds) != 2 or not all(
            isinstance(v, int | np.integer) and not isinstance(v, bool) for v in bounds
        ):
            bounds = (-1, -1)
    lo, hi = (int(v) for v in bounds)
    if lo < 0 or hi < lo or hi > 20:
        raise ValueError(
            "n_lesions must be an integer or an inclusive (min, max) pair with "
            f"0 <= min <= max <= 20, got {n_lesions!r}"
        )
    return lo, hi


def _parse_orientation(orientation: str, name: str = "orientation") -> tuple[str, ...] | None:
    """Axis codes of a named orientation, or ``None`` for ``"oblique"``."""
    if isinstance(orientation, str):
        if orientation == "oblique":
            return None
        codes = tuple(orientation.upper())
        if len(codes) == 3:
            try:
                ornt_tools.axcodes2ornt(codes)
            except ValueError:
                pass
            else:
                # every world axis exactly once
                if sorted(ornt_tools.axcodes2ornt(codes)[:, 0].tolist()) == [0, 1, 2]:
                    return codes
    raise ValueError(
        f"{name} must be one of {ORIENTATIONS} or a 3-letter axis code string "
        f"naming each of L/R, P/A, I/S once (e.g. 'LIA'), got {orientation!r}"
    )


# --------------------------------------------------------------------------- #
# the phantom in RAS voxel order, in normalized world coordinates
# --------------------------------------------------------------------------- #


def _normalized_coords(n: int) -> np.ndarray:
    """Voxel centres of an axis of ``n`` voxels, in (-1, 1) across the field of view."""
    return ((np.arange(n, dtype=np.float64) - (n - 1) / 2.0) / (n / 2.0)).astype(np.float32)


def _linear_weights(coords: np.ndarray, nodes: int) -> np.ndarray:
    """``(len(coords), nodes)`` linear-interpolation weights onto ``nodes`` nodes over [-1, 1]."""
    position = (np.clip(coords, -1.0, 1.0) + 1.0) / 2.0 * (nodes - 1)
    low = np.minimum(np.floor(position).astype(np.int64), nodes - 2)
    frac = position - low
    weights = np.zeros((coords.size, nodes), dtype=np.float32)
    rows = np.arange(coords.size)
    weights[rows, low] = 1.0 - frac
    weights[rows, low + 1] = frac
    return weights


def _smooth_texture(rng: np.random.Generator, axes: Sequence[np.ndarray], nodes: int) -> np.ndarray:
    """A coarse ``nodes**3`` random grid in [-1, 1], trilinearly upsampled to the grid."""
    coarse = rng.uniform(-1.0, 1.0, size=(nodes, nodes, nodes)).astype(np.float32)
    wx, wy, wz = (_linear_weights(a, nodes) for a in axes)
    # separable trilinear interpolation: contract one axis at a time
    out = np.tensordot(wx, coarse, axes=(1, 0))  # (x, b, c)
    out = np.tensordot(out, wy, axes=(1, 1))  # (x, c, y)
    out = np.tensordot(out, wz, axes=(1, 1))  # (x, y, z)
    return out


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix (from a random unit quaternion)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _draw_parameters(rng: np.random.Generator, n_lesions: tuple[int, int]) -> dict:
    """All random scalars of a phantom, drawn in a fixed order (independent of the grid)."""
    head = rng.uniform(0.75, 0.9, size=3)
    count = int(rng.integers(n_lesions[0], n_lesions[1] + 1))
    lesions = []
    for _ in range(count):
        semi = rng.uniform(0.12, 0.22, size=3)
        rotation = _random_rotation(rng)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        depth = rng.uniform(0.0, 1.0) ** (1.0 / 3.0)
        level = rng.uniform(*LESION_LEVELS)
        lesions.append((semi, rotation, direction, depth, level))
    bias = rng.uniform(-1.0, 1.0, size=9)
    return {"head": head, "lesions": lesions, "bias": bias}


def _bias_field(coeffs: np.ndarray, axes: Sequence[np.ndarray]) -> np.ndarray:
    """1 + a second-order polynomial in the normalized coordinates, within 1 +- BIAS_AMPLITUDE."""
    u = axes[0][:, None, None]
    v = axes[1][None, :, None]
    w = axes[2][None, None, :]
    terms = (u, v, w, u * u, v * v, w * w, u * v, u * w, v * w)
    poly = sum(float(c) * t for c, t in zip(coeffs, terms, strict=True))
    # |every term| <= 1 inside the field of view, so |poly| <= sum |c|
    scale = BIAS_AMPLITUDE / max(float(np.abs(coeffs).sum()), 1e-12)
    return (1.0 + scale * poly).astype(np.float32)


def _ras_phantom(
    rng: np.random.Generator, ras_shape: tuple[int, int, int], n_lesions: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Image and label in RAS voxel order on a grid of ``ras_shape`` voxels.

    Geometry lives in normalized coordinates (the field of view is (-1, 1)
    along each world axis), so the content depends on the seed and the grid
    shape only, not on the voxel size or the storage orientation.
    """
    params = _draw_parameters(rng, n_lesions)
    axes = [_normalized_coords(n) for n in ras_shape]
    u = axes[0][:, None, None]
    v = axes[1][None, :, None]
    w = axes[2][None, None, :]

    head_axes = params["head"]
    head = (u / head_axes[0]) ** 2 + (v / head_axes[1]) ** 2 + (w / head_axes[2]) ** 2 <= 1.0

    texture = 0.7 * _smooth_texture(rng, axes, 5) + 0.3 * _smooth_texture(rng, axes, 9)
    image = TISSUE_LEVEL + TISSUE_TEXTURE * texture
    label = np.zeros(ras_shape, dtype=np.uint8)

    # a lesion never gets thinner than one voxel, so it always holds voxels
    min_semi = max(2.0 / n for n in ras_shape)
    for semi, rotation, direction, depth, level in params["lesions"]:
        semi = np.maximum(semi, min_semi)
        reach = float(semi.max())
        # keep the whole lesion inside the head: in head-scaled units the
        # lesion reaches at most reach / min(head) from its centre
        room = max(1.0 - reach / float(head_axes.min()) - 0.05, 0.0)
        centre = direction * depth * room * head_axes
        # only visit the lesion's bounding box
        box = []
        for axis, n in enumerate(ras_shape):
            lo_coord, hi_coord = centre[axis] - reach, centre[axis] + reach
            lo = max(int(np.floor(lo_coord * n / 2.0 + (n - 1) / 2.0)), 0)
            hi = min(int(np.ceil(hi_coord * n / 2.0 + (n - 1) / 2.0)) + 1, n)
            box.append(slice(lo, max(hi, lo)))
        bu = axes[0][box[0]][:, None, None] - centre[0]
        bv = axes[1][box[1]][None, :, None] - centre[1]
        bw = axes[2][box[2]][None, None, :] - centre[2]
        # coordinates in the lesion's own (rotated) frame: rotation.T @ (p - centre)
        inside = np.zeros((bu.shape[0], bv.shape[1], bw.shape[2]), dtype=np.float32)
        for k in range(3):
            local = rotation[0, k] * bu + rotation[1, k] * bv + rotation[2, k] * bw
            inside += (local / semi[k]) ** 2
        mask = (inside <= 1.0) & head[tuple(box)]
        region = image[tuple(box)]
        region[mask] = level + 0.3 * TISSUE_TEXTURE * texture[tuple(box)][mask]
        label[tuple(box)][mask] = 1

    image *= _bias_field(params["bias"], axes)
    image += rng.normal(0.0, NOISE_STD, size=ras_shape).astype(np.float32)
    image = np.where(head, np.maximum(image, 1.0), 0.0).astype(np.float32)
    return image, label


# --------------------------------------------------------------------------- #
# world geometry
# --------------------------------------------------------------------------- #


def _rotation_degrees(degrees: Sequence[float]) -> np.ndarray:
    """4x4 rotation: about x by degrees[0], then y by [1], then z by [2] (world axes)."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ ry @ rx
    return out


def make_phantom(
    shape: Sequence[int] = (48, 48, 48),
    *,
    seed: SeedLike = None,
    n_lesions: int | Sequence[int] = (1, 3),
    orientation: str = "RAS",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make one synthetic head-with-lesions volume and its lesion label map.

    The phantom is built in world (RAS+ mm) space, centred on the world
    origin, and stored in the voxel order of ``orientation``. Its content
    (head, lesions, texture, bias, noise) depends only on ``seed``,
    ``n_lesions`` and the grid shape seen in RAS order: two phantoms with
    the same seed and the same ``shape`` stored as ``"RAS"`` and ``"LPS"``
    (or, for a cubic ``shape``, any two orientations) give identical arrays
    once reoriented to RAS+ by ``keras_nii.load_nifti``. The head is scaled
    to the field of view, so the voxel size changes the world size of the
    phantom but not its voxel content.

    Intensities: background exactly 0; tissue about 300-500; lesions about
    800-1000; then a smooth bias field in [0.85, 1.15] and Gaussian noise of
    standard deviation 20 inside the head (see the module docstring).

    Args:
        shape: the stored array shape ``(x, y, z)`` (each >= 8), in the
            voxel order of ``orientation``.
        seed: an integer, a ``numpy.random.Generator``, or ``None`` for a
            fresh random phantom. The same integer gives the same arrays.
        n_lesions: the number of lesions, or an inclusive ``(min, max)``
            range to draw it from. Lesions lie wholly inside the head and may
            overlap.
        orientation: the stored voxel order: ``"RAS"``, ``"LPS"``, ``"LAS"``,
            ``"PSR"`` or any other 3-letter axis code string (e.g. ``"LIA"``);
            or ``"oblique"``: RAS voxel order with the voxel axes rotated in
            world space (15 degrees about x, then 20 about z; the content is
            rotated with them, not resampled).
        spacing: voxel sizes in mm along the stored array axes (what
            ``nibabel.affines.voxel_sizes`` of the affine gives back).

    Returns:
        A tuple ``(image, label, affine)``: the ``float32`` image and the
        ``uint8`` label (1 in lesions, 0 elsewhere), both of shape ``shape``
        in the stored voxel order, and the 4x4 ``float64`` voxel-to-world
        affine of those arrays.

    Raises:
        ValueError: a bad ``shape``, ``n_lesions``, ``orientation`` or
            ``spacing``; the message names the argument.

    Example:

    >>> image, label, affine = make_phantom((32, 32, 32), seed=0, orientation="LPS")
    >>> image.shape, image.dtype, label.dtype
    ((32, 32, 32), dtype('float32'), dtype('uint8'))
    >>> import nibabel as nib
    >>> nib.aff2axcodes(affine)
    ('L', 'P', 'S')
    """
    shape = _parse_shape(shape)
    spacing = _parse_spacing(spacing)
    bounds = _parse_n_lesions(n_lesions)
    codes = _parse_orientation(orientation)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    target = _RAS_ORNT if codes is None else ornt_tools.axcodes2ornt(codes)
    # the RAS grid: stored axis i runs along world axis target[i, 0]
    ras_shape = [0, 0, 0]
    ras_spacing = [0.0, 0.0, 0.0]
    for axis, (world_axis, _flip) in enumerate(target):
        ras_shape[int(world_axis)] = shape[axis]
        ras_spacing[int(world_axis)] = spacing[axis]
    ras_shape = tuple(ras_shape)

    image, label = _ras_phantom(rng, ras_shape, bounds)

    # RAS voxel grid centred on the world origin
    ras_affine = np.diag([*ras_spacing, 1.0])
    ras_affine[:3, 3] = -np.asarray(ras_spacing) * (np.asarray(ras_shape) - 1) / 2.0

    if codes is None:
        affine = _rotation_degrees(OBLIQUE_DEGREES) @ ras_affine
    else:
        transform = ornt_tools.ornt_transform(_RAS_ORNT, target)
        image = ornt_tools.apply_orientation(image, transform)
        label = ornt_tools.apply_orientation(label, transform)
        affine = ras_affine @ ornt_tools.inv_ornt_aff(transform, ras_shape)
    return (
        np.ascontiguousarray(image, dtype=np.float32),
        np.ascontiguousarray(label, dtype=np.uint8),
        np.asarray(affine, dtype=np.float64),
    )


# --------------------------------------------------------------------------- #
# datasets on disk
# --------------------------------------------------------------------------- #


def _header(dtype: np.dtype, affine: np.ndarray, slope: float | None = None) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_xyzt_units("mm")
    header.set_sform(affine, 2)  # aligned
    header.set_qform(affine, 1)  # scanner
    if slope is not None:
        header.set_slope_inter(slope, 0.0)
    return header


def _write(array: np.ndarray, path: Path, affine: np.ndarray, slope: float | None = None) -> None:
    """Write through save_nifti (atomic), with mm units and, for int16, a scl_slope."""
    header = _header(np.dtype(np.int16) if slope is not None else array.dtype, affine, slope)
    like = Volume(
        array=array,
        affine=affine,
        header=header,
        source_affine=affine,
        source_shape=tuple(array.shape),
    )
    save_nifti(array, path, like=like)


def _quantize(image: np.ndarray) -> tuple[np.ndarray, float]:
    """``image`` rounded onto an int16 grid with a float32 slope, and the slope."""
    slope = float(np.float32(max(float(image.max()), 1.0) / 30000.0))
    raw = np.rint(image.astype(np.float64) / slope)
    return (raw * slope).astype(np.float32), slope


def _stored_as_int16(index: int) -> bool:
    # a quarter of the cases, starting with the second one, and (with three
    # orientations) cycling through all of them
    return index % 4 == 1


def _prepare_case_folder(folder: str | os.PathLike, overwrite: bool) -> Path:
    """``folder`` with empty ``images/`` and ``labels/`` of case files: old case
    files are removed with ``overwrite``, and are an error without it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"folder {folder} exists and is not a directory")
    subfolders = [folder / "images", folder / "labels"]
    existing = [
        p for sub in subfolders if sub.is_dir() for p in sub.iterdir() if _CASE_FILE.match(p.name)
    ]
    if existing and not overwrite:
        raise ValueError(
            f"folder {folder} already holds {len(existing)} case file(s) "
            f"(e.g. {sorted(existing)[0]}); pass overwrite=True to replace them"
        )
    for sub in subfolders:
        sub.mkdir(parents=True, exist_ok=True)
    for old in existing:
        old.unlink()
    return folder


def make_dataset(
    folder: str | os.PathLike,
    n: int,
    *,
    shape: Sequence[int] = (48, 48, 48),
    seed: int = 0,
    orientations: Sequence[str] = ("RAS", "LPS", "oblique"),
    spacings: Sequence[Sequence[float]] = ((1.0, 1.0, 1.0), (1.2, 1.0, 0.9)),
    compress: bool = True,
    overwrite: bool = False,
) -> list[tuple[Path, Path]]:
    """Write ``n`` synthetic image/label pairs as NIfTI files.

    Case ``i`` is ``make_phantom(shape, seed=..., orientation=orientations[i %
    len(orientations)], spacing=spacings[i % len(spacings)])`` with its own
    seed derived from ``seed`` and ``i``, written to
    ``folder/images/case_{i:03d}.nii.gz`` and ``folder/labels/case_{i:03d}.nii.gz``
    (the same file name in both folders). Images are float32, except every
    fourth case starting with case 1 (1, 5, 9, ...), which is stored as int16
    with a ``scl_slope`` so that readers' scaling is exercised; labels are
    uint8. Files are written atomically.

    Args:
        folder: the dataset folder; created if missing.
        n: the number of cases (>= 1).
        shape: the stored array shape of every case.
        seed: the dataset seed; the same seed gives the same arrays.
        orientations: stored orientations to cycle through (see
            :func:`make_phantom`).
        spacings: voxel sizes in mm to cycle through.
        compress: write ``.nii.gz`` (default) rather than ``.nii``.
        overwrite: allow writing into a folder that already holds case
            files; the old ``case_*.nii``/``case_*.nii.gz`` files of
            ``images/`` and ``labels/`` are then removed first, so no stale
            case is left behind. Without it such a folder is refused.

    Returns:
        The list of ``(image_path, label_path)`` written, in case order.

    Raises:
        ValueError: a bad argument (the message names it), or ``folder``
            already holds case files and ``overwrite`` is False.

    Example:

    >>> pairs = make_dataset("/tmp/phantoms", 4, shape=(32, 32, 32))  # doctest: +SKIP
    >>> pairs[0]                                                       # doctest: +SKIP
    (PosixPath('/tmp/phantoms/images/case_000.nii.gz'),
     PosixPath('/tmp/phantoms/labels/case_000.nii.gz'))
    """
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    shape = _parse_shape(shape)
    if isinstance(orientations, str) or len(orientations) == 0:
        raise ValueError(
            f"orientations must be a non-empty sequence of names, got {orientations!r}"
        )
    for name in orientations:
        _parse_orientation(name, "orientations")
    try:
        spacings = [_parse_spacing(s, "spacings") for s in spacings]
    except TypeError as err:
        raise ValueError(f"spacings must be a sequence of voxel sizes, got {spacings!r}") from err
    if not spacings:
        raise ValueError(f"spacings must be a non-empty sequence of voxel sizes, got {spacings!r}")

    folder = _prepare_case_folder(folder, overwrite)

    suffix = ".nii.gz" if compress else ".nii"
    pairs = []
    for i in range(int(n)):
        rng = np.random.default_rng([int(seed), i])
        image, label, affine = make_phantom(
            shape,
            seed=rng,
            orientation=orientations[i % len(orientations)],
            spacing=spacings[i % len(spacings)],
        )
        name = f"case_{i:03d}{suffix}"
        image_path, label_path = folder / "images" / name, folder / "labels" / name
        if _stored_as_int16(i):
            quantized, slope = _quantize(image)
            _write(quantized, image_path, affine, slope)
        else:
            _write(image, image_path, affine)
        _write(label, label_path, affine)
        pairs.append((image_path, label_path))
    return pairs


# --------------------------------------------------------------------------- #
# CT-like abdominal scans (a Decathlon-like task)
# --------------------------------------------------------------------------- #

#: Hounsfield units of the CT-like phantoms (before texture and noise).
CT_AIR = -1000.0
CT_BODY = -60.0  # fat and soft tissue
CT_ORGAN = 120.0  # an enhancing organ (liver-like)
CT_LESION = 40.0  # a hypodense lesion inside it
CT_NOISE_STD = 12.0
#: The most of a scan's voxels that its lesions may take.
CT_LESION_MAX_FRACTION = 1e-3


def make_ct_phantom(
    shape: Sequence[int] = (192, 192, 80),
    *,
    spacing: Sequence[float] = (0.8, 0.8, 3.0),
    orientation: str = "RAS",
    seed: SeedLike = None,
    n_lesions: int | Sequence[int] = (1, 2),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One CT-like abdominal scan: air, a body, an organ and small lesions, in HU.

    The anatomy lives in world space (mm), centred on the grid's centre: an
    elliptic-cylinder body filling about 80 % of the in-plane field of view,
    an ellipsoid organ in it (semi-axes about 25-35 % of the in-plane field
    of view, 40-80 mm along z), and 1-2 spherical lesions inside the organ
    whose total volume stays under ``CT_LESION_MAX_FRACTION`` of the scan.
    The grid is stored in the voxel order of ``orientation`` (``"oblique"``:
    axes rotated as in :func:`make_phantom`), so the same anatomy is seen
    through differently oriented and spaced grids. Intensities: air -1000,
    body about -60, organ about 120, lesions about 40 HU, each with a smooth
    texture, plus Gaussian noise of 12 HU inside the body.

    Returns:
        ``(image, label, affine)``: float32 HU, uint8 labels (0 background,
        1 organ, 2 lesion) in the stored voxel order, and the affine.
    """
    shape = _parse_shape(shape)
    spacing = _parse_spacing(spacing)
    bounds = _parse_n_lesions(n_lesions)
    codes = _parse_orientation(orientation)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    if codes is None:
        affine = _rotation_degrees(OBLIQUE_DEGREES) @ affine
    else:
        # the stored axes follow `codes`: flip / permute the RAS grid's axes
        target = ornt_tools.axcodes2ornt(codes)
        linear = np.zeros((3, 3))
        for axis, (world_axis, flip) in enumerate(target):
            linear[int(world_axis), axis] = flip * spacing[axis]
        affine = np.eye(4)
        affine[:3, :3] = linear
        affine[:3, 3] = -linear @ ((np.asarray(shape) - 1) / 2.0)

    # world coordinates (mm) of every voxel centre, axis by axis (separable)
    ijk = [np.arange(n, dtype=np.float32) for n in shape]
    world = [
        affine[r, 0] * ijk[0][:, None, None]
        + affine[r, 1] * ijk[1][None, :, None]
        + affine[r, 2] * ijk[2][None, None, :]
        + np.float32(affine[r, 3])
        for r in range(3)
    ]
    x, y, z = world
    fov = np.abs(affine[:3, :3]) @ np.asarray(shape, dtype=np.float64)  # world extent
    half_x, half_y, half_z = fov / 2.0

    body_axes = np.array([half_x, half_y]) * rng.uniform(0.72, 0.85, size=2)
    body = (x / body_axes[0]) ** 2 + (y / body_axes[1]) ** 2 <= 1.0
    organ_semi = np.array(
        [
            half_x * rng.uniform(0.25, 0.35),
            half_y * rng.uniform(0.25, 0.35),
            min(rng.uniform(40.0, 80.0), 0.8 * half_z),
        ]
    )
    organ_centre = np.array(
        [
            rng.uniform(-0.3, 0.3) * (body_axes[0] - organ_semi[0]),
            rng.uniform(-0.3, 0.3) * (body_axes[1] - organ_semi[1]),
            rng.uniform(-0.3, 0.3) * max(half_z - organ_semi[2], 0.0),
        ]
    )
    rel = [(c - organ_centre[k]) / organ_semi[k] for k, c in enumerate(world)]
    organ_r2 = rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2
    organ = (organ_r2 <= 1.0) & body

    texture = _smooth_texture(rng, [_normalized_coords(n) for n in shape], 6)
    image = np.full(shape, CT_AIR, dtype=np.float32)
    image[body] = CT_BODY + 25.0 * texture[body]
    image[organ] = CT_ORGAN + 10.0 * texture[organ]
    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1

    n = int(rng.integers(bounds[0], bounds[1] + 1))
    scan_mm3 = float(np.prod(shape)) * float(np.prod(spacing))
    budget = CT_LESION_MAX_FRACTION * scan_mm3 * 0.8 / max(n, 1)  # mm^3 per lesion
    voxel_mm3 = float(np.prod(spacing))
    for _ in range(n):
        radius = min(rng.uniform(6.0, 12.0), (3.0 * budget / (4.0 * np.pi)) ** (1.0 / 3.0))
        radius = max(radius, 1.2 * voxel_mm3 ** (1.0 / 3.0))
        # a centre well inside the organ (in organ-scaled units)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        depth = rng.uniform(0.0, 0.5)
        room = np.maximum(organ_semi - radius, 0.0)
        centre = organ_centre + direction * depth * room
        d2 = sum((c - centre[k]) ** 2 for k, c in enumerate(world))
        lesion = (d2 <= radius**2) & organ
        image[lesion] = CT_LESION + 8.0 * texture[lesion]
        label[lesion] = 2

    image += np.where(body, rng.normal(0.0, CT_NOISE_STD, size=shape), 0.0).astype(np.float32)
    return (
        np.ascontiguousarray(image, dtype=np.float32),
        label,
        np.asarray(affine, dtype=np.float64),
    )


def make_ct_dataset(
    folder: str | os.PathLike,
    n: int,
    *,
    seed: int = 0,
    in_plane: tuple[int, int] = (160, 260),
    slices: tuple[int, int] = (60, 150),
    in_plane_spacing: tuple[float, float] = (0.6, 0.9),
    slice_spacing: tuple[float, float] = (1.5, 5.0),
    orientations: Sequence[str] = ("RAS", "LPS", "oblique"),
    overwrite: bool = False,
) -> list[tuple[Path, Path]]:
    """Write ``n`` CT-like cases (a Medical-Segmentation-Decathlon-like task).

    Every case has its own shape (in-plane size and slice count drawn from
    ``in_plane`` and ``slices``) and anisotropic spacing (in-plane from
    ``in_plane_spacing``, slices from ``slice_spacing``, mm), and the
    orientations cycle through ``orientations``. Images are stored as int16
    with ``scl_slope = 1`` and ``scl_inter = -1024`` (raw = HU + 1024, as
    scanners store CT), labels as uint8 (0 background, 1 organ, 2 lesion),
    in ``folder/images/case_XXX.nii.gz`` and ``folder/labels/case_XXX.nii.gz``.
    The same ``seed`` gives the same files.

    Returns:
        ``[(image_path, label_path), ...]`` in case order.
    """
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, (lo, hi) in (
        ("in_plane", in_plane),
        ("slices", slices),
        ("in_plane_spacing", in_plane_spacing),
        ("slice_spacing", slice_spacing),
    ):
        if not 0 < lo <= hi:
            raise ValueError(f"{name} must be a range (low, high) with 0 < low <= high")
    folder = _prepare_case_folder(folder, overwrite)
    pairs = []
    for i in range(int(n)):
        rng = np.random.default_rng([int(seed), 7919, i])
        side = int(rng.integers(in_plane[0], in_plane[1] + 1))
        shape = (
            side,
            int(side * rng.uniform(0.9, 1.0)),
            int(rng.integers(slices[0], slices[1] + 1)),
        )
        row = float(np.round(rng.uniform(*in_plane_spacing), 3))
        spacing = (row, row, float(np.round(rng.uniform(*slice_spacing), 2)))
        image, label, affine = make_ct_phantom(
            shape,
            spacing=spacing,
            orientation=orientations[i % len(orientations)],
            seed=rng,
        )
        name = f"case_{i:03d}.nii.gz"
        image_path, label_path = folder / "images" / name, folder / "labels" / name
        header = _header(np.dtype(np.int16), affine)
        header.set_slope_inter(1.0, -1024.0)
        raw = np.clip(np.rint(image + 1024.0), -32768, 32767).astype(np.int16)
        like = Volume(
            array=raw, affine=affine, header=header, source_affine=affine, source_shape=shape
        )
        save_nifti(raw.astype(np.float32) - 1024.0, image_path, like=like)
        _write(label, label_path, affine)
        pairs.append((image_path, label_path))
    return pairs
