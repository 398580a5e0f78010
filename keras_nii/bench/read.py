"""``read``: one epoch of NiftiDataset (no cache, memory cache, directory cache) against a
plain nibabel loop.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from keras_nii.bench.core import (
    Context,
    Row,
    Target,
    find_row,
    keras_nii_attr,
    operation,
)

READ_FILES = 8  # volumes in the ``read`` dataset


def _targets(rows: list[Row], target: Target) -> None:
    cold = find_row(rows, "read", "no cache", "keras-nii")
    plain = find_row(rows, "read", "no cache", "nibabel")
    if cold and plain:
        target(
            "read without cache vs nibabel loop",
            "NiftiDataset / nibabel <= 1.1",
            cold["ms_per_volume"] / plain["ms_per_volume"],
            1.1,
        )
    for variant in ("memory cache", "dir cache"):
        cached = find_row(rows, "read", variant, "keras-nii")
        if cold and cached:
            target(
                f"read {variant} speed-up",
                "no cache / cached >= 10",
                cold["ms_per_volume"] / cached["ms_per_volume"],
                10.0,
                higher_is_better=True,
            )


@operation("read", order=70, targets=_targets)
def bench_read(ctx: Context) -> None:
    import nibabel as nib

    from keras_nii.phantoms import make_dataset

    with tempfile.TemporaryDirectory(prefix="keras-nii-bench-") as tmp:
        ctx.log(f"read      writing {READ_FILES} phantoms of {ctx.size}^3 to {tmp}")
        pairs = make_dataset(Path(tmp) / "data", READ_FILES, shape=(ctx.size,) * 3, seed=0)
        paths = [str(image) for image, _ in pairs]
        n = len(paths)

        def dataset(cache: Any) -> Callable[[], Any]:
            cls = keras_nii_attr("data", "NiftiDataset")
            ds = cls(paths, batch_size=ctx.batch, cache=cache)

            def epoch() -> int:
                count = 0
                for i in range(len(ds)):
                    batch = ds[i]
                    x = batch[0] if isinstance(batch, tuple) else batch
                    count += int(np.asarray(x).shape[0])
                if count != n:
                    raise RuntimeError(f"one epoch gave {count} volumes, expected {n}")
                return count

            return epoch

        ctx.add(
            "read",
            "no cache",
            "keras-nii",
            "NiftiDataset",
            "1",
            lambda: dataset(None),
            volumes=n,
            reference=True,
            note=f"one epoch of {n} .nii.gz files, batch {ctx.batch}",
        )
        ctx.add(
            "read",
            "memory cache",
            "keras-nii",
            "NiftiDataset",
            "1",
            lambda: dataset("memory"),
            volumes=n,
            note="first call fills the cache",
        )
        ctx.add(
            "read",
            "dir cache",
            "keras-nii",
            "NiftiDataset",
            "1",
            lambda: dataset(str(Path(tmp) / "cache")),
            volumes=n,
            note="first call fills the cache",
        )

        def plain() -> Callable[[], Any]:
            return lambda: [nib.load(p).get_fdata(dtype=np.float32) for p in paths]

        ctx.add(
            "read",
            "no cache",
            "nibabel",
            "python loop",
            "1",
            plain,
            volumes=n,
            note="nibabel.load(p).get_fdata(dtype=float32)",
        )
