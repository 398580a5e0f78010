"""Slice views of volumes, with label overlays (needs matplotlib: ``pip install keras-nii[plot]``).

:func:`show_slices` draws the three orthogonal slices through a voxel of a
volume (the centre by default), with an optional reference mask filled in
translucent colour and an optional prediction outlined in red. Figures are
made with matplotlib's object-oriented API (no pyplot state, no display
needed): saving works on a headless machine, and in a notebook the returned
figure is shown inline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from keras_nii.io import Volume

__all__ = ["show_slices"]

_TRUTH_COLOR = (0.1, 0.9, 0.2)
_PREDICTION_COLOR = (1.0, 0.15, 0.1)
_UP = 8  # upsampling of the prediction before contouring, so outlines follow voxel edges
# slices: (fixed array axis, (horizontal axis, vertical axis))
_VIEWS = ((0, (1, 2)), (1, (0, 2)), (2, (0, 1)))
# the anatomical plane normal to an axis, by the axis's orientation code
_PLANES = {"L": "sagittal", "R": "sagittal", "A": "coronal", "P": "coronal"}
_PLANES.update({"S": "axial", "I": "axial"})


def _matplotlib() -> Any:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "keras_nii.plot needs matplotlib, which is not installed: "
            "pip install keras-nii[plot]  (or: pip install matplotlib)"
        ) from err
    return Figure


def _as_array(value: Any, name: str) -> tuple[np.ndarray, Volume | None]:
    """A 3D array (the first channel) and the Volume it came from, if any."""
    volume = value if isinstance(value, Volume) else None
    array = np.asarray(value.array if volume is not None else value)
    if array.ndim == 4:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(
            f"{name} must be a Volume or an (x, y, z) or (x, y, z, c) array, got shape "
            f"{array.shape}"
        )
    return array, volume


def _parse_index(index: Any, shape: Sequence[int]) -> tuple[int, int, int]:
    if index is None:
        return tuple(int(s) // 2 for s in shape)
    if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
        index = (index, index, index)
    try:
        values = tuple(index)
    except TypeError:
        values = ()
    if len(values) != 3 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"index must be None, an int or 3 ints (i, j, k), got {index!r}")
    for axis, (v, n) in enumerate(zip(values, shape, strict=True)):
        if not -n <= v < n:
            raise ValueError(f"index {values}: {v} is out of range for axis {axis} of size {n}")
    return tuple(int(v) % int(n) for v, n in zip(values, shape, strict=True))


def _window(image: np.ndarray) -> tuple[float, float]:
    """Display range: the 0.5 and 99.5 percentiles of the finite voxels."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, (0.5, 99.5)))
    if high <= low:
        high = low + 1.0
    return low, high


def show_slices(
    volume: Volume | np.ndarray,
    mask: Volume | np.ndarray | None = None,
    prediction: Volume | np.ndarray | None = None,
    *,
    index: int | Sequence[int] | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """Three orthogonal slices of a volume, with a mask and a prediction overlaid.

    One row of three panels: the slices through voxel ``index`` normal to
    array axes 0, 1 and 2 (sagittal, coronal and axial for a RAS+ volume as
    :func:`keras_nii.load_nifti` returns it; a Volume's panels are named by
    its orientation, an array's by axis only). Each panel is drawn with
    array axis ``a < b`` of the slice running left to right (``a``) and
    bottom to top (``b``), so a RAS+ volume appears in neurological
    convention (the subject's right on the right), and with the voxel aspect
    ratio of a :class:`~keras_nii.Volume`'s spacing.

    The image (first channel) is shown in grey between its 0.5 and 99.5
    percentiles. ``mask`` (the reference) is filled in translucent green
    where it is non-zero; ``prediction`` is outlined in red where it is
    non-zero (a probability map is taken as ``> 0.5``).

    Args:
        volume: a :class:`~keras_nii.Volume` or an ``(x, y, z)`` or
            ``(x, y, z, c)`` array.
        mask: optional reference labels on the same grid (Volume or array).
        prediction: optional predicted labels or probabilities on the same
            grid (Volume or array).
        index: the voxel ``(i, j, k)`` the slices go through, one int for all
            three, or ``None`` for the centre of the volume.
        title: an optional figure title.
        path: if given, the figure is also saved there (the format follows
            the suffix: ``.png``, ``.pdf``, ``.svg`` ...).

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ImportError: matplotlib is not installed (``pip install keras-nii[plot]``).
        ValueError: arrays of different spatial shapes, or a bad ``index``.

    Example:

    ```python
    vol = keras_nii.load_nifti("sub-01_T1w.nii.gz")
    keras_nii.plot.show_slices(vol, mask=keras_nii.load_nifti("sub-01_mask.nii.gz"),
                               path="slices.png")
    ```
    """
    Figure = _matplotlib()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    image, image_volume = _as_array(volume, "volume")
    overlays = {}
    for name, value in (("mask", mask), ("prediction", prediction)):
        if value is None:
            continue
        array, _ = _as_array(value, name)
        if array.shape != image.shape:
            raise ValueError(
                f"{name} has spatial shape {array.shape}, the volume {image.shape}: "
                "they must be on the same voxel grid"
            )
        if array.dtype.kind == "f" and name == "prediction":
            array = array > 0.5
        overlays[name] = array != 0
    position = _parse_index(index, image.shape)
    spacing = image_volume.spacing if image_volume is not None else (1.0, 1.0, 1.0)
    codes = image_volume.axcodes if image_volume is not None else None
    low, high = _window(image)

    fig = Figure(figsize=(12, 4.4), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (fixed, (h, v)) in zip(axes, _VIEWS, strict=True):
        take = [slice(None)] * 3
        take[fixed] = position[fixed]
        # (h, v) array -> rows v, columns h for imshow with origin lower
        ax.imshow(
            image[tuple(take)].T,
            cmap="gray",
            vmin=low,
            vmax=high,
            origin="lower",
            interpolation="nearest",
            aspect=spacing[v] / spacing[h],
        )
        if "mask" in overlays:
            truth = overlays["mask"][tuple(take)].T
            rgba = np.zeros((*truth.shape, 4), dtype=np.float32)
            rgba[truth] = (*_TRUTH_COLOR, 0.45)
            ax.imshow(
                rgba,
                origin="lower",
                interpolation="nearest",
                aspect=spacing[v] / spacing[h],
            )
        if "prediction" in overlays:
            predicted = overlays["prediction"][tuple(take)].T
            if predicted.any():
                # outline the voxel edges: contour a nearest-upsampled copy
                fine = np.kron(predicted.astype(np.float32), np.ones((_UP, _UP), np.float32))
                rows = (np.arange(fine.shape[0]) + 0.5) / _UP - 0.5
                cols = (np.arange(fine.shape[1]) + 0.5) / _UP - 0.5
                ax.contour(
                    cols,
                    rows,
                    fine,
                    levels=[0.5],
                    colors=[_PREDICTION_COLOR],
                    linewidths=1.2,
                )
        label = f"axis {fixed} = {position[fixed]}"
        if codes is not None:
            label = f"{_PLANES[codes[fixed]]}, {label}"
        ax.set_title(label, fontsize=10)
        if codes is not None:
            ax.set_xlabel(f"axis {h} (towards {codes[h]})", fontsize=8)
            ax.set_ylabel(f"axis {v} (towards {codes[v]})", fontsize=8)
        else:
            ax.set_xlabel(f"axis {h}", fontsize=8)
            ax.set_ylabel(f"axis {v}", fontsize=8)
        ax.tick_params(labelsize=7)
    handles = []
    if "mask" in overlays:
        handles.append(Patch(facecolor=(*_TRUTH_COLOR, 0.45), label="reference"))
    if "prediction" in overlays:
        handles.append(Line2D([], [], color=_PREDICTION_COLOR, label="prediction"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9)
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=100)
    return fig
