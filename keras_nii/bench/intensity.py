"""``intensity``: random shift, gamma and noise against MONAI, TorchIO and NumPy."""

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


@operation("intensity", order=50)
def bench_intensity(ctx: Context) -> None:
    images, _ = ctx.data()
    unit = (images / images.max()).astype(np.float32)

    def make() -> tuple[Callable, list]:
        shift, gamma, noise = keras_nii_layers(
            "intensity", "RandomIntensityShift", "RandomGamma", "RandomGaussianNoise"
        )
        layers = [
            shift(offset=0.1, seed=0),
            gamma(gamma=(0.7, 1.5), seed=1),
            noise(std=0.1, seed=2),
        ]
        return apply_layers(layers), layers

    ctx.keras_rows(
        "intensity",
        "shift+gamma+noise",
        make,
        lambda: ctx.tensors(unit),
        reference=True,
        note="RandomIntensityShift -> RandomGamma -> RandomGaussianNoise",
    )

    def monai() -> Callable[[], Any]:
        mt = ctx.monai()
        tfm = mt.Compose(
            [
                mt.RandShiftIntensity(offsets=0.1, prob=1.0),
                mt.RandAdjustContrast(prob=1.0, gamma=(0.7, 1.5)),
                mt.RandGaussianNoise(prob=1.0, std=0.1),
            ]
        )
        vols, _ = ctx.torch_volumes(unit=True)
        return ctx.torch_synced(lambda: [tfm(v) for v in vols])

    ctx.add_torch(
        "intensity",
        "shift+gamma+noise",
        "MONAI",
        monai,
        note="RandShiftIntensity + RandAdjustContrast + RandGaussianNoise",
    )

    def torchio() -> Callable[[], Any]:
        tio = try_import("torchio")
        tfm = tio.Compose([tio.RandomGamma(log_gamma=(-0.35, 0.4)), tio.RandomNoise(std=0.1)])
        subjects = ctx.torchio_subjects(tio, masks=False, unit=True)
        return lambda: [tfm(s) for s in subjects]

    ctx.add_torchio(
        "intensity",
        "gamma+noise",
        torchio,
        note="TorchIO has no random intensity shift: RandomGamma + RandomNoise only",
    )

    def numpy_ref() -> Callable[[], Any]:
        rng = np.random.default_rng(0)

        def run() -> list[np.ndarray]:
            out = []
            for v in unit:
                x = v + rng.uniform(-0.1, 0.1)
                lo, hi = x.min(), x.max()
                x = ((x - lo) / (hi - lo)) ** rng.uniform(0.7, 1.5) * (hi - lo) + lo
                out.append(x + rng.normal(0.0, 0.1, size=x.shape).astype(np.float32))
            return out

        return run

    ctx.add("intensity", "shift+gamma+noise", "NumPy", "numpy", "1", numpy_ref)
