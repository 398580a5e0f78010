"""The bench's ``spacing`` operation, run tiny with the torch peers blocked."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from keras_nii import bench
from keras_nii.bench import spacing as spacing_bench


def test_spacing_rows_and_target(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("torch", "monai", "monai.data", "monai.transforms", "torchio", "SimpleITK"):
        monkeypatch.setitem(sys.modules, name, None)
    rows = bench.run_benchmarks(size=16, batch=1, repeats=1, only=["spacing"])
    by_library = {(row["library"], row["variant"]): row for row in rows}
    ours = by_library[("keras-nii", spacing_bench.VARIANT)]
    assert ours["status"] == "ok" and ours["reference"] and ours["volumes_per_call"] == 1
    assert "64x64x12 int16" in ours["note"]  # 512 x 512 x 100 scaled by 16 / 128
    assert by_library[("keras-nii", "read only")]["status"] == "ok"
    assert by_library[("nibabel+SciPy", spacing_bench.VARIANT)]["status"] == "ok"
    for peer in ("MONAI", "TorchIO"):
        assert by_library[(peer, spacing_bench.VARIANT)]["status"] == "not installed"
    (target,) = [t for t in bench.check_targets(rows) if t["target"].startswith("spacing")]
    scipy_row = by_library[("nibabel+SciPy", spacing_bench.VARIANT)]
    assert np.isclose(
        target["measured"], ours["ms_per_volume"] / scipy_row["ms_per_volume"], atol=1e-3
    )
    assert "spacing" in bench.OPERATIONS
