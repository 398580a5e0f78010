"""XLA on CPUs: where it runs, a fusion barrier for it, and XLA where TF has none.

Keras trains without XLA on a TensorFlow machine without a GPU, where the
resampling layers run 6-8x slower as plain graph ops;
:func:`tensorflow_graph_on_cpu` says when a trace is such a graph, and
:func:`call_compiled` compiles a layer's (or ``AugmentedModel``'s) work with
XLA there all the same, one program per input shape, at most
:func:`table_size` programs in a process (TensorFlow never frees one).

Two of XLA's CPU code-generation habits cost keras-nii's layers several times
their time, and neither shows on the ops themselves:

- reductions run on one thread (see :mod:`keras_nii.ops.reduce`);
- an elementwise producer (a flip's per-sample selects, a noise draw) is
  fused into the gathers that read it, so the resampler, which reads its
  input at 8 places per output voxel, recomputes the producer 8 times at
  scattered places: a flip before a random affine took 60 ms per 128^3
  volume instead of 17 (TensorFlow), 75 instead of 22 (JAX).
  :func:`materialize` makes XLA write such an input to memory first.

Both remedies are applied only where they were measured to pay: XLA compiling
for the CPU, under TensorFlow (``jit_compile=True``) or JAX. Without XLA
nothing is fused, and no GPU was at hand to measure them on.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import keras

__all__ = [
    "tensorflow_xla_on_cpu",
    "tensorflow_graph_on_cpu",
    "jax_on_cpu",
    "materialize",
    "call_compiled",
    "compiled_programs",
    "is_compiled",
    "set_table_size",
    "table_size",
    "DEFAULT_TABLE_SIZE",
    "TABLE_SIZE_VARIABLE",
]


def _tensorflow_for_cpu() -> bool:
    """The backend is TensorFlow and it sees no GPU (where ops would be placed)."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return not tf.config.list_logical_devices("GPU")


def _in_xla_trace() -> bool:
    """Whether the TensorFlow graph being traced is for XLA.

    TensorFlow has no public way to ask; ``control_flow_util`` is where its
    own ``tf.function`` records it.
    """
    import tensorflow as tf

    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TensorFlow that moved it
        return True
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def tensorflow_xla_on_cpu() -> bool:
    """Whether this trace is being compiled by XLA under TensorFlow, for a CPU.

    Without a GPU, XLA compiles for the CPU; with one, the ops would be placed
    there.
    """
    return _tensorflow_for_cpu() and _in_xla_trace()


def tensorflow_graph_on_cpu() -> bool:
    """Whether this is a TensorFlow graph being traced for a CPU, without XLA.

    That is where Keras's ``fit`` runs on a machine without a GPU (its
    ``jit_compile="auto"``), and where ``tf.data`` runs its ``map``
    functions. Not under a ``tf.distribute`` strategy (Keras leaves XLA out
    there), and not eagerly.
    """
    if not _tensorflow_for_cpu():
        return False
    import tensorflow as tf

    if tf.executing_eagerly() or tf.distribute.has_strategy():
        return False
    return not _in_xla_trace()


# ----------------------------------------------------------------------------
# the compile table


#: how many XLA programs keras-nii compiles in one process, unless told otherwise
DEFAULT_TABLE_SIZE = 8
#: the environment variable that sets it (an integer >= 0; 0 turns compiling off)
TABLE_SIZE_VARIABLE = "KERAS_NII_XLA_TABLE_SIZE"


class _CompileTable:
    """The XLA programs keras-nii compiled, one per owner, method and input signature.

    TensorFlow keeps every XLA program it compiles until the process ends (its
    compilation cache has no eviction, and nothing in its API empties it):
    about 20 MB for a random affine's. Evicting an entry to compile another
    would not give that memory back, so the table is bounded by what it lets
    in: ``size`` programs in a process. A signature that finds the table full
    runs as plain graph ops (the same result, several times slower), and a
    warning says so once. An entry whose owner is garbage collected is
    released (its ``tf.function`` and graphs); the program TensorFlow compiled
    for it, and so its place in the count, stay.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, Any] = {}
        self.spent = 0
        self.size: int | None = None
        self.warned = False

    def limit(self) -> int:
        if self.size is None:
            raw = os.environ.get(TABLE_SIZE_VARIABLE, "").strip()
            if raw:
                try:
                    self.size = _check_size(TABLE_SIZE_VARIABLE, int(raw))
                except ValueError:
                    raise ValueError(
                        f"{TABLE_SIZE_VARIABLE} must be an integer >= 0, got {raw!r}"
                    ) from None
            else:
                self.size = DEFAULT_TABLE_SIZE
        return self.size

    def lookup(self, owner: Any, method: str, signature: tuple) -> Any:
        key = (id(owner), method, signature)
        compiled = self.entries.get(key)
        if compiled is not None or self.spent >= self.limit():
            if compiled is None and not self.warned:
                self.warned = True
                message = _FULL.format(size=self.limit(), variable=TABLE_SIZE_VARIABLE)
                warnings.warn(message, RuntimeWarning, stacklevel=4)
            return compiled
        import tensorflow as tf

        ref = weakref.ref(owner)

        def call(*args: Any) -> Any:
            return getattr(ref(), method)(*args)

        compiled = tf.function(call, jit_compile=True, reduce_retracing=False)
        self.entries[key] = compiled
        self.spent += 1
        weakref.finalize(owner, self.entries.pop, key, None)
        return compiled


_FULL = (
    "keras-nii has compiled its {size} XLA programs for this process (one per layer and "
    "input shape; TensorFlow keeps each until the process ends), so this layer runs as "
    "plain TensorFlow graph ops for this shape: the same result, several times slower. "
    "Feed the layers a few fixed shapes (patches, CenterCropOrPad3D, or batches bucketed "
    "by size), or raise the bound with {variable} or "
    "keras_nii.ops.xla.set_table_size()."
)

_TABLE = _CompileTable()


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def table_size() -> int:
    """How many XLA programs keras-nii's layers may compile in this process.

    :data:`DEFAULT_TABLE_SIZE` (8) unless :data:`TABLE_SIZE_VARIABLE` or
    :func:`set_table_size` says otherwise.
    """
    return _TABLE.limit()


def set_table_size(size: int) -> None:
    """Set how many XLA programs keras-nii's layers may compile in this process.

    Programs already compiled count; 0 compiles nothing more. Each costs memory
    until the process ends (see :func:`call_compiled`).
    """
    _TABLE.size = _check_size("size", size)
    _TABLE.warned = False


def compiled_programs() -> int:
    """How many XLA programs keras-nii's layers have compiled in this process."""
    return _TABLE.spent


def is_compiled(owner: Any) -> bool:
    """Whether ``owner`` holds an entry in the compile table."""
    return any(key[0] == id(owner) for key in _TABLE.entries)


def _signature(args: Any) -> str | None:
    """The structure, static shapes and dtypes of ``args``, as a key.

    None when a size past the batch axis is unknown: XLA would then compile one
    program per size it meets at run time, beyond any count.
    """
    import tensorflow as tf

    dynamic = False

    def describe(leaf: Any) -> Any:
        nonlocal dynamic
        if leaf is None or not hasattr(leaf, "shape"):
            return leaf  # a Python value: part of the trace, as tf.function keys it
        shape = tf.TensorShape(leaf.shape)
        if shape.rank is None or None in shape.as_list()[1:]:
            dynamic = True
            return None
        return (tuple(shape.as_list()), tf.as_dtype(leaf.dtype).name)

    described = tf.nest.map_structure(describe, args)
    return None if dynamic else repr(described)


def call_compiled(owner: Any, method: str, *args: Any) -> Any:
    """``owner.<method>(*args)``, compiled with XLA when the compile table has room.

    For a TensorFlow graph traced for a CPU without XLA (see
    :func:`tensorflow_graph_on_cpu`). Each (owner, method, input signature)
    compiles one XLA program, kept in the table (:class:`_CompileTable`) and
    reused whenever that signature comes again. The table holds at most
    :func:`table_size` programs per process: TensorFlow frees none it has
    compiled, and a layer fed many native sizes (every scan of a folder at
    its own shape) would otherwise grow the process by some 20 MB a shape.
    Past the bound, and for inputs whose sizes are not static past the batch
    axis (a ``tf.data`` map over scans of many sizes), the call runs as plain
    graph ops: the same result, slower. The remedy is to give the layers a
    few fixed shapes: patches (``NiftiDataset(patch_size=...)``), a
    ``CenterCropOrPad3D`` in front, or batches bucketed by size.

    Kept in a table rather than on ``owner``: a ``tf.function`` set as an
    attribute of a Keras layer or model would be tracked, and saved with it.
    The function reaches ``owner`` through a weak reference, so the table does
    not keep it alive.
    """
    signature = _signature(args)
    compiled = None if signature is None else _TABLE.lookup(owner, method, signature)
    if compiled is None:
        return getattr(owner, method)(*args)
    return compiled(*args)


def jax_on_cpu() -> bool:
    """Whether the backend is JAX and its default device a CPU."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


def materialize(tensor: Any, runtime_flag: Callable[[], Any]) -> Any:
    """``tensor`` unchanged, but computed into its own buffer under XLA on CPU.

    XLA does not fuse across a conditional, so ``tensor`` passes through one
    whose two branches both return it. ``runtime_flag()`` gives its predicate
    (called only then): a scalar boolean known only at run time (XLA inlines
    a conditional with a constant predicate, and the barrier with it: slower,
    never wrong). Elsewhere ``tensor`` is returned as is.
    """
    if tensorflow_xla_on_cpu():
        import tensorflow as tf

        return tf.cond(runtime_flag(), lambda: tf.identity(tensor), lambda: tf.identity(tensor))
    if jax_on_cpu():
        import jax
        import jax.numpy as jnp

        # JAX merges two identical branches (and the barrier with them): the
        # second multiplies by one, exactly the identity for every dtype
        return jax.lax.cond(
            runtime_flag(), lambda t: t, lambda t: t * jnp.ones((), t.dtype), tensor
        )
    return tensor
