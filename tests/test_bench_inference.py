"""The bench's ``inference`` operation, run tiny: Keras and ONNX Runtime, steady and fresh."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_nii import bench

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the ONNX rows export under TensorFlow"
)
pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
pytest.importorskip("tf2onnx", reason="the [onnx] extra is not installed")


def test_inference_rows_and_targets() -> None:
    rows = bench.run_benchmarks(size=16, batch=1, repeats=1, only=["inference"])
    by = {(row["variant"], row["runtime"]): row for row in rows}
    assert set(by) == {
        ("steady", "keras tensorflow"),
        ("steady", "onnxruntime"),
        ("first prediction", "keras tensorflow"),
        ("first prediction", "onnxruntime"),
    }
    for row in rows:
        assert row["status"] == "ok", row
        assert "24^3 scan, 12^3 windows" in rows[0]["note"]  # 1.5 and 0.75 times --size
    assert by["steady", "keras tensorflow"]["reference"]
    for runtime in ("keras tensorflow", "onnxruntime"):
        fresh = by["first prediction", runtime]
        # the start-up (process, imports, load) is part of the time to the first prediction
        assert 0 < fresh["startup_ms"] < fresh["ms_per_call"]
    targets = {t["target"]: t for t in bench.check_targets(rows)}
    steady = targets["inference steady state"]
    assert np.isclose(
        steady["measured"],
        by["steady", "onnxruntime"]["ms_per_volume"]
        / by["steady", "keras tensorflow"]["ms_per_volume"],
        atol=1e-3,
    )
    start = targets["inference start-up"]
    assert np.isclose(
        start["measured"],
        by["first prediction", "keras tensorflow"]["startup_ms"]
        / by["first prediction", "onnxruntime"]["startup_ms"],
        atol=1e-3,
    )
    assert "inference" in bench.OPERATIONS
