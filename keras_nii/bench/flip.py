"""``flip``: RandomFlip3D on image + mask (and image alone) against MONAI, TorchIO and NumPy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from keras_nii.bench.core import (
    Context,
    apply_layers,
    keras_nii_layers,
    operation,
    try_import,
)


@operation("flip", order=20, copy_floor="image")
def bench_flip(ctx: Context) -> None:
    images, masks = ctx.data()

    def make() -> tuple[Callable, list]:
        (cls,) = keras_nii_layers("flip", "RandomFlip3D")
        layer = cls(axes=(0, 1, 2), probability=0.5, seed=0)
        return apply_layers([layer]), [layer]

    ctx.keras_rows(
        "flip",
        "image+mask",
        make,
        lambda: dict(
            zip(("images", "segmentation_masks"), ctx.tensors(images, masks), strict=True)
        ),
        reference=True,
    )
    ctx.keras_rows("flip", "image", make, lambda: ctx.tensors(images), graph_row=False)

    def monai() -> Callable[[], Any]:
        mt = ctx.monai()
        tfm = mt.Compose(
            [mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=a) for a in range(3)]
        )
        return ctx.monai_pairs(tfm)

    ctx.add_torch(
        "flip",
        "image+mask",
        "MONAI",
        monai,
        note="RandFlipd per axis",
    )

    def torchio() -> Callable[[], Any]:
        tio = try_import("torchio")
        tfm = tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5)
        subjects = ctx.torchio_subjects(tio)
        return lambda: [tfm(s) for s in subjects]

    ctx.add_torchio("flip", "image+mask", torchio)

    def numpy_ref() -> Callable[[], Any]:
        rng = np.random.default_rng(0)

        def run() -> list[Any]:
            out = []
            for v, m in zip(images, masks, strict=True):
                axes = tuple(a for a in range(3) if rng.random() < 0.5)
                out.append(
                    (np.ascontiguousarray(np.flip(v, axes)), np.ascontiguousarray(np.flip(m, axes)))
                )
            return out

        return run

    ctx.add("flip", "image+mask", "NumPy", "numpy", "1", numpy_ref)
