"""The end-to-end demo behind ``keras-nii demo``: phantoms in, a NIfTI prediction out.

:func:`run_demo` walks through the whole library on synthetic data, on a
laptop CPU in a few minutes:

1. writes a dataset of head-with-lesions phantoms
   (:func:`keras_nii.phantoms.make_dataset`) stored in varied orientations
   (RAS, LPS, oblique) and voxel sizes, plus one held-out LPS case;
2. feeds them to Keras with :class:`keras_nii.NiftiDataset` (RAS+ arrays,
   shuffled, cached in memory);
3. trains a small 3D U-Net (:func:`keras_nii.models.unet3d`) whose first
   layer is ``ZScoreNormalization(nonzero=True)``, so the saved model takes
   raw scans, wrapped in :class:`keras_nii.AugmentedModel`: random flips,
   small rotations/zooms, a gamma change and a bias field, applied to image
   and mask together inside the training step;
4. reports the validation Dice after every epoch (``val_dice`` in Keras's
   progress line);
5. saves ``model.keras`` and exports a SavedModel (``exported/``);
6. predicts the held-out scan with :func:`keras_nii.predict_nifti`, which
   writes ``prediction.nii.gz`` in the scan's own voxel order and affine, and
   scores it against the scan's label map (both read in the file's own voxel
   order), next to what an empty and an all-foreground prediction would score;
7. draws ``slices.png`` (image, reference, prediction) if matplotlib is there.

Intensity augmentation is multiplicative (gamma, bias field): additive noise
would turn the phantoms' zero background non-zero and change what
``ZScoreNormalization(nonzero=True)`` normalizes over, between training and
inference.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# the defaults live in a module of their own, so that `keras-nii --help` does not import this one
from keras_nii._defaults import DEMO as DEFAULTS

__all__ = ["run_demo", "DEFAULTS", "DemoError"]

# what the demo writes in its folder; --overwrite replaces these and nothing else
_OUTPUTS = ("data", "heldout", "model.keras", "exported", "prediction.nii.gz", "slices.png")


class DemoError(ValueError):
    """A demo that cannot run as asked (e.g. its folder is not empty)."""


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _prepare_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DemoError(
                f"{out} already exists and is not empty; pass --overwrite to replace the "
                "demo's files there, or choose another --out"
            )
        for name in _OUTPUTS:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _augmentation(seed: int) -> Any:
    import keras

    from keras_nii.layers import RandomAffine3D, RandomBiasField, RandomFlip3D, RandomGamma

    return keras.layers.Pipeline(
        [
            RandomFlip3D(axes=(0, 1, 2), probability=0.5, seed=seed + 1),
            RandomAffine3D(degrees=10, scales=0.1, translation=2, probability=0.8, seed=seed + 2),
            RandomGamma(gamma=(0.8, 1.25), probability=0.5, seed=seed + 3),
            RandomBiasField(coefficients=0.1, order=2, probability=0.5, seed=seed + 4),
        ],
        name="augmentation",
    )


def _export(net: Any, path: Path, factor: int) -> None:
    """``net.export``; under JAX, telling jax2tf that spatial sizes are multiples of ``factor``."""
    import keras

    kwargs: dict[str, Any] = {}
    if keras.backend.backend() == "jax":
        # with free symbolic sizes jax2tf cannot prove that the U-Net's
        # upsampled features match their skip connections
        channels = net.input_shape[-1]
        shape = f"(batch, {factor}*x, {factor}*y, {factor}*z, {channels})"
        kwargs["jax2tf_kwargs"] = {"polymorphic_shapes": [shape]}
    net.export(str(path), verbose=False, **kwargs)


def _validation_callback(net: Any, dataset: Any) -> Any:
    """A callback that adds ``val_dice`` (mean Dice over the validation cases) to the logs."""
    import keras

    from keras_nii.models import dice_score

    class ValidationDice(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.history: list[float] = []

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            scores = []
            for i in range(len(dataset)):
                x, y = dataset[i]
                probabilities = np.asarray(net.predict_on_batch(x))
                scores += [dice_score(t, p) for t, p in zip(y, probabilities, strict=True)]
            value = float(np.mean(scores))
            self.history.append(value)
            if logs is not None:
                # the progress bar runs after this callback: it prints val_dice
                logs["val_dice"] = value

    return ValidationDice()


def run_demo(
    out: str | os.PathLike = DEFAULTS["out"],
    *,
    epochs: int = DEFAULTS["epochs"],
    cases: int = DEFAULTS["cases"],
    size: int = DEFAULTS["size"],
    seed: int = DEFAULTS["seed"],
    batch_size: int = DEFAULTS["batch_size"],
    filters: int = DEFAULTS["filters"],
    learning_rate: float = DEFAULTS["learning_rate"],
    overwrite: bool = False,
    verbose: int | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run the demo: write phantoms, train, save, export, predict, score, plot.

    Args:
        out: the demo folder. It must not exist, or be empty, unless
            ``overwrite`` (then only the demo's own outputs in it are replaced).
        epochs: training epochs.
        cases: phantoms for training and validation (a fifth of them, at
            least 1, validate); one more held-out phantom is predicted at the end.
        size: phantom size in voxels along each axis (a multiple of 4, >= 16).
        seed: seed of the data, the shuffling, the augmentation and the weights.
        batch_size: volumes per training step.
        filters: channels of the U-Net's first level.
        learning_rate: Adam's learning rate.
        overwrite: allow a non-empty ``out`` folder.
        verbose: Keras's ``fit`` verbosity (1: progress bar, 2: one line per
            epoch); default 1 on a terminal, 2 otherwise.
        log: where the demo's messages go.

    Returns:
        A dict with the results: ``dice`` (held-out), ``dice_empty``,
        ``dice_full``, ``val_dice`` (per epoch), ``files`` (name -> path),
        ``seconds`` and ``exported`` (whether the SavedModel export worked).

    Raises:
        DemoError: ``out`` is not empty and ``overwrite`` is false.
        ValueError: a bad argument.
    """
    start = time.perf_counter()
    epochs = _check_int("epochs", epochs, 1)
    cases = _check_int("cases", cases, 2)
    size = _check_int("size", size, 16)
    if size % 4:
        raise ValueError(f"size must be a multiple of 4 (the U-Net halves it twice), got {size}")
    seed = _check_int("seed", seed, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    filters = _check_int("filters", filters, 1)
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    out = Path(out)
    _prepare_folder(out, overwrite)

    import keras

    from keras_nii.data import NiftiDataset
    from keras_nii.inference import predict_nifti
    from keras_nii.io import load_nifti
    from keras_nii.layers import ZScoreNormalization
    from keras_nii.models import DiceLoss, dice_score, unet3d
    from keras_nii.phantoms import make_dataset
    from keras_nii.training import AugmentedModel

    backend = keras.backend.backend()
    shape = (size, size, size)
    log(f"keras-nii demo: Keras {keras.__version__}, {backend} backend; folder {out.resolve()}")
    if backend == "jax":
        import jax

        if jax.default_backend() == "cpu":
            log(
                "note: on CPU, XLA (JAX) runs 3D convolutions several times slower than "
                "TensorFlow's oneDNN kernels: expect this demo to take a few times longer "
                "than under KERAS_BACKEND=tensorflow"
            )

    # 1. data: train/validation phantoms in mixed orientations and voxel sizes,
    # and one held-out case stored LPS with anisotropic voxels
    pairs = make_dataset(out / "data", cases, shape=shape, seed=seed)
    heldout_image, heldout_label = make_dataset(
        out / "heldout",
        1,
        shape=shape,
        seed=seed + 1,
        orientations=("LPS",),
        spacings=((1.2, 1.0, 0.9),),
    )[0]
    n_val = max(1, cases // 5)
    train, val = pairs[:-n_val], pairs[-n_val:]
    log(
        f"wrote {cases} phantoms of {size}^3 voxels (RAS / LPS / oblique, 1 mm and "
        f"1.2 x 1.0 x 0.9 mm) in {out / 'data'}: {len(train)} to train, {len(val)} to validate; "
        f"1 held-out LPS case in {out / 'heldout'}"
    )

    # 2. feed: RAS+ arrays, cropped/padded to one shape, cached after the first epoch
    keras.utils.set_random_seed(seed)
    train_ds = NiftiDataset(
        [str(p) for p, _ in train],
        [str(q) for _, q in train],
        batch_size=batch_size,
        shape=shape,
        shuffle=True,
        seed=seed,
        cache="memory",
    )
    val_ds = NiftiDataset(
        [str(p) for p, _ in val],
        [str(q) for _, q in val],
        batch_size=batch_size,
        shape=shape,
        cache="memory",
    )

    # 3. model: normalization inside, augmentation in the training step only
    net = unet3d(
        (None, None, None, 1),
        num_classes=1,
        filters=filters,
        levels=2,
        normalization=ZScoreNormalization(nonzero=True, name="zscore"),
    )
    model = AugmentedModel(net, _augmentation(seed))
    # jit_compile="auto": XLA where there is a GPU; on CPU, TensorFlow's XLA
    # Conv3D is several times slower than its oneDNN kernels
    # the learning rate decays to 0 along a cosine: the last epochs settle
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate, decay_steps=epochs * len(train_ds), alpha=0.05
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=DiceLoss(bce_weight=1.0),
        jit_compile="auto",
    )
    log(
        f"training a 3D U-Net ({net.count_params():,} parameters) for {epochs} epoch(s), "
        f"batch size {batch_size}, with flips, rotations/zooms, gamma and bias field "
        "augmentation on the fly; val_dice: mean Dice on the validation cases"
    )
    callback = _validation_callback(net, val_ds)
    fit_start = time.perf_counter()
    # Keras prints nothing until the first step has been traced and compiled
    log("compiling the training step (epoch 1 includes it and is the slowest)...")
    model.fit(train_ds, epochs=epochs, callbacks=[callback], verbose=verbose)
    fit_seconds = time.perf_counter() - fit_start

    # 4. save and export (the wrapped network: no augmentation in them)
    files: dict[str, Path] = {
        "training images": out / "data" / "images",
        "training labels": out / "data" / "labels",
        "held-out scan": Path(heldout_image),
        "held-out label": Path(heldout_label),
    }
    model_path = out / "model.keras"
    net.save(model_path)
    files["Keras model"] = model_path
    exported = False
    export_path = out / "exported"
    try:
        _export(net, export_path, factor=4)
    except Exception as err:  # export needs TensorFlow (and jax2tf under JAX)
        log(
            f"note: SavedModel export skipped under the {backend} backend ({type(err).__name__}: {err})"
        )
        shutil.rmtree(export_path, ignore_errors=True)
    else:
        exported = True
        files["exported SavedModel"] = export_path

    # 5. predict the held-out scan, written in its own space
    prediction_path = out / "prediction.nii.gz"
    predict_nifti(net, heldout_image, prediction_path)
    files["prediction"] = prediction_path
    truth = load_nifti(heldout_label, canonical=False, dtype="uint8").array
    predicted = load_nifti(prediction_path, canonical=False, dtype="uint8").array
    dice = dice_score(truth, predicted)
    fraction = float(np.count_nonzero(truth)) / truth.size
    dice_empty = dice_score(truth, np.zeros_like(truth))
    dice_full = dice_score(truth, np.ones_like(truth))

    # 6. picture
    slices_path = out / "slices.png"
    try:
        from keras_nii.plot import show_slices

        image = load_nifti(heldout_image)
        reference = load_nifti(heldout_label, dtype="uint8")
        prediction = load_nifti(prediction_path, dtype="uint8")
        # the slices go through the lesion voxel closest to the lesions' centroid
        lesion = np.argwhere(reference.array[..., 0] > 0)
        index = None
        if len(lesion):
            nearest = np.argmin(((lesion - lesion.mean(axis=0)) ** 2).sum(axis=1))
            index = tuple(int(v) for v in lesion[nearest])
        show_slices(
            image,
            reference,
            prediction,
            index=index,
            title=f"held-out phantom (green: reference, red: prediction), Dice {dice:.3f}",
            path=slices_path,
        )
    except ImportError:
        log("note: matplotlib is not installed, slices.png skipped (pip install keras-nii[plot])")
    else:
        files["slices"] = slices_path

    seconds = time.perf_counter() - start
    log("")
    log(f"held-out Dice: {dice:.3f}   (lesions are {100 * fraction:.2f}% of the voxels)")
    log(
        f"  for reference: an empty prediction scores {dice_empty:.3f}, all-foreground {dice_full:.3f}"
    )
    log(
        f"  best validation Dice {max(callback.history):.3f} (epoch {int(np.argmax(callback.history)) + 1})"
    )
    log("files:")
    width = max(len(name) for name in files)
    for name, path in files.items():
        log(f"  {name:<{width}}  {path}")
    log(f"training took {fit_seconds:.0f} s, the whole demo {seconds:.0f} s")
    if exported:
        log(f"next: keras-nii predict {export_path} YOUR_SCAN.nii.gz OUT.nii.gz")
    else:
        log(f"next: keras-nii predict {model_path} YOUR_SCAN.nii.gz OUT.nii.gz")
    return {
        "dice": dice,
        "dice_empty": dice_empty,
        "dice_full": dice_full,
        "val_dice": list(callback.history),
        "files": files,
        "seconds": seconds,
        "fit_seconds": fit_seconds,
        "exported": exported,
    }
