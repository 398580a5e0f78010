"""``train``: a training step of a tiny 3D U-Net, with and without AugmentedModel's on-device
augmentation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from keras_nii.bench.affine import AFFINE_DEGREES, AFFINE_SCALES
from keras_nii.bench.core import (
    Context,
    Unavailable,
    keras_nii_attr,
    operation,
)

TRAIN_MAX_SIZE = 64  # the U-Net of ``train`` sees min(size, 64)**3


def _unet(keras: Any, size: int, name: str) -> Any:
    """A tiny 2-level 3D U-Net (8 and 16 filters) for ``size**3`` single-channel volumes."""
    layers = keras.layers

    def block(x: Any, filters: int, prefix: str) -> Any:
        for i in range(2):
            x = layers.Conv3D(
                filters, 3, padding="same", activation="relu", name=f"{prefix}_conv{i}"
            )(x)
        return x

    inputs = keras.Input((size, size, size, 1), name="images")
    down = block(inputs, 8, "down")
    bottom = block(layers.MaxPooling3D(2)(down), 16, "bottom")
    up = layers.UpSampling3D(2)(bottom)
    x = block(layers.Concatenate()([up, down]), 8, "up")
    outputs = layers.Conv3D(1, 1, activation="sigmoid", name="head")(x)
    return keras.Model(inputs, outputs, name=name)


@operation("train", order=80)
def bench_train(ctx: Context) -> None:
    keras = ctx.keras
    size = min(ctx.size, TRAIN_MAX_SIZE)
    size -= size % 2  # one 2x pooling level
    images, masks = ctx.data(size)
    x, y = images, masks.astype(np.float32)
    unet_note = f"U-Net 2 levels, 8/16 filters, {size}^3, Adam, BCE; train_on_batch"
    compiled: list[Any] = []

    def step(model: Any) -> Callable[[], Any]:
        # Keras's default jit_compile="auto": XLA under JAX and on TensorFlow
        # GPUs; TensorFlow graph (no XLA) on CPU-only machines
        model.compile(optimizer="adam", loss="binary_crossentropy")
        compiled.append(model)
        return lambda: model.train_on_batch(x, y)

    def runtime() -> str:
        if ctx.backend == "jax":
            return "jax jit"
        if compiled and compiled[-1].jit_compile:
            return "tensorflow XLA"
        return "tensorflow graph"

    def plain() -> Callable[[], Any]:
        keras.utils.set_random_seed(0)
        return step(_unet(keras, size, "unet"))

    base = ctx.add(
        "train",
        "no augmentation",
        "keras-nii",
        "keras fit",
        str(ctx.cores),
        plain,
        reference=True,
        note=unet_note,
    )
    base["runtime"] = runtime()

    how: list[str] = []

    def augmented() -> Callable[[], Any]:
        flip, affine, noise = (
            keras_nii_attr("layers.flip", "RandomFlip3D"),
            keras_nii_attr("layers.affine", "RandomAffine3D"),
            keras_nii_attr("layers.intensity", "RandomGaussianNoise"),
        )
        augmentation = [
            flip(seed=0),
            affine(degrees=AFFINE_DEGREES, scales=AFFINE_SCALES, seed=1),
            noise(std=0.1, seed=2),
        ]
        keras.utils.set_random_seed(0)
        unet = _unet(keras, size, "unet_aug")
        try:
            wrapper = keras_nii_attr("training", "AugmentedModel")
        except Unavailable:
            wrapper = None
        if wrapper is not None:
            how.append("keras_nii.training.AugmentedModel: image + mask augmented in train_step")
            return step(wrapper(unet, keras.layers.Pipeline(augmentation)))
        how.append("AugmentedModel not available: layers at the front of the model (image only)")
        inputs = keras.Input((size, size, size, 1))
        out = inputs
        for layer in augmentation:
            out = layer(out)
        return step(keras.Model(inputs, unet(out)))

    compiled.clear()
    row = ctx.add(
        "train",
        "augmented",
        "keras-nii",
        "keras fit",
        str(ctx.cores),
        augmented,
        note="RandomFlip3D + RandomAffine3D + RandomGaussianNoise on device",
    )
    row["runtime"] = runtime()
    if how:
        row["note"] = "; ".join([row["note"], *how])
    for r in (base, row):
        if r["status"] == "ok":
            r["note"] += f"; {r['ms_per_call']:.1f} ms/step"
    if base["status"] == "ok" and row["status"] == "ok":
        extra = row["ms_per_call"] - base["ms_per_call"]
        row["augmentation_overhead_ms_per_step"] = extra
        row["augmentation_overhead_percent"] = 100.0 * extra / base["ms_per_call"]
        row["note"] += (
            f"; augmentation adds {extra:.1f} ms/step ({row['augmentation_overhead_percent']:.0f} %)"
        )


# --------------------------------------------------------------------------- #
# peer helpers
# --------------------------------------------------------------------------- #
