"""Segmentation metrics for ``model.compile(metrics=...)``: :class:`DiceScore`."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

__all__ = ["DiceScore"]


@keras.saving.register_keras_serializable(package="keras_nii")
class DiceScore(keras.metrics.Metric):
    """The Dice score of each class, accumulated over the batches of an epoch.

    The prediction of a voxel is its class of highest probability (the argmax
    over ``num_classes`` channels), or, for one sigmoid channel and
    ``num_classes=2``, class 1 where it exceeds ``threshold``. For each class
    ``c`` the metric sums, over every voxel of every batch since the last
    reset, the true positives ``tp``, and the voxels of ``c`` in the labels
    and in the prediction; ``dice_c = 2 tp / (|labels == c| + |prediction ==
    c|)``, which is ``2 tp / (2 tp + fp + fn)``: the Dice of the epoch's
    voxels pooled, as nnU-Net's "pseudo Dice" (not the mean of per-batch
    Dices). A class absent from both labels and prediction has no Dice (NaN)
    and is left out of the mean.

    With ``per_class=True`` the result is a dict, which ``fit`` logs as
    separate entries: ``{name}_1``, ``{name}_2``, ... (``{name}_0`` too without
    ``ignore_background``) and ``{name}_mean``; ``validation_data`` adds the
    ``val_`` prefix. With ``per_class=False`` it is the mean alone, logged as
    ``{name}``.

    Args:
        num_classes: the number of classes ``K`` (labels ``0 .. K-1``).
        ignore_background: leave class 0 out (of the entries and the mean).
        per_class: log every class, or only the mean.
        threshold: for a single-channel (sigmoid) prediction, with ``K = 2``.
        name: the prefix of the logged entries.
        dtype: the dtype of the accumulators.

    Inputs: ``y_true`` an integer label map ``(batch, x, y, z, 1)`` or
    ``(batch, x, y, z)``; ``y_pred`` ``(batch, x, y, z, K)`` probabilities or
    logits (or ``(batch, x, y, z, 1)`` with ``K = 2``). ``sample_weight``, if
    given, weighs voxels (it broadcasts against ``(batch, x, y, z)``: one
    weight per sample is ``(batch, 1, 1, 1)``).

    Example:

    ```python
    model.compile(optimizer="adam", loss=DiceLoss(),
                  metrics=[keras_nii.metrics.DiceScore(num_classes=3)])
    history = model.fit(ds, epochs=10)
    history.history["dice_1"], history.history["dice_mean"]
    ```
    """

    def __init__(
        self,
        num_classes: int,
        ignore_background: bool = True,
        per_class: bool = True,
        threshold: float = 0.5,
        name: str = "dice",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, dtype=dtype or "float32")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_background = bool(ignore_background)
        self.per_class = bool(per_class)
        self.threshold = float(threshold)
        shape = (num_classes,)
        self.true_positives = self.add_variable(shape, "zeros", name="true_positives")
        self.label_voxels = self.add_variable(shape, "zeros", name="label_voxels")
        self.predicted_voxels = self.add_variable(shape, "zeros", name="predicted_voxels")

    @property
    def classes(self) -> list[int]:
        """The classes reported (from 1 with ``ignore_background``)."""
        return list(range(1 if self.ignore_background else 0, self.num_classes))

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        y_pred = ops.convert_to_tensor(y_pred)
        channels = y_pred.shape[-1]
        if channels == self.num_classes:
            predicted = ops.argmax(y_pred, axis=-1)
        elif channels == 1 and self.num_classes == 2:
            predicted = ops.squeeze(y_pred, axis=-1) > self.threshold
        else:
            raise ValueError(
                f"DiceScore(num_classes={self.num_classes}) needs predictions with "
                f"{self.num_classes} channels (or 1 for num_classes=2), got shape {y_pred.shape}"
            )
        predicted = ops.cast(predicted, "int32")
        labels = ops.cast(ops.convert_to_tensor(y_true), "int32")
        if len(labels.shape) == len(y_pred.shape):
            labels = ops.squeeze(labels, axis=-1)
        weight = None
        if sample_weight is not None:
            weight = ops.broadcast_to(ops.cast(sample_weight, self.dtype), ops.shape(labels))
        tp, in_labels, in_prediction = [], [], []
        for c in range(self.num_classes):
            is_label = ops.cast(ops.equal(labels, c), self.dtype)
            is_predicted = ops.cast(ops.equal(predicted, c), self.dtype)
            if weight is not None:
                is_label, is_predicted = is_label * weight, is_predicted * weight
            tp.append(ops.sum(is_label * ops.cast(ops.equal(predicted, c), self.dtype)))
            in_labels.append(ops.sum(is_label))
            in_prediction.append(ops.sum(is_predicted))
        self.true_positives.assign_add(ops.stack(tp))
        self.label_voxels.assign_add(ops.stack(in_labels))
        self.predicted_voxels.assign_add(ops.stack(in_prediction))

    def scores(self) -> Any:
        """The Dice of every class ``(num_classes,)``, NaN where it has none."""
        denominator = self.label_voxels + self.predicted_voxels
        nan = ops.full_like(denominator, float("nan"))
        return ops.where(
            denominator > 0, 2.0 * self.true_positives / ops.maximum(denominator, 1.0), nan
        )

    def result(self) -> Any:
        dice = self.scores()
        reported = ops.take(dice, self.classes)
        defined = ops.logical_not(ops.isnan(reported))
        count = ops.sum(ops.cast(defined, self.dtype))
        total = ops.sum(ops.where(defined, reported, ops.zeros_like(reported)))
        mean = ops.where(count > 0, total / ops.maximum(count, 1.0), float("nan"))
        if not self.per_class:
            return mean
        out = {f"{self.name}_{c}": dice[c] for c in self.classes}
        out[f"{self.name}_mean"] = mean
        return out

    def reset_state(self) -> None:
        for variable in (self.true_positives, self.label_voxels, self.predicted_voxels):
            variable.assign(ops.zeros(variable.shape, variable.dtype))

    def get_config(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "ignore_background": self.ignore_background,
            "per_class": self.per_class,
            "threshold": self.threshold,
            "name": self.name,
            "dtype": self.dtype,
        }
