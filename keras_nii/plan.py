"""The dataset fingerprint, and the configuration it suggests.

:func:`fingerprint` reads every image (and label map) of a dataset once and
measures what a training configuration depends on: shapes, voxel spacings,
orientations, foreground intensities and label frequencies. From those
figures the returned :class:`Plan` suggests, in nnU-Net's manner, the voxel
spacing to train at, a patch size and an intensity normalization, which
:meth:`Plan.normalization_layers` turns into keras-nii layers.

The rules, all in one place (see :func:`fingerprint`):

- **Axes.** Files are read as :func:`keras_nii.load_nifti` reads them for
  training (RAS+ voxel axes), so every figure per axis is for the axis the
  model sees: axis 0 left-right, 1 posterior-anterior, 2 inferior-superior.
- **Foreground.** The voxels where the label map is non-zero, or, without
  label maps, each channel's non-zero voxels.
- **Target spacing.** The median spacing per axis; an axis whose median is
  more than 3 times the finest axis's gets the 10th percentile of its
  spacings instead (thick-slice scans are then upsampled less), but never
  finer than the coarsest of the other axes.
- **Median shape.** Each file's shape at the target spacing
  (``round(shape * spacing / target_spacing)``), the median per axis.
- **Patch size.** Each axis the smallest multiple of ``divisor`` (16: a
  4-level U-Net halves it 4 times) that holds the median shape, so the
  median case fits in one patch; then, while the patch holds more than
  ``max_voxels`` voxels, the axis with the largest extent in mm loses one
  step of ``divisor`` (never below one step).
- **Normalization.** CT-like data (intensities in Hounsfield units: in every
  file at least 0.5 % of the voxels are at or below -500, i.e. air or the
  outside of the field of view; MR magnitudes are never negative) is
  clipped to the dataset's foreground 0.5 and 99.5 percentiles, then
  z-scored with the dataset's foreground mean and std (nnU-Net's CT
  scheme). Anything else (MR) gets a per-sample z-score, over the non-zero
  voxels when, in the median file, under 3/4 of the voxels are non-zero
  (a zero background, e.g. skull-stripped scans).

Only NumPy, nibabel and :mod:`keras_nii.io`: the module imports neither Keras
nor a backend (``keras-nii plan`` runs without TensorFlow);
:meth:`Plan.normalization_layers` imports the layers when it is called.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from keras_nii import storage
from keras_nii.io import NiftiError, load_nifti

__all__ = ["Plan", "fingerprint", "PERCENTILES", "ANISOTROPY"]

#: the intensity percentiles of the fingerprint (and of the CT clipping window)
PERCENTILES = (0.5, 99.5)
#: an axis whose median spacing is more than this many times the finest is "thick"
ANISOTROPY = 3.0
#: CT-like: in every file at least this fraction of voxels is at or below AIR_HU
_AIR_FRACTION = 0.005
_AIR_HU = -500.0
#: MR: z-score over the non-zero voxels when the median file has fewer non-zero voxels
_NONZERO_BELOW = 0.75
#: an image and its label map must have affines this close (mm), as in keras_nii.data
_AFFINE_ATOL = 1e-4
_SUFFIXES = (".nii.gz", ".nii")
_FORMAT_VERSION = 1

PathLike = str | os.PathLike
Progress = Callable[[int, int, str], None]


# --------------------------------------------------------------------------- #
# inputs
# --------------------------------------------------------------------------- #


def _list_folder(folder: Path, argument: str) -> dict[str, Path]:
    """``{name stem: path}`` of the ``.nii`` / ``.nii.gz`` files of a folder, by name."""
    return storage.list_nifti(folder, argument, _SUFFIXES)


def _as_list(image: Any) -> list[str]:
    """A subject's image files: one path, or a list of them (modalities)."""
    return [image] if isinstance(image, str) else list(image)


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _inputs(images: Any, labels: Any, pair_by: Any = "stem") -> list[tuple[Any, str | None]]:
    """``(image, label or None)`` pairs from folders or lists of files.

    From folders, paired by subject as :meth:`keras_nii.NiftiDataset.from_folder`
    pairs them (``pair_by``); an image is then a path, or a list of paths
    (a subject's modalities).
    """
    if _is_path(images):
        from keras_nii.pairing import pair_files

        found = _list_folder(Path(images), "images")
        if labels is not None and not (_is_path(labels) and Path(labels).is_dir()):
            raise ValueError(f"labels must be a folder when images is one, got {labels!r}")
        maps = None if labels is None else _list_folder(Path(labels), "labels")
        paired, paired_labels = pair_files(
            found, maps, pair_by, images_dir=images, labels_dir=labels
        )
        if paired_labels is None:
            return [(image, None) for image in paired]
        return list(zip(paired, paired_labels, strict=True))
    if pair_by != "stem":
        raise ValueError("pair_by applies to folders; images is a list of files")
    try:
        files = [os.fspath(p) for p in images]
    except TypeError as err:
        raise ValueError(
            f"images must be a folder or a list of NIfTI files, got {images!r}"
        ) from err
    if not files:
        raise ValueError("images is an empty list")
    if labels is None:
        return [(f, None) for f in files]
    if _is_path(labels):
        raise ValueError("labels must be a list of files (one per image) when images is a list")
    maps = [os.fspath(p) for p in labels]
    if len(maps) != len(files):
        raise ValueError(f"labels has {len(maps)} file(s) for {len(files)} image(s)")
    return list(zip(files, maps, strict=True))


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- #
# one file
# --------------------------------------------------------------------------- #


def _intensity(values: np.ndarray) -> dict[str, Any]:
    """The figures of one channel's foreground values (float32, any length).

    The percentiles are taken on the float32 values themselves (a partition
    of float64 copies took twice as long); moments are summed in float64.
    """
    if values.size == 0:
        return {"foreground_voxels": 0}
    low, high = np.percentile(values, PERCENTILES)
    mean = float(np.mean(values, dtype=np.float64))
    return {
        "foreground_voxels": int(values.size),
        "min": float(values.min()),
        "max": float(values.max()),
        f"p{PERCENTILES[0]:g}": float(low),
        f"p{PERCENTILES[1]:g}": float(high),
        "mean": mean,
        "std": float(np.std(values, dtype=np.float64)),
    }


def _label_counts(label: np.ndarray) -> dict[int, int]:
    flat = label.ravel(order="K")  # memory order: no copy of a Fortran-ordered array
    if flat.size and flat.min() >= 0 and flat.max() < 1 << 20:
        counts = np.bincount(flat)
        return {int(v): int(c) for v, c in enumerate(counts) if c}
    values, counts = np.unique(flat, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def _label_table(counts: dict[int, int]) -> dict[str, dict[str, float]]:
    total = sum(counts.values())
    return {
        str(value): {"voxels": int(n), "fraction": n / total if total else 0.0}
        for value, n in sorted(counts.items())
    }


@dataclass
class _Accumulator:
    """Dataset-wide foreground statistics of one channel: exact moments, sampled values."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    low: float = math.inf
    high: float = -math.inf
    samples: list = field(default_factory=list)

    def add(self, figures: dict[str, Any], sample: np.ndarray) -> None:
        """Pool one file's foreground (its :func:`_intensity` figures and a sample)."""
        n = int(figures["foreground_voxels"])
        if n == 0:
            return
        mean = figures["mean"]
        m2 = figures["std"] ** 2 * n
        # Chan et al.'s pairwise update: exact pooled mean and variance
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.low = min(self.low, figures["min"])
        self.high = max(self.high, figures["max"])
        self.samples.append(sample)

    def result(self) -> dict[str, Any]:
        if self.count == 0:
            return {"foreground_voxels": 0, "sampled_voxels": 0}
        pooled = np.concatenate(self.samples)
        low, high = np.percentile(pooled, PERCENTILES)
        return {
            "foreground_voxels": self.count,
            "sampled_voxels": int(pooled.size),
            "min": self.low,
            "max": self.high,
            f"p{PERCENTILES[0]:g}": float(low),
            f"p{PERCENTILES[1]:g}": float(high),
            "mean": self.mean,
            "std": math.sqrt(self.m2 / self.count),
        }


def _read_pair(
    index: int,
    image_path: str,
    label_path: str | None,
    per_file_samples: int,
    seed: int,
    accumulators: list[_Accumulator],
    label_counts: dict[int, int],
) -> dict[str, Any]:
    """The figures of one subject; adds its foreground to the dataset's accumulators.

    ``image_path`` is a file, or a list of files (modalities, as channels in
    that order), which must share one voxel grid.
    """
    paths = _as_list(image_path)
    volume = load_nifti(paths[0])
    data = volume.array
    if len(paths) > 1:
        parts = [data]
        for path in paths[1:]:
            other = load_nifti(path)
            if other.shape[:3] != volume.shape[:3] or not np.allclose(
                other.affine, volume.affine, rtol=0, atol=_AFFINE_ATOL
            ):
                raise NiftiError(
                    f"{path}: not on the voxel grid of {paths[0]}, the subject's first "
                    f"modality: shapes {tuple(other.shape[:3])} vs {tuple(volume.shape[:3])}"
                )
            parts.append(other.array)
        data = np.concatenate(parts, axis=-1)
    shape = [int(s) for s in data.shape[:3]]
    channels = int(data.shape[3])
    record: dict[str, Any] = {
        "image": image_path,
        "label": label_path,
        "shape": shape,
        "channels": channels,
        "spacing": [float(s) for s in volume.spacing],
        "orientation": "".join(nib.aff2axcodes(volume.source_affine)),
    }
    foreground = None
    if label_path is not None:
        label = load_nifti(label_path, dtype="int32")
        if tuple(label.shape[:3]) != tuple(shape) or not np.allclose(
            label.affine, volume.affine, rtol=0, atol=_AFFINE_ATOL
        ):
            raise NiftiError(
                f"{label_path}: the label map is not on the voxel grid of {image_path}: "
                f"shapes {tuple(label.shape[:3])} vs {tuple(shape)}, spacings "
                f"{label.spacing} vs {volume.spacing}"
            )
        foreground = np.any(label.array != 0, axis=-1)
        counts = _label_counts(label.array)
        for value, n in counts.items():
            label_counts[value] = label_counts.get(value, 0) + n
        record["labels"] = _label_table(counts)
    if len(accumulators) < channels:
        accumulators.extend(_Accumulator() for _ in range(channels - len(accumulators)))
    rng = np.random.default_rng([seed, index])
    intensity = []
    for channel in range(channels):
        voxels = data[..., channel]
        inside = voxels != 0 if foreground is None else foreground
        values = voxels[inside]
        if values.size > per_file_samples:
            pick = np.sort(rng.choice(values.size, per_file_samples, replace=False))
            sample = values[pick]
        else:
            sample = values.copy()
        figures = _intensity(values)
        accumulators[channel].add(figures, sample)
        intensity.append(figures)
    record["intensity"] = intensity
    record["nonzero_fraction"] = float(np.count_nonzero(data) / data.size)
    record["air_fraction"] = float(np.count_nonzero(data <= _AIR_HU) / data.size)
    return record


# --------------------------------------------------------------------------- #
# the suggestions
# --------------------------------------------------------------------------- #


def _target_spacing(spacings: np.ndarray) -> tuple[list[float], list[int]]:
    """The target spacing (median; p10 on thick axes), and the thick axes."""
    median = np.median(spacings, axis=0)
    p10 = np.percentile(spacings, 10, axis=0)
    finest = float(median.min())
    thick = [axis for axis in range(3) if median[axis] > ANISOTROPY * finest]
    target = median.copy()
    others = [axis for axis in range(3) if axis not in thick]
    floor = float(median[others].max())
    for axis in thick:
        target[axis] = max(float(p10[axis]), floor)
    return [float(v) for v in target], thick


def _round(value: float) -> int:
    return int(math.floor(value + 0.5))


def _patch_size(
    median_shape: Sequence[int], target: Sequence[float], max_voxels: int, divisor: int
) -> list[int]:
    patch = [max(divisor, math.ceil(m / divisor) * divisor) for m in median_shape]
    while math.prod(patch) > max_voxels:
        shrinkable = [axis for axis in range(3) if patch[axis] > divisor]
        if not shrinkable:
            break
        # the largest extent in mm; ties: the larger size, then the lower axis
        axis = max(shrinkable, key=lambda a: (patch[a] * target[a], patch[a], -a))
        patch[axis] -= divisor
    return patch


def _modality(records: list[dict], modality: str) -> tuple[str, str]:
    """``("ct" | "mr", reason)``."""
    fractions = [r["air_fraction"] for r in records]
    ct_like = all(f >= _AIR_FRACTION for f in fractions)
    if modality == "auto":
        if ct_like:
            reason = (
                f"Hounsfield units: in every file at least {_AIR_FRACTION:.1%} of the voxels "
                f"are <= {_AIR_HU:g} (air); the smallest share is {min(fractions):.1%}"
            )
        else:
            short = sum(f < _AIR_FRACTION for f in fractions)
            reason = (
                f"not Hounsfield units: {short} of {len(records)} file(s) have under "
                f"{_AIR_FRACTION:.1%} of their voxels <= {_AIR_HU:g} (air)"
            )
        return ("ct" if ct_like else "mr"), reason
    return modality, f"as given (modality={modality!r})"


def _normalization(
    modality: str, intensity: list[dict], records: list[dict], foreground: str
) -> dict[str, Any]:
    low_key, high_key = (f"p{p:g}" for p in PERCENTILES)
    if modality == "ct":
        if any(ch["foreground_voxels"] == 0 for ch in intensity):
            raise ValueError("the dataset has no foreground voxels to take CT statistics from")

        def one_or_list(values: list) -> Any:
            return values[0] if len(values) == 1 else values

        return {
            "scheme": "ct",
            "clip": one_or_list([[ch[low_key], ch[high_key]] for ch in intensity]),
            "mean": one_or_list([ch["mean"] for ch in intensity]),
            "std": one_or_list([ch["std"] if ch["std"] > 0 else 1.0 for ch in intensity]),
            "foreground": foreground,
        }
    median_nonzero = float(np.median([r["nonzero_fraction"] for r in records]))
    return {
        "scheme": "zscore",
        "per_sample": True,
        "nonzero": bool(median_nonzero < _NONZERO_BELOW),
        "median_nonzero_fraction": median_nonzero,
    }


# --------------------------------------------------------------------------- #
# the plan
# --------------------------------------------------------------------------- #


def _mm(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.4g}" for v in values)


def _voxels(values: Sequence[int]) -> str:
    return " x ".join(str(int(v)) for v in values)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.5g}"


@dataclass
class Plan:
    """A dataset's fingerprint and the training configuration it suggests.

    Made by :func:`fingerprint`; :meth:`to_json` / :meth:`from_json` save and
    load it (``keras-nii plan --json FILE`` writes the same document).

    Attributes:
        target_spacing: the suggested voxel spacing in mm, per RAS+ axis
            (``load_nifti(path, spacing=plan.target_spacing)``).
        median_shape: the median shape of the files at ``target_spacing``.
        patch_size: the suggested training patch, in voxels at
            ``target_spacing``.
        normalization: ``{"scheme": "ct", "clip": [low, high], "mean": m,
            "std": s, ...}`` or ``{"scheme": "zscore", "per_sample": True,
            "nonzero": bool, ...}`` (see :meth:`normalization_layers`).
        modality: ``"ct"`` or ``"mr"``, and ``modality_reason``, why.
        dataset: the dataset's figures: ``shape`` and ``spacing`` (median,
            10th percentile, min, max per axis), ``orientations`` (file
            counts per orientation code), ``intensity`` (per channel: the
            foreground's 0.5 / 99.5 percentiles, mean, std, min, max),
            ``labels`` (voxel count and fraction per label value),
            ``thick_axes`` (the axes whose *median* spacing is over 3x the
            finest, which got the 10th percentile), ...
        files: one dict per file with the same figures.
    """

    target_spacing: list[float]
    median_shape: list[int]
    patch_size: list[int]
    normalization: dict[str, Any]
    modality: str
    modality_reason: str
    dataset: dict[str, Any]
    files: list[dict[str, Any]]

    # -- layers ---------------------------------------------------------------

    def normalization_layers(self) -> list:
        """The suggested normalization as keras-nii layers, to put first in a model.

        CT: ``[IntensityWindow(minval=low, maxval=high, output_range=(low,
        high)), ZScoreNormalization(mean=mean, std=std)]`` -- a clip to the
        foreground's 0.5 / 99.5 percentiles in Hounsfield units, then the
        dataset's foreground z-score, both baked into the model. MR:
        ``[ZScoreNormalization(nonzero=...)]``, per sample and channel.

        Raises:
            ValueError: CT-like data with several channels whose clipping
                windows differ (one ``IntensityWindow`` clips every channel
                alike).
        """
        from keras_nii.layers import IntensityWindow, ZScoreNormalization

        norm = self.normalization
        if norm["scheme"] == "zscore":
            return [ZScoreNormalization(nonzero=norm["nonzero"], per_channel=True)]
        clip = norm["clip"]
        if isinstance(clip[0], list):
            if any(window != clip[0] for window in clip):
                raise ValueError(
                    f"the channels have different clipping windows {clip}: one IntensityWindow "
                    "clips all channels alike; build the layers per channel"
                )
            clip = clip[0]
        low, high = float(clip[0]), float(clip[1])
        layers = []
        if low < high:
            layers.append(IntensityWindow(minval=low, maxval=high, output_range=(low, high)))
        layers.append(ZScoreNormalization(mean=norm["mean"], std=norm["std"]))
        return layers

    def thick_axes(self) -> list[int]:
        """The axes of ``target_spacing`` over :data:`ANISOTROPY` times its finest axis.

        What :meth:`augmentation_layers` keys on: the data the model trains
        on may still be anisotropic after resampling (or no longer be, when
        the 10th percentile brought a thick axis down).
        """
        finest = min(self.target_spacing)
        return [a for a in range(3) if self.target_spacing[a] > ANISOTROPY * finest]

    def augmentation_layers(self, seed: int | None = None) -> list:
        """A starting point for spatial augmentation at ``target_spacing``, in mm.

        ``[RandomFlip3D(), RandomAffine3D(..., spacing=target_spacing)]``:
        rotations are physical angles and zooms are drawn per sample with
        probability 0.5. Without a thick axis (see :meth:`thick_axes`): up to
        30 degrees about each axis and one zoom factor in (0.7, 1.4) (nnU-Net's
        ranges). With one thick axis, "dummy 2D" (nnU-Net's choice for such
        data): rotation about the thick axis only, up to 180 degrees, zoom
        in the slice plane only, so that nothing is interpolated across the
        thick slices. With two thick axes, flips only.

        Args:
            seed: the seed of the first layer (the next gets ``seed + 1``),
                or ``None``.
        """
        from keras_nii.layers import RandomAffine3D, RandomFlip3D

        def next_seed(offset: int) -> int | None:
            return None if seed is None else seed + offset

        layers = [RandomFlip3D(seed=next_seed(0))]
        thick = self.thick_axes()
        if len(thick) > 1:
            return layers
        spacing = [float(v) for v in self.target_spacing]
        if not thick:
            layers.append(
                RandomAffine3D(
                    degrees=30,
                    scales=(0.7, 1.4),
                    isotropic=True,
                    probability=0.5,
                    spacing=spacing,
                    seed=next_seed(1),
                )
            )
            return layers
        [axis] = thick
        degrees = [0.0, 0.0, 0.0]
        degrees[axis] = 180.0
        scales = [(0.7, 1.4)] * 3
        scales[axis] = (1.0, 1.0)
        layers.append(
            RandomAffine3D(
                degrees=degrees,
                scales=scales,
                isotropic=False,
                probability=0.5,
                spacing=spacing,
                seed=next_seed(1),
            )
        )
        return layers

    # -- JSON -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON types (what :meth:`to_json` writes)."""
        return {
            "keras_nii_plan": _FORMAT_VERSION,
            "target_spacing": list(self.target_spacing),
            "median_shape": list(self.median_shape),
            "patch_size": list(self.patch_size),
            "normalization": dict(self.normalization),
            "modality": self.modality,
            "modality_reason": self.modality_reason,
            "dataset": self.dataset,
            "files": self.files,
        }

    def to_json(self, path: PathLike | None = None) -> str:
        """The plan as JSON text; written (atomically) to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            path = os.fspath(path)
            directory = os.path.dirname(os.path.abspath(path))
            tmp = os.path.join(directory, f".keras-nii-{uuid.uuid4().hex}.json")
            try:
                with open(tmp, "w", encoding="utf-8") as file:
                    file.write(text)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """The plan of :meth:`to_dict`'s document."""
        if not isinstance(data, dict) or data.get("keras_nii_plan") != _FORMAT_VERSION:
            raise ValueError(
                "not a keras-nii plan (version "
                f"{_FORMAT_VERSION}): the key 'keras_nii_plan' is missing or differs"
            )
        return cls(
            target_spacing=[float(v) for v in data["target_spacing"]],
            median_shape=[int(v) for v in data["median_shape"]],
            patch_size=[int(v) for v in data["patch_size"]],
            normalization=dict(data["normalization"]),
            modality=data["modality"],
            modality_reason=data.get("modality_reason", ""),
            dataset=data.get("dataset", {}),
            files=list(data.get("files", [])),
        )

    @classmethod
    def from_json(cls, path: PathLike) -> Plan:
        """Read a plan written by :meth:`to_json` or ``keras-nii plan --json``."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as file:
                data = json.load(file)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from err
        try:
            return cls.from_dict(data)
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from err

    # -- text -----------------------------------------------------------------

    def report(self) -> str:
        """A readable table: the files, the dataset's figures, the suggestions."""
        low_key, high_key = (f"p{p:g}" for p in PERCENTILES)
        names = [" + ".join(os.path.basename(f) for f in _as_list(r["image"])) for r in self.files]
        width = max(len("file"), *(len(n) for n in names))
        shapes = [
            _voxels(r["shape"]) + (f" x {r['channels']}" if r["channels"] > 1 else "")
            for r in self.files
        ]
        shape_width = max(len("shape"), *(len(s) for s in shapes))
        spacings = [_mm(r["spacing"]) for r in self.files]
        spacing_width = max(len("spacing (mm)"), *(len(s) for s in spacings))
        head = (
            f"{'file':<{width}}  {'shape':<{shape_width}}  {'spacing (mm)':<{spacing_width}}  "
            f"{'orient':<6}  {low_key:>9}  {high_key:>9}  {'mean':>9}  {'std':>9}"
        )
        lines = [head, "-" * len(head)]
        for name, shape, spacing, record in zip(names, shapes, spacings, self.files, strict=True):
            first = record["intensity"][0]
            lines.append(
                f"{name:<{width}}  {shape:<{shape_width}}  {spacing:<{spacing_width}}  "
                f"{record['orientation']:<6}  {_number(first.get(low_key)):>9}  "
                f"{_number(first.get(high_key)):>9}  {_number(first.get('mean')):>9}  "
                f"{_number(first.get('std')):>9}"
            )
        data = self.dataset
        lines.append("")
        lines.append(f"dataset: {data['n_files']} file(s), foreground = {data['foreground']}")
        lines.append(
            f"  shape (voxels)   median {' x '.join(f'{v:g}' for v in data['shape']['median'])}, "
            f"min {_voxels(data['shape']['min'])}, max {_voxels(data['shape']['max'])}"
        )
        lines.append(
            f"  spacing (mm)     median {_mm(data['spacing']['median'])}, "
            f"10th percentile {_mm(data['spacing']['p10'])}, "
            f"min {_mm(data['spacing']['min'])}, max {_mm(data['spacing']['max'])}"
        )
        orientations = ", ".join(f"{code} {n}" for code, n in data["orientations"].items())
        lines.append(f"  orientations     {orientations}")
        for channel, figures in enumerate(data["intensity"]):
            label = "  intensity" + (f" [{channel}]" if len(data["intensity"]) > 1 else "")
            if not figures["foreground_voxels"]:
                lines.append(f"{label:<19}no foreground voxels")
                continue
            lines.append(
                f"{label:<19}{low_key} {_number(figures[low_key])}, "
                f"{high_key} {_number(figures[high_key])}, mean {_number(figures['mean'])}, "
                f"std {_number(figures['std'])} over {figures['foreground_voxels']} foreground "
                "voxel(s)"
            )
        if data.get("labels"):
            table = ", ".join(
                f"{value}: {entry['fraction']:.2%}" for value, entry in data["labels"].items()
            )
            lines.append(f"  labels           {table} of the voxels")
        lines.append(f"  modality         {self.modality.upper()}, {self.modality_reason}")
        lines.append("")
        lines.append("plan")
        thick = data.get("thick_axes") or []
        note = f" (thick axes {thick}: 10th percentile)" if thick else " (median)"
        lines.append(f"  target_spacing   {_mm(self.target_spacing)} mm{note}")
        lines.append(f"  median_shape     {_voxels(self.median_shape)} voxels at target_spacing")
        lines.append(
            f"  patch_size       {_voxels(self.patch_size)} ({math.prod(self.patch_size)} voxels)"
        )
        norm = self.normalization
        if norm["scheme"] == "ct":
            windows = norm["clip"] if isinstance(norm["mean"], list) else [norm["clip"]]
            means = norm["mean"] if isinstance(norm["mean"], list) else [norm["mean"]]
            stds = norm["std"] if isinstance(norm["std"], list) else [norm["std"]]
            text = (
                "clip to "
                + ", ".join(f"[{_number(a)}, {_number(b)}]" for a, b in windows)
                + f" (foreground {low_key} / {high_key}), then z-score with mean "
                + ", ".join(_number(m) for m in means)
                + ", std "
                + ", ".join(_number(s) for s in stds)
            )
        else:
            text = "z-score per sample" + (" over the non-zero voxels" if norm["nonzero"] else "")
        lines.append(f"  normalization    {text}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


def fingerprint(
    images: PathLike | Sequence[PathLike],
    labels: PathLike | Sequence[PathLike] | None = None,
    *,
    modality: str = "auto",
    max_voxels: int = 128**3,
    divisor: int = 16,
    samples: int = 10_000_000,
    seed: int = 0,
    progress: Progress | None = None,
    pair_by: Any = "stem",
) -> Plan:
    """Measure a dataset and suggest how to train on it.

    Reads every image once with :func:`keras_nii.load_nifti` (RAS+, scaled,
    float32) and, with ``labels``, its label map (integers), and measures:
    per file and for the dataset, the shape, the voxel spacing (median and
    10th percentile per axis for the dataset), the orientation code of the
    file's own voxel axes, the foreground intensities (0.5 and 99.5
    percentiles, mean, std, min, max, per channel), and the voxel count and
    fraction of every label value. The dataset's mean and std are exact over
    all foreground voxels; its percentiles are taken over all of them too
    while they number at most ``samples``, else over ``samples // files``
    voxels drawn without replacement from each file (seeded).

    The suggestions (target spacing, median shape, patch size,
    normalization) follow the rules of the module docstring.

    Args:
        images: a folder of ``.nii`` / ``.nii.gz`` files (sorted by name,
            hidden files ignored) or a list of files.
        labels: ``None``, a folder of label maps paired with the images by
            subject (``pair_by``, as :meth:`keras_nii.NiftiDataset.from_folder`
            pairs them), or a list of label files, one per image. Each must
            be on its image's voxel grid.
        modality: ``"auto"`` (detect CT from Hounsfield units), ``"ct"`` or
            ``"mr"`` (any non-CT data: per-sample z-score).
        max_voxels: the patch's voxel budget.
        divisor: every patch axis is a multiple of it.
        samples: at most this many foreground voxels are kept for the
            dataset's percentiles.
        seed: the seed of that subsampling.
        progress: called as ``progress(done, total, path)`` after each file.
        pair_by: how files in folders are grouped and paired by subject:
            ``"stem"`` (identical names), ``"bids"``, ``"nnunet"``, a regular
            expression or a function (see :mod:`keras_nii.pairing`). A
            subject's several images (BIDS modalities, nnU-Net channels) are
            measured as the channels of one volume.

    Returns:
        A :class:`Plan`.

    Raises:
        NiftiError: an unreadable file, or a label map off its image's grid.
        ValueError: bad arguments (no files, unpaired files, ...).

    Example:

    ```python
    plan = keras_nii.fingerprint("data/images", "data/labels")
    print(plan.report())
    plan.target_spacing, plan.patch_size          # e.g. [0.8, 0.8, 2.5], [160, 160, 48]
    norm = plan.normalization_layers()            # e.g. [IntensityWindow, ZScoreNormalization]
    ```
    """
    if modality not in ("auto", "ct", "mr"):
        raise ValueError(f"modality must be 'auto', 'ct' or 'mr', got {modality!r}")
    max_voxels = _check_positive_int("max_voxels", max_voxels)
    divisor = _check_positive_int("divisor", divisor)
    samples = _check_positive_int("samples", samples)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    pairs = _inputs(images, labels, pair_by)
    has_labels = pairs[0][1] is not None
    per_file = max(1, samples // len(pairs))

    accumulators: list[_Accumulator] = []
    label_counts: dict[int, int] = {}
    records = []
    for index, (image, label) in enumerate(pairs):
        records.append(
            _read_pair(index, image, label, per_file, int(seed), accumulators, label_counts)
        )
        if progress is not None:
            progress(index + 1, len(pairs), _as_list(image)[0])
    channels = {r["channels"] for r in records}
    if len(channels) > 1:
        raise ValueError(
            f"the images have different numbers of channels {sorted(channels)}: "
            + ", ".join(f"{r['image']} ({r['channels']})" for r in records[:5])
        )

    shapes = np.array([r["shape"] for r in records], dtype=np.float64)
    spacings = np.array([r["spacing"] for r in records], dtype=np.float64)
    target, thick = _target_spacing(spacings)
    at_target = np.floor(shapes * spacings / np.asarray(target) + 0.5)
    for record, shape in zip(records, at_target, strict=True):
        record["shape_at_target"] = [int(s) for s in shape]
    median_shape = [_round(v) for v in np.median(at_target, axis=0)]
    patch = _patch_size(median_shape, target, max_voxels, divisor)

    orientations: dict[str, int] = {}
    for record in records:
        orientations[record["orientation"]] = orientations.get(record["orientation"], 0) + 1
    intensity = [acc.result() for acc in accumulators]
    foreground = "labels" if has_labels else "nonzero"
    dataset = {
        "n_files": len(records),
        "channels": records[0]["channels"],
        "foreground": foreground,
        "shape": {
            "median": [float(v) for v in np.median(shapes, axis=0)],
            "min": [int(v) for v in shapes.min(axis=0)],
            "max": [int(v) for v in shapes.max(axis=0)],
        },
        "spacing": {
            "median": [float(v) for v in np.median(spacings, axis=0)],
            "p10": [float(v) for v in np.percentile(spacings, 10, axis=0)],
            "min": [float(v) for v in spacings.min(axis=0)],
            "max": [float(v) for v in spacings.max(axis=0)],
        },
        "thick_axes": thick,
        "orientations": dict(sorted(orientations.items(), key=lambda item: -item[1])),
        "intensity": intensity,
        "labels": _label_table(label_counts) if has_labels else None,
    }
    chosen, reason = _modality(records, modality)
    return Plan(
        target_spacing=target,
        median_shape=median_shape,
        patch_size=patch,
        normalization=_normalization(chosen, intensity, records, foreground),
        modality=chosen,
        modality_reason=reason,
        dataset=dataset,
        files=records,
    )
