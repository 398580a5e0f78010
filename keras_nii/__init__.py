"""keras-nii: train and ship Keras models on NIfTI medical volumes.

The package imports lazily (PEP 562): ``import keras_nii`` loads neither Keras
nor TensorFlow, and ``keras_nii.NiftiDataset``, ``keras_nii.layers`` and the
other names below import their module on first use. The layers, models and
losses are still registered with Keras as soon as Keras is imported (at once
if it already is), so ``import keras_nii`` then
``keras.saving.load_model("model.keras")`` works in either import order; see
``keras_nii/_registration.py``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from keras_nii import _registration

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_NAMES = {
    "AugmentedModel": "keras_nii.training",
    "NiftiDataset": "keras_nii.data",
    "predict_nifti": "keras_nii.inference",
    "fingerprint": "keras_nii.plan",
    "NiftiError": "keras_nii.io",
    "Volume": "keras_nii.io",
    "load_nifti": "keras_nii.io",
    "save_nifti": "keras_nii.io",
}

# submodules reachable as attributes (``keras_nii.layers``) without importing them first
_SUBMODULES = (
    "bench",
    "cache",
    "callbacks",
    "cli",
    "data",
    "demo",
    "export",
    "grain",
    "inference",
    "io",
    "layers",
    "metrics",
    "models",
    "ops",
    "pairing",
    "patches",
    "phantoms",
    "plan",
    "plot",
    "quiet",
    "remote",
    "serving",
    "sharding",
    "spacing",
    "storage",
    "training",
)

__all__ = [
    "layers",
    "models",
    "AugmentedModel",
    "NiftiDataset",
    "predict_nifti",
    "fingerprint",
    "NiftiError",
    "Volume",
    "load_nifti",
    "save_nifti",
    "__version__",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ does this lazily
    from keras_nii import layers, models
    from keras_nii.data import NiftiDataset
    from keras_nii.inference import predict_nifti
    from keras_nii.io import NiftiError, Volume, load_nifti, save_nifti
    from keras_nii.plan import fingerprint
    from keras_nii.training import AugmentedModel


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif name in _SUBMODULES:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_registration.install()
