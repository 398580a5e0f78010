"""A small 3D U-Net and the Dice score, for demos, tutorials and baselines.

:func:`unet3d` builds a compact 3D U-Net (Ronneberger et al. 2015, Cicek et
al. 2016) as a functional ``keras.Model``; an optional preprocessing layer
(for example ``ZScoreNormalization(nonzero=True)``) goes first, inside the
model, so that a saved or exported model takes raw scans.
:func:`dice_score` is the NumPy Dice coefficient of two masks, and
:class:`DiceLoss` a soft Dice loss (optionally plus cross-entropy) for
training on small structures such as lesions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

__all__ = ["unet3d", "dice_score", "DiceLoss", "SizeDivisor", "PadToMultiple", "CropToInput"]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_divisor(divisor: Any) -> tuple[int, int, int]:
    values = [divisor] * 3 if isinstance(divisor, (int, np.integer)) else list(divisor)
    if len(values) != 3:
        raise ValueError(f"divisor must be an int or 3 ints, got {divisor!r}")
    return tuple(_check_int("divisor", v, 1) for v in values)


def _spatial_axes(data_format: str) -> tuple[int, int, int]:
    return (1, 2, 3) if data_format == "channels_last" else (2, 3, 4)


def _check_data_format(data_format: str) -> str:
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError(
            f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}"
        )
    return data_format


@keras.saving.register_keras_serializable(package="keras_nii")
class SizeDivisor(keras.layers.Layer):
    """Passes its input through; records that spatial sizes must be multiples of ``divisor``.

    :func:`unet3d` puts one after its input, so that the model can say what
    input sizes it takes, also once saved (``.keras``) or exported
    (SavedModel): the divisor is the layer's config and a non-trainable
    ``int32`` weight named ``size_divisor``, which an exported model keeps
    among its variables. :func:`keras_nii.inference.size_divisor` reads it,
    and :func:`keras_nii.predict_nifti` pads a scan to it and crops the
    prediction back.

    When the spatial sizes are known as the layer is called (eagerly, under
    JAX's tracing, or when TensorFlow traces a step for a given batch shape),
    a size that is not a multiple raises ``ValueError`` saying what to set,
    instead of a shape error deep in the network.

    Args:
        divisor: an int, or one per spatial axis ``(x, y, z)``.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
    """

    def __init__(
        self,
        divisor: int | Sequence[int] = 1,
        data_format: str = "channels_last",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.divisor = _check_divisor(divisor)
        self.data_format = _check_data_format(data_format)
        self.size_divisor = self.add_weight(
            name="size_divisor",
            shape=(3,),
            dtype="int32",
            initializer=keras.initializers.Constant(list(self.divisor)),
            trainable=False,
        )
        self.supports_masking = True

    def _check(self, shape: Sequence[Any]) -> None:
        if len(shape) != 5:
            return
        spatial = shape[1:4] if self.data_format == "channels_last" else shape[2:5]
        bad = [
            (axis, int(s), d)
            for axis, (s, d) in enumerate(zip(spatial, self.divisor, strict=True))
            if isinstance(s, (int, np.integer)) and s % d
        ]
        if bad:
            sizes = " x ".join(str(s) for s in spatial)
            need = " x ".join(str(d) for d in self.divisor)
            raise ValueError(
                f"{self.name}: input of {sizes} voxels, but this model takes spatial sizes that "
                f"are multiples of {need} (axis "
                + ", axis ".join(f"{a} has {s}" for a, s, _ in bad)
                + "); pad the volumes: NiftiDataset(..., pad_to_multiple="
                f"{max(self.divisor)}) or shape= a multiple, for training and validation, "
                "or build the unet3d with pad_to_fit=True; predict_nifti pads by itself"
            )

    def call(self, inputs: Any) -> Any:
        self._check(tuple(inputs.shape))
        return inputs

    def compute_output_shape(self, input_shape: Sequence[Any]) -> tuple:
        self._check(tuple(input_shape))
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "divisor": self.divisor, "data_format": self.data_format}


@keras.saving.register_keras_serializable(package="keras_nii")
class PadToMultiple(keras.layers.Layer):
    """Zero pads the end of each spatial axis up to a multiple of ``divisor``.

    With :class:`CropToInput` at the output, it lets a network that needs
    sizes divisible by its downsampling (a U-Net) take any size:
    :func:`unet3d` puts it after the input's normalization, so the padding is
    a normalized 0 and the statistics are the scan's own. A size already a
    multiple is left as it is (statically: no copy at all).

    The padding is a concatenation with zeros, not a pad op: TensorFlow's
    oneDNN build fuses a pad into the next convolution and, for a pad at one
    end only, then computes wrong sizes ("could not create a primitive
    descriptor" in the transposed convolution of a U-Net).

    Args:
        divisor: an int, or one per spatial axis ``(x, y, z)``.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
    """

    def __init__(
        self, divisor: int | Sequence[int] = 1, data_format: str = "channels_last", **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.divisor = _check_divisor(divisor)
        self.data_format = _check_data_format(data_format)
        self.supports_masking = True

    def call(self, inputs: Any) -> Any:
        x = inputs
        for axis, divisor in zip(_spatial_axes(self.data_format), self.divisor, strict=True):
            size = ops.shape(x)[axis]
            if isinstance(size, (int, np.integer)) and size % divisor == 0:
                continue
            shape = list(ops.shape(x))
            # of non-negative numbers only: tf2onnx's Mod of a negative size is negative
            shape[axis] = (divisor - size % divisor) % divisor
            x = ops.concatenate([x, ops.zeros(shape, dtype=x.dtype)], axis=axis)
        return x

    def compute_output_shape(self, input_shape: Sequence[Any]) -> tuple:
        shape = list(input_shape)
        for axis, divisor in zip(_spatial_axes(self.data_format), self.divisor, strict=True):
            if shape[axis] is not None:
                shape[axis] += -shape[axis] % divisor
        return tuple(shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "divisor": self.divisor, "data_format": self.data_format}


@keras.saving.register_keras_serializable(package="keras_nii")
class CropToInput(keras.layers.Layer):
    """Crops the spatial axes of its first input to the sizes of its second.

    Called as ``CropToInput()([outputs, inputs])``: the output of a network
    that padded its input with :class:`PadToMultiple` is cut back to the
    input's voxels (the padding was at the end of each axis).

    Args:
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
    """

    def __init__(self, data_format: str = "channels_last", **kwargs: Any):
        super().__init__(**kwargs)
        self.data_format = _check_data_format(data_format)

    def call(self, inputs: Sequence[Any]) -> Any:
        x, reference = inputs
        sizes = ops.shape(reference)
        window = [slice(None)] * 5
        for axis in _spatial_axes(self.data_format):
            window[axis] = slice(0, sizes[axis])
        return x[tuple(window)]

    def compute_output_shape(self, input_shape: Sequence[Any]) -> tuple:
        shape, reference = (list(s) for s in input_shape)
        for axis in _spatial_axes(self.data_format):
            shape[axis] = reference[axis]
        return tuple(shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "data_format": self.data_format}


def _conv_block(x: Any, filters: int, batch_norm: bool, name: str) -> Any:
    """Two (Conv3D 3x3x3 -> BatchNorm? -> ReLU) layers."""
    for i in (1, 2):
        x = keras.layers.Conv3D(
            filters,
            3,
            padding="same",
            use_bias=not batch_norm,
            kernel_initializer="he_normal",
            name=f"{name}_conv{i}",
        )(x)
        if batch_norm:
            # a short memory for the moving statistics: small datasets and few
            # steps must still give usable inference statistics
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = keras.layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def unet3d(
    input_shape: Sequence[int | None] = (None, None, None, 1),
    num_classes: int = 1,
    filters: int = 8,
    levels: int = 2,
    normalization: keras.layers.Layer | None = None,
    *,
    batch_norm: bool = True,
    pad_to_fit: bool = True,
    name: str = "unet3d",
) -> keras.Model:
    """A small 3D U-Net for voxel-wise segmentation.

    The encoder has ``levels`` downsampling steps (``MaxPooling3D`` by 2);
    each resolution has a block of two ``Conv3D(3) -> BatchNormalization ->
    ReLU`` layers, with ``filters * 2**level`` channels. The decoder upsamples
    with ``Conv3DTranspose(2, strides=2)`` and concatenates the encoder's
    features of the same resolution (skip connections) before its block. A
    final ``Conv3D(1)`` gives ``num_classes`` channels: a sigmoid probability
    for ``num_classes=1`` (binary segmentation), a softmax over classes
    otherwise.

    The network itself needs spatial sizes divisible by ``2**levels`` (4
    with the default ``levels=2``), so that upsampled features line up with
    their skip connections. With ``pad_to_fit=True`` (the default) the model
    takes any size: after the normalization, :class:`PadToMultiple` zero pads
    the end of each axis to a multiple, and :class:`CropToInput` cuts the
    output back to the input's voxels, in ``fit``, ``evaluate``, ``predict``
    and every exported artifact alike (sizes that are multiples are not
    touched). The loss and metrics see only the input's voxels.

    With ``pad_to_fit=False`` the model takes multiples only and records the
    divisor (a :class:`SizeDivisor` layer after the input and normalization,
    kept by ``save`` and ``export``): :func:`keras_nii.predict_nifti` pads any
    scan to it and crops the result back; a static size that is not a
    multiple raises ``ValueError`` here, and a volume of another size given
    to ``fit`` or ``evaluate`` raises a ``ValueError`` that says to pad
    (``NiftiDataset(..., pad_to_multiple=4)``, ``shape=``, ``CenterCropOrPad3D``)
    when TensorFlow traces the step for its size; volumes of varied sizes
    are traced for unknown sizes, and the mismatch then shows as a
    TensorFlow shape error in the skip connection.

    Either way, ``model.export`` under the JAX backend must be told that the
    sizes are multiples of ``2**levels`` (jax2tf cannot prove that the
    upsampled features match their skip connections otherwise), e.g. for
    ``levels=2`` and one channel: ``model.export(path, jax2tf_kwargs=
    {"polymorphic_shapes": ["(batch, 4*x, 4*y, 4*z, 1)"]})``; the exported
    model then takes multiples of 4.

    Args:
        input_shape: ``(x, y, z, channels)``; spatial sizes may be ``None``.
        num_classes: output channels: 1 (sigmoid) or >= 2 (softmax).
        filters: channels of the first block, doubled at each level.
        levels: number of downsampling steps (>= 1).
        normalization: an optional layer applied to the input first, inside
            the model (e.g. ``keras_nii.layers.ZScoreNormalization(nonzero=True)``),
            so that the saved or exported model takes raw intensities.
        batch_norm: put ``BatchNormalization`` after each convolution.
        pad_to_fit: pad inside the model, so that it takes any spatial size
            (see above); ``False``: multiples of ``2**levels`` only.
        name: the model's name.

    Returns:
        A ``keras.Model`` mapping ``(batch, x, y, z, channels)`` to
        ``(batch, x, y, z, num_classes)`` float probabilities.

    Raises:
        ValueError: a bad argument, or (``pad_to_fit=False``) a static
            spatial size not divisible by ``2**levels``.

    Example:

    ```python
    from keras_nii.layers import ZScoreNormalization

    model = unet3d((None, None, None, 1), normalization=ZScoreNormalization(nonzero=True))
    model.compile("adam", DiceLoss(bce_weight=1.0))
    ```
    """
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 4 or not all(
        s is None or (isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0)
        for s in shape
    ):
        raise ValueError(
            f"input_shape must be (x, y, z, channels) of positive ints or None, got {input_shape!r}"
        )
    if shape[3] is None:
        raise ValueError(f"input_shape must give the number of channels, got {input_shape!r}")
    num_classes = _check_int("num_classes", num_classes, 1)
    filters = _check_int("filters", filters, 1)
    levels = _check_int("levels", levels, 1)
    if normalization is not None and not isinstance(normalization, keras.layers.Layer):
        raise ValueError(
            f"normalization must be a keras layer or None, got {type(normalization).__name__}"
        )
    factor = 2**levels
    if not isinstance(pad_to_fit, bool):
        raise ValueError(f"pad_to_fit must be True or False, got {pad_to_fit!r}")
    bad = [(axis, s) for axis, s in enumerate(shape[:3]) if s is not None and s % factor]
    if bad and not pad_to_fit:
        raise ValueError(
            f"input_shape {tuple(input_shape)}: spatial sizes must be divisible by "
            f"2**levels = {factor} (levels={levels}); axis "
            + ", axis ".join(f"{axis} has {s}" for axis, s in bad)
            + "; or keep pad_to_fit=True"
        )

    inputs = keras.Input(shape=shape, name="image")
    x = normalization(inputs) if normalization is not None else inputs
    if pad_to_fit:
        x = PadToMultiple(factor, name="pad_to_fit")(x)
    else:
        x = SizeDivisor(factor, name="size_divisor")(x)
    skips = []
    for level in range(levels):
        x = _conv_block(x, filters * 2**level, batch_norm, f"enc{level}")
        skips.append(x)
        x = keras.layers.MaxPooling3D(2, name=f"pool{level}")(x)
    x = _conv_block(x, filters * 2**levels, batch_norm, "bottom")
    for level in reversed(range(levels)):
        x = keras.layers.Conv3DTranspose(filters * 2**level, 2, strides=2, name=f"up{level}")(x)
        x = keras.layers.Concatenate(axis=-1, name=f"skip{level}")([x, skips[level]])
        x = _conv_block(x, filters * 2**level, batch_norm, f"dec{level}")
    activation = "sigmoid" if num_classes == 1 else "softmax"
    outputs = keras.layers.Conv3D(
        num_classes,
        1,
        activation=activation,
        dtype="float32",
        name="padded_probabilities" if pad_to_fit else "probabilities",
    )(x)
    if pad_to_fit:
        outputs = CropToInput(name="probabilities")([outputs, inputs])
    return keras.Model(inputs, outputs, name=name)


def dice_score(y_true: Any, y_pred: Any, threshold: float = 0.5) -> float:
    """The Dice coefficient ``2 |T & P| / (|T| + |P|)`` of two binary masks.

    Both arguments are arrays of the same shape (NumPy arrays, tensors,
    anything ``np.asarray`` takes). Boolean arrays are used as they are;
    other arrays are binarized with ``> threshold``: label maps of 0 and 1,
    and probabilities, both work with the default 0.5.

    Convention: when both masks are empty the Dice score is 1.0 (the
    prediction is perfect: nothing to find, nothing found), as in MONAI's
    ``DiceMetric(ignore_empty=False)`` and most challenge rules; when only
    one is empty it is 0.0.

    Args:
        y_true: the reference mask.
        y_pred: the predicted mask, labels or probabilities.
        threshold: the binarization threshold of non-boolean arrays.

    Returns:
        A float in ``[0, 1]``.

    Example:

    >>> dice_score(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    0.6666666666666666
    """
    true = np.asarray(y_true)
    pred = np.asarray(y_pred)
    if true.shape != pred.shape:
        raise ValueError(
            f"y_true and y_pred must have the same shape, got {true.shape} and {pred.shape}"
        )
    true = true if true.dtype == bool else true > threshold
    pred = pred if pred.dtype == bool else pred > threshold
    total = int(np.count_nonzero(true)) + int(np.count_nonzero(pred))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(true & pred)) / total


@keras.saving.register_keras_serializable(package="keras_nii")
class DiceLoss(keras.losses.Loss):
    """Soft Dice loss, optionally plus cross-entropy, for segmentation.

    For each sample and class, ``1 - (2 sum(t p) + smooth) / (sum(t) + sum(p)
    + smooth)`` over the voxels, averaged over classes and samples. The soft
    Dice looks at the foreground only, so it is not swamped by the
    background when the structures are small (lesions); adding cross-entropy
    (``bce_weight > 0``) gives well-behaved gradients from the first step.

    ``y_pred`` holds probabilities (the sigmoid / softmax output of
    :func:`unet3d`), ``(batch, x, y, z, k)``. With ``k == 1`` ``y_true`` is a
    0/1 mask of the same shape (binary cross-entropy); with ``k > 1`` it is
    an integer label map ``(batch, x, y, z, 1)`` (or ``(batch, x, y, z)``),
    one-hot encoded here (categorical cross-entropy).

    Args:
        smooth: added to the numerator and denominator (a Dice of 1 for an
            empty mask predicted empty, and no division by zero).
        bce_weight: weight of the cross-entropy term; 0 for pure soft Dice.
        **kwargs: ``keras.losses.Loss`` arguments (``name``, ``reduction``).
    """

    def __init__(self, smooth: float = 1.0, bce_weight: float = 0.0, **kwargs: Any):
        kwargs.setdefault("name", "dice_loss")
        super().__init__(**kwargs)
        if isinstance(smooth, bool) or not isinstance(smooth, (int, float)) or smooth < 0:
            raise ValueError(f"smooth must be a number >= 0, got {smooth!r}")
        if (
            isinstance(bce_weight, bool)
            or not isinstance(bce_weight, (int, float))
            or bce_weight < 0
        ):
            raise ValueError(f"bce_weight must be a number >= 0, got {bce_weight!r}")
        self.smooth = float(smooth)
        self.bce_weight = float(bce_weight)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        y_pred = ops.convert_to_tensor(y_pred)
        classes = y_pred.shape[-1]
        if classes is None or classes == 1:
            y_true = ops.cast(ops.reshape(y_true, ops.shape(y_pred)), y_pred.dtype)
        else:
            labels = ops.cast(y_true, "int32")
            if len(labels.shape) == len(y_pred.shape):
                labels = ops.squeeze(labels, axis=-1)
            y_true = ops.one_hot(labels, classes, dtype=y_pred.dtype)
        spatial = tuple(range(1, len(y_pred.shape) - 1))
        intersection = ops.sum(y_true * y_pred, axis=spatial)
        denominator = ops.sum(y_true, axis=spatial) + ops.sum(y_pred, axis=spatial)
        dice = (2.0 * intersection + self.smooth) / (denominator + self.smooth)
        loss = 1.0 - ops.mean(dice, axis=-1)
        if self.bce_weight:
            epsilon = keras.backend.epsilon()
            p = ops.clip(y_pred, epsilon, 1.0 - epsilon)
            if classes is None or classes == 1:
                ce = -(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))
            else:
                ce = -y_true * ops.log(p)
            ce = ops.mean(ops.sum(ce, axis=-1), axis=spatial)
            loss = loss + self.bce_weight * ce
        return loss

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(smooth=self.smooth, bce_weight=self.bce_weight)
        return config
