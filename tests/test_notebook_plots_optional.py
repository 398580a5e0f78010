"""The quickstart notebook runs without matplotlib: its set-up cell replaces the plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]


def test_setup_cell_runs_without_matplotlib(tmp_path):
    setup = "".join(_cells()[1]["source"])
    assert not any(line.startswith("%") for line in setup.splitlines())  # plain Python
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None  # as if it were not installed\n"
        + setup
        + "\nimport numpy as np\nshow_slices(np.zeros((4, 4, 4)), title='a view')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[slice view 'a view' skipped: matplotlib is not installed]" in proc.stdout


def test_stored_outputs_hold_no_tensorflow_log_lines_nor_varying_scores():
    from keras_nii.quiet import is_tensorflow_log_line

    for cell in _cells():
        for output in cell.get("outputs", []):
            for line in "".join(output.get("text", "")).splitlines():
                assert not is_tensorflow_log_line(line), line
                assert not line.startswith("Dice after"), line
