"""``zscore``: ZScoreNormalization(nonzero=True) against MONAI, TorchIO and NumPy, and the copy floor."""

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


@operation("zscore", order=10, copy_floor="nonzero")
def bench_zscore(ctx: Context) -> None:
    images, _ = ctx.data()

    def make() -> tuple[Callable, list]:
        (cls,) = keras_nii_layers("normalization", "ZScoreNormalization")
        layer = cls(nonzero=True)
        return apply_layers([layer]), [layer]

    ctx.keras_rows("zscore", "nonzero", make, lambda: ctx.tensors(images), reference=True)

    def monai() -> Callable[[], Any]:
        mt = ctx.monai()
        tfm = mt.NormalizeIntensity(nonzero=True)
        vols, _ = ctx.torch_volumes()
        return ctx.torch_synced(lambda: [tfm(v) for v in vols])

    ctx.add_torch("zscore", "nonzero", "MONAI", monai)

    def torchio() -> Callable[[], Any]:
        tio = try_import("torchio")
        tfm = tio.ZNormalization(masking_method=lambda x: x > 0)
        subjects = ctx.torchio_subjects(tio, masks=False)
        return lambda: [tfm(s) for s in subjects]

    ctx.add_torchio("zscore", "nonzero", torchio)

    def numpy_ref() -> Callable[[], Any]:
        def run() -> list[np.ndarray]:
            out = []
            for v in images:
                inside = v != 0
                values = v[inside]
                std = values.std()
                out.append(np.where(inside, (v - values.mean()) / (std if std > 0 else 1), 0))
            return out

        return run

    ctx.add("zscore", "nonzero", "NumPy", "numpy", "1", numpy_ref)
