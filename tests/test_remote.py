"""Scans in object storage and on web servers: fsspec URLs everywhere a path goes.

Against real servers on this machine, no network: an S3 endpoint from moto's
server mode, Python's own HTTP server, and fsspec's memory filesystem. Each
test stops what it started.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

fsspec = pytest.importorskip("fsspec")

from keras_nii import remote  # noqa: E402
from keras_nii.io import NiftiError, load_nifti, save_nifti  # noqa: E402
from keras_nii.phantoms import make_dataset  # noqa: E402

DATA = Path(nib.__file__).parent / "tests" / "data"
ANATOMICAL = DATA / "anatomical.nii"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def memory():
    """A fresh bucket in fsspec's memory filesystem, emptied afterwards."""
    fs = fsspec.filesystem("memory")
    bucket = f"memory://t{os.getpid()}-{time.monotonic_ns()}"
    yield bucket
    with contextlib.suppress(FileNotFoundError):
        fs.rm(bucket[len("memory://") :], recursive=True)


def test_round_trip_through_a_store_keeps_voxels_and_geometry(memory):
    source = load_nifti(ANATOMICAL)
    url = f"{memory}/sub-01/anat.nii.gz"
    assert save_nifti(source.array, url, like=source) == url
    back = load_nifti(url)
    assert back.path == url
    np.testing.assert_array_equal(back.array, source.array)
    np.testing.assert_allclose(back.affine, source.affine)
    # the object is a real .nii.gz: nibabel reads its bytes as the file's
    with fsspec.open(url, "rb") as f:
        raw = nib.Nifti1Image.from_bytes(gzip.decompress(f.read()))
    np.testing.assert_allclose(raw.affine, nib.load(ANATOMICAL).affine)
    np.testing.assert_array_equal(np.asarray(raw.dataobj), np.asarray(nib.load(ANATOMICAL).dataobj))


def test_pairs_go_up_and_come_back_together(memory):
    source = load_nifti(ANATOMICAL, dtype="int16")
    save_nifti(source.array, f"{memory}/pair.HDR", like=source)
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(memory[len("memory://") :], detail=False))
    assert names == ["pair.HDR", "pair.IMG"]
    back = load_nifti(f"{memory}/pair.IMG", dtype="int16")
    np.testing.assert_array_equal(back.array, source.array)


def test_overwrite_guard_compares_normalized_urls(memory):
    url = f"{memory}/a/scan.nii.gz"
    vol = load_nifti(ANATOMICAL)
    save_nifti(vol.array, url, like=vol)
    remote_vol = load_nifti(url)
    for spelling in (url, f"{memory}/a/./scan.nii.gz", f"{memory}/b/../a/scan.nii.gz"):
        with pytest.raises(ValueError, match="refusing to write"):
            save_nifti(remote_vol.array * 0, spelling, like=remote_vol)
    before = load_nifti(url).array
    np.testing.assert_array_equal(before, vol.array)  # untouched
    save_nifti(remote_vol.array * 0, f"{memory}/a/other.nii.gz", like=remote_vol)


def test_missing_object_and_folder_are_nifti_errors_naming_the_url(memory):
    with pytest.raises(NiftiError, match=f"{memory}/nothing.nii: no such object"):
        load_nifti(f"{memory}/nothing.nii")
    fsspec.filesystem("memory").makedirs(memory[len("memory://") :] + "/folder", exist_ok=True)
    with pytest.raises(NiftiError, match="no such object|not a NIfTI file"):
        load_nifti(f"{memory}/folder")


def test_hostile_bounds_hold_for_remote_files(memory):
    """A 74-byte .nii.gz claiming 1000^3 float32 fails fast, naming the URL."""
    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 1000))
    header.set_data_dtype(np.float32)
    url = f"{memory}/liar.nii.gz"
    with fsspec.open(url, "wb") as f:
        f.write(gzip.compress(header.binaryblock + b"\0" * 4))
    start = time.perf_counter()
    with pytest.raises(NiftiError, match=f"^{url}:"):
        load_nifti(url)
    assert time.perf_counter() - start < 2


def test_memory_cache_of_urls_serves_a_replaced_object_anew(memory, tmp_path):
    from keras_nii import NiftiDataset

    vol = load_nifti(ANATOMICAL)
    url = f"{memory}/c/anat.nii.gz"
    save_nifti(vol.array, url, like=vol)
    ds = NiftiDataset([url], batch_size=1, cache="memory")
    np.testing.assert_array_equal(ds[0][0], vol.array)
    save_nifti(vol.array * 2, url, like=load_nifti(ANATOMICAL))
    np.testing.assert_allclose(ds[0][0], 2 * vol.array, rtol=1e-6)


# ---------------------------------------------------------------- HTTP


@contextlib.contextmanager
def _http_server(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_http_read_equals_the_local_read_and_hides_credentials(tmp_path):
    (tmp_path / "anatomical.nii").write_bytes(ANATOMICAL.read_bytes())
    with _http_server(tmp_path) as base:
        vol = load_nifti(f"{base}/anatomical.nii")
        np.testing.assert_array_equal(vol.array, load_nifti(ANATOMICAL).array)
        secret = base.replace("http://", "http://reader:s3cr3t-pass@")
        with pytest.raises(NiftiError) as err:
            load_nifti(f"{secret}/missing.nii")
        assert "s3cr3t-pass" not in str(err.value)
        assert f"{base}/missing.nii" in str(err.value)


def test_display_and_normalize():
    assert remote.display("https://u:p@host/x.nii") == "https://host/x.nii"
    assert remote.normalize("S3://Bucket//a/./b/../c.nii") == "s3://bucket/a/c.nii"
    assert remote.normalize("s3://bucket/A.nii") != remote.normalize("s3://bucket/a.nii")
    assert remote.is_url("s3://b/x.nii") and not remote.is_url("file:///tmp/x.nii")
    assert not remote.is_url("/tmp/x.nii") and not remote.is_url("C:/x.nii")


# ---------------------------------------------------------------- S3 (moto)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A real S3 endpoint (moto's server) on 127.0.0.1, credentials from the
    environment as users set them; stopped afterwards."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    port = _free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("scans")
    try:
        yield fs, env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _upload_dataset(fs, local: Path, prefix: str) -> None:
    for sub in ("images", "labels"):
        for path in sorted((local / sub).iterdir()):
            fs.put_file(str(path), f"scans/{prefix}/{sub}/{path.name}")


def test_from_folder_on_s3_with_a_cache_fetches_changed_objects_only(s3, tmp_path):
    from keras_nii import NiftiDataset

    fs, _ = s3
    make_dataset(tmp_path / "local", 3, shape=(8, 8, 8), seed=4)
    _upload_dataset(fs, tmp_path / "local", "ds1")
    cache = tmp_path / "cache"
    ds = NiftiDataset.from_folder(
        "s3://scans/ds1/images", "s3://scans/ds1/labels", batch_size=3, cache=str(cache)
    )
    here = NiftiDataset.from_folder(
        tmp_path / "local/images", tmp_path / "local/labels", batch_size=3
    )
    assert ds.images[0][0] == "s3://scans/ds1/images/case_000.nii.gz"
    x, y = ds[0]
    want_x, want_y = here[0]
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(y, want_y)
    copies = sorted((cache / "remote").iterdir())
    assert len(copies) == 6
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in copies}
    ds[0]  # unchanged objects: never fetched again
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in copies} == stamps
    # a changed object is fetched again and its new voxels served
    image = load_nifti(tmp_path / "local/images/case_001.nii.gz")
    save_nifti(image.array + 100, tmp_path / "changed.nii.gz", like=image)
    fs.put_file(str(tmp_path / "changed.nii.gz"), "scans/ds1/images/case_001.nii.gz")
    x2, _ = ds[0]
    np.testing.assert_allclose(x2[1], want_x[1] + 100, rtol=1e-5)
    np.testing.assert_array_equal(x2[0], want_x[0])
    assert len(list((cache / "remote").iterdir())) == 7


def test_predict_nifti_from_s3_to_s3_lands_on_the_scan(s3, tmp_path):
    import keras

    from keras_nii import predict_nifti

    fs, _ = s3
    source = load_nifti(ANATOMICAL)
    save_nifti(source.array, "s3://scans/predict/anat.nii.gz", like=source)
    inputs = keras.Input((None, None, None, 1))
    model = keras.Model(inputs, keras.layers.Activation("sigmoid")(inputs - 50.0))
    out = "s3://scans/predict/anat_pred.nii.gz"
    with pytest.raises(ValueError, match="input scan"):
        predict_nifti(model, "s3://scans/predict/anat.nii.gz", "s3://scans//predict/anat.nii.gz")
    predict_nifti(model, "s3://scans/predict/anat.nii.gz", out, patch_size=(16, 16, 16))
    fs.get_file("scans/predict/anat_pred.nii.gz", str(tmp_path / "pred.nii.gz"))
    written = nib.load(tmp_path / "pred.nii.gz")
    assert written.shape == nib.load(ANATOMICAL).shape
    np.testing.assert_allclose(written.affine, nib.load(ANATOMICAL).affine)
    expected = (np.asarray(nib.load(ANATOMICAL).dataobj, dtype=np.float32) > 50).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    """``python -m keras_nii ARGS`` with the S3 endpoint's environment."""
    run_env = {**os.environ, **env}
    run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), run_env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "keras_nii", *args],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_cli_info_reads_an_s3_url(s3, tmp_path):
    _, env = s3
    source = load_nifti(ANATOMICAL)
    save_nifti(source.array, "s3://scans/cli/anat.nii.gz", like=source)
    done = _cli(env, "info", "s3://scans/cli/anat.nii.gz")
    assert done.returncode == 0, done.stderr
    assert "s3://scans/cli/anat.nii.gz" in done.stdout
    assert "33" in done.stdout and "41" in done.stdout
    assert "testing-secret" not in done.stdout + done.stderr
    missing = _cli(env, "info", "s3://scans/cli/none.nii.gz")
    assert missing.returncode != 0
    assert "s3://scans/cli/none.nii.gz" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_cli_predict_reads_and_writes_s3(s3, tmp_path):
    import keras

    fs, env = s3
    source = load_nifti(ANATOMICAL)
    save_nifti(source.array, "s3://scans/cli2/anat.nii.gz", like=source)
    inputs = keras.Input((None, None, None, 1))
    model = keras.Model(inputs, keras.layers.Activation("sigmoid")(inputs - 50.0))
    model.save(tmp_path / "model.keras")
    model_file = str(tmp_path / "model.keras")
    refused = _cli(
        env, "predict", model_file, "s3://scans/cli2/anat.nii.gz", "s3://scans/cli2/./anat.nii.gz"
    )
    assert refused.returncode != 0 and "input scan" in refused.stderr
    done = _cli(
        env, "predict", model_file, "s3://scans/cli2/anat.nii.gz", "s3://scans/cli2/pred.nii.gz"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fs.invalidate_cache()
    fs.get_file("scans/cli2/pred.nii.gz", str(tmp_path / "pred.nii.gz"))
    expected = (np.asarray(nib.load(ANATOMICAL).dataobj, dtype=np.float32) > 50).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "pred.nii.gz").dataobj), expected)
