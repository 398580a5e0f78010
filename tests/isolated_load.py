"""Load NIfTI files in a child process under an address-space cap (a test helper).

``python tests/isolated_load.py ROOT CAP_MB < cases.json`` reads a JSON list of
``{"path": ..., "kwargs": {...}}``, caps the address space at its current size
plus ``CAP_MB`` (``resource.setrlimit(RLIMIT_AS)``), loads each file with
``keras_nii.io.load_nifti`` from the checkout ``ROOT`` and prints one JSON line
per case: how it ended (``"ok"``, ``"NiftiError"`` or the name of any other
exception, with its traceback), the message, the seconds it took, the growth of
the peak RSS during the case (MB) and, for a load, what a sane volume must
satisfy. Only ``keras_nii.io`` and ``keras_nii.storage`` are imported (not the
package, whose layers import Keras): the cap then leaves room for the reading
itself and nothing else. Run through :func:`run_cases`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as file:
            file.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _summary(vol) -> dict:
    import numpy as np

    array = vol.array
    return {
        "shape": list(array.shape),
        "finite": bool(np.all(np.isfinite(array))) if array.dtype.kind == "f" else True,
        "affine_finite": bool(np.all(np.isfinite(vol.affine))),
        "spacing": [float(s) for s in vol.spacing],
        "axcodes": "".join(vol.axcodes),
    }


def main() -> None:
    root, cap_mb = sys.argv[1], int(sys.argv[2])
    package = types.ModuleType("keras_nii")
    package.__path__ = [os.path.join(root, "keras_nii")]
    sys.modules["keras_nii"] = package  # keras_nii.io without the package's Keras imports
    import resource

    from keras_nii.io import NiftiError, load_nifti

    cases = json.load(sys.stdin)
    baseline = _status("VmSize") + cap_mb
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (baseline << 20, hard))
    for case in cases:
        _reset_peak()
        before = _status("VmRSS")
        start = time.perf_counter()
        record: dict = {"path": case["path"]}
        try:
            vol = load_nifti(case["path"], **case.get("kwargs", {}))
            record.update(kind="ok", **_summary(vol))
            del vol
        except NiftiError as err:
            record.update(kind="NiftiError", message=str(err))
        except BaseException as err:  # noqa: BLE001  (what the tests look for)
            record.update(kind=type(err).__name__, message=traceback.format_exc())
        record["seconds"] = time.perf_counter() - start
        record["peak_mb"] = _status("VmHWM") - before
        print(json.dumps(record), flush=True)


def run_cases(cases: list[dict], cap_mb: int = 2048, timeout: float | None = None) -> list[dict]:
    """Run ``cases`` in one child process; a hang or a crash fails with what was done."""
    timeout = timeout if timeout is not None else 30 + 2 * len(cases)
    try:
        done = subprocess.run(
            [sys.executable, __file__, str(ROOT), str(cap_mb)],
            input=json.dumps(cases),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout or ""
        out = out.decode() if isinstance(out, bytes) else out
        finished = len(out.splitlines())
        raise AssertionError(
            f"the child hung on {cases[min(finished, len(cases) - 1)]} "
            f"({finished} of {len(cases)} cases finished in {timeout} s)"
        ) from None
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or len(records) != len(cases):
        raise AssertionError(
            f"the child ended with status {done.returncode} after {len(records)} of "
            f"{len(cases)} cases (next: {cases[min(len(records), len(cases) - 1)]}):\n"
            f"{done.stderr[-3000:]}"
        )
    return records


if __name__ == "__main__":
    main()
