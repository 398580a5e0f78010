"""Silence TensorFlow's start-up and runtime log lines (what ``keras-nii`` does unless ``--verbose``).

Importing TensorFlow 2.21 writes, from C++, lines such as::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796155991.752826   15281 port.cc:153] oneDNN custom operations are on. ...
    I0000 00:00:1796155991.763947   15281 cudart_stub.cc:31] Could not find cuda drivers ...

twice (two of its shared libraries log before absl is initialised), then, on a
machine without a GPU, ``E0000 ... failed call to cuInit`` at the first
operation, and XLA's ``Compiled cluster using XLA!`` lines when a function is
compiled. ``TF_CPP_MIN_LOG_LEVEL`` reaches only the lines logged after absl's
initialisation (the cuInit and XLA lines, at level 3); the lines before it are
printed whatever the environment says, so the only way to hide them is to catch
the process's standard error (file descriptor 2) while TensorFlow is imported.

:func:`quiet_tensorflow` does both, for a library user as for the CLI::

    from keras_nii.quiet import quiet_tensorflow

    quiet_tensorflow()  # before anything imports TensorFlow (or Keras with its backend)
    import keras

It sets ``TF_CPP_MIN_LOG_LEVEL=3`` (unless already set: an explicit setting
wins), imports Keras (and so TensorFlow, under its backend) with file
descriptor 2 redirected to a temporary file, then writes back every captured
line that is not one of TensorFlow's log lines: errors and Python warnings
printed during the import still show. TensorFlow's Python logger is set to
``ERROR``. After TensorFlow is imported it is too late for the start-up lines;
the function then only sets the levels it still can.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

__all__ = ["quiet_tensorflow", "is_tensorflow_log_line"]

# absl / TensorFlow C++ log lines: "I0000 00:00:1796155991.752826   15281 port.cc:153] ..."
_LOG_LINE = re.compile(
    rb"^(?:[IWEF]\d{4} \d+:\d+:\d+\.\d+\s+\d+ [\w./-]+:\d+\]"
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|To enable the following instructions: .* rebuild TensorFlow)"
)


def is_tensorflow_log_line(line: bytes | str) -> bool:
    """Whether ``line`` is one of TensorFlow's (absl's) C++ log lines."""
    if isinstance(line, str):
        line = line.encode("utf-8", "replace")
    return bool(_LOG_LINE.match(line))


@contextlib.contextmanager
def _filtered_stderr() -> Iterator[None]:
    """Catch what is written to fd 2 inside the block; write back all but TF's log lines."""
    # file descriptor 2 itself, not sys.stderr: a Jupyter kernel replaces sys.stderr with a
    # stream without a descriptor, and forwards what is written to fd 2 to the notebook
    fd = 2
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):  # no stderr at all (e.g. pythonw)
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().splitlines(True) if not _LOG_LINE.match(line)]
            if kept:
                os.write(fd, b"".join(kept))


def quiet_tensorflow(module: str = "keras") -> None:
    """Hide TensorFlow's log lines in this process (see the module's docstring).

    Args:
        module: what to import now, under the filter: ``"keras"`` (Keras and
            its backend: TensorFlow under the default backend) or
            ``"tensorflow"`` (TensorFlow alone, e.g. to load a SavedModel
            under another Keras backend; skipped if it is not installed).
    """
    if module not in ("keras", "tensorflow"):
        raise ValueError(f"module must be 'keras' or 'tensorflow', got {module!r}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules:
        with _filtered_stderr():
            try:
                importlib.import_module(module)
            except ImportError:  # no TensorFlow: a JAX or PyTorch installation
                if module == "keras":
                    raise
    tf = sys.modules.get("tensorflow")
    if tf is not None and hasattr(tf, "get_logger"):
        tf.get_logger().setLevel("ERROR")
    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is not None:
        absl_logging.set_verbosity(absl_logging.ERROR)
