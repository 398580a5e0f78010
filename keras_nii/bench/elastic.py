"""``elastic``: RandomElasticDeformation3D on image + mask against MONAI, TorchIO and SciPy."""

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

# the elastic deformation: TorchIO's defaults, for keras-nii and TorchIO
ELASTIC_POINTS = 7
ELASTIC_DISPLACEMENT = 7.5


@operation("elastic", order=40)
def bench_elastic(ctx: Context) -> None:
    images, masks = ctx.data()

    def make() -> tuple[Callable, list]:
        (cls,) = keras_nii_layers("elastic", "RandomElasticDeformation3D")
        layer = cls(
            num_control_points=ELASTIC_POINTS, max_displacement=ELASTIC_DISPLACEMENT, seed=0
        )
        return apply_layers([layer]), [layer]

    paired = lambda: dict(  # noqa: E731
        zip(("images", "segmentation_masks"), ctx.tensors(images, masks), strict=True)
    )
    note = f"{ELASTIC_POINTS}^3 control points, max displacement {ELASTIC_DISPLACEMENT} voxels"
    ctx.keras_rows("elastic", "image+mask", make, paired, reference=True, note=note)

    def monai() -> Callable[[], Any]:
        return ctx.monai_pairs(monai_rand_elastic(ctx))

    ctx.add_torch(
        "elastic",
        "image+mask",
        "MONAI",
        monai,
        note="Rand3DElasticd sigma 5-8, magnitude 100-200 (dense Gaussian-smoothed field)",
    )

    def torchio() -> Callable[[], Any]:
        tio = try_import("torchio")
        tfm = tio.RandomElasticDeformation(
            num_control_points=ELASTIC_POINTS, max_displacement=ELASTIC_DISPLACEMENT
        )
        subjects = ctx.torchio_subjects(tio)
        return lambda: [tfm(s) for s in subjects]

    ctx.add_torchio(
        "elastic",
        "image+mask",
        torchio,
        resamples=True,
    )

    def scipy_ref() -> Callable[[], Any]:
        ndimage = try_import("scipy.ndimage")
        rng = np.random.default_rng(0)
        shape = images.shape[1:4]
        grid = np.stack(
            np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
        )

        def run() -> list[Any]:
            out = []
            for v, m in zip(images, masks, strict=True):
                coarse = rng.uniform(
                    -ELASTIC_DISPLACEMENT, ELASTIC_DISPLACEMENT, size=(3, *(ELASTIC_POINTS,) * 3)
                ).astype(np.float32)
                zoom = [n / ELASTIC_POINTS for n in shape]
                field = np.stack([ndimage.zoom(c, zoom, order=3) for c in coarse])
                coords = grid + field
                out.append(
                    (
                        ndimage.map_coordinates(v[..., 0], coords, order=1),
                        ndimage.map_coordinates(m[..., 0], coords, order=0),
                    )
                )
            return out

        return run

    ctx.add(
        "elastic",
        "image+mask",
        "SciPy",
        "scipy.ndimage",
        "1",
        scipy_ref,
        note="cubic zoom of a coarse field + map_coordinates",
    )


def monai_rand_elastic(ctx: Context) -> Any:
    """MONAI's ``Rand3DElasticd`` on image and mask, as this row runs it, on the torch
    peers' device (the pipeline row reuses it)."""
    mt = ctx.monai()
    return mt.Rand3DElasticd(
        keys=["image", "label"],
        sigma_range=(5.0, 8.0),
        magnitude_range=(100.0, 200.0),
        prob=1.0,
        mode=("bilinear", "nearest"),
        padding_mode="zeros",
        device=ctx.torch().device(ctx.torch_device()),
    )
