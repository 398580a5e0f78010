"""Deployable artifacts from a Keras model: a SavedModel, an ONNX file, a LiteRT file.

:func:`export_model` writes a model (or a ``.keras`` file) in one of
:data:`FORMATS`, with its keras-nii preprocessing inside: the normalization
layers compute in the exported graph, the random layers are the identity
(they are traced with ``training=False``, so no random op is left), and the
spatial sizes stay symbolic, so one file serves any window size the network
accepts. It returns the artifact's :class:`Signature`, read back from the
file written.

- ``"savedmodel"``: ``model.export(path, format="tf_saved_model")``, a folder
  served by TensorFlow (``tf.saved_model.load``, TF Serving).
- ``"onnx"``: ``model.export(path, format="onnx")`` (tf2onnx under
  TensorFlow, ``torch.onnx`` under PyTorch, jax2onnx under JAX), a ``.onnx``
  file run by ONNX Runtime, without TensorFlow.
- ``"litert"``: ``model.export(path, format="litert")`` restricted to LiteRT's
  builtin ops (no TensorFlow "Flex" kernels, which the LiteRT runtime alone
  cannot run), a ``.tflite`` file run by the LiteRT interpreter
  (``ai-edge-litert``). TensorFlow backend only. LiteRT has no 3D pooling
  kernel: ``MaxPooling3D`` and ``AveragePooling3D`` layers whose strides equal
  their pool size (a U-Net's) are traced as the same maximum or mean of
  strided slices, which it has.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "Signature", "TensorSignature", "export_model", "read_signature"]

FORMATS = ("savedmodel", "onnx", "litert")

_SUFFIXES = {"onnx": ".onnx", "litert": ".tflite"}

#: the ONNX metadata key of the multiple that the input's spatial sizes must be
DIVISOR_KEY = "keras_nii.size_divisor"


@dataclass(frozen=True)
class TensorSignature:
    """One input or output of an artifact: ``None`` in ``shape`` is a symbolic size."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: str

    def __str__(self) -> str:
        shape = (
            "?"
            if self.shape is None
            else ", ".join("?" if s is None else str(s) for s in self.shape)
        )
        return f"{self.name}: {self.dtype} [{shape}]"


@dataclass(frozen=True)
class Signature:
    """What an exported artifact takes and returns."""

    format: str
    path: str
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]

    def lines(self) -> list[str]:
        """The signature as lines of text, for the ``keras-nii export`` command."""
        return [f"input  {tensor}" for tensor in self.inputs] + [
            f"output {tensor}" for tensor in self.outputs
        ]


def format_of(path: str | os.PathLike) -> str:
    """The format a path's suffix implies: ``.onnx``, ``.tflite``, else a SavedModel folder."""
    name = os.fspath(path).lower()
    for fmt, suffix in _SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    return "savedmodel"


def export_model(
    model: Any,
    path: str | os.PathLike,
    format: str | None = None,
    *,
    opset: int | None = None,
    overwrite: bool = False,
) -> Signature:
    """Export a Keras model, or a ``.keras`` file, as a deployable artifact.

    Args:
        model: a ``keras.Model``, or the path of a ``.keras`` file.
        path: where to write: a folder for ``"savedmodel"``, a ``.onnx`` file
            for ``"onnx"``, a ``.tflite`` file for ``"litert"``.
        format: one of :data:`FORMATS`; default from ``path``'s suffix.
        opset: the ONNX opset (default: the converter's).
        overwrite: replace an existing ``path`` (never the model's own file).

    Returns:
        The :class:`Signature` of the written artifact.

    Example:

    ```python
    signature = keras_nii.export.export_model("model.keras", "model.onnx")
    print("\\n".join(signature.lines()))
    ```
    """
    path = os.fspath(path)
    fmt = format_of(path) if format is None else format
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    suffix = _SUFFIXES.get(fmt)
    if suffix is not None and not path.lower().endswith(suffix):
        raise ValueError(f"the {fmt} format writes a {suffix} file, got path {path!r}")
    if suffix is None and (format_of(path) != "savedmodel" or path.lower().endswith(".keras")):
        raise ValueError(f"a SavedModel is a folder, not a file like {path!r}")
    if isinstance(model, (str, os.PathLike)):
        source = os.path.abspath(os.fspath(model))
        target = os.path.abspath(path)
        if source == target or source.startswith(target.rstrip(os.sep) + os.sep):
            raise ValueError(f"refusing to write {path}: it is or holds the model being exported")
        model = _load_keras(os.fspath(model))
    if os.path.exists(path):
        if not overwrite:
            raise ValueError(f"{path} already exists; pass overwrite=True to replace it")
        if fmt == "savedmodel" and not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise ValueError(f"refusing to replace {path}: it is not a SavedModel folder")
        if fmt != "savedmodel" and not os.path.isfile(path):
            raise ValueError(f"refusing to replace {path}: it is not a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path}: folder {folder} does not exist")

    import keras

    if not isinstance(model, keras.Model):
        raise ValueError(
            f"model must be a keras.Model or a .keras file, got {type(model).__name__}"
        )
    if fmt == "savedmodel":
        if os.path.isdir(path):
            import shutil

            shutil.rmtree(path)
        model.export(path, format="tf_saved_model", verbose=False)
    elif fmt == "onnx":
        _export_onnx(model, path, opset)
    else:
        _export_litert(model, path)
    return read_signature(path, fmt)


def _load_keras(path: str) -> Any:
    if not path.endswith(".keras"):
        raise ValueError(f"model {path}: expected a .keras file")
    if not os.path.isfile(path):
        raise ValueError(f"model {path}: no such file")
    from keras_nii.inference import load_model

    return load_model(path)


def _export_onnx(model: Any, path: str, opset: int | None) -> None:
    tmp = path + ".partial"
    try:
        model.export(
            tmp,
            format="onnx",
            opset_version=opset,
            input_signature=_input_signature(model),
            verbose=False,
        )
        names = getattr(model, "output_names", None) or [t.name for t in model.outputs]
        _finish_onnx(tmp, list(names), model)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _finish_onnx(path: str, names: list[str], keras_model: Any) -> None:
    """Name the graph's outputs as the Keras model's (tf2onnx's are 'Identity:0'), and
    record the model's size divisor in the metadata (``keras_nii.size_divisor``)."""
    import onnx

    model = onnx.load(path)
    graph = model.graph
    taken = {v for node in graph.node for v in (*node.input, *node.output)}
    taken |= {t.name for t in (*graph.input, *graph.initializer)}
    if len(names) == len(graph.output) and len(set(names)) == len(names) and not taken & set(names):
        renamed = {out.name: new for out, new in zip(graph.output, names, strict=True)}
        # an output that is an input as it is (a model of random layers only, from
        # jax2onnx) has no node to rename: it gets an Identity under the new name
        sources = {t.name for t in (*graph.input, *graph.initializer)}
        for out in graph.output:
            if out.name in sources:
                graph.node.append(
                    onnx.helper.make_node("Identity", [out.name], [renamed[out.name]])
                )
                out.name = renamed.pop(out.name)
        for node in graph.node:
            for i, value in enumerate(node.output):
                node.output[i] = renamed.get(value, value)
            for i, value in enumerate(node.input):
                node.input[i] = renamed.get(value, value)
        for out in graph.output:
            out.name = renamed.get(out.name, out.name)
    divisor = size_divisor_of(keras_model)
    if divisor is not None:
        onnx.helper.set_model_props(
            model,
            {
                **{p.key: p.value for p in model.metadata_props},
                DIVISOR_KEY: ",".join(str(d) for d in divisor),
            },
        )
    onnx.save(model, path)


def _input_signature(model: Any) -> list:
    """The model's inputs as specs, ``None`` sizes kept (a loaded model was never called)."""
    import keras

    specs = [
        keras.InputSpec(shape=tuple(t.shape), dtype=t.dtype, name=t.name) for t in model.inputs
    ]
    return specs if len(specs) == 1 else [specs]


def _export_litert(model: Any, path: str) -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "the LiteRT export needs the TensorFlow backend (KERAS_BACKEND=tensorflow); "
            f"this process runs {keras.backend.backend()}"
        )
    import tensorflow as tf

    traced = _with_builtin_pooling(model)
    try:
        traced.export(
            path,
            format="litert",
            input_signature=_input_signature(traced),
            verbose=False,
            target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]},
        )
    except Exception as err:  # the converter's ConverterError lists the ops it could not map
        missing = re.search(r"TF Select ops: ([^\n]*)", str(err))
        what = f"TensorFlow ops {missing.group(1)}" if missing else f"{type(err).__name__}: {err}"
        raise ValueError(
            f"cannot convert the model to LiteRT with builtin ops only: {what}"[:1000]
        ) from err
    divisor = size_divisor_of(model)
    if divisor is not None:
        _add_litert_metadata(path, DIVISOR_KEY, ",".join(str(d) for d in divisor))


def size_divisor_of(model: Any) -> tuple[int, int, int] | None:
    """The size divisor an artifact should record: ``None`` when any size is taken."""
    from keras_nii.inference import size_divisor

    divisor = size_divisor(model)
    return None if divisor is None or divisor == (1, 1, 1) else divisor


def litert_schema() -> Any:
    """The LiteRT flatbuffer schema's Python module (``ai-edge-litert``'s, else TensorFlow's)."""
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        from tensorflow.lite.python import schema_py_generated
    return schema_py_generated


def _add_litert_metadata(path: str, name: str, value: str) -> None:
    """Add a named metadata entry (a buffer of UTF-8 bytes) to a ``.tflite`` file, in place.

    The flatbuffer ``Model`` has a list of named metadata buffers for this
    (LiteRT's own ``min_runtime_version`` is one); the interpreter ignores
    the others. The file is rewritten through a temporary and a rename.
    """
    import flatbuffers
    import numpy as np

    schema = litert_schema()
    with open(path, "rb") as file:
        model = schema.ModelT.InitFromPackedBuf(bytearray(file.read()), 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(value.encode("utf-8"), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    tmp = path + ".partial"
    with open(tmp, "wb") as file:
        file.write(builder.Output())
    os.replace(tmp, path)


def read_litert_metadata(path: str) -> dict[str, bytes]:
    """The named metadata buffers of a ``.tflite`` file (without TensorFlow)."""
    schema = litert_schema()
    with open(path, "rb") as file:
        data = bytearray(file.read())
    model = schema.Model.GetRootAs(data, 0)
    out = {}
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        buffer = model.Buffers(entry.Buffer())
        out[entry.Name().decode("utf-8")] = (
            bytes(buffer.DataAsNumpy()) if buffer.DataLength() else b""
        )
    return out


def _layers_of(model: Any) -> list:
    """Every layer of a model, those of nested models included."""
    import keras

    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(_layers_of(layer))
    return found


def _with_builtin_pooling(model: Any) -> Any:
    """``model``, or a clone sharing its layers with 3D pooling done by strided slices."""
    import keras

    pooling = (keras.layers.MaxPooling3D, keras.layers.AveragePooling3D)

    def replaceable(layer: Any) -> bool:
        return (
            isinstance(layer, pooling)
            and tuple(layer.pool_size) == tuple(layer.strides)
            and layer.padding == "valid"
        )

    if not any(replaceable(layer) for layer in _layers_of(model)):
        return model
    if not isinstance(model, (keras.Sequential, keras.Model)) or not hasattr(model, "inputs"):
        return model
    return keras.models.clone_model(
        model,
        clone_function=lambda layer: _sliced_pooling(layer) if replaceable(layer) else layer,
        recursive=True,
    )


@functools.cache
def _sliced_pooling_class() -> type:
    import keras

    class SlicedPooling3D(keras.layers.Layer):
        """``MaxPooling3D`` / ``AveragePooling3D`` (strides = pool size, valid padding)
        as the maximum or mean of strided slices: the same values, in LiteRT builtins."""

        def __init__(self, pooling: Any):
            super().__init__(name=pooling.name)
            self.pool = tuple(int(p) for p in pooling.pool_size)
            self.average = isinstance(pooling, keras.layers.AveragePooling3D)
            first = pooling.data_format == "channels_first"
            self.axes = (2, 3, 4) if first else (1, 2, 3)

        def call(self, x: Any) -> Any:
            import tensorflow as tf

            for axis, k in zip(self.axes, self.pool, strict=True):
                if k == 1:
                    continue
                n = tf.shape(x)[axis]
                stop = (n // k) * k
                parts = []
                for offset in range(k):
                    index = [slice(None)] * 5
                    index[axis] = slice(offset, stop, k)
                    parts.append(x[tuple(index)])
                x = parts[0]
                for part in parts[1:]:
                    x = x + part if self.average else tf.maximum(x, part)
                if self.average:
                    x = x / float(k)
            return x

        def compute_output_shape(self, shape: Sequence) -> tuple:
            shape = list(shape)
            for axis, k in zip(self.axes, self.pool, strict=True):
                shape[axis] = None if shape[axis] is None else shape[axis] // k
            return tuple(shape)

    return SlicedPooling3D


def _sliced_pooling(pooling: Any) -> Any:
    return _sliced_pooling_class()(pooling)


# --------------------------------------------------------------------------- #
# signatures, read back from the artifact


def read_signature(path: str | os.PathLike, format: str | None = None) -> Signature:
    """The inputs and outputs of an exported artifact, as its runtime sees them."""
    path = os.fspath(path)
    fmt = format_of(path) if format is None else format
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or folder")
    if fmt == "onnx":
        inputs, outputs = _onnx_signature(path)
    elif fmt == "litert":
        inputs, outputs = _litert_signature(path)
    elif fmt == "savedmodel":
        inputs, outputs = _saved_model_signature(path)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return Signature(fmt, str(Path(path)), tuple(inputs), tuple(outputs))


def _onnx_signature(path: str) -> tuple[list, list]:
    from keras_nii.serving import OnnxModel

    model = OnnxModel(path)
    return model.inputs, model.outputs


def _litert_signature(path: str) -> tuple[list, list]:
    from keras_nii.serving import litert_interpreter

    interpreter = litert_interpreter(path)

    def tensors(details: list) -> list:
        out = []
        for d in details:
            shape = tuple(None if s < 0 else int(s) for s in d["shape_signature"])
            out.append(TensorSignature(d["name"], shape, _numpy_name(d["dtype"])))
        return out

    return tensors(interpreter.get_input_details()), tensors(interpreter.get_output_details())


def _saved_model_signature(path: str) -> tuple[list, list]:
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise ValueError(f"{path}: the SavedModel has no 'serving_default' signature")
    _, kwargs = signature.structured_input_signature

    def tensor(name: str, spec: Any) -> TensorSignature:
        shape = None if spec.shape.rank is None else tuple(spec.shape.as_list())
        return TensorSignature(name, shape, spec.dtype.name)

    inputs = [tensor(name, spec) for name, spec in kwargs.items()]
    outputs = [tensor(name, spec) for name, spec in signature.structured_outputs.items()]
    return inputs, outputs


def _numpy_name(dtype: Any) -> str:
    import numpy as np

    return np.dtype(dtype).name
