"""The end-to-end demo behind ``keras-nii demo``: a Decathlon-like CT task, end to end.

:func:`run_demo` runs, on synthetic data, the pipeline the README teaches for
real datasets (scans of different sizes, anisotropic voxels, mixed
orientations, a lesion class of under 0.1 % of the voxels), in a few minutes
on a laptop CPU:

1. writes CT-like abdominal scans with :func:`keras_nii.phantoms.make_ct_dataset`
   (every scan its own shape, 0.6-0.9 mm in-plane and 1.5-5 mm slices, RAS /
   LPS / oblique, int16 Hounsfield units with slope / intercept; labels 0
   background, 1 organ, 2 lesion): training, validation and held-out subjects;
2. measures the training scans with :func:`keras_nii.fingerprint`: target
   spacing, CT normalization (clip to the foreground's percentiles, z-score);
3. feeds patches with :class:`keras_nii.NiftiDataset` (``spacing=``,
   ``patch_size=``, ``patches_per_volume=``, class-balanced
   ``label_probabilities=``, a directory ``cache=`` of memory-mappable
   arrays), at the plan's spacing times ``coarsen`` (a coarser grid, so that
   the demo fits a CPU budget; ``coarsen=1`` trains at the plan's spacing);
4. trains a 3-class 3D U-Net whose first layers are the plan's normalization
   (the saved model takes raw HU), wrapped in :class:`keras_nii.AugmentedModel`:
   flips, rotations / zooms in millimetres, intensity shift and scale, on
   image and mask together inside the training step; the patch Dice per class
   (:class:`keras_nii.metrics.DiceScore`) and, every few epochs, the
   whole-scan validation Dice
   (:class:`keras_nii.callbacks.SlidingWindowValidation`) are printed, one
   line per epoch;
5. exports the network (``net.export``: a SavedModel) and predicts the
   held-out scans with it through :func:`keras_nii.predict_nifti`
   (``spacing=``, ``tta="flips"``), written on each scan's own grid, and
   scores them per class against their label maps, next to what an empty and
   an all-foreground prediction would score.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# the defaults live in a module of their own, so that `keras-nii --help` does not import this one
from keras_nii._defaults import DEMO as DEFAULTS
from keras_nii._defaults import DEMO_QUICK as QUICK

__all__ = ["run_demo", "DEFAULTS", "QUICK", "DemoError", "CLASSES"]

#: The demo's classes (label value -> name).
CLASSES = {1: "organ", 2: "lesion"}

# what the demo writes in its folder; --overwrite replaces these and nothing else
_OUTPUTS = ("data", "validation", "heldout", "cache", "model.keras", "exported", "predictions")


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


def _progress(epochs: int, log: Callable[[str], Any]) -> Any:
    """A callback that logs one short line per epoch."""
    import keras

    class Progress(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            parts = [f"epoch {epoch + 1:>2}/{epochs}", f"loss {logs.get('loss', np.nan):.3f}"]
            patch = ", ".join(
                f"{n} {logs.get(f'dice_{c}', np.nan):.2f}" for c, n in CLASSES.items()
            )
            parts.append(f"patch Dice {patch}")
            if "val_dice_1" in logs:
                whole = ", ".join(
                    f"{n} {logs.get(f'val_dice_{c}', np.nan):.2f}" for c, n in CLASSES.items()
                )
                parts.append(f"whole-scan validation Dice {whole}")
            parts.append(f"{time.perf_counter() - self.start:.0f} s")
            log("  " + " | ".join(parts))

    return Progress()


def _dice_references(truth: np.ndarray, predicted: np.ndarray, classes: list[int]) -> dict:
    """Per class: the Dice of ``predicted``, of an empty and of an all-``c`` prediction."""
    result = {}
    for c in classes:
        t = truth == c
        p = predicted == c
        count = int(np.count_nonzero(t))
        both = count + int(np.count_nonzero(p))
        result[c] = {
            "dice": 2.0 * np.count_nonzero(t & p) / both if both else 1.0,
            "empty": 0.0 if count else 1.0,
            "full": 2.0 * count / (count + t.size),
            "fraction": count / t.size,
        }
    return result


def run_demo(
    out: str | os.PathLike = DEFAULTS["out"],
    *,
    quick: bool = False,
    epochs: int | None = None,
    cases: int | None = None,
    seed: int = DEFAULTS["seed"],
    overwrite: bool = False,
    json_path: str | os.PathLike | None = None,
    log: Callable[[str], Any] = print,
    **settings: Any,
) -> dict[str, Any]:
    """Run the demo: write CT-like scans, plan, train on patches, export, predict, score.

    Args:
        out: the demo folder. It must not exist, or be empty, unless
            ``overwrite`` (then only the demo's own outputs in it are replaced).
        quick: the sub-minute version (:data:`QUICK`: fewer, smaller scans,
            fewer epochs; for a first look, not for its Dice).
        epochs: training epochs (default: the setting's).
        cases: training subjects (default: the setting's).
        seed: seed of the data, the sampling, the augmentation and the weights.
        overwrite: allow a non-empty ``out`` folder.
        json_path: also write the figures there, as JSON (``heldout_dice``: a
            mapping from class label, ``"1"``, ``"2"``, to the held-out Dice).
        log: where the demo's messages go.
        **settings: any other entry of :data:`DEFAULTS` (e.g. ``coarsen``,
            ``patch_size``, ``filters``, ``learning_rate``).

    Returns:
        The figures: ``heldout_dice`` (class -> mean Dice over the held-out
        scans), ``heldout`` (per scan and class: Dice, empty and all-foreground
        references), ``history`` (per epoch), ``plan_spacing``,
        ``train_spacing``, ``seconds``, ``files``.

    Raises:
        DemoError: ``out`` is not empty and ``overwrite`` is false.
        ValueError: a bad argument.
    """
    start = time.perf_counter()
    config = dict(QUICK if quick else DEFAULTS)
    unknown = sorted(set(settings) - set(config))
    if unknown:
        raise ValueError(f"unknown demo setting(s): {', '.join(unknown)}")
    config.update(settings)
    if epochs is not None:
        config["epochs"] = epochs
    if cases is not None:
        config["cases"] = cases
    epochs = _check_int("epochs", config["epochs"], 1)
    cases = _check_int("cases", config["cases"], 2)
    seed = _check_int("seed", seed, 0)
    n_val = _check_int("validation", config["validation"], 1)
    n_heldout = _check_int("heldout", config["heldout"], 1)
    coarsen = float(config["coarsen"])
    if not coarsen >= 1:
        raise ValueError(f"coarsen must be a number >= 1, got {coarsen!r}")
    patch_size = tuple(_check_int("patch_size", p, 8) for p in config["patch_size"])
    levels = _check_int("levels", config["levels"], 1)
    if any(p % 2**levels for p in patch_size):
        raise ValueError(f"patch_size must be multiples of {2**levels}, got {patch_size}")
    if json_path is not None and not Path(json_path).parent.is_dir():
        raise ValueError(f"json_path {json_path}: its folder does not exist")
    out = Path(out)
    _prepare_folder(out, overwrite)

    import keras

    from keras_nii.callbacks import SlidingWindowValidation
    from keras_nii.data import NiftiDataset
    from keras_nii.inference import predict_nifti
    from keras_nii.io import load_nifti
    from keras_nii.layers import RandomIntensityScale, RandomIntensityShift
    from keras_nii.metrics import DiceScore
    from keras_nii.models import DiceLoss, unet3d
    from keras_nii.phantoms import make_ct_dataset
    from keras_nii.plan import fingerprint
    from keras_nii.training import AugmentedModel

    backend = keras.backend.backend()
    log(f"keras-nii demo: Keras {keras.__version__}, {backend} backend; folder {out.resolve()}")

    # 1. data: every scan its own shape, spacing and orientation
    shapes = dict(in_plane=tuple(config["in_plane"]), slices=tuple(config["slices"]))
    train = make_ct_dataset(out / "data", cases, seed=seed, **shapes)
    val = make_ct_dataset(out / "validation", n_val, seed=seed + 100_000, **shapes)
    heldout = make_ct_dataset(out / "heldout", n_heldout, seed=seed + 200_000, **shapes)
    log(
        f"wrote {cases} training, {n_val} validation and {n_heldout} held-out CT-like scans "
        f"(in-plane {shapes['in_plane'][0]}-{shapes['in_plane'][1]}, "
        f"{shapes['slices'][0]}-{shapes['slices'][1]} slices, 0.6-0.9 mm x 1.5-5 mm, "
        "RAS / LPS / oblique, int16 HU; labels 1 organ, 2 lesion) "
        f"[{time.perf_counter() - start:.0f} s]"
    )

    # 2. plan: fingerprint of the training scans
    plan = fingerprint([str(p) for p, _ in train], [str(q) for _, q in train])
    spacing = [round(float(s) * coarsen, 4) for s in plan.target_spacing]
    norm = plan.normalization
    lesion_fraction = plan.dataset["labels"].get("2", {}).get("fraction", 0.0)
    log(
        f"plan: target spacing {' x '.join(f'{s:.2f}' for s in plan.target_spacing)} mm; "
        + (
            f"training at {coarsen:g}x that, {' x '.join(f'{s:.2f}' for s in spacing)} mm "
            "(coarser, to fit a CPU budget); "
            if coarsen != 1
            else "training at it; "
        )
        + f"CT normalization: clip to [{norm['clip'][0]:.0f}, {norm['clip'][1]:.0f}] HU, "
        f"z-score; lesions {100 * lesion_fraction:.3f} % of the voxels "
        f"[{time.perf_counter() - start:.0f} s]"
    )

    # 3. feed: class-balanced patches, resampled once and cached on disk
    keras.utils.set_random_seed(seed)
    probabilities = {int(k): float(v) for k, v in config["label_probabilities"].items()}
    train_ds = NiftiDataset(
        [str(p) for p, _ in train],
        [str(q) for _, q in train],
        spacing=spacing,
        patch_size=patch_size,
        patches_per_volume=config["patches_per_volume"],
        label_probabilities=probabilities,
        batch_size=config["batch_size"],
        shuffle=True,
        seed=seed,
        cache=out / "cache",
    )

    # 4. model: the plan's normalization inside, augmentation in the training step
    normalization = keras.Sequential(plan.normalization_layers(), name="normalization")
    net = unet3d(
        (None, None, None, 1),
        num_classes=len(CLASSES) + 1,
        filters=config["filters"],
        levels=levels,
        normalization=normalization,
    )
    train_plan = dataclasses.replace(plan, target_spacing=spacing)
    augmentation = keras.layers.Pipeline(
        [
            *train_plan.augmentation_layers(seed=seed + 1),
            RandomIntensityShift(offset=20.0, probability=0.5, seed=seed + 3),
            RandomIntensityScale(factor=0.1, probability=0.5, seed=seed + 4),
        ],
        name="augmentation",
    )
    model = AugmentedModel(net, augmentation)
    schedule = keras.optimizers.schedules.CosineDecay(
        config["learning_rate"], decay_steps=epochs * len(train_ds), alpha=0.05
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=DiceLoss(bce_weight=1.0),
        metrics=[DiceScore(num_classes=len(CLASSES) + 1)],
        jit_compile="auto",
    )
    every = max(1, int(config["validate_every"]))
    validation = SlidingWindowValidation(
        [str(p) for p, _ in val],
        [str(q) for _, q in val],
        patch_size=config["window"],
        every=every,
        spacing=spacing,
        num_classes=len(CLASSES) + 1,
        batch_size=1,
    )
    log(
        f"training a 3D U-Net ({net.count_params():,} parameters) for {epochs} epochs of "
        f"{len(train_ds)} steps: {cases} scans x {config['patches_per_volume']} patches of "
        f"{' x '.join(map(str, patch_size))} voxels, batch {config['batch_size']}, "
        f"classes drawn {probabilities}; flips, rotations / zooms in mm, intensity shift / "
        f"scale; whole-scan validation Dice every {every} epochs "
        "(epoch 1 includes compiling the training step)"
    )
    fit_start = time.perf_counter()
    history = model.fit(
        train_ds, epochs=epochs, callbacks=[validation, _progress(epochs, log)], verbose=0
    )
    fit_seconds = time.perf_counter() - fit_start

    # 5. save, export, predict the held-out scans on their own grids with the export
    files: dict[str, Path] = {
        "training scans": out / "data",
        "validation scans": out / "validation",
        "held-out scans": out / "heldout",
        "patch cache": out / "cache",
    }
    model_path = out / "model.keras"
    net.save(model_path)
    files["Keras model"] = model_path
    export_path = out / "exported"
    predictor: Any = net
    try:
        _export(net, export_path, factor=2**levels)
    except Exception as err:  # export needs TensorFlow (and jax2tf under JAX)
        log(f"note: SavedModel export skipped under {backend} ({type(err).__name__}: {err})")
        shutil.rmtree(export_path, ignore_errors=True)
    else:
        files["exported SavedModel"] = export_path
        predictor = str(export_path)
    predictions = out / "predictions"
    predictions.mkdir()
    files["held-out predictions"] = predictions
    predict_start = time.perf_counter()
    per_scan = []
    for image_path, label_path in heldout:
        target = predictions / Path(image_path).name
        predict_nifti(
            predictor,
            image_path,
            target,
            patch_size=config["window"],
            spacing=spacing,
            tta="flips",
            batch_size=1,
        )
        truth = load_nifti(label_path, canonical=False, dtype="int32").array[..., 0]
        predicted = load_nifti(target, canonical=False, dtype="int32").array[..., 0]
        per_scan.append(_dice_references(truth, predicted, list(CLASSES)))
    predict_seconds = time.perf_counter() - predict_start

    heldout_dice = {str(c): float(np.mean([s[c]["dice"] for s in per_scan])) for c in CLASSES}
    seconds = time.perf_counter() - start
    log("")
    log(
        f"held-out Dice over {len(per_scan)} scans (predicted with the SavedModel on their own "
        f"grids, via {' x '.join(f'{s:.2f}' for s in spacing)} mm, 8-flip TTA):"
    )
    for c, name in CLASSES.items():
        empty = np.mean([s[c]["empty"] for s in per_scan])
        full = np.mean([s[c]["full"] for s in per_scan])
        fraction = np.mean([s[c]["fraction"] for s in per_scan])
        log(
            f"  {c} {name:<6}  {heldout_dice[str(c)]:.3f}   (empty prediction {empty:.3f}, "
            f"all-{name} {full:.4f}; {100 * fraction:.3f} % of the voxels)"
        )
    log("files:")
    width = max(len(name) for name in files)
    for name, path in files.items():
        log(f"  {name:<{width}}  {path}")
    log(
        f"training took {fit_seconds:.0f} s, the held-out predictions {predict_seconds:.0f} s, "
        f"the whole demo {seconds:.0f} s"
    )
    log(f"next: keras-nii predict {predictor} YOUR_SCAN.nii.gz OUT.nii.gz")
    result = {
        "heldout_dice": heldout_dice,
        "heldout": [
            {str(c): {k: float(v) for k, v in s[c].items()} for c in CLASSES} for s in per_scan
        ],
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "plan_spacing": [float(s) for s in plan.target_spacing],
        "train_spacing": spacing,
        "coarsen": coarsen,
        "epochs": epochs,
        "cases": cases,
        "seed": seed,
        "quick": bool(quick),
        "backend": backend,
        "seconds": seconds,
        "fit_seconds": fit_seconds,
        "predict_seconds": predict_seconds,
        "files": {k: str(v) for k, v in files.items()},
    }
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
