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
    assert all(r["status"] == "ok" and r["volumes_per_call"] == bench.READ_FILES for r in read_rows)
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

    monkeypatch.delenv(bench._CHILD_ENV, raising=False)
    monkeypatch.setattr(bench.subprocess, "call", fake_call)
    argv = ["--backend", other, *TINY, "--only", "zscore"]
    assert bench.main(argv) == 7
    ((command, env),) = calls
    assert command == [sys.executable, "-m", "keras_nii.bench", *argv]
    assert env["KERAS_BACKEND"] == other and env[bench._CHILD_ENV] == "1"


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
    bench._fill_ratios(rows)
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
    ctx = bench._Context(16, 1, 1, log=lambda line: None)

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
    runner = bench._JaxRunner(lambda v: layer(v, training=True), [layer], x)
    first, second = np.asarray(runner()), np.asarray(runner())
    assert not np.allclose(first, second)
