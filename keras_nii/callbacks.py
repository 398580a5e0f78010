"""Keras callbacks for training on NIfTI scans: :class:`SlidingWindowValidation`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_nii.io import load_nifti

__all__ = ["SlidingWindowValidation", "dice_per_class"]

PathLike = str | os.PathLike


def dice_per_class(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """The Dice of every class ``0 .. num_classes - 1`` of one scan, NaN for a
    class in neither ``labels`` nor ``predicted`` (integer arrays of one shape)."""
    labels = np.asarray(labels).reshape(-1)
    predicted = np.asarray(predicted).reshape(-1)
    if labels.shape != predicted.shape:
        raise ValueError(f"labels and prediction differ in size: {labels.size}, {predicted.size}")
    k = num_classes
    inside = (labels >= 0) & (labels < k)
    pair = labels[inside].astype(np.int64) * k + predicted[inside]
    confusion = np.bincount(pair, minlength=k * k).reshape(k, k)
    tp = np.diag(confusion).astype(np.float64)
    denominator = confusion.sum(0) + confusion.sum(1)
    denominator = denominator + np.bincount(predicted[~inside], minlength=k)[:k]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2.0 * tp / denominator, np.nan)


class SlidingWindowValidation(keras.callbacks.Callback):
    """Whole-scan validation during ``fit``: per-class Dice in the history.

    At the end of every ``every``-th epoch, each validation scan is predicted
    whole, in sliding windows, exactly as :func:`keras_nii.predict_nifti`
    predicts it (:func:`keras_nii.inference.predict_scan`: on the scan's own
    grid, resampled to ``spacing`` for the model and back when given), its
    argmax compared with the label map, and the Dice of every class computed
    per scan. As nnU-Net reports validation, a class's Dice is the mean over
    the scans of the per-scan Dices (a scan where the class is neither in the
    labels nor predicted is left out), and the mean over the classes is
    logged too: ``{prefix}_1``, ``{prefix}_2``, ... and ``{prefix}_mean``
    (``prefix="val_dice"``: ``val_dice_1``, ``val_dice_mean``). They go into
    the epoch's logs, so ``fit``'s history holds them and callbacks after
    this one in the list see them: ``ModelCheckpoint(monitor="val_dice_mean",
    mode="max")`` keeps the best model.

    The model predicted is ``self.model``: with
    :class:`~keras_nii.training.AugmentedModel`, its inner network (no
    augmentation at inference). Windows are averaged in place (see
    :func:`keras_nii.inference.predict_volume`): the memory needed is about
    twice the float32 probability map of the largest scan.

    Args:
        images: validation scans: one path per subject, or a list of paths
            per subject (modalities, in the model's channel order).
        labels: their label maps (integer labels ``0 .. K-1``).
        patch_size: the sliding-window size ``(x, y, z)``.
        every: validate at the end of every ``every``-th epoch (1: each).
        num_classes: ``K``; default the model's output channels (2 for one
            sigmoid channel).
        ignore_background: leave class 0 out of the entries and the mean.
        overlap, batch_size, blend, canonical, spacing, tta, threshold:
            as in :func:`keras_nii.predict_nifti`.
        prefix: the name of the logged entries.
        verbose: 1 prints one line per validation.

    Example:

    ```python
    validate = SlidingWindowValidation(val_images, val_labels, patch_size=(96, 96, 96))
    best = keras.callbacks.ModelCheckpoint("best.keras", monitor="val_dice_mean",
                                           mode="max", save_best_only=True)
    model.fit(patches, epochs=50, callbacks=[validate, best])
    ```
    """

    def __init__(
        self,
        images: Sequence[PathLike] | Sequence[Sequence[PathLike]],
        labels: Sequence[PathLike],
        patch_size: Sequence[int],
        every: int = 1,
        *,
        num_classes: int | None = None,
        ignore_background: bool = True,
        overlap: float = 0.5,
        batch_size: int = 2,
        blend: str = "gaussian",
        canonical: bool = True,
        spacing: Sequence[float | None] | float | None = None,
        tta: Any = None,
        threshold: float = 0.5,
        prefix: str = "val_dice",
        verbose: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
            raise ValueError(f"images must be a list of paths, got {images!r}")
        if isinstance(labels, (str, os.PathLike)) or not isinstance(labels, Sequence):
            raise ValueError(f"labels must be a list of paths, got {labels!r}")
        if not images or len(images) != len(labels):
            raise ValueError(
                f"images and labels must be non-empty and of one length, got {len(images)} "
                f"and {len(labels)}"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ValueError(f"num_classes must be None or an integer >= 2, got {num_classes!r}")
        self.images = [
            os.fspath(p) if isinstance(p, (str, os.PathLike)) else [os.fspath(q) for q in p]
            for p in images
        ]
        self.labels = [os.fspath(p) for p in labels]
        missing = [p for p in [*self.labels, *_flat(self.images)] if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"{len(missing)} validation file(s) not found: {missing[:5]}")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive integers, got {patch_size!r}")
        self.every = every
        self.num_classes = num_classes
        self.ignore_background = bool(ignore_background)
        self.options = dict(
            overlap=overlap,
            batch_size=batch_size,
            blend=blend,
            canonical=canonical,
            spacing=spacing,
            tta=tta,
        )
        self.threshold = float(threshold)
        self.prefix = prefix
        self.verbose = verbose
        #: the per-scan Dice ``(scans, K)`` of the last validation
        self.last_scores: np.ndarray | None = None

    def evaluate(self, model: Any | None = None) -> dict[str, float]:
        """Predict every validation scan; the entries this callback logs."""
        from keras_nii.inference import _to_labels, predict_scan

        model = self.model if model is None else model
        scores = []
        for image, label in zip(self.images, self.labels, strict=True):
            _, prediction, _ = predict_scan(
                model, image, patch_size=self.patch_size, **self.options
            )
            k = self.num_classes or max(2, prediction.shape[-1])
            predicted = _to_labels(prediction, self.threshold)
            del prediction
            truth = load_nifti(label, canonical=self.options["canonical"], dtype="int32").array
            if truth.shape[:3] != predicted.shape:
                raise ValueError(
                    f"label map {label} has shape {truth.shape[:3]}, its scan {image} "
                    f"{predicted.shape}"
                )
            scores.append(dice_per_class(truth, predicted, k))
        self.last_scores = np.stack(scores)
        first = 1 if self.ignore_background else 0
        per_class = {}
        for c in range(first, self.last_scores.shape[1]):
            column = self.last_scores[:, c]
            column = column[~np.isnan(column)]
            per_class[c] = float(column.mean()) if len(column) else float("nan")
        values = [v for v in per_class.values() if not np.isnan(v)]
        logs = {f"{self.prefix}_{c}": v for c, v in per_class.items()}
        logs[f"{self.prefix}_mean"] = float(np.mean(values)) if values else float("nan")
        return logs

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if (epoch + 1) % self.every:
            return
        entries = self.evaluate()
        if logs is not None:
            logs.update(entries)
        if self.verbose:
            text = ", ".join(f"{k} {v:.4f}" for k, v in entries.items())
            print(f"epoch {epoch + 1}: whole-scan validation: {text}")


def _flat(images: list) -> list[str]:
    return [p for entry in images for p in ([entry] if isinstance(entry, str) else entry)]
