"""TensorFlow's log lines are hidden by the CLI (and quiet_tensorflow), shown with --verbose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_nii.quiet import _filtered_stderr, is_tensorflow_log_line

ROOT = Path(__file__).resolve().parents[1]

# lines TensorFlow 2.21 printed on this machine (2-core CPU VM, no GPU)
TF_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796155991.752826   15281 port.cc:153] oneDNN custom operations are on.",
    "I0000 00:00:1796155991.763947   15281 cudart_stub.cc:31] Could not find cuda drivers",
    "E0000 00:00:1796156002.104209   15281 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
    "I0000 00:00:1796156002.5   15281 device_compiler.h:196] Compiled cluster using XLA!",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
]


def test_log_line_pattern():
    for line in TF_LINES:
        assert is_tensorflow_log_line(line), line
    for line in (
        "keras-nii: error: scan.nii: no such file",
        "Epoch 1/20",
        "<string>:8: UserWarning: a python warning",
        "Traceback (most recent call last):",
        "I0000 is not a log line without its source location",
    ):
        assert not is_tensorflow_log_line(line), line


def test_filter_drops_fd_level_log_lines_and_keeps_the_rest():
    # C++ writes to file descriptor 2 directly, bypassing sys.stderr
    code = (
        "import os, sys\n"
        "from keras_nii.quiet import _filtered_stderr\n"
        "with _filtered_stderr():\n"
        f"    os.write(2, ({chr(10).join(TF_LINES)!r} + chr(10)).encode())\n"
        "    os.write(2, b'a real error\\n')\n"
        "    print('python stderr', file=sys.stderr)\n"
        "os.write(2, b'after\\n')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["a real error", "python stderr", "after"]


def test_filter_without_a_real_stderr(capsys):
    # a sys.stderr without a descriptor (pytest's capture) still gets Python's writes
    with _filtered_stderr():
        print("kept", file=sys.stderr)
    assert "kept" in capsys.readouterr().err


def test_filter_when_sys_stderr_is_replaced():
    # a Jupyter kernel replaces sys.stderr and forwards fd 2 to the notebook: fd 2 is filtered
    code = (
        "import io, os, sys\n"
        "from keras_nii.quiet import _filtered_stderr\n"
        "sys.stderr = io.StringIO()\n"
        "with _filtered_stderr():\n"
        f"    os.write(2, ({TF_LINES[1]!r} + chr(10) + 'kept' + chr(10)).encode())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "kept\n"


def _predict(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    from keras_nii.io import save_nifti

    scan = tmp_path / "scan.nii"
    if not scan.exists():
        save_nifti(np.random.default_rng(0).uniform(0, 1, (8, 8, 8)).astype(np.float32), scan)
    out = tmp_path / f"out{len(options)}.nii"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "keras_nii", *options, "predict", str(tmp_path / "m.keras")]
        + [str(scan), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.skipif(
    os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow",
    reason="TensorFlow's own log lines",
)
def test_cli_predict_is_quiet_unless_verbose(tmp_path):
    from keras_nii.models import unet3d

    unet3d(filters=2, levels=1).save(tmp_path / "m.keras")
    quiet = _predict(tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.startswith("wrote ")
    assert quiet.stderr == "", quiet.stderr
    verbose = _predict(tmp_path, "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    # the same run shows TensorFlow's start-up lines with --verbose: the check above can fail
    assert any(is_tensorflow_log_line(line) for line in verbose.stderr.splitlines())
