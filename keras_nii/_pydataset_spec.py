"""Tell Keras's ``tf.data`` pipeline which sizes of a :class:`~keras_nii.NiftiDataset` vary.

Under TensorFlow, Keras turns a ``keras.utils.PyDataset`` into a ``tf.data``
pipeline whose element signature it infers from the dataset's first two
batches only (``NUM_BATCHES_FOR_TENSOR_SPEC``): a dimension those two share
is taken as fixed, and a later volume of another size then stops ``fit``
with "`generator` yielded an element of shape ... where an element of shape
... was expected". Scans are like that: a CT dataset all 512 x 512 in plane
but one, or two first volumes of the same depth.

A ``NiftiDataset`` knows better, from its headers (``_sizes_vary``).
:func:`install` wraps the adapter's ``get_tf_dataset`` so that, once Keras
has read its two batches, the spatial sizes of a dataset that varies become
unknown (``None``) in the signature. Only datasets with a ``_sizes_vary``
method are touched, only under the TensorFlow backend, and a Keras without
this adapter (another version's layout) keeps its own behaviour.
"""

from __future__ import annotations

from typing import Any

__all__ = ["install", "relax"]


def relax(signature: Any) -> Any:
    """``signature`` with the spatial sizes of each 5D tensor unknown."""
    import tensorflow as tf

    def unknown_sizes(spec: Any) -> Any:
        if isinstance(spec, tf.TensorSpec) and spec.shape.rank == 5:
            shape = [spec.shape[0], None, None, None, spec.shape[4]]
            return tf.TensorSpec(shape, spec.dtype, spec.name)
        return spec

    return tf.nest.map_structure(unknown_sizes, signature)


def install() -> None:
    """Wrap ``PyDatasetAdapter.get_tf_dataset`` (once; TensorFlow backend only)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    try:
        from keras.src.trainers.data_adapters import py_dataset_adapter
    except ImportError:  # pragma: no cover - another Keras layout: its own behaviour
        return
    adapter = getattr(py_dataset_adapter, "PyDatasetAdapter", None)
    original = getattr(adapter, "get_tf_dataset", None)
    if original is None or getattr(original, "_keras_nii", False):
        return

    def get_tf_dataset(self: Any) -> Any:
        varies = getattr(getattr(self, "py_dataset", None), "_sizes_vary", None)
        if varies is None or getattr(self, "_output_signature", "unknown") is not None:
            return original(self)
        original(self)  # Keras reads its first batches and sets the signature
        if varies():
            self._output_signature = relax(self._output_signature)
        return original(self)

    get_tf_dataset._keras_nii = True
    adapter.get_tf_dataset = get_tf_dataset
