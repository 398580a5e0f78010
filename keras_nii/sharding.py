"""Split an epoch's subjects between the processes of a multi-process job.

Keras refuses inputs other than ``tf.data`` under its multi-process
auto-sharding, so :class:`keras_nii.NiftiDataset` shards itself: every
process draws the same global permutation of the subjects from the seed, and
takes every ``count``-th subject of it, starting at its own ``index``. The
permutation is first padded, by repeating its first subjects, to a multiple
of ``count``, so that every process gets as many subjects -- and hence runs
as many steps -- as every other: an uneven step count deadlocks the
collectives of data-parallel training.

This module imports neither Keras nor a backend at import time.
"""

from __future__ import annotations

import numbers
import sys
from typing import Any

import numpy as np

__all__ = ["Shard", "check_shard", "detect_shard", "share"]

#: ``(index, count)``: this process takes share ``index`` of ``count``.
Shard = tuple[int, int]


def check_shard(value: Any) -> Shard | str | None:
    """Validate a ``shard=`` argument: ``"auto"``, ``None`` or ``(index, count)``."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"shard must be 'auto', None or (index, count), got {value!r}")
    index, count = value
    for name, number in (("index", index), ("count", count)):
        if isinstance(number, bool) or not isinstance(number, numbers.Integral):
            raise ValueError(f"shard {name} must be an integer, got {number!r} in shard={value!r}")
    index, count = int(index), int(count)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {value!r}")
    return index, count


def detect_shard() -> Shard | None:
    """This process's share under a multi-process ``keras.distribution`` job.

    ``(jax.process_index(), jax.process_count())`` when the JAX backend runs
    with a distribution set (``keras.distribution.set_distribution``) and more
    than one process; otherwise ``None`` (one process reads everything). Keras
    and JAX are only looked at when they are already imported.
    """
    keras = sys.modules.get("keras")
    if keras is None or "jax" not in sys.modules:
        return None
    try:
        if keras.config.backend() != "jax" or keras.distribution.distribution() is None:
            return None
    except AttributeError:  # a Keras without the distribution API
        return None
    import jax

    count = jax.process_count()
    return (jax.process_index(), count) if count > 1 else None


def share(order: np.ndarray, shard: Shard | None) -> np.ndarray:
    """The subjects of ``order`` (one epoch, all processes) that ``shard`` reads.

    Shares are disjoint but for the padding, cover every subject, and have
    the same length ``ceil(len(order) / count)`` in every process.
    """
    order = np.asarray(order)
    if shard is None or shard[1] == 1:
        return order
    index, count = shard
    if len(order) == 0:
        return order
    per_process = -(-len(order) // count)
    padded = np.resize(order, per_process * count)  # repeats the first subjects
    return padded[index::count]
