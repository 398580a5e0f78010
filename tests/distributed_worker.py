"""One process of the two-process data-parallel run of tests/test_distributed.py.

Usage: ``python distributed_worker.py MODE PROCESS_ID NUM_PROCESSES PORT DATA_DIR OUT_DIR``

``MODE`` is ``augmented`` (AugmentedModel + unet3d with a random flip) or
``plain`` (the same unet3d without augmentation). ``PROCESS_ID`` -1 is the
single-process reference: it trains on the global batches that the two
processes of a ``plain`` run feed together (process 0's batch then process
1's, per step), starting from the initial weights that run saved.

Every process writes ``OUT_DIR/MODE-PROCESS_ID.npz``: the subjects its
feed returned per epoch, the initial and final weights, and (augmented) the
augmented images of the first batch drawn through ``AugmentedModel.augment``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402

MODE, PID, COUNT, PORT, DATA, OUT = sys.argv[1:7]
PID, COUNT = int(PID), int(COUNT)
if PID >= 0:
    # the launch the README documents: Keras's variables, gloo for CPU collectives
    os.environ["KERAS_DISTRIBUTION_JOB_ADDRESSES"] = f"127.0.0.1:{PORT}"
    os.environ["KERAS_DISTRIBUTION_NUM_PROCESSES"] = str(COUNT)
    os.environ["KERAS_DISTRIBUTION_PROCESS_ID"] = str(PID)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

import keras  # noqa: E402

if PID >= 0:
    keras.distribution.initialize()
import numpy as np  # noqa: E402

import keras_nii  # noqa: E402
from keras_nii.layers import RandomFlip3D  # noqa: E402
from keras_nii.models import unet3d  # noqa: E402

EPOCHS = 2
BATCH = 2  # per process
SHAPE = (16, 16, 16)
images = sorted(str(p) for p in (__import__("pathlib").Path(DATA) / "images").glob("*.nii.gz"))
labels = [p.replace("/images/", "/labels/") for p in images]


class Recording(keras_nii.NiftiDataset):
    """A NiftiDataset that records which subjects each batch held, per epoch
    (an epoch starts at the callback's ``on_epoch_begin``: the first batch that
    Keras peeks at to build an unbuilt step before training is not counted)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[list[int]] = [[]]

    def __getitem__(self, index):
        subjects = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        self.seen[-1].extend(int(s) for s in subjects)
        return super().__getitem__(index)


class EpochMarks(keras.callbacks.Callback):
    def __init__(self, ds):
        super().__init__()
        self.ds = ds

    def on_epoch_begin(self, epoch, logs=None):
        self.ds.seen.append([])


def feed(shard="auto"):
    return Recording(
        images, labels, batch_size=BATCH, shape=SHAPE, shuffle=True, seed=7, shard=shard
    )


def network():
    keras.utils.set_random_seed(0)
    return unet3d((*SHAPE, 1), num_classes=1, filters=2, levels=1, batch_norm=False)


def compile_(model):
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="binary_crossentropy")


if PID >= 0:
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
    )
    ds = feed()
    assert ds.process_shard == (PID, COUNT), ds.process_shard
    if MODE == "augmented":
        model = keras_nii.AugmentedModel(network(), RandomFlip3D(seed=11))
    else:
        model = network()
    compile_(model)
    result = {}
    if MODE == "augmented":
        # one global batch of identical samples, each process holding its part:
        # the draws must differ between samples (hence between processes)
        from jax.experimental import multihost_utils
        from jax.sharding import NamedSharding, PartitionSpec

        x0, _ = feed(shard=None)[0]  # the same sample in every process
        local = np.repeat(x0[:1], BATCH, axis=0)
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
        sharding = NamedSharding(mesh, PartitionSpec("batch"))
        x_global = jax.make_array_from_process_local_data(sharding, local)
        flipped, _ = model.augment(x_global)
        result["augmented"] = multihost_utils.process_allgather(flipped, tiled=True)
        result["sample"] = x0[:1]
    ds.seen = [[]]
    initial = [np.asarray(w) for w in model.get_weights()]
    model.fit(ds, epochs=EPOCHS, verbose=0, shuffle=False, callbacks=[EpochMarks(ds)])
    result |= {
        "seen": np.array(json.dumps(ds.seen[1:])),
        "initial": np.array(initial, dtype=object),
        "final": np.array([np.asarray(w) for w in model.get_weights()], dtype=object),
    }
    np.savez(os.path.join(OUT, f"{MODE}-{PID}.npz"), **result, allow_pickle=True)
elif MODE == "augmented":
    # the draws of one process over the whole global batch
    sample = np.load(os.path.join(OUT, "augmented-0.npz"), allow_pickle=True)["sample"]
    flipped = RandomFlip3D(seed=11)(np.repeat(sample, COUNT * BATCH, axis=0), training=True)
    np.savez(os.path.join(OUT, "augmented--1.npz"), augmented=np.asarray(flipped))
else:
    # the reference: one process, the same global batches, the same start
    start = np.load(os.path.join(OUT, "plain-0.npz"), allow_pickle=True)["initial"]
    shares = [feed(shard=(i, COUNT)) for i in range(COUNT)]

    class GlobalBatches(keras.utils.PyDataset):
        def __len__(self):
            return len(shares[0])

        def __getitem__(self, index):
            parts = [s[index] for s in shares]
            return tuple(np.concatenate([p[k] for p in parts]) for k in range(2))

        def on_epoch_end(self):
            for s in shares:
                s.on_epoch_end()

    model = network()
    compile_(model)
    model.set_weights(list(start))
    model.fit(GlobalBatches(), epochs=EPOCHS, verbose=0, shuffle=False)
    final = np.array([np.asarray(w) for w in model.get_weights()], dtype=object)
    np.savez(os.path.join(OUT, "plain--1.npz"), final=final, allow_pickle=True)
print("done", MODE, PID, flush=True)
