"""XLA on CPUs: where it runs, a fusion barrier for it, and XLA where TF has none.

Keras trains without XLA on a TensorFlow machine without a GPU, where the
resampling layers run 6-8x slower as plain graph ops;
:func:`tensorflow_graph_on_cpu` says when a trace is such a graph, and
:func:`xla_compiled` compiles a layer's (or ``AugmentedModel``'s) work with
XLA there all the same.

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

import weakref
from collections.abc import Callable
from typing import Any

import keras

__all__ = [
    "tensorflow_xla_on_cpu",
    "tensorflow_graph_on_cpu",
    "jax_on_cpu",
    "materialize",
    "xla_compiled",
]

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def xla_compiled(owner: Any, method: str) -> Callable[..., Any]:
    """``owner.<method>`` under ``tf.function(jit_compile=True)``, made once per ``owner``.

    Kept in a weak table rather than on ``owner``: a ``tf.function`` set as an
    attribute of a Keras layer or model would be tracked, and saved with it.
    The function reaches ``owner`` through a weak reference, so the table
    does not keep it alive.
    """
    compiled = _COMPILED.get(owner)
    if compiled is None:
        import tensorflow as tf

        ref = weakref.ref(owner)

        def call(*args: Any) -> Any:
            return getattr(ref(), method)(*args)

        compiled = tf.function(call, jit_compile=True)
        _COMPILED[owner] = compiled
    return compiled


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
