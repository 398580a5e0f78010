"""NiftiDataset.as_grain: the same samples through a Grain DataLoader, sharded,
deterministic from the seed, and checkpointable across processes."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("grain")

import keras  # noqa: E402

from keras_nii import NiftiDataset  # noqa: E402
from keras_nii.phantoms import make_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grain")
    pairs = make_dataset(folder, N, shape=(8, 8, 8), seed=2)
    return [str(i) for i, _ in pairs], [str(m) for _, m in pairs]


def _subject_of(x: np.ndarray, reference: list[np.ndarray]) -> int:
    """Which subject's image ``x`` is (the phantoms all differ)."""
    found = [i for i, r in enumerate(reference) if np.array_equal(x, r)]
    assert len(found) == 1
    return found[0]


def test_batches_equal_the_pydataset_in_order(files):
    ds = NiftiDataset(*files, batch_size=2, shape=(8, 8, 6))
    batches = list(ds.as_grain())
    assert len(batches) == len(ds) == 3
    for i, (x, y) in enumerate(batches):
        want_x, want_y = ds[i]
        assert x.dtype == np.float32 and y.dtype == np.int32
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)


def test_shuffled_epochs_are_permutations_reproducible_from_the_seed(files):
    ds = NiftiDataset(*files, batch_size=2, shuffle=True, seed=5)
    reference = [NiftiDataset(*files, batch_size=1)[i][0][0] for i in range(N)]

    def epochs(loader):
        order = [_subject_of(x, reference) for batch in loader for x in batch[0]]
        return [order[:N], order[N:]]

    first = epochs(ds.as_grain(num_epochs=2))
    for epoch in first:
        assert sorted(epoch) == list(range(N))
    assert first[0] != first[1]  # reshuffled
    assert epochs(ds.as_grain(num_epochs=2)) == first
    other = NiftiDataset(*files, batch_size=2, shuffle=True, seed=6)
    assert epochs(other.as_grain(num_epochs=2)) != first


def test_explicit_shards_are_disjoint_and_equal(files):
    reference = [NiftiDataset(*files, batch_size=1)[i][0][0] for i in range(N)]
    seen = []
    for index in range(2):
        ds = NiftiDataset(*files, batch_size=1, shuffle=True, seed=1, shard=(index, 2))
        seen.append([_subject_of(b[0][0], reference) for b in ds.as_grain()])
    assert len(seen[0]) == len(seen[1]) == N // 2
    assert set(seen[0]) | set(seen[1]) == set(range(N))
    assert not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize(
    "kwargs",
    [{"worker_count": -1}, {"worker_count": 1.5}, {"num_epochs": 0}, {"worker_buffer_size": 0}],
)
def test_bad_arguments_name_themselves(files, kwargs):
    ds = NiftiDataset(*files, batch_size=2)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ds.as_grain(**kwargs)


def test_fit_takes_the_loader_directly(files):
    ds = NiftiDataset(*files, batch_size=2, shuffle=True, seed=0)
    model = keras.Sequential(
        [keras.Input((8, 8, 8, 1)), keras.layers.Conv3D(1, 1, activation="sigmoid")]
    )
    model.compile(optimizer=keras.optimizers.SGD(1e-4), loss="binary_crossentropy")
    history = model.fit(ds.as_grain(num_epochs=2), epochs=2, steps_per_epoch=len(ds), verbose=0)
    assert len(history.history["loss"]) == 2
    assert np.all(np.isfinite(history.history["loss"]))


_RESUME = textwrap.dedent(
    """
    import pickle, sys
    import numpy as np
    from keras_nii import NiftiDataset

    def main():
        images, labels, state_file, out_file = sys.argv[1:5]
        ds = NiftiDataset(pickle.loads(bytes.fromhex(images)), pickle.loads(bytes.fromhex(labels)),
                          batch_size=2, shuffle=True, seed=9)
        it = iter(ds.as_grain(num_epochs=2, worker_count=2))
        with open(state_file, "rb") as f:
            it.set_state(f.read())
        rest = [b[0] for b in it]
        np.save(out_file, np.stack(rest))

    if __name__ == "__main__":
        main()
    """
)


def test_checkpoint_restored_in_a_new_process_continues_with_the_next_batch(files, tmp_path):
    ds = NiftiDataset(*files, batch_size=2, shuffle=True, seed=9)
    it = iter(ds.as_grain(num_epochs=2, worker_count=2))
    head = [next(it)[0] for _ in range(4)]  # into the second epoch
    state = it.get_state()
    uninterrupted = [b[0] for b in it]
    assert len(head) + len(uninterrupted) == 2 * len(ds)
    (tmp_path / "state").write_bytes(state)
    script = tmp_path / "resume.py"
    script.write_text(_RESUME)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            pickle.dumps(files[0]).hex(),
            pickle.dumps(files[1]).hex(),
            str(tmp_path / "state"),
            str(tmp_path / "rest.npy"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = np.load(tmp_path / "rest.npy")
    np.testing.assert_array_equal(resumed, np.stack(uninterrupted))


def test_patch_dataset_gives_the_pydatasets_batches_epoch_by_epoch(files):
    kwargs = dict(batch_size=2, patch_size=(4, 4, 4), patches_per_volume=2, shuffle=True, seed=4)
    ds = NiftiDataset(*files, **kwargs)
    loader = NiftiDataset(*files, **kwargs).as_grain(num_epochs=2)
    batches = list(loader)
    assert len(batches) == 2 * len(ds) == 2 * 6
    for epoch in range(2):
        for b in range(len(ds)):
            x, y = ds[b]  # the PyDataset's stream, batch by batch
            gx, gy = batches[epoch * len(ds) + b]
            np.testing.assert_array_equal(gx, x)
            np.testing.assert_array_equal(gy, y)
        ds.on_epoch_end()
    assert not np.array_equal(batches[0][0], batches[len(ds)][0])
    with pytest.raises(ValueError, match="num_epochs"):
        NiftiDataset(*files, **kwargs).as_grain(num_epochs=None)
