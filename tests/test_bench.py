"""The plumbing of ``keras-nii bench`` (rows, columns, JSON, errors), not its speed.

The peers (torch, MONAI, TorchIO) are blocked here, so the tests need only the
test extras and stay quick: a tiny size, one volume, two repeats.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest

from keras_nii import bench
from keras_nii.bench import affine as bench_affine
from keras_nii.bench import core
from keras_nii.bench import read as bench_read

TINY = ["--size", "16", "--batch", "1", "--repeats", "2"]
PEERS = ("torch", "monai", "monai.data", "monai.transforms", "torchio", "SimpleITK")
COLUMNS = {
    "operation",
    "variant",
    "library",
    "runtime",
    "threads",
    "status",
    "first_call_ms",
    "ms_per_call",
    "volumes_per_call",
    "ms_per_volume",
    "volumes_per_s",
    "ratio",
    "reference",
    "note",
}


def _block_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    # a None entry in sys.modules makes ``import name`` raise ImportError
    for name in PEERS:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run of ``main`` on zscore, flip and read, peers blocked; its outputs."""
    path = tmp_path_factory.mktemp("bench") / "out" / "bench.json"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        _block_peers(mp)
        code = bench.main([*TINY, "--only", "zscore", "flip", "read", "--json", str(path)])
    return {
        "code": code,
        "stdout": stdout.getvalue(),
        "json": json.loads(path.read_text(encoding="utf-8")),
    }


def _key(row: dict) -> tuple[str, str, str, str]:
    return (row["operation"], row["variant"], row["library"], row["runtime"])


def test_main_returns_zero_and_prints_a_table(tiny_run: dict) -> None:
    assert tiny_run["code"] == 0
    out = tiny_run["stdout"]
    assert "operation" in out and "ms/vol" in out and "vol/s" in out and "ratio" in out
    for operation in ("zscore", "flip", "read"):
        assert operation in out
    assert "affine" not in out.split("targets:")[0]


def test_rows_and_columns(tiny_run: dict) -> None:
    rows = tiny_run["json"]["rows"]
    assert rows and all(set(row) >= COLUMNS for row in rows)
    assert {row["operation"] for row in rows} == {"zscore", "flip", "read"}
    libraries = {(row["operation"], row["variant"], row["library"]) for row in rows}
    expected = {
        ("zscore", "copy", "keras-nii"),
        ("zscore", "nonzero", "keras-nii"),
        ("zscore", "nonzero", "MONAI"),
        ("zscore", "nonzero", "TorchIO"),
        ("zscore", "nonzero", "NumPy"),
        ("flip", "copy", "keras-nii"),
        ("flip", "image+mask", "keras-nii"),
        ("flip", "image", "keras-nii"),
        ("flip", "image+mask", "MONAI"),
        ("flip", "image+mask", "TorchIO"),
        ("flip", "image+mask", "NumPy"),
        ("read", "no cache", "keras-nii"),
        ("read", "memory cache", "keras-nii"),
        ("read", "dir cache", "keras-nii"),
        ("read", "no cache", "nibabel"),
    }
    assert expected <= libraries
    # one reference per operation, and its ratio column is 1
    for operation in ("zscore", "flip", "read"):
        refs = [r for r in rows if r["operation"] == operation and r["reference"]]
        assert len(refs) == 1 and refs[0]["library"] == "keras-nii"
        assert refs[0]["ratio"] == pytest.approx(1.0)
    for row in rows:
        if row["status"] == "ok":
            assert row["ms_per_volume"] > 0 and row["volumes_per_s"] > 0
            assert row["first_call_ms"] > 0
            assert row["ms_per_volume"] == pytest.approx(
                row["ms_per_call"] / row["volumes_per_call"]
            )
            assert row["ratio"] is not None
        else:
            assert row["ms_per_volume"] is None and row["ratio"] is None
    read_rows = [r for r in rows if r["operation"] == "read"]
    assert all(
        r["status"] == "ok" and r["volumes_per_call"] == bench_read.READ_FILES for r in read_rows
    )
    numpy_rows = [r for r in rows if r["library"] == "NumPy"]
    assert numpy_rows and all(r["status"] == "ok" for r in numpy_rows)


def test_missing_peers_are_listed_as_not_installed(tiny_run: dict) -> None:
    rows = tiny_run["json"]["rows"]
    peers = [r for r in rows if r["library"] in ("MONAI", "TorchIO")]
    assert len(peers) == 4
    assert all(r["status"] == "not installed" for r in peers)
    assert "NOT INSTALLED" in tiny_run["stdout"]


def test_json_holds_the_table_machine_and_targets(tiny_run: dict) -> None:
    document = tiny_run["json"]
    assert set(document) == {"settings", "machine", "rows", "targets"}
    assert document["settings"]["size"] == 16 and document["settings"]["batch"] == 1
    assert document["settings"]["only"] == ["zscore", "flip", "read"]
    machine = document["machine"]
    assert machine["backend"] in bench.BACKENDS
    assert machine["cores"] >= 1 and isinstance(machine["cpu"], str)
    assert isinstance(machine["gpus"], list)
    assert {"keras", "tensorflow", "jax", "torch", "monai", "torchio", "scipy"} <= set(
        machine["versions"]
    )
    # the JSON rows are the printed rows, in the same order
    printed = [
        line
        for line in tiny_run["stdout"].splitlines()
        if line.split()[:1] in (["zscore"], ["flip"], ["read"])
    ]
    assert len(printed) == len(document["rows"])
    for line, row in zip(printed, document["rows"], strict=True):
        library = row["library"] + ("*" if row["reference"] else "")
        assert line.startswith(row["operation"])
        assert f" {row['variant']} " in line and f" {library} " in line and row["runtime"] in line
    names = {t["target"] for t in document["targets"]}
    assert {"zscore vs copy", "flip vs copy", "read without cache vs nibabel loop"} <= names
    assert all(isinstance(t["met"], bool) for t in document["targets"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "0"], "--size: must be >= 8"),
        (["--size", "big"], "--size: must be an integer"),
        (["--batch", "0"], "--batch: must be >= 1"),
        (["--repeats", "0"], "--repeats: must be >= 1"),
        (["--only", "zscore", "warp"], "invalid choice: 'warp'"),
        (["--backend", "torch"], "invalid choice: 'torch'"),
    ],
)
def test_bad_arguments_exit_with_a_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "keras-nii bench" in err and message in err


def test_run_benchmarks_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="size must be an integer >= 8"):
        bench.run_benchmarks(size=0)
    with pytest.raises(ValueError, match="batch"):
        bench.run_benchmarks(batch=0)
    with pytest.raises(ValueError, match=r"unknown operation\(s\) \['warp'\]"):
        bench.run_benchmarks(only=["warp"])


def test_help_exits_zero(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        bench.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: keras-nii bench") and "--only" in out


def test_other_backend_reruns_in_a_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    import keras

    current = keras.backend.backend()
    other = "jax" if current != "jax" else "tensorflow"
    calls = []

    def fake_call(command: list[str], env: dict) -> int:
        calls.append((command, env))
        return 7

    monkeypatch.delenv(core.CHILD_ENV, raising=False)
    monkeypatch.setattr(core.subprocess, "call", fake_call)
    argv = ["--backend", other, *TINY, "--only", "zscore"]
    assert bench.main(argv) == 7
    ((command, env),) = calls
    assert command == [sys.executable, "-m", "keras_nii.bench", *argv]
    assert env["KERAS_BACKEND"] == other and env[core.CHILD_ENV] == "1"


def test_check_targets_and_table_format() -> None:
    def row(operation, variant, library, ms, status="ok", reference=False):
        return {
            "operation": operation,
            "variant": variant,
            "library": library,
            "runtime": "x",
            "threads": "1",
            "status": status,
            "first_call_ms": ms,
            "ms_per_call": ms,
            "volumes_per_call": 1,
            "ms_per_volume": ms,
            "volumes_per_s": None if ms is None else 1000 / ms,
            "ratio": None,
            "reference": reference,
            "note": "",
        }

    rows = [
        row("affine", "image+mask", "keras-nii", 10.0, reference=True),
        row("affine", "image+mask", "TorchIO", 30.0),
        row("affine", "image+mask", "MONAI", None, status="not installed"),
        row("read", "no cache", "keras-nii", 11.5, reference=True),
        row("read", "no cache", "nibabel", 10.0),
        row("read", "memory cache", "keras-nii", 1.0),
    ]
    core.fill_ratios(rows)
    assert rows[1]["ratio"] == pytest.approx(3.0) and rows[2]["ratio"] is None
    targets = {t["target"]: t for t in bench.check_targets(rows)}
    assert targets["affine image+mask vs fastest peer"]["met"] is True
    assert targets["affine image+mask vs fastest peer"]["measured"] == pytest.approx(
        1 / 3, abs=1e-3
    )
    assert targets["read without cache vs nibabel loop"]["met"] is False
    assert targets["read memory cache speed-up"]["met"] is True
    table = bench.format_table(rows).splitlines()
    assert table[0].split()[:3] == ["operation", "variant", "library"]
    assert any("NOT INSTALLED" in line and "MONAI" in line for line in table)
    assert any("keras-nii*" in line and "ref" in line for line in table)


def test_a_failing_implementation_is_an_error_row() -> None:
    ctx = core.Context(16, 1, 1, log=lambda line: None)

    def broken():
        raise RuntimeError("boom")

    row = ctx.add("zscore", "nonzero", "Broken", "none", "1", broken)
    assert row["status"] == "error" and "RuntimeError: boom" in row["note"]
    assert row["ms_per_volume"] is None


@pytest.mark.skipif(
    "keras" in sys.modules and sys.modules["keras"].backend.backend() != "jax",
    reason="the stateless JAX runner needs the JAX backend",
)
def test_jax_runner_draws_anew_every_call() -> None:
    import keras
    import numpy as np

    if keras.backend.backend() != "jax":
        pytest.skip("the stateless JAX runner needs the JAX backend")
    from keras_nii.layers.intensity import RandomGaussianNoise

    layer = RandomGaussianNoise(std=1.0, seed=0)
    x = keras.ops.zeros((1, 4, 4, 4, 1))
    runner = core.JaxRunner(lambda v: layer(v, training=True), [layer], x)
    first, second = np.asarray(runner()), np.asarray(runner())
    assert not np.allclose(first, second)


def test_gpu_targets_only_with_a_gpu() -> None:
    def row(operation, variant, ms):
        return {
            "operation": operation,
            "variant": variant,
            "library": "keras-nii",
            "runtime": "jax jit",
            "status": "ok",
            "ms_per_volume": ms,
            "volumes_per_s": 1000.0 / ms,
            "reference": True,
        }

    rows = [row("affine", "image+mask", 0.1), row("zscore", "nonzero", 0.02)]
    cpu = {t["target"] for t in bench.check_targets(rows, {"gpus": []})}
    assert not any("volumes/s" in t["goal"] for t in bench.check_targets(rows, {"gpus": []}))
    assert cpu == {t["target"] for t in bench.check_targets(rows)}
    targets = {t["target"]: t for t in bench.check_targets(rows, {"gpus": ["NVIDIA H200"]})}
    affine = targets["affine image+mask on NVIDIA H200"]
    zscore = targets["zscore nonzero on NVIDIA H200"]
    assert affine["measured"] == pytest.approx(10_000) and affine["met"] is False  # < 15,000/s
    assert zscore["measured"] == pytest.approx(50_000) and zscore["met"] is True  # >= 40,000/s


# --------------------------------------------------------------------------- the torch peers
# (run where torch is installed: CI's PyTorch pass runs this file again)


def _assert_rotations_times_scales(linear) -> None:
    """``linear`` (n, 3, 3) holds R @ diag(s): R a rotation of the drawn size, s in range."""
    import numpy as np

    scales = np.linalg.norm(linear, axis=1)  # column norms: R @ diag(s) has |column j| = s_j
    low, high = bench_affine.AFFINE_SCALES
    assert scales.min() >= low - 1e-6 and scales.max() <= high + 1e-6
    assert scales.max() - scales.min() > 0.1  # drawn, not constant
    rotations = linear / scales[:, None, :]
    eye = np.broadcast_to(np.eye(3), rotations.shape)
    np.testing.assert_allclose(rotations.transpose(0, 2, 1) @ rotations, eye, atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-6)
    # the angle of each rotation is at most the composition of three of 30 degrees
    angles = np.degrees(np.arccos(np.clip((np.trace(rotations, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert angles.max() <= 3 * bench_affine.AFFINE_DEGREES and angles.mean() > 5.0


def test_torch_thetas_are_rotations_times_scales() -> None:
    torch = pytest.importorskip("torch")
    import numpy as np

    generator = torch.Generator().manual_seed(0)
    theta = bench_affine._torch_thetas(torch, 64, "cpu", generator).double().numpy()
    assert theta.shape == (64, 3, 4)
    np.testing.assert_array_equal(theta[:, :, 3], 0.0)  # about the centre
    _assert_rotations_times_scales(theta[:, :, :3])
    second = bench_affine._torch_thetas(torch, 64, "cpu", generator).numpy()
    assert not np.allclose(second, theta)  # every call draws anew


def test_jax_peer_draws_rotations_times_scales() -> None:
    jax = pytest.importorskip("jax")
    import numpy as np

    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    linear = np.asarray(jax.vmap(lambda key: bench_affine._jax_random_linear(jax, key))(keys))
    _assert_rotations_times_scales(linear.astype(np.float64))


def test_jax_affine_peer_rows() -> None:
    pytest.importorskip("jax")
    ctx = core.Context(16, 2, 1, log=lambda line: None)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("torch", "monai", "monai.data", "monai.transforms", "torchio", "kornia"):
            mp.setitem(sys.modules, name, None)
        mp.setitem(sys.modules, "kornia.augmentation", None)
        bench_affine.bench_affine(ctx)
    rows = {(r["variant"], r["library"]): r for r in ctx.rows}
    for variant in ("image+mask", "image"):
        row = rows[(variant, "JAX")]
        assert row["status"] == "ok", row["note"]
        assert row["ms_per_volume"] > 0
        assert rows[(variant, "PyTorch")]["status"] == "not installed"
        assert rows[(variant, "Kornia")]["status"] == "not installed"


def test_torch_and_kornia_affine_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    for name in ("monai", "monai.data", "monai.transforms", "torchio", "SimpleITK"):
        monkeypatch.setitem(sys.modules, name, None)
    rows = bench.run_benchmarks(size=16, batch=2, repeats=1, only=["affine"])
    by_key = {(r["variant"], r["library"]): r for r in rows}
    for variant in ("image+mask", "image"):
        torch_row = by_key[(variant, "PyTorch")]
        assert torch_row["status"] == "ok", torch_row["note"]
        assert torch_row["runtime"] in ("torch affine_grid", "torch cuda affine_grid")
        kornia_row = by_key[(variant, "Kornia")]
        try:
            import kornia  # noqa: F401
        except ImportError:
            assert kornia_row["status"] == "not installed"
        else:
            assert kornia_row["status"] == "ok", kornia_row["note"]


def test_kornia_mask_replays_the_image_draw() -> None:
    """The Kornia peer warps the mask with the image's parameters: for an
    image that is its own mask, the nearest-sampled mask and the trilinear
    image agree everywhere but at the boundary."""
    torch = pytest.importorskip("torch")
    augmentation = pytest.importorskip("kornia.augmentation")
    import numpy as np

    torch.manual_seed(0)
    grid = np.indices((24, 24, 24)).astype(np.float32) - 11.5
    ball = (np.sqrt((grid**2).sum(0)) < 8).astype(np.float32)
    box = ((np.abs(grid) < 5).all(0) & (grid[0] > -2)).astype(np.float32)
    volume = torch.from_numpy(np.stack([ball, box]))[:, None]  # (2, 1, 24, 24, 24)
    options = dict(
        degrees=bench_affine.AFFINE_DEGREES, scale=(bench_affine.AFFINE_SCALES,) * 3, p=1.0
    )
    image_tfm = augmentation.RandomAffine3D(resample="bilinear", **options)
    mask_tfm = augmentation.RandomAffine3D(resample="nearest", **options)
    params = image_tfm.forward_parameters(volume.shape)
    image = image_tfm(volume, params=params).numpy()
    mask = mask_tfm(volume, params=params).numpy()
    unreplayed = mask_tfm(volume).numpy()
    agree = ((image > 0.5) == (mask > 0.5)).mean()
    assert agree > 0.98
    assert ((image > 0.5) == (unreplayed > 0.5)).mean() < agree - 0.01
    assert np.abs(image - volume.numpy()).max() > 0.5  # it moved


def test_pipeline_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # keras-nii's chain runs (compiled, and as a graph under TensorFlow); MONAI
    # runs its Compose where it is installed; TorchIO, blocked, is listed
    for name in ("torchio", "SimpleITK"):
        monkeypatch.setitem(sys.modules, name, None)
    rows = bench.run_benchmarks(size=16, batch=2, repeats=1, only=["pipeline"])
    assert {r["operation"] for r in rows} == {"pipeline"}
    ours = [r for r in rows if r["library"] == "keras-nii"]
    assert ours and all(r["status"] == "ok" and r["ms_per_volume"] > 0 for r in ours)
    assert sum(r["reference"] for r in ours) == 1
    by_library = {r["library"]: r for r in rows if r["library"] != "keras-nii"}
    assert by_library["TorchIO"]["status"] == "not installed"
    try:
        import monai.transforms  # noqa: F401
    except ImportError:
        assert by_library["MONAI"]["status"] == "not installed"
    else:
        assert by_library["MONAI"]["status"] == "ok", by_library["MONAI"]["note"]


def test_patches_rows_and_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    from keras_nii.bench import patches as bench_patches

    _block_peers(monkeypatch)
    rows = bench.run_benchmarks(size=16, batch=1, repeats=1, only=["patches"])
    ours = [r for r in rows if r["library"] == "keras-nii"]
    assert [r["variant"] for r in ours] == ["cold", "cached", "cached"]
    n = bench_patches.SCANS * bench_patches.PER_VOLUME
    for row in ours:
        assert row["status"] == "ok", row["note"]
        assert row["volumes_per_call"] == n and row["ms_per_volume"] > 0
    peers = {(r["library"], r["variant"]): r["status"] for r in rows if r["library"] != "keras-nii"}
    assert peers == {
        ("TorchIO", "cold"): "not installed",
        ("MONAI", "cold"): "not installed",
        ("MONAI", "cached"): "not installed",
    }

    def row(library, variant, first_ms, ms):
        return {
            "operation": "patches",
            "variant": variant,
            "library": library,
            "runtime": "x",
            "status": "ok",
            "first_call_ms": first_ms,
            "volumes_per_call": 32,
            "volumes_per_s": 32_000.0 / ms,
            "reference": False,
            "note": "",
        }

    measured = [
        row("keras-nii", "cold", 4000.0, 4000.0),  # 8 patches/s
        row("keras-nii", "cached", 6000.0, 100.0),  # 320 patches/s after the first epoch
        row("TorchIO", "cold", 16000.0, 16000.0),  # 2 patches/s
        row("MONAI", "cold", 8000.0, 8000.0),  # 4 patches/s
        row("MONAI", "cached", 10000.0, 1000.0),  # first epoch 3.2/s, then 32/s
    ]
    targets = {t["target"]: t for t in bench.check_targets(measured)}
    assert targets["patches cold vs fastest peer"]["measured"] == pytest.approx(2.0)
    assert targets["patches cached vs TorchIO"]["measured"] == pytest.approx(160.0)
    assert targets["patches cached vs fastest cached peer"]["measured"] == pytest.approx(10.0)
    assert all(t["met"] for t in targets.values() if t["target"].startswith("patches"))
