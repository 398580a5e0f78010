"""``feed``: one epoch over the same files through the PyDataset (worker processes, as
``fit`` runs it) and through its Grain loader (``NiftiDataset.as_grain``, worker
processes).

Both read ``FEED_FILES`` phantoms of ``size**3`` (``.nii.gz``) without a cache,
in batches of ``--batch``. The PyDataset epoch is driven by Keras's own
``PyDatasetAdapter`` (what ``model.fit`` wraps a PyDataset in), with
``workers=2, use_multiprocessing=True``: its worker pool starts at each
epoch's begin and stops at its end, as in ``fit``. The Grain loader keeps one
iterator (``num_epochs=None``) with 2 workers, as ``fit(...,
steps_per_epoch=...)`` does; its first call includes starting the workers
(spawned processes that import keras-nii), reported as ``first ms``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from keras_nii.bench.core import Context, Unavailable, keras_nii_attr, operation

FEED_FILES = 8  # volumes in the ``feed`` dataset
FEED_WORKERS = 2


@operation("feed", order=75)
def bench_feed(ctx: Context) -> None:
    from keras_nii.phantoms import make_dataset

    with tempfile.TemporaryDirectory(prefix="keras-nii-bench-") as tmp:
        ctx.log(f"feed      writing {FEED_FILES} phantoms of {ctx.size}^3 to {tmp}")
        pairs = make_dataset(Path(tmp) / "data", FEED_FILES, shape=(ctx.size,) * 3, seed=1)
        images = [str(image) for image, _ in pairs]
        labels = [str(label) for _, label in pairs]
        n = len(images)

        def dataset(**kwargs: Any) -> Any:
            cls = keras_nii_attr("data", "NiftiDataset")
            return cls(images, labels, batch_size=ctx.batch, shuffle=True, seed=0, **kwargs)

        def count(batches: Any) -> int:
            seen = sum(int(np.asarray(x).shape[0]) for x, _ in batches)
            if seen != n:
                raise RuntimeError(f"one epoch gave {seen} volumes, expected {n}")
            return seen

        def pydataset() -> Callable[[], Any]:
            from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

            adapter = PyDatasetAdapter(
                dataset(workers=FEED_WORKERS, use_multiprocessing=True), shuffle=False
            )

            def epoch() -> int:
                adapter.on_epoch_begin()
                try:
                    return count(adapter.get_numpy_iterator())
                finally:
                    adapter.on_epoch_end()

            return epoch

        ctx.add(
            "feed",
            "epoch",
            "keras-nii",
            "PyDataset",
            str(FEED_WORKERS),
            pydataset,
            volumes=n,
            reference=True,
            note=f"{n} .nii.gz, batch {ctx.batch}, {FEED_WORKERS} worker processes",
        )

        def grain() -> Callable[[], Any]:
            try:
                import grain  # noqa: F401
            except ImportError as err:
                raise Unavailable("missing", 'pip install "keras-nii[grain]"') from err
            ds = dataset()
            iterator = iter(ds.as_grain(num_epochs=None, worker_count=FEED_WORKERS))
            steps = len(ds)

            def epoch() -> int:
                return count(next(iterator) for _ in range(steps))

            return epoch

        ctx.add(
            "feed",
            "epoch",
            "keras-nii",
            "Grain DataLoader",
            str(FEED_WORKERS),
            grain,
            volumes=n,
            note=f"as_grain(worker_count={FEED_WORKERS}); first call starts the workers",
        )
