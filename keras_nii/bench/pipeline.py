"""``pipeline``: the usual chain, flip -> random affine -> Gaussian noise on image + mask, as
one compiled function (keras-nii) or one ``Compose`` (MONAI, TorchIO).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keras_nii.bench.affine import AFFINE_DEGREES, AFFINE_SCALES, monai_rand_affine
from keras_nii.bench.core import (
    Context,
    apply_layers,
    keras_nii_attr,
    operation,
    try_import,
)


@operation("pipeline", order=60)
def bench_pipeline(ctx: Context) -> None:
    images, masks = ctx.data()

    def make() -> tuple[Callable, list]:
        flip, affine, noise = (
            keras_nii_attr("layers.flip", "RandomFlip3D"),
            keras_nii_attr("layers.affine", "RandomAffine3D"),
            keras_nii_attr("layers.intensity", "RandomGaussianNoise"),
        )
        layers = [
            flip(axes=(0, 1, 2), probability=0.5, seed=0),
            affine(degrees=AFFINE_DEGREES, scales=AFFINE_SCALES, seed=1),
            noise(std=0.1, seed=2),
        ]
        return apply_layers(layers), layers

    ctx.keras_rows(
        "pipeline",
        "image+mask",
        make,
        lambda: dict(
            zip(("images", "segmentation_masks"), ctx.tensors(images, masks), strict=True)
        ),
        reference=True,
        note="RandomFlip3D -> RandomAffine3D -> RandomGaussianNoise (images only)",
    )

    def monai() -> Callable[[], Any]:
        mt = ctx.monai()
        flips = [mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=a) for a in range(3)]
        noise = mt.RandGaussianNoised(keys=["image"], prob=1.0, std=0.1)
        tfm = mt.Compose([*flips, monai_rand_affine(ctx, with_mask=True), noise])
        return ctx.monai_pairs(tfm)

    ctx.add_torch(
        "pipeline",
        "image+mask",
        "MONAI",
        monai,
        note="RandFlipd per axis + RandAffined + RandGaussianNoised",
    )

    def torchio() -> Callable[[], Any]:
        tio = try_import("torchio")
        tfm = tio.Compose(
            [
                tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5),
                tio.RandomAffine(scales=AFFINE_SCALES, degrees=AFFINE_DEGREES),
                tio.RandomNoise(std=0.1),
            ]
        )
        subjects = ctx.torchio_subjects(tio)
        return lambda: [tfm(s) for s in subjects]

    ctx.add_torchio(
        "pipeline",
        "image+mask",
        torchio,
        resamples=True,
        note="RandomFlip + RandomAffine + RandomNoise",
    )
