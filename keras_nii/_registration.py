"""Register keras-nii's Keras objects as soon as Keras is imported, not before.

``import keras_nii`` is lazy (PEP 562, see ``keras_nii/__init__.py``): it does
not import Keras or TensorFlow, so the ``keras-nii`` command and the NumPy-only
modules (``io``, ``phantoms``) start in a fraction of a second. Yet
``import keras_nii`` followed by ``keras.saving.load_model("model.keras")``
must find every keras-nii layer, model and loss: Keras looks a registered name
(``"keras_nii>ZScoreNormalization"``) up in its table and imports modules by
itself only for its own packages.

So the modules that register objects (:data:`REGISTERING`) are imported

- at once, by :func:`install`, when Keras is already imported;
- otherwise right after Keras finishes importing, by a one-shot finder on
  ``sys.meta_path`` that watches the ``keras`` module and the modules of
  ``keras_nii``. When a keras-nii module is what imports Keras (``from
  keras_nii.layers import ...`` as the first import), the registration waits
  until the outermost keras-nii import is done, so no module is imported half
  initialized. Once it has run, the finder removes itself.

A failure of the registration does not break ``import keras``: it is reported
as a warning (a model file would then fail to load with Keras's own message).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings
from typing import Any

#: The modules that call ``keras.saving.register_keras_serializable``. A new
#: module that registers Keras objects must be listed here (a test checks it).
REGISTERING = (
    "keras_nii.layers",
    "keras_nii.metrics",
    "keras_nii.models",
    "keras_nii.training",
)

_PACKAGE = "keras_nii"
_state = threading.local()  # per thread: how many watched modules are executing
_lock = threading.Lock()
_done = False


def _depth() -> int:
    return getattr(_state, "depth", 0)


def registered() -> bool:
    """Whether the keras-nii objects are registered with Keras (for the tests)."""
    return _done


def _register() -> None:
    """Import the registering modules, once (Keras is imported and nothing is mid-import)."""
    global _done
    with _lock:
        if _done:
            return
        _done = True
        _uninstall()
    for name in REGISTERING:
        try:
            importlib.import_module(name)
        except Exception as err:  # an import of keras must not fail because of keras-nii
            warnings.warn(
                f"keras-nii could not register its Keras objects ({name}: "
                f"{type(err).__name__}: {err}); import {name} to see the error",
                RuntimeWarning,
                stacklevel=2,
            )


def _keras_ready() -> bool:
    keras = sys.modules.get("keras")
    if keras is None:
        return False
    spec = getattr(keras, "__spec__", None)
    return not getattr(spec, "_initializing", False)


class _Loader:
    """Run a module's own loader, then register if it was the outermost watched import."""

    def __init__(self, loader: Any):
        self._loader = loader

    def __getattr__(self, name: str) -> Any:  # everything else is the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        _state.depth = _depth() + 1
        try:
            self._loader.exec_module(module)
        finally:
            _state.depth -= 1
        if _state.depth == 0 and "keras" in sys.modules:
            _register()


class _Finder(importlib.abc.MetaPathFinder):
    """Watches the imports of ``keras`` and of ``keras_nii.*`` (finds nothing itself)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "keras" and not fullname.startswith(_PACKAGE + "."):
            return None
        if _done:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


_finder = _Finder()


def _uninstall() -> None:
    try:
        sys.meta_path.remove(_finder)
    except ValueError:
        pass


def install() -> None:
    """Register now if Keras is imported, else watch for its import (``keras_nii/__init__``)."""
    if _done:
        return
    if _keras_ready():
        _register()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
