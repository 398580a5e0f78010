"""Exported models run without TensorFlow: ONNX Runtime and the LiteRT interpreter.

:class:`OnnxModel` (a ``.onnx`` file, ONNX Runtime) and :class:`LiteRTModel`
(a ``.tflite`` file, the ``ai-edge-litert`` interpreter) are prediction
functions as :func:`keras_nii.inference.predict_volume` calls them: a
``(batch, x, y, z, c)`` float array in, the model's first output out, with
``input_shape`` (``None`` for a symbolic size) for the checks and the default
window size. :func:`keras_nii.inference.load_model` returns them for those
suffixes, so ``predict_nifti("model.onnx", ...)`` and ``keras-nii predict
model.onnx ...`` read, window, stitch and write exactly as with a Keras model.
This module imports neither Keras nor a deep-learning framework.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from keras_nii.export import DIVISOR_KEY, TensorSignature, read_litert_metadata

__all__ = ["OnnxModel", "LiteRTModel", "litert_interpreter"]

# ONNX Runtime's type names of the tensor element types
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(bool)": "bool",
}


def _check_file(path: str, suffix: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"model {path}: no such file")
    if not path.lower().endswith(suffix):
        raise ValueError(f"model {path}: expected a {suffix} file")


class OnnxModel:
    """An ``.onnx`` model run by ONNX Runtime, as a prediction function.

    Args:
        path: the ``.onnx`` file (``keras-nii export MODEL OUT.onnx``).
        providers: ONNX Runtime execution providers, in order of preference
            (default: every one this onnxruntime build has, e.g. CUDA first
            with ``onnxruntime-gpu``, then the CPU).
        threads: threads for one operator (default: ONNX Runtime's, the
            physical cores).

    Attributes:
        input_shape: the input's shape, ``None`` where it is symbolic.
        size_divisor: the multiple the spatial sizes must be, from the file's
            ``keras_nii.size_divisor`` metadata (written by
            :func:`keras_nii.export.export_model`), or ``None``.
        inputs, outputs: the :class:`~keras_nii.export.TensorSignature` of each.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ):
        path = os.fspath(path)
        _check_file(path, ".onnx")
        try:
            import onnxruntime
        except ImportError as err:
            raise ImportError(
                f"model {path}: running an ONNX model needs onnxruntime "
                "(pip install 'keras-nii[onnx]')"
            ) from err
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = onnxruntime.InferenceSession(
                path,
                options,
                providers=list(providers or onnxruntime.get_available_providers()),
            )
        except Exception as err:  # ONNX Runtime reports a damaged file in many ways
            raise ValueError(
                f"model {path}: ONNX Runtime cannot load it ({type(err).__name__}: {err})"
            ) from err
        self.path = path
        self.inputs = [self._signature(t) for t in self.session.get_inputs()]
        self.outputs = [self._signature(t) for t in self.session.get_outputs()]
        if len(self.inputs) != 1:
            raise ValueError(
                f"model {path}: predicting needs a model with one input, this one has "
                f"{len(self.inputs)} ({', '.join(t.name for t in self.inputs)})"
            )
        self.input_shape = self.inputs[0].shape
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.size_divisor = _divisor(metadata.get(DIVISOR_KEY), path)
        self._input = self.inputs[0]
        self._output = self.outputs[0].name

    @staticmethod
    def _signature(node: Any) -> TensorSignature:
        shape = None
        if node.shape is not None:
            shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in node.shape)
        return TensorSignature(node.name, shape, _ORT_TYPES.get(node.type, node.type))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=self._input.dtype)
        return self.session.run([self._output], {self._input.name: batch})[0]


def _divisor(value: str | bytes | None, path: Any) -> tuple[int, ...] | None:
    """A ``keras_nii.size_divisor`` metadata value ("4,4,4"), or ``None`` without one."""
    if not value:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    try:
        divisor = tuple(int(v) for v in text.split(","))
    except ValueError:
        divisor = ()
    if len(divisor) != 3 or min(divisor) < 1:
        raise ValueError(f"model {path}: bad {DIVISOR_KEY} metadata {text!r}")
    return divisor


def litert_interpreter(path: str | os.PathLike, threads: int | None = None) -> Any:
    """A LiteRT interpreter of a ``.tflite`` file (``ai-edge-litert``, else TensorFlow's)."""
    path = os.fspath(path)
    _check_file(path, ".tflite")
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tensorflow.lite import Interpreter
        except ImportError as err:
            raise ImportError(
                f"model {path}: running a LiteRT model needs ai-edge-litert "
                "(pip install 'keras-nii[litert]')"
            ) from err
    try:
        return Interpreter(model_path=path, num_threads=threads)
    except Exception as err:  # a damaged file
        raise ValueError(
            f"model {path}: LiteRT cannot load it ({type(err).__name__}: {err})"
        ) from err


class LiteRTModel:
    """A ``.tflite`` model run by the LiteRT interpreter, as a prediction function.

    The interpreter is resized to each new batch shape (its symbolic sizes
    are ``-1`` in the file).

    Args:
        path: the ``.tflite`` file (``keras-nii export MODEL OUT.tflite``).
        threads: interpreter threads (default: LiteRT's).

    Attributes:
        size_divisor: the multiple the spatial sizes must be, from the file's
            ``keras_nii.size_divisor`` metadata buffer (written by
            :func:`keras_nii.export.export_model` for a model that takes
            multiples only), or ``None``.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        self.path = os.fspath(path)
        self.interpreter = litert_interpreter(self.path, threads)
        inputs = self.interpreter.get_input_details()
        if len(inputs) != 1:
            raise ValueError(
                f"model {self.path}: predicting needs a model with one input, this one has "
                f"{len(inputs)}"
            )
        self._input = inputs[0]
        self._output = self.interpreter.get_output_details()[0]["index"]
        self.input_shape = tuple(None if s < 0 else int(s) for s in inputs[0]["shape_signature"])
        self.size_divisor = _divisor(read_litert_metadata(self.path).get(DIVISOR_KEY), self.path)
        self._shape: tuple | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=self._input["dtype"])
        if batch.shape != self._shape:
            self.interpreter.resize_tensor_input(self._input["index"], batch.shape)
            self.interpreter.allocate_tensors()
            self._shape = batch.shape
        self.interpreter.set_tensor(self._input["index"], batch)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self._output))
