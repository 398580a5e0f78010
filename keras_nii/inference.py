"""Predictions on raw NIfTI scans, written back in the scan's own space.

:func:`predict_nifti` reads a scan with the same reader as training
(:func:`keras_nii.load_nifti`, RAS+ by default), runs a model over the whole
volume, in sliding windows with blended overlaps when the volume is larger
than the model's input or ``patch_size`` is given, and writes the result with
``save_nifti(..., like=scan)``: same shape, affine and voxel order as the
input file, whatever its orientation.

With ``spacing=``, the scan is resampled to the model's voxel spacing first
and the predicted probabilities (not the labels) are resampled back onto the
scan's own grid before the argmax or threshold (see :mod:`keras_nii.spacing`).
With ``tta=``, the prediction is the mean over flipped copies of each window,
each flipped back (test-time augmentation), and ``uncertainty_path=`` writes
their voxel-wise variance.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from keras_nii import remote
from keras_nii.io import NIFTI_SUFFIXES, NiftiError, Volume, load_nifti, save_nifti
from keras_nii.storage import overwritten_input

__all__ = [
    "predict_nifti",
    "predict_volume",
    "predict_scan",
    "load_model",
    "size_divisor",
    "sliding_window_positions",
    "tta_flips",
]

Output = Literal["labels", "probabilities"]

#: every combination of flips of the three spatial axes, the identity first
ALL_FLIPS = tuple(axes for n in range(4) for axes in itertools.combinations((0, 1, 2), n))


def tta_flips(tta: Any) -> list[tuple[int, ...]]:
    """The flips that ``tta=`` names, as tuples of spatial axes; ``()`` is no flip.

    ``None`` is no test-time augmentation (``[()]``); ``"flips"`` is all 8
    combinations of flips of axes 0, 1 and 2; a list such as ``[(0,), (1,),
    (0, 1)]`` is those flips. The unflipped prediction is always part of
    the mean (``()`` is added first when missing) and repeated entries count
    once.
    """
    if tta is None:
        return [()]
    if isinstance(tta, str):
        if tta != "flips":
            raise ValueError(f"tta must be None, 'flips' or a list of axis tuples, got {tta!r}")
        return list(ALL_FLIPS)
    if not isinstance(tta, Sequence):
        raise ValueError(f"tta must be None, 'flips' or a list of axis tuples, got {tta!r}")
    flips: list[tuple[int, ...]] = [()]
    for entry in tta:
        if isinstance(entry, (int, np.integer)) and not isinstance(entry, bool):
            entry = (entry,)
        if not isinstance(entry, Sequence) or isinstance(entry, str):
            raise ValueError(
                f"tta entries must be tuples of axes (0, 1, 2), got {entry!r} in {tta!r}"
            )
        axes = []
        for axis in entry:
            if (
                isinstance(axis, bool)
                or not isinstance(axis, (int, np.integer))
                or not 0 <= axis <= 2
            ):
                raise ValueError(f"tta axes must be 0, 1 or 2, got {entry!r} in {tta!r}")
            axes.append(int(axis))
        if len(set(axes)) != len(axes):
            raise ValueError(f"tta entry {entry!r} names an axis twice")
        key = tuple(sorted(axes))
        if key not in flips:
            flips.append(key)
    return flips


def _out_of_memory(err: BaseException | None) -> bool:
    """Whether an exception, or one that caused it, says that memory ran out.

    TensorFlow raises ``ResourceExhaustedError``, torch ``OutOfMemoryError``,
    JAX an ``XlaRuntimeError`` whose message starts ``RESOURCE_EXHAUSTED``,
    NumPy and plain Python ``MemoryError``.
    """
    for _ in range(8):  # the cause chain (a wrapper's error, then the model's)
        if err is None:
            return False
        name = type(err).__name__
        text = str(err)
        if (
            isinstance(err, MemoryError)
            or name in ("ResourceExhaustedError", "OutOfMemoryError")
            or "RESOURCE_EXHAUSTED" in text
            or "out of memory" in text.lower()
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


def _flip_averaged(
    run: Callable[[np.ndarray], np.ndarray], flips: list[tuple[int, ...]], variance: bool
) -> Callable[[np.ndarray], np.ndarray]:
    """``run`` as the mean of ``flip^-1(run(flip(batch)))`` over ``flips``, in one call.

    All flipped copies of the batch go to the model together, as long as
    memory allows: when the model runs out of memory (see
    :func:`_out_of_memory`) on that many windows at once, they are sent in
    halves, then quarters..., down to one window a call, and the smaller
    size is kept for the windows that follow. With ``variance``, the
    variance over the flips follows the mean as more channels:
    ``(b, x, y, z, 2k)``.
    """
    per_call: int | None = None

    def call(batch: np.ndarray) -> np.ndarray:
        nonlocal per_call
        n = len(batch)
        copies = [np.flip(batch, [a + 1 for a in axes]) if axes else batch for axes in flips]
        inputs = np.concatenate(copies)
        size = len(inputs) if per_call is None else min(per_call, len(inputs))
        parts, start = [], 0
        while start < len(inputs):
            try:
                part = np.asarray(run(inputs[start : start + size]), dtype=np.float32)
            except Exception as err:
                if size == 1 or not _out_of_memory(err):
                    raise
                size = max(1, size // 2)
                warnings.warn(
                    f"predict_nifti: the model ran out of memory on {2 * size} or more "
                    f"windows at once; sending the {len(flips)} flipped copies of each "
                    f"window {size} at a time",
                    RuntimeWarning,
                    stacklevel=2,
                )
                per_call = size
                continue
            parts.append(part)
            start += size
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if out.ndim == 4:
            out = out[..., None]
        if out.ndim != 5 or out.shape[:4] != (len(flips) * n, *batch.shape[1:4]):
            raise ValueError(
                f"the model returned shape {out.shape} for windows of shape "
                f"{(len(flips) * n, *batch.shape[1:])}: predict_nifti needs a model whose "
                "output has its input's spatial size"
            )
        stack = np.stack(
            [
                np.flip(out[i * n : (i + 1) * n], [a + 1 for a in axes])
                if axes
                else out[i * n : (i + 1) * n]
                for i, axes in enumerate(flips)
            ]
        )
        mean = stack.mean(axis=0)
        if not variance:
            return mean
        return np.concatenate([mean, stack.var(axis=0)], axis=-1)

    return call


def load_model(path: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
    """A prediction function from a ``.keras`` file or an exported artifact.

    ``.onnx`` files run by ONNX Runtime and ``.tflite`` files by the LiteRT
    interpreter (:mod:`keras_nii.serving`), without Keras or TensorFlow.
    SavedModels (``model.export(...)``) are loaded with ``tf.saved_model.load``
    and called through their ``serve`` endpoint; ``.keras`` files with
    ``keras.saving.load_model`` (keras-nii's layers are registered on import).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"model {path}: no such file or folder")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ValueError(f"model {path}: a folder without saved_model.pb is not a SavedModel")
        import tensorflow as tf

        try:
            loaded = tf.saved_model.load(path)
        except Exception as err:  # TensorFlow reports a damaged SavedModel in many ways
            raise ValueError(
                f"model {path}: cannot be loaded ({type(err).__name__}: {err})"
            ) from err
        serve = getattr(loaded, "serve", None)
        if serve is not None:
            call = serve
        else:
            signature = loaded.signatures.get("serving_default")
            if signature is None:
                raise ValueError(
                    f"model {path}: the SavedModel has neither a 'serve' endpoint nor a "
                    "'serving_default' signature"
                )
            # signature functions take their input by keyword only
            name = next(iter(signature.structured_input_signature[1]))

            def call(tensor: Any, _signature: Any = signature, _name: str = name) -> Any:
                return _signature(**{_name: tensor})

            serve = signature

        def run(batch: np.ndarray) -> np.ndarray:
            out = call(tf.constant(batch))
            if isinstance(out, dict):
                out = next(iter(out.values()))
            return np.asarray(out)

        # keep the loaded object alive as long as the function: its variables
        # are deleted with it
        run.saved_model = loaded
        run.input_shape = _saved_model_input_shape(serve)
        run.size_divisor = _saved_model_divisor(loaded)
        return run
    if path.lower().endswith((".onnx", ".tflite")):
        # run without Keras or TensorFlow (keras_nii.serving)
        from keras_nii.serving import LiteRTModel, OnnxModel

        return OnnxModel(path) if path.lower().endswith(".onnx") else LiteRTModel(path)
    if not path.endswith(".keras"):
        raise ValueError(
            f"model {path}: expected a .keras, .onnx or .tflite file or an exported "
            "SavedModel folder"
        )
    import keras

    import keras_nii.layers  # noqa: F401  (registers the layers for deserialization)

    try:
        return keras.saving.load_model(path)
    except Exception as err:  # keras reports a damaged file in many ways
        raise ValueError(f"model {path}: cannot be loaded ({type(err).__name__}: {err})") from err


def _saved_model_input_shape(serve: Any) -> tuple | None:
    """The input shape of a restored ``serve`` function or a signature, if it has one."""
    specs = []
    signature = getattr(serve, "input_signature", None)  # a restored tf.function
    if signature:
        specs = list(signature)
    else:
        functions = getattr(serve, "concrete_functions", None) or [serve]
        try:
            args, kwargs = functions[0].structured_input_signature
            specs = list(args) or list(kwargs.values())
        except (AttributeError, IndexError, TypeError, ValueError):
            return None
    if len(specs) != 1 or getattr(specs[0], "shape", None) is None:
        return None  # several inputs, or a nested structure
    try:
        return tuple(specs[0].shape.as_list())
    except ValueError:  # unknown rank
        return None


def _saved_model_divisor(loaded: Any) -> tuple[int, int, int] | None:
    """The divisor a SizeDivisor layer stored as a variable in an exported model."""
    for variable in getattr(loaded, "variables", ()):
        name = getattr(variable, "name", "")
        if name.split("/")[-1].split(":")[0] == "size_divisor" and variable.shape == (3,):
            return tuple(int(v) for v in np.asarray(variable.numpy()))
    return None


# the layers that divide a spatial size by their strides (transposed convolutions multiply)
_DOWNSAMPLING = ("MaxPooling3D", "AveragePooling3D", "Conv3D", "DepthwiseConv3D", "SeparableConv3D")


def size_divisor(model: Any) -> tuple[int, int, int] | None:
    """The multiple that the spatial sizes of a model's input must be, if it is known.

    - a model with a :class:`keras_nii.models.SizeDivisor` layer (a
      :func:`keras_nii.models.unet3d` with ``pad_to_fit=False``), also loaded
      from a ``.keras`` file or an exported SavedModel (:func:`load_model`):
      its stored divisor;
    - a model with a :class:`keras_nii.models.PadToMultiple` layer (a
      ``unet3d`` by default), which pads its input itself: ``(1, 1, 1)``;
    - an object with a ``size_divisor`` attribute: that;
    - another Keras model: the product, per axis, of the strides of its 3D
      pooling and strided convolution layers (a U-Net with ``n`` poolings by
      2: ``2**n``); this can overestimate for a model with parallel
      downsampling branches, which only costs some padding;
    - otherwise (a plain function, a SavedModel without the layer): ``None``.
      Pass ``size_divisor=`` to :func:`predict_nifti` for such a model.
    """
    value = getattr(model, "size_divisor", None)
    if value is not None and not hasattr(value, "shape"):  # not a layer's weight
        return tuple(int(v) for v in value)
    layers = getattr(model, "layers", None)
    if layers is None:
        return None
    divisor = [1, 1, 1]
    stack = list(layers)
    while stack:
        layer = stack.pop()
        if type(layer).__name__ == "SizeDivisor":
            return tuple(int(v) for v in layer.divisor)
        if type(layer).__name__ == "PadToMultiple":  # the model pads by itself
            return (1, 1, 1)
        if hasattr(layer, "layers"):  # a nested model
            stack.extend(layer.layers)
            continue
        if type(layer).__name__ in _DOWNSAMPLING:
            strides = getattr(layer, "strides", None) or getattr(layer, "pool_size", None)
            if strides is not None:
                strides = [strides] * 3 if isinstance(strides, int) else list(strides)
                divisor = [d * int(s) for d, s in zip(divisor, strides, strict=False)]
    return tuple(divisor)


def _divisor_argument(value: Any, model: Any) -> tuple[int, int, int]:
    if value is None:
        return size_divisor(model) or (1, 1, 1)
    values = [value] * 3 if isinstance(value, (int, np.integer)) else list(value)
    if len(values) != 3 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in values
    ):
        raise ValueError(f"size_divisor must be a positive int or 3 of them, got {value!r}")
    return tuple(int(v) for v in values)


def _model_input_shape(model: Any) -> tuple | None:
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, list):  # multi-input models are not supported here
        shape = shape[0] if len(shape) == 1 else None
    return tuple(shape) if shape is not None else None


def _predict_fn(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    if hasattr(model, "predict_on_batch"):

        def run(batch: np.ndarray) -> np.ndarray:
            out = model.predict_on_batch(batch)
            if isinstance(out, dict):
                out = next(iter(out.values()))
            return np.asarray(out)

        return run
    if callable(model):
        return lambda batch: np.asarray(model(batch))
    raise ValueError(f"model must be a keras model or a callable, got {type(model).__name__}")


def sliding_window_positions(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of ``patch`` covering ``size`` (the last one flush with the end)."""
    if patch >= size:
        return [0]
    step = max(1, int(round(patch * (1.0 - overlap))))
    starts = list(range(0, size - patch + 1, step))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def _gaussian_weights(patch: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Importance weights that favour window centres (as nnU-Net and MONAI blend)."""
    weights = np.ones(patch, dtype=np.float32)
    for axis, size in enumerate(patch):
        centre = (size - 1) / 2.0
        sigma = max(size * sigma_scale, 1e-3)
        profile = np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = size
        weights = weights * profile.reshape(shape)
    # never exactly zero, so every voxel covered by a window gets a value
    return np.maximum(weights / weights.max(), 1e-3)[..., None]


def _trim_faces(
    weights: np.ndarray,
    start: Sequence[int],
    patch: Sequence[int],
    full: Sequence[int],
    margin: int,
) -> np.ndarray:
    """Zero the weights within ``margin`` of the window faces inside the volume."""
    weights = weights.copy()
    for axis in range(3):
        index = [slice(None)] * 4
        if start[axis] > 0:
            index[axis] = slice(0, margin)
            weights[tuple(index)] = 0.0
        if start[axis] + patch[axis] < full[axis]:
            index[axis] = slice(patch[axis] - margin, patch[axis])
            weights[tuple(index)] = 0.0
    return weights


def _check_count(name: str, value: Any) -> int:
    """A positive int (a NumPy one too), or a ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_overlap(value: Any) -> float:
    """A number in [0, 1), or a ValueError naming ``overlap``."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not 0.0 <= value < 1.0
    ):
        raise ValueError(f"overlap must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_patch_size(value: Any) -> tuple[int, int, int]:
    """Three positive ints ``(x, y, z)`` (not a string, not floats), or a ValueError."""
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, (Sequence, np.ndarray))
        or len(value) != 3
        or any(
            isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, np.integer)) or p < 1
            for p in value
        )
    ):
        raise ValueError(f"patch_size must be three positive integers (x, y, z), got {value!r}")
    return tuple(int(p) for p in value)


def predict_volume(
    model: Any,
    array: np.ndarray,
    *,
    patch_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    batch_size: int = 2,
    blend: Literal["gaussian", "constant"] = "gaussian",
    margin: int = 0,
    size_divisor: int | Sequence[int] | None = None,
    tta: Any = None,
    uncertainty: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Run a model over one ``(x, y, z, c)`` volume, in sliding windows if needed.

    Args:
        model: a Keras model, a function returned by :func:`load_model`, or any
            callable mapping a ``(b, x, y, z, c)`` batch to ``(b, x, y, z, k)``.
        array: the volume, channels last.
        patch_size: window size ``(x, y, z)``. Default: the model's fixed input
            size when it has one, else the whole volume in one pass, zero
            padded (at the end of each axis) to a multiple of ``size_divisor``,
            the result cropped back. An explicit size must be such a multiple.
        overlap: fraction of a window shared with its neighbour, in ``[0, 1)``.
        batch_size: windows per model call.
        blend: how overlapping windows are averaged: ``"gaussian"`` weights
            favour window centres; ``"constant"`` is a plain mean.
        margin: voxels at each window face that are discarded, except where the
            face lies on the volume's border. A convolutional network sees zero
            padding there instead of the true neighbourhood; with ``margin`` at
            least its receptive-field radius, the sliding-window result equals
            the whole-volume result. The overlap must leave ``2 * margin``
            voxels shared between neighbouring windows.
        size_divisor: the multiple the model's input sizes must be (an int or
            one per axis). Default: what :func:`size_divisor` finds (a
            ``unet3d``: ``2**levels``), else 1.
        tta: test-time augmentation: ``None``, ``"flips"`` (all 8
            combinations of flips of the spatial axes) or a list of flips
            such as ``[(0,), (1,), (0, 1)]`` (see :func:`tta_flips`). Each
            window's prediction is the mean of ``flip^-1(model(flip(w)))``
            over the flips, all of which go to the model in one call: a call
            holds ``batch_size * len(flips)`` windows. Where memory does not
            allow that (the model raises an out-of-memory error), the copies
            are sent in halves, quarters ... down to one a call, with a
            warning, and the smaller size is kept.
        uncertainty: also return the variance over the flips (needs ``tta``);
            overlapping windows blend it as they blend the mean.

    Returns:
        ``(x, y, z, k)`` float32 predictions for every voxel; with
        ``uncertainty``, ``(prediction, variance)``, both ``(x, y, z, k)``.
    """
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 4:
        raise ValueError(f"array must be (x, y, z, c), got shape {array.shape}")
    overlap = _check_overlap(overlap)
    batch_size = _check_count("batch_size", batch_size)
    if patch_size is not None:
        patch_size = _check_patch_size(patch_size)
    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    run = _predict_fn(model)
    flips = tta_flips(tta)
    if uncertainty and tta is None:
        raise ValueError("uncertainty needs tta: it is the variance over the augmented predictions")
    if tta is not None:
        run = _flip_averaged(run, flips, uncertainty)
    input_shape = _model_input_shape(model)
    if input_shape is not None and len(input_shape) == 5:
        channels = input_shape[-1]
        if channels is not None and channels != array.shape[-1]:
            raise ValueError(
                f"the model takes {channels} channel(s); the volume has {array.shape[-1]}"
            )
        if patch_size is None and all(s is not None for s in input_shape[1:4]):
            patch_size = tuple(int(s) for s in input_shape[1:4])
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"margin must be a non-negative int, got {margin!r}")
    spatial = array.shape[:3]
    divisor = _divisor_argument(size_divisor, model)
    if patch_size is None:
        patch_size = tuple(-(-s // d) * d for s, d in zip(spatial, divisor, strict=True))
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size must be three positive ints, got {patch_size!r}")
    if any(p % d for p, d in zip(patch, divisor, strict=True)):
        raise ValueError(
            f"patch_size {patch} is not a multiple of the model's size divisor {divisor}: "
            "pass a patch_size of multiples, or leave it unset (the scan is then padded)"
        )

    # pad a volume smaller than the window, predict, crop back
    pad = [(0, max(0, p - s)) for p, s in zip(patch, spatial, strict=True)]
    padded = np.pad(array, [*pad, (0, 0)]) if any(after for _, after in pad) else array
    full = padded.shape[:3]
    starts = list(
        itertools.product(
            *[sliding_window_positions(n, p, overlap) for n, p in zip(full, patch, strict=True)]
        )
    )
    weights = (
        _gaussian_weights(patch)
        if blend == "gaussian" and len(starts) > 1
        else np.ones((*patch, 1), np.float32)
    )
    for axis, (n, p) in enumerate(zip(full, patch, strict=True)):
        positions = sliding_window_positions(n, p, overlap)
        shared = min((a + p - b for a, b in zip(positions, positions[1:], strict=False)), default=p)
        if margin and shared < 2 * margin:
            raise ValueError(
                f"overlap {overlap} leaves {shared} voxel(s) shared along axis {axis}; "
                f"margin={margin} needs at least {2 * margin}"
            )
    total = None
    norm = np.zeros((*full, 1), np.float32)
    for first in range(0, len(starts), batch_size):
        chunk = starts[first : first + batch_size]
        batch = np.stack(
            [padded[i : i + patch[0], j : j + patch[1], k : k + patch[2]] for i, j, k in chunk]
        )
        out = np.asarray(run(batch), dtype=np.float32)
        if out.ndim == 4:
            out = out[..., None]
        if out.shape[:4] != (len(chunk), *patch):
            raise ValueError(
                f"the model returned shape {out.shape} for windows of shape {batch.shape}: "
                "predict_nifti needs a model whose output has its input's spatial size"
            )
        if not np.isfinite(out).all():
            raise ValueError(
                f"the model returned NaN or inf for the window(s) starting at {chunk} (of "
                f"size {patch}): a label map or probabilities made of them would be wrong; "
                "check the scan for non-finite voxels and the model's weights"
            )
        if total is None:
            total = np.zeros((*full, out.shape[-1]), np.float32)
        for (i, j, k), pred in zip(chunk, out, strict=True):
            window = (slice(i, i + patch[0]), slice(j, j + patch[1]), slice(k, k + patch[2]))
            w = _trim_faces(weights, (i, j, k), patch, full, margin) if margin else weights
            total[window] += pred * w
            norm[window] += w
    # in place: the probability map is the largest array here, never copied
    result = np.divide(total, norm, out=total)
    result = result[: spatial[0], : spatial[1], : spatial[2]]
    if uncertainty:
        k = result.shape[-1] // 2
        return result[..., :k], result[..., k:]
    return result


def label_dtype(classes: int) -> np.dtype:
    """The smallest integer type that holds the labels ``0 .. classes - 1``."""
    for dtype in (np.uint8, np.uint16, np.int32):
        if classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _to_labels(prediction: np.ndarray, threshold: float) -> np.ndarray:
    """Labels in the smallest integer type for the number of classes (uint8 up
    to 256): the argmax, slab by slab (no full-size int64 index array), or a
    single channel over ``threshold``."""
    if prediction.shape[-1] == 1:
        return (prediction[..., 0] > threshold).astype(np.uint8)
    labels = np.empty(prediction.shape[:-1], label_dtype(prediction.shape[-1]))
    for i in range(0, labels.shape[0], 8):
        labels[i : i + 8] = np.argmax(prediction[i : i + 8], axis=-1)
    return labels


def _output_header(header: Any, result: np.ndarray, output: str, classes: int) -> Any:
    """The source header, fitted to a label or probability map made from it.

    Geometry (affine, sform / qform and their codes, voxel sizes, the spatial
    unit) stays the source's. What described the source's values or its time
    axis does not carry over: the display range (``cal_min`` / ``cal_max``)
    becomes the output's (labels ``0 .. K-1``, probabilities ``0 .. 1``), the
    intent says what the values are (``label``; ``estimate`` named
    ``probabilities``), ``descrip`` says what made the file, there is no
    scaling, and a 4th axis (classes, not time) has no time unit, step, offset
    or slice timing.
    """
    import nibabel as nib

    if not isinstance(header, nib.Nifti1Header):  # a volume made in memory: nothing to fit
        return header
    from keras_nii import __version__

    header = header.copy()
    header.set_data_dtype(result.dtype)
    header.set_slope_inter(np.nan, np.nan)
    spatial_unit = header.get_xyzt_units()[0]
    header.set_xyzt_units(xyz=spatial_unit, t="unknown")
    header["pixdim"][4:] = 1.0
    header["toffset"] = 0.0
    header["slice_code"] = 0
    header["slice_start"] = 0
    header["slice_end"] = 0
    header["slice_duration"] = 0.0
    if output == "labels":
        header.set_intent("label", (), name="labels")
        low, high = 0.0, float(max(classes, 2) - 1)
        what = f"labels 0..{int(high)}"
    else:
        header.set_intent("estimate", (), name="probabilities")
        finite = result[np.isfinite(result)]
        low = min(0.0, float(finite.min())) if finite.size else 0.0
        high = max(1.0, float(finite.max())) if finite.size else 1.0
        what = f"probabilities of {classes} class(es)" if classes > 1 else "probabilities"
    header["cal_min"], header["cal_max"] = low, high
    header["descrip"] = f"keras-nii {__version__} predict_nifti: {what}".encode()[:79]
    return header


def _check_output_path(out_path: str, inputs: Sequence[str]) -> None:
    if not out_path.lower().endswith(NIFTI_SUFFIXES):
        raise ValueError(f"out_path must end with one of {NIFTI_SUFFIXES}, got {out_path!r}")
    if remote.is_url(out_path):  # an object store: compared as normalized URLs
        source = remote.overwritten_url(out_path, list(inputs))
        if source is not None:
            raise ValueError(
                f"refusing to write {remote.display(out_path)}: it is an input scan "
                f"({remote.display(source)})"
            )
        return
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise NiftiError(f"{out_path}: cannot write: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise NiftiError(f"{out_path}: cannot write: folder {folder} is not writable")
    # compared as files (links, case variants, .hdr/.img twins), before the model runs
    source = overwritten_input([out_path], list(inputs))
    if source is not None:
        same = os.path.abspath(source) == os.path.abspath(out_path)
        raise ValueError(
            f"refusing to write {out_path}: it is an input scan" + ("" if same else f" ({source})")
        )


def _load_inputs(
    paths: Sequence[str], canonical: bool, spacing: Any = None
) -> tuple[Volume, np.ndarray]:
    volumes = [load_nifti(p, canonical=canonical, spacing=spacing) for p in paths]
    first = volumes[0]
    for other in volumes[1:]:
        if other.shape[:3] != first.shape[:3] or not np.allclose(
            other.affine, first.affine, atol=1e-4
        ):
            raise ValueError(
                f"modalities {first.path} and {other.path} do not share a grid "
                f"(shapes {first.shape[:3]} and {other.shape[:3]})"
            )
    array = np.concatenate([v.array for v in volumes], axis=-1) if len(volumes) > 1 else first.array
    return first, array


def predict_scan(
    model: Any,
    in_path: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    patch_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    batch_size: int = 2,
    blend: Literal["gaussian", "constant"] = "gaussian",
    margin: int = 0,
    canonical: bool = True,
    size_divisor: int | Sequence[int] | None = None,
    spacing: Sequence[float | None] | float | None = None,
    tta: Any = None,
    uncertainty: bool = False,
) -> tuple[Volume, np.ndarray, np.ndarray | None]:
    """The model's output on a scan, on the scan's own grid, in memory.

    What :func:`predict_nifti` computes before it writes: the scan is read
    (and resampled to ``spacing``), predicted in sliding windows by
    :func:`predict_volume`, and the output (probabilities or logits) is
    resampled back onto the scan's own grid. The arguments are
    :func:`predict_nifti`'s.

    Returns:
        ``(volume, prediction, variance)``: the scan's :class:`Volume` (its
        grid and header), the ``(x, y, z, k)`` float32 output and, with
        ``uncertainty`` (and ``tta``), its variance over the flips, else
        ``None``.
    """
    paths = [
        os.fspath(p) for p in ([in_path] if isinstance(in_path, (str, os.PathLike)) else in_path)
    ]
    if not paths:
        raise ValueError("in_path must name at least one scan")
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    volume, array = _load_inputs(paths, canonical, spacing)
    prediction = predict_volume(
        model,
        array,
        patch_size=patch_size,
        overlap=overlap,
        batch_size=batch_size,
        blend=blend,
        margin=margin,
        size_divisor=size_divisor,
        tta=tta,
        uncertainty=uncertainty,
    )
    variance = None
    if uncertainty:
        prediction, variance = prediction
    if volume.resampling is not None:
        # the probabilities go back to the scan's grid, then become labels
        how = volume.resampling
        prediction = how.invert(prediction, "linear")
        if variance is not None:
            variance = how.invert(variance, "linear")
        volume = dataclasses.replace(
            volume, array=prediction, affine=how.source_affine, resampling=None
        )
    return volume, prediction, variance


def predict_nifti(
    model: Any,
    in_path: str | os.PathLike | Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    patch_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    batch_size: int = 2,
    output: Output = "labels",
    threshold: float = 0.5,
    blend: Literal["gaussian", "constant"] = "gaussian",
    margin: int = 0,
    canonical: bool = True,
    size_divisor: int | Sequence[int] | None = None,
    spacing: Sequence[float | None] | float | None = None,
    tta: Any = None,
    uncertainty_path: str | os.PathLike | None = None,
) -> Path:
    """Predict on a NIfTI scan and write the result in the scan's own space.

    Args:
        model: a Keras model, or the path of a ``.keras`` file, an exported
            ``.onnx`` or ``.tflite`` file (run without TensorFlow) or an
            exported SavedModel folder (see :func:`load_model`).
        in_path: the scan, or a list of scans of one subject (modalities, in
            the channel order the model was trained with).
        out_path: the NIfTI file to write (``.nii`` or ``.nii.gz``). Writing
            over an input scan is refused.
        patch_size: sliding-window size; default the model's fixed input size,
            or, for a fully convolutional model, the whole volume padded to a
            multiple of ``size_divisor`` (any scan size works).
        overlap: fraction of overlap between neighbouring windows.
        batch_size: windows per model call.
        output: ``"labels"`` writes integer labels: the argmax over channels
            for a multi-channel output, ``prediction > threshold`` for a
            single channel (sigmoid probabilities; pass ``threshold=0`` for
            logits). ``"probabilities"`` writes the float32 model output (a 4D
            file when it has several channels).
        threshold: see ``output``.
        blend: ``"gaussian"`` or ``"constant"`` weighting of overlapping windows.
        margin: voxels discarded at inner window faces (see :func:`predict_volume`).
        canonical: read the scan as the model was trained (RAS+ by default,
            as ``NiftiDataset``).
        size_divisor: the multiple that the model's input sizes must be;
            default: found from the model (see :func:`size_divisor`), else 1.
        spacing: the voxel spacing the model was trained at, ``(sx, sy, sz)``
            in mm (``None`` entries keep an axis): the scan is resampled to it
            (``load_nifti(..., spacing=...)``), predicted there, and the
            model's output -- probabilities or logits, never labels -- is
            resampled linearly back onto the scan's own grid before the
            argmax or threshold. ``None``: the scan's own grid throughout.
        tta: test-time augmentation: ``"flips"`` averages the predictions of
            all 8 combinations of flips of the three axes, each flipped back;
            or a list of flips such as ``[(0,), (1,), (0, 1)]`` (the unflipped
            prediction is always included). The flipped copies of a window
            go to the model in one call (``batch_size`` windows, each with
            all its flips), or in smaller calls when the model runs out of
            memory. See :func:`tta_flips`.
        uncertainty_path: with ``tta``, a second NIfTI file to write: the
            voxel-wise variance of the model's output across the augmented
            predictions (float32, one channel per output channel, a 4D file
            when there are several), on the same grid as ``out_path``.

    Returns:
        The path written.

    Example:

    ```python
    keras_nii.predict_nifti("model.keras", "sub-01_T1w.nii.gz", "sub-01_pred.nii.gz",
                            patch_size=(96, 96, 96), overlap=0.5)
    ```
    """
    paths = [
        os.fspath(p) for p in ([in_path] if isinstance(in_path, (str, os.PathLike)) else in_path)
    ]
    if not paths:
        raise ValueError("in_path must name at least one scan")
    out_path = os.fspath(out_path)
    if output not in ("labels", "probabilities"):
        raise ValueError(f"output must be 'labels' or 'probabilities', got {output!r}")
    if (
        isinstance(threshold, (bool, np.bool_))
        or not isinstance(threshold, (int, float, np.integer, np.floating))
        or not np.isfinite(threshold)
    ):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    # the window arguments, before a scan is read or the model run
    _check_overlap(overlap)
    _check_count("batch_size", batch_size)
    if patch_size is not None:
        _check_patch_size(patch_size)
    _check_output_path(out_path, paths)
    flips = tta_flips(tta)
    if uncertainty_path is not None:
        uncertainty_path = os.fspath(uncertainty_path)
        if tta is None:
            raise ValueError(
                "uncertainty_path needs tta=: it is the variance over the augmented predictions"
            )
        _check_output_path(uncertainty_path, paths)
        if os.path.abspath(uncertainty_path) == os.path.abspath(out_path):
            raise ValueError(f"uncertainty_path and out_path are the same file: {out_path}")
    volume, prediction, variance = predict_scan(
        model,
        paths,
        patch_size=patch_size,
        overlap=overlap,
        batch_size=batch_size,
        blend=blend,
        margin=margin,
        canonical=canonical,
        size_divisor=size_divisor,
        spacing=spacing,
        tta=None if tta is None else flips,
        uncertainty=uncertainty_path is not None,
    )
    result = _to_labels(prediction, threshold) if output == "labels" else prediction
    classes = max(2, prediction.shape[-1]) if output == "labels" else prediction.shape[-1]
    header = _output_header(volume.header, np.asarray(result), output, classes)
    written = save_nifti(result, out_path, like=dataclasses.replace(volume, header=header))
    if variance is not None:
        variance = variance.astype(np.float32)
        header = _output_header(volume.header, variance, "probabilities", variance.shape[-1])
        if header is not None:
            header.set_intent("estimate", (), name="variance")
            header["cal_min"], header["cal_max"] = 0.0, float(max(variance.max(), 0.0))
            header["descrip"] = b"keras-nii predict_nifti: variance across test-time flips"
        save_nifti(
            variance,
            uncertainty_path,
            like=dataclasses.replace(volume, header=header),
            dtype="float32",
        )
    return written
