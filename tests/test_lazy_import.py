"""``import keras_nii`` is lazy, yet registers its Keras objects; the CLI starts without TensorFlow.

Each check that is about what a fresh Python process imports runs in a
subprocess (this test process has Keras imported already).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import keras_nii
from keras_nii import _registration

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "jax", "torch")


def _python(code: str, *, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


# the CLI run in a fresh process, reporting the heavy packages it imported
_CLI = """
import json, sys, time
start = time.perf_counter()
from keras_nii.cli import main
try:
    code = main({argv!r})
except SystemExit as stop:
    code = stop.code
seconds = time.perf_counter() - start
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))
print("RESULT " + json.dumps({{"code": code, "heavy": heavy, "seconds": seconds}}), file=sys.stderr)
"""


def _cli(*argv: str) -> dict:
    proc = _python(_CLI.format(argv=list(argv), heavy=HEAVY))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stderr
    result = json.loads(lines[-1][len("RESULT ") :])
    result["stdout"] = proc.stdout
    result["stderr"] = proc.stderr
    return result


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["--version"], 0),
        (["predict", "--help"], 0),
        (["demo", "--help"], 0),
        (["no-such-command"], 2),
        ([], 2),
    ],
)
def test_cli_help_and_errors_start_without_tensorflow(argv, code):
    result = _cli(*argv)
    assert result["code"] == code, result["stderr"]
    assert result["heavy"] == [], f"keras-nii {' '.join(argv)} imported {result['heavy']}"
    # TensorFlow alone takes several seconds to import here; this start-up takes about 0.2 s
    assert result["seconds"] < 4.0, result["seconds"]


def test_cli_info_starts_without_tensorflow(nibabel_data):
    result = _cli("info", str(nibabel_data / "anatomical.nii"))
    assert result["code"] == 0, result["stderr"]
    assert "33 x 41 x 25" in result["stdout"]
    assert result["heavy"] == []
    assert result["seconds"] < 4.0, result["seconds"]


def test_cli_plan_starts_without_tensorflow(tmp_path):
    if not (ROOT / "keras_nii" / "plan.py").is_file():
        pytest.skip("this checkout has no `keras-nii plan`")
    from keras_nii.phantoms import make_dataset

    make_dataset(tmp_path, 2, shape=(16, 16, 16), seed=0)
    result = _cli("plan", str(tmp_path))
    assert result["heavy"] == [], result["stderr"]


def test_python_m_keras_nii_help_is_fast():
    # the whole command as a user runs it, interpreter start-up included
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "keras_nii", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "usage: keras-nii" in proc.stdout
    assert proc.stderr == ""
    assert seconds < 4.0, seconds


def test_import_keras_nii_imports_no_backend():
    proc = _python(
        "import sys, keras_nii, keras_nii.io, keras_nii.phantoms, keras_nii.cli\n"
        "keras_nii.__version__; dir(keras_nii); keras_nii.load_nifti; keras_nii.NiftiError\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------- registration


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A .keras file with keras-nii layers in the graph and DiceLoss as its compiled loss."""
    import keras

    from keras_nii.layers import RandomFlip3D, ZScoreNormalization
    from keras_nii.models import DiceLoss

    inputs = keras.Input((8, 8, 8, 1))
    x = ZScoreNormalization(nonzero=True)(inputs)
    x = RandomFlip3D(axes=(0,), seed=1)(x)
    outputs = keras.layers.Conv3D(1, 1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss=DiceLoss(bce_weight=0.5))
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return path


_LOAD = """
import keras
model = keras.saving.load_model({path!r})
names = sorted(type(layer).__module__ + "." + type(layer).__name__ for layer in model.layers)
print("LOADED " + ",".join(names) + " LOSS " + type(model.loss).__name__)
"""


def _loaded(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(line for line in proc.stdout.splitlines() if line.startswith("LOADED "))


def _expect_keras_nii_objects(line: str) -> None:
    assert "keras_nii.layers.normalization.ZScoreNormalization" in line
    assert "keras_nii.layers.flip.RandomFlip3D" in line
    assert line.endswith("LOSS DiceLoss")


def test_import_keras_nii_then_keras_loads_a_model(saved_model):
    proc = _python(
        "import sys, keras_nii\n"
        "assert 'keras' not in sys.modules\n"
        "from keras_nii import layers\n"  # works as before, and imports Keras
        "assert layers.ZScoreNormalization.__module__ == 'keras_nii.layers.normalization'\n"
        + _LOAD.format(path=str(saved_model))
    )
    _expect_keras_nii_objects(_loaded(proc))


def test_import_keras_then_keras_nii_loads_a_model(saved_model):
    # without keras_nii the file does not load (the check below could fail), with it it does
    proc = _python(
        "import keras\n"
        "try:\n"
        f"    keras.saving.load_model({str(saved_model)!r})\n"
        "except Exception as err:\n"
        "    print('WITHOUT', type(err).__name__, 'keras_nii>' in str(err))\n"
        "import keras_nii\n" + _LOAD.format(path=str(saved_model))
    )
    assert "WITHOUT TypeError True" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    _expect_keras_nii_objects(_loaded(proc))


def test_keras_first_imported_by_a_keras_nii_module_registers_everything(saved_model):
    # keras_nii.io does not import Keras; the lazy import of keras_nii.data does (PyDataset),
    # and the model file needs the layers and DiceLoss (keras_nii.models), never imported here
    proc = _python(
        "import sys, keras_nii\n"
        "keras_nii.load_nifti\n"
        "assert 'keras' not in sys.modules\n"
        "keras_nii.NiftiDataset\n"
        "assert 'keras' in sys.modules\n" + _LOAD.format(path=str(saved_model))
    )
    _expect_keras_nii_objects(_loaded(proc))


def test_every_module_that_registers_keras_objects_is_imported_by_the_registration():
    for name in _registration.REGISTERING:
        importlib.import_module(name)
    assert _registration.registered()
    package = ROOT / "keras_nii"
    for path in package.rglob("*.py"):
        if "register_keras_serializable" not in path.read_text():
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name == "keras_nii._registration":
            continue
        assert name in sys.modules, f"{name} registers Keras objects: list it in REGISTERING"


def test_lazy_attributes():
    from keras_nii.data import NiftiDataset
    from keras_nii.io import load_nifti

    assert keras_nii.NiftiDataset is NiftiDataset
    assert keras_nii.load_nifti is load_nifti
    from keras_nii import layers, models

    assert layers.ZScoreNormalization is keras_nii.layers.ZScoreNormalization
    assert callable(models.unet3d)
    assert {"NiftiDataset", "predict_nifti", "layers", "AugmentedModel"} <= set(dir(keras_nii))
    with pytest.raises(AttributeError, match="no_such_name"):
        keras_nii.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        from keras_nii import no_such_name  # noqa: F401
