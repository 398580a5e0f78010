"""``spacing``: read a thick-slice CT and resample it to isotropic voxels.

One ``.nii.gz`` of int16 CT-like data at 0.7 x 0.7 x 5 mm (512 x 512 x 100
voxels at the default ``--size 128``; the three sizes scale with ``--size``)
is read and resampled to 1.5 mm isotropic, linearly, from the file to a
float32 array on the new grid: ``load_nifti(path, spacing=1.5)`` against
nibabel + ``scipy.ndimage.zoom(order=1)``, MONAI's ``LoadImage`` +
``Spacing`` and TorchIO's ``ScalarImage`` + ``Resample``. Every row includes
the read (decompression included), since that is what a user waits for.
Target: keras-nii at most 0.6x the time of the fastest peer.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from keras_nii.bench.core import Context, Row, Target, find_row, lazy, operation, try_import

#: the file's grid at ``--size 128`` (scaled by size / 128) and its spacing, in mm
SHAPE_AT_128 = (512, 512, 100)
SOURCE_SPACING = (0.7, 0.7, 5.0)
TARGET_SPACING = 1.5
PEERS = ("nibabel+SciPy", "MONAI", "TorchIO")
VARIANT = "0.7x0.7x5->1.5"
#: the heavy peers take seconds a call: fewer timed calls than the other operations
MAX_REPEATS = 3


def _targets(rows: list[Row], target: Target) -> None:
    ours = find_row(rows, "spacing", VARIANT, "keras-nii")
    peers = [find_row(rows, "spacing", VARIANT, name) for name in PEERS]
    peers = [row for row in peers if row is not None]
    if ours and peers:
        fastest = min(row["ms_per_volume"] for row in peers)
        target(
            "spacing: read + resample vs the fastest peer",
            "keras-nii / fastest peer <= 0.6",
            ours["ms_per_volume"] / fastest,
            0.6,
        )


def _write_scan(folder: Path, shape: tuple[int, int, int]) -> Path:
    import nibabel as nib

    from keras_nii.phantoms import make_phantom

    image, _, affine = make_phantom(shape, seed=0, spacing=SOURCE_SPACING)
    # CT-like: air at -1000 HU, soft tissue about 40 HU, lesions brighter
    hu = np.rint(image * 0.5 - 1000.0).astype(np.int16)
    img = nib.Nifti1Image(hu, affine)
    img.header.set_xyzt_units("mm")
    path = folder / "ct.nii.gz"
    nib.save(img, str(path))
    return path


@operation("spacing", order=75, targets=_targets)
def bench_spacing(ctx: Context) -> None:
    shape = tuple(max(8, round(n * ctx.size / 128)) for n in SHAPE_AT_128)
    repeats = min(ctx.repeats, MAX_REPEATS)
    variant = VARIANT
    note = f"{shape[0]}x{shape[1]}x{shape[2]} int16 .nii.gz, read + resample"
    with tempfile.TemporaryDirectory(prefix="keras-nii-bench-") as tmp:
        ctx.log(f"spacing   writing a {shape} int16 scan to {tmp}")
        path = str(_write_scan(Path(tmp), shape))

        def keras_nii() -> Callable[[], Any]:
            from keras_nii.io import load_nifti

            return lambda: load_nifti(path, spacing=TARGET_SPACING).array

        ctx.add(
            "spacing",
            variant,
            "keras-nii",
            "NumPy",
            str(ctx.cores),
            keras_nii,
            volumes=1,
            reference=True,
            note=note,
            repeats=repeats,
        )

        def read_only() -> Callable[[], Any]:
            from keras_nii.io import load_nifti

            return lambda: load_nifti(path).array

        ctx.add(
            "spacing",
            "read only",
            "keras-nii",
            "NumPy",
            "1",
            read_only,
            volumes=1,
            note="load_nifti without spacing: the decode alone, for scale",
            repeats=repeats,
        )

        def scipy() -> Callable[[], Any]:
            import nibabel as nib

            ndimage = try_import("scipy.ndimage")
            factors = [s / TARGET_SPACING for s in SOURCE_SPACING]

            def run() -> Any:
                data = nib.load(path).get_fdata(dtype=np.float32)
                return ndimage.zoom(data, factors, order=1)

            return run

        ctx.add(
            "spacing",
            variant,
            "nibabel+SciPy",
            "NumPy",
            "1",
            scipy,
            volumes=1,
            note="nibabel get_fdata + scipy.ndimage.zoom(order=1)",
            repeats=repeats,
        )

        def monai() -> Callable[[], Any]:
            ctx.torch()
            data = try_import("monai.data")
            mt = try_import("monai.transforms")
            load = mt.LoadImage(image_only=True, ensure_channel_first=True)
            resample = mt.Spacing(pixdim=(TARGET_SPACING,) * 3, mode="bilinear")

            def run() -> Any:
                # Spacing needs the affine: metadata on for this row only
                before = data.get_track_meta()
                data.set_track_meta(True)
                try:
                    return resample(load(path))
                finally:
                    data.set_track_meta(before)

            return run

        ctx.add(
            "spacing",
            variant,
            "MONAI",
            "torch",
            lazy(ctx.torch_threads),
            monai,
            volumes=1,
            note="LoadImage + Spacing(mode='bilinear'), on the CPU",
            repeats=repeats,
        )

        def torchio() -> Callable[[], Any]:
            tio = try_import("torchio")
            resample = tio.Resample(TARGET_SPACING)

            def run() -> Any:
                return resample(tio.ScalarImage(path)).data

            return run

        ctx.add(
            "spacing",
            variant,
            "TorchIO",
            "torch+SimpleITK",
            lazy(lambda: f"{ctx.torch_threads()}/{ctx.itk_threads()}"),
            torchio,
            volumes=1,
            note="ScalarImage + Resample (linear)",
            repeats=repeats,
        )
