"""The notebooks (quickstart, physical space) run from top to bottom without errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
PHYSICAL = NOTEBOOK.with_name("physical_space.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    # the kernel must run this interpreter (the one with keras-nii installed):
    # jupyter_client starts a "python" kernelspec with sys.executable
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working folder
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    # the prediction lies on the held-out scan's own grid
    scan = re.search(r"^scan +(\(\d+, \d+, \d+\)) (\w{3})$", text, re.M)
    assert scan, text
    assert f"prediction {scan[1]} {scan[2]} | same affine: True | uint8" in text
    # class-balanced patches: the first batch of 2 holds background, organ and lesion
    assert "labels in the batch [0 1 2]" in text
    assert "mask dtype after augmentation: int32" in text
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == 4
    # nothing was written next to the notebook or in the working folder
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_physical_space_notebook_executes(tmp_path):
    nb = nbformat.read(PHYSICAL, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    # the plan: median in-plane spacing, the 10th percentile on the thick axis
    assert "target_spacing   2 x 2 x 3.2 mm (thick axes [2]: 10th percentile)" in text
    assert "at the target  shape (33, 41, 18)  spacing (2.0, 2.0, 3.2)" in text
    # the rotation in mm is the true one; in voxels it is not
    in_mm = float(
        re.search(r"spacing=\(2, 2, 8\)\s+correlation with the true rotation: ([\d.]+)", text)[1]
    )
    voxels = float(
        re.search(r"voxel units\s+correlation with the true rotation: ([\d.]+)", text)[1]
    )
    assert in_mm > 0.8 and voxels < 0.6
    # the prediction is on the thick scan's own grid, and finds the head
    assert "prediction (33, 41, 7) LAS | same grid as the scan: True" in text
    dice = float(re.search(r"Dice against the head mask, on the scan's grid: ([\d.]+)", text)[1])
    assert dice > 0.7
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("path", [NOTEBOOK, PHYSICAL], ids=lambda p: p.stem)
def test_stored_notebook_has_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "the stored notebook must be executed"
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
