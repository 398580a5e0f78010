"""A test's script run in a fresh Python process that reports one JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_script(
    script: str,
    *args: Any,
    env: dict[str, str] | None = None,
    cwd: Any = ROOT,
    timeout: int = 240,
    isolated: bool = False,
    checkout: bool = True,
) -> dict:
    """Run ``script`` with ``args`` in a fresh interpreter; it prints ``RESULT <json>`` last.

    Args:
        script: Python source, run with ``python -c``.
        args: its ``sys.argv[1:]`` (turned to strings).
        env: variables set on top of this process's environment.
        cwd: the working folder (default: the checkout).
        timeout: seconds before the run is stopped.
        isolated: ``python -I`` (no user site, no ``PYTHONPATH``, no script folder).
        checkout: put the checkout first on ``PYTHONPATH``; ``False``: keras_nii
            comes from the installed package.

    Returns:
        The JSON of the last ``RESULT`` line of its standard output; the run
        must exit 0 and print one.
    """
    full = dict(os.environ, **(env or {}))
    if checkout:
        full["PYTHONPATH"] = os.pathsep.join([str(ROOT), full.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    command = [sys.executable, *(["-I"] if isolated else []), "-c", script, *map(str, args)]
    proc = subprocess.run(
        command, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])
