"""The feed of a :class:`keras_nii.NiftiDataset` as a Grain ``DataLoader``.

`Grain <https://github.com/google/grain>`_ is JAX's data loader: its worker
*processes* decode and batch (free of the GIL), its sampler shards by JAX
process and shuffles from a seed, and its iterators are checkpointable.
:meth:`keras_nii.NiftiDataset.as_grain` builds one over the same files, with
the same per-subject samples (crop / pad, modalities as channels, label
maps) as the PyDataset, and ``model.fit`` takes it directly (Keras has a
Grain adapter). Needs the optional extra ``pip install "keras-nii[grain]"``.
"""

from __future__ import annotations

import copy
import numbers
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from keras_nii.data import NiftiDataset

__all__ = ["NiftiSource", "PatchBatchSource", "grain_loader"]


def _grain() -> Any:
    try:
        import grain
    except ImportError as err:
        raise ImportError(
            'NiftiDataset.as_grain needs Grain: pip install "keras-nii[grain]"'
        ) from err
    return grain


class NiftiSource:
    """A Grain random-access data source: record ``i`` is subject ``i``'s sample.

    A sample is what one row of a :class:`~keras_nii.NiftiDataset` batch holds:
    ``x`` of shape ``(x, y, z, c)`` float32, or ``(x, y)`` with the label map
    ``(x, y, z, 1)`` int32 or the subject's target. Picklable, so Grain's
    worker processes each read their own records.
    """

    def __init__(self, dataset: NiftiDataset) -> None:
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset.images)

    def __getitem__(self, record_key: int) -> Any:
        batch = self._dataset._batch(np.array([int(record_key)]))
        if isinstance(batch, tuple):
            return tuple(part[0] for part in batch)
        return batch[0]

    def __repr__(self) -> str:
        return f"NiftiSource({len(self)} subjects)"


class PatchBatchSource:
    """A Grain data source of a patch dataset's batches: record ``e * n + b`` is
    batch ``b`` of epoch ``e``'s patch stream (see :mod:`keras_nii.patches`).

    A patch stream mixes the patches of several subjects in every batch (the
    queue), so its records are whole batches, in stream order: the stream of
    epoch ``e`` is the one the PyDataset gives in its epoch ``e`` (the same
    subject order, drawn from the seed as the PyDataset draws it, and the
    same patches), so Grain's loader yields exactly the PyDataset's batches.
    """

    def __init__(self, dataset: NiftiDataset, num_epochs: int) -> None:
        self._dataset = dataset
        self._per_epoch = len(dataset)
        self._epochs = int(num_epochs)
        self._views: dict[int, Any] = {}

    def __len__(self) -> int:
        return self._per_epoch * self._epochs

    def _view(self, epoch: int) -> Any:
        """The dataset as it stands in ``epoch``: its subject order of that epoch."""
        view = self._views.get(epoch)
        if view is None:
            ds = self._dataset
            view = copy.copy(ds)
            n = len(ds.images)
            if ds.shuffle:
                rng = np.random.default_rng(ds.seed)
                for _ in range(epoch + 1):  # one at start, one after each epoch
                    order = rng.permutation(n)
                view._global_order = order
            else:
                view._global_order = np.arange(n)
            self._views = {epoch: view}
        return view

    def __getitem__(self, record_key: int) -> Any:
        epoch, position = divmod(int(record_key), self._per_epoch)
        view = self._view(epoch)
        return view.patches.batch_at(view, position, epoch=epoch)

    def __repr__(self) -> str:
        return f"PatchBatchSource({self._epochs} epoch(s) of {self._per_epoch} batches)"


def _patch_loader(dataset: NiftiDataset, grain: Any, num_epochs: Any, **options: Any) -> Any:
    if num_epochs is None:
        raise ValueError("num_epochs must be a number of epochs for a patch dataset, got None")
    if dataset.shuffle and dataset.seed is None:
        raise ValueError("as_grain of a shuffled patch dataset needs a seed= to draw its epochs")
    # the dataset shards its subjects itself (its order is this process's share)
    sampler = grain.samplers.IndexSampler(
        num_records=len(dataset) * int(num_epochs),
        shard_options=grain.sharding.NoSharding(),
        shuffle=False,
        num_epochs=1,
        seed=0,
    )
    return grain.DataLoader(
        data_source=PatchBatchSource(dataset, int(num_epochs)), sampler=sampler, **options
    )


def grain_loader(
    dataset: NiftiDataset,
    *,
    num_epochs: int | None = 1,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
    drop_remainder: bool = False,
) -> Any:
    """A ``grain.DataLoader`` of ``dataset``'s batches (see ``NiftiDataset.as_grain``)."""
    for name, value, least in (
        ("worker_count", worker_count, 0),
        ("worker_buffer_size", worker_buffer_size, 1),
        ("num_epochs", 1 if num_epochs is None else num_epochs, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    grain = _grain()
    if worker_count:
        # Grain's worker pool reads absl flags, which only absl.app.run parses:
        # in any other program (a notebook, a plain script) take their defaults
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    if dataset.patches is not None:
        return _patch_loader(
            dataset,
            grain,
            num_epochs,
            worker_count=worker_count,
            worker_buffer_size=worker_buffer_size,
        )
    shard = dataset.process_shard
    if shard is None:
        shard_options = grain.sharding.NoSharding()
    elif dataset.shard == "auto":
        # equal shares in every process: uneven step counts deadlock collectives
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    else:
        shard_options = grain.sharding.ShardOptions(
            shard_index=shard[0], shard_count=shard[1], drop_remainder=True
        )
    sampler = grain.samplers.IndexSampler(
        num_records=len(dataset.images),
        shard_options=shard_options,
        shuffle=dataset.shuffle,
        num_epochs=num_epochs,
        seed=0 if dataset.seed is None else int(dataset.seed),
    )
    return grain.DataLoader(
        data_source=NiftiSource(dataset),
        sampler=sampler,
        operations=[
            grain.transforms.Batch(dataset.batch_size, drop_remainder=bool(drop_remainder))
        ],
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
    )
