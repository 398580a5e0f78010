"""``pipeline``: the usual chain, flip -> random affine -> elastic -> Gaussian noise on image +
mask: keras-nii's ``Pipeline3D`` (one resampling), the same layers one after the other
(unfused), MONAI ``Compose`` (with and without ``lazy=True``) and TorchIO ``Compose``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keras_nii.bench.affine import AFFINE_DEGREES, AFFINE_SCALES, monai_rand_affine
from keras_nii.bench.core import (
    Context,
    Row,
    Target,
    apply_layers,
    find_row,
    keras_nii_attr,
    operation,
    try_import,
)
from keras_nii.bench.elastic import ELASTIC_DISPLACEMENT, ELASTIC_POINTS, monai_rand_elastic

UNFUSED = "image+mask unfused"


def _targets(rows: list[Row], target: Target) -> None:
    fused = find_row(rows, "pipeline", "image+mask", "keras-nii")
    if fused is None:
        return
    elastic = find_row(rows, "elastic", "image+mask", "keras-nii")
    if elastic:
        target(
            "pipeline fused vs elastic alone",
            "Pipeline3D / RandomElasticDeformation3D <= 1.2",
            fused["ms_per_volume"] / elastic["ms_per_volume"],
            1.2,
        )
    unfused = find_row(rows, "pipeline", UNFUSED, "keras-nii")
    if unfused:
        target(
            "pipeline fused vs unfused",
            "Pipeline3D / the layers one after the other <= 0.6",
            fused["ms_per_volume"] / unfused["ms_per_volume"],
            0.6,
        )
    peers = [
        r
        for r in rows
        if r["operation"] == "pipeline" and r["library"] != "keras-nii" and r["status"] == "ok"
    ]
    if peers:
        fastest = min(peers, key=lambda r: r["ms_per_volume"])
        target(
            "pipeline fused vs fastest peer",
            f"{fastest['library']} ({fastest['runtime']}) / keras-nii >= 5",
            fastest["ms_per_volume"] / fused["ms_per_volume"],
            5.0,
            higher_is_better=True,
        )


def _layers() -> list[Any]:
    flip = keras_nii_attr("layers.flip", "RandomFlip3D")
    affine = keras_nii_attr("layers.affine", "RandomAffine3D")
    elastic = keras_nii_attr("layers.elastic", "RandomElasticDeformation3D")
    noise = keras_nii_attr("layers.intensity", "RandomGaussianNoise")
    return [
        flip(axes=(0, 1, 2), probability=0.5, seed=0),
        affine(degrees=AFFINE_DEGREES, scales=AFFINE_SCALES, seed=1),
        elastic(num_control_points=ELASTIC_POINTS, max_displacement=ELASTIC_DISPLACEMENT, seed=2),
        noise(std=0.1, seed=3),
    ]


@operation("pipeline", order=60, targets=_targets)
def bench_pipeline(ctx: Context) -> None:
    images, masks = ctx.data()

    def fused() -> tuple[Callable, list]:
        pipeline = keras_nii_attr("layers.pipeline", "Pipeline3D")(_layers())
        return apply_layers([pipeline]), [pipeline]

    def unfused() -> tuple[Callable, list]:
        layers = _layers()
        return apply_layers(layers), layers

    paired = lambda: dict(  # noqa: E731
        zip(("images", "segmentation_masks"), ctx.tensors(images, masks), strict=True)
    )
    chain = "RandomFlip3D -> RandomAffine3D -> RandomElasticDeformation3D -> RandomGaussianNoise"
    ctx.keras_rows(
        "pipeline",
        "image+mask",
        fused,
        paired,
        reference=True,
        note=f"Pipeline3D: {chain}, one resampling",
    )
    ctx.keras_rows(
        "pipeline",
        UNFUSED,
        unfused,
        paired,
        graph_row=False,
        note=f"{chain}, one after the other (two resamplings)",
    )

    def monai(lazy: bool) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            mt = ctx.monai()
            flips = [
                mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=a) for a in range(3)
            ]
            elastic = monai_rand_elastic(ctx)  # the elastic bench row's MONAI deformation
            noise = mt.RandGaussianNoised(keys=["image"], prob=1.0, std=0.1)
            tfm = mt.Compose(
                [*flips, monai_rand_affine(ctx, with_mask=True), elastic, noise], lazy=lazy
            )
            if lazy:
                # lazy resampling keeps the pending transforms in the metadata
                # (ctx.monai() turned it off: set it after building the transforms)
                try_import("monai.data").set_track_meta(True)
            return ctx.monai_pairs(tfm)

        return setup

    for lazy in (False, True):
        ctx.add_torch(
            "pipeline",
            "image+mask",
            "MONAI",
            monai(lazy),
            runtime_suffix=", lazy" if lazy else "",
            note=(
                "Compose(lazy=True): RandFlipd per axis + RandAffined fused, then "
                "Rand3DElasticd (not lazy) + RandGaussianNoised"
                if lazy
                else "Compose: RandFlipd per axis + RandAffined + Rand3DElasticd + "
                "RandGaussianNoised"
            ),
        )

    def torchio() -> Callable[[], Any]:
        tio = try_import("torchio")
        tfm = tio.Compose(
            [
                tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5),
                tio.RandomAffine(scales=AFFINE_SCALES, degrees=AFFINE_DEGREES),
                tio.RandomElasticDeformation(
                    num_control_points=ELASTIC_POINTS, max_displacement=ELASTIC_DISPLACEMENT
                ),
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
        note="Compose: RandomFlip + RandomAffine + RandomElasticDeformation + RandomNoise",
    )
