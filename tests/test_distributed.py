"""Sharding the feed across processes, and a real two-process data-parallel run.

The two-process run is JAX's multi-process runtime on this machine: two
Python processes, a coordinator on 127.0.0.1, gloo CPU collectives, and
``keras.distribution.DataParallel`` over both processes' devices, training
a ``unet3d`` on phantoms from a self-sharding ``NiftiDataset``
(tests/distributed_worker.py is one process).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_nii.phantoms import make_dataset
from keras_nii.sharding import check_shard, share

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- shares


@pytest.mark.parametrize("n", [1, 5, 6, 7, 10])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shares_cover_all_subjects_with_equal_lengths(n, count):
    order = np.random.default_rng(n).permutation(n)
    shares = [share(order, (i, count)) for i in range(count)]
    lengths = {len(s) for s in shares}
    assert lengths == {-(-n // count)}
    union = np.concatenate(shares)
    assert set(union.tolist()) == set(range(n))
    # disjoint but for the padding: exactly len(union) - n repeats
    assert len(union) - len(set(union.tolist())) == len(union) - n


def test_share_of_one_process_is_the_order():
    order = np.array([3, 1, 2, 0])
    assert share(order, None) is not None
    np.testing.assert_array_equal(share(order, None), order)
    np.testing.assert_array_equal(share(order, (0, 1)), order)


@pytest.mark.parametrize(
    "bad", [(2, 2), (-1, 2), (0, 0), (0.5, 2), (0, True), "0,2", (1,), 3, "everything"]
)
def test_bad_shard_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="shard"):
        check_shard(bad)


def _dataset(tmp_path, n=5, **kwargs):
    from keras_nii import NiftiDataset

    folder = tmp_path / "data"
    if not folder.exists():
        make_dataset(folder, n, shape=(8, 8, 8), seed=1)
    images = sorted(str(p) for p in (folder / "images").iterdir())
    labels = sorted(str(p) for p in (folder / "labels").iterdir())
    return NiftiDataset(images, labels, **kwargs)


def test_dataset_shards_each_epoch_one_global_permutation(tmp_path):
    kwargs = dict(batch_size=2, shuffle=True, seed=3)
    whole = _dataset(tmp_path, **kwargs, shard=None)
    parts = [_dataset(tmp_path, **kwargs, shard=(i, 2)) for i in range(2)]
    assert [len(p) for p in parts] == [2, 2]  # ceil(ceil(5 / 2) / 2) in both
    for _ in range(3):  # epochs
        expected = share(whole.order, (0, 2)), share(whole.order, (1, 2))
        for part, want in zip(parts, expected, strict=True):
            np.testing.assert_array_equal(part.order, want)
        seen = np.concatenate([p.order for p in parts])
        assert set(seen.tolist()) == set(range(5))
        # a batch holds the share's subjects: compare voxels with the whole feed
        x, _ = parts[1][0]
        first = int(parts[1].order[0])
        position = int(np.flatnonzero(whole.order == first)[0])
        xw, _ = whole[position // 2]
        np.testing.assert_array_equal(x[0], xw[position % 2])
        for ds in (whole, *parts):
            ds.on_epoch_end()


def test_auto_shard_reads_everything_in_one_process(tmp_path):
    ds = _dataset(tmp_path, batch_size=2)
    assert ds.process_shard is None
    assert len(ds) == 3
    np.testing.assert_array_equal(ds.order, np.arange(5))


def test_sharded_shuffle_needs_a_seed(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        _dataset(tmp_path, batch_size=1, shuffle=True, shard=(0, 2))


# ---------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict:
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    return env


def _run_processes(mode: str, data: Path, out: Path, timeout: float = 240) -> None:
    env = _worker_env()
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(i), "2", port, str(data), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-4000:]


def _run_reference(mode: str, data: Path, out: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(WORKER), mode, "-1", "2", "0", str(data), str(out)],
        env=_worker_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    make_dataset(folder, 7, shape=(16, 16, 16), seed=5)
    return folder


def _load(out: Path, name: str) -> dict:
    with np.load(out / f"{name}.npz", allow_pickle=True) as f:
        return {k: f[k] for k in f.files}


def _assert_disjoint_cover(runs: list[dict], n: int = 7) -> None:
    """Per epoch: the processes' subjects cover all, overlap by the padding only."""
    epochs = [json.loads(str(r["seen"])) for r in runs]
    for epoch in range(2):
        # 7 subjects over 2 processes: shares of 4 (2 steps of 2), one repeated
        assert [len(e[epoch]) for e in epochs] == [4, 4], epochs
        seen = [set(e[epoch]) for e in epochs]
        assert seen[0] | seen[1] == set(range(n)), epochs
        assert len(seen[0] & seen[1]) == 1, epochs
    assert epochs[0][0] != epochs[0][1]  # reshuffled every epoch


def test_two_processes_train_plain_unet_like_one_process(phantoms, tmp_path):
    _run_processes("plain", phantoms, tmp_path)
    runs = [_load(tmp_path, f"plain-{i}") for i in range(2)]
    _assert_disjoint_cover(runs)
    for a, b in zip(runs[0]["final"], runs[1]["final"], strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(runs[0]["initial"], runs[0]["final"], strict=True):
        assert a.shape == b.shape
    assert any(
        not np.array_equal(a, b) for a, b in zip(runs[0]["initial"], runs[0]["final"], strict=True)
    )
    _run_reference("plain", phantoms, tmp_path)
    reference = _load(tmp_path, "plain--1")["final"]
    for got, want in zip(runs[0]["final"], reference, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_two_processes_train_augmented_model_with_distinct_draws(phantoms, tmp_path):
    _run_processes("augmented", phantoms, tmp_path)
    runs = [_load(tmp_path, f"augmented-{i}") for i in range(2)]
    _assert_disjoint_cover(runs)
    for a, b in zip(runs[0]["final"], runs[1]["final"], strict=True):
        np.testing.assert_array_equal(a, b)
    augmented = runs[0]["augmented"]
    np.testing.assert_array_equal(augmented, runs[1]["augmented"])
    assert augmented.shape[0] == 4
    # identical inputs, one draw per sample: the two processes' halves differ
    assert not np.array_equal(augmented[:2], augmented[2:])
    _run_reference("augmented", phantoms, tmp_path)
    np.testing.assert_array_equal(augmented, _load(tmp_path, "augmented--1")["augmented"])
