"""Shipping a model: keras-nii layers baked into an exported SavedModel.

A model that starts with keras-nii preprocessing (z-score normalization, and
random augmentation layers that must be the identity in serving) is exported
with ``model.export``; a fresh Python process that cannot import keras_nii
loads it with ``tf.saved_model.load`` and must predict exactly what the model
predicted in the original process, from the raw volume. The exported graph must
be pure TensorFlow (no ``py_function``).

TensorFlow only.
"""

from __future__ import annotations

import textwrap

import keras
import numpy as np
import pytest

import keras_nii.layers
from tests.scripts import run_script

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="SavedModel export needs TensorFlow"
)

# layers that are random in training and must be the identity in serving
_RANDOM_LAYERS = (
    ("RandomFlip3D", {}),
    ("RandomAffine3D", {"degrees": 20, "translation": 2}),
    ("RandomGaussianNoise", {"std": (0.5, 1.0)}),
)


def build_model(random_layers: bool = True) -> keras.Model:
    inputs = keras.Input((None, None, None, 1))
    x = keras_nii.layers.ZScoreNormalization(nonzero=True)(inputs)
    for seed, (name, kwargs) in enumerate(_RANDOM_LAYERS if random_layers else ()):
        cls = getattr(keras_nii.layers, name, None)
        if cls is not None:
            x = cls(seed=seed, **kwargs)(x)
    init = keras.initializers.GlorotUniform(seed=0)
    x = keras.layers.Conv3D(4, 3, padding="same", activation="relu", kernel_initializer=init)(x)
    outputs = keras.layers.Conv3D(
        2, 1, activation="softmax", kernel_initializer=keras.initializers.GlorotUniform(seed=1)
    )(x)
    return keras.Model(inputs, outputs)


def raw_volume() -> np.ndarray:
    """A raw, unnormalized scan-like volume: a bright blob on a zero background."""
    rng = np.random.default_rng(0)
    grid = np.indices((12, 14, 10)).astype("float32")
    centre = np.array([6.0, 7.0, 5.0])[:, None, None, None]
    inside = np.sum((grid - centre) ** 2, axis=0) < 16
    volume = np.where(inside, 600.0 + 200.0 * rng.random(inside.shape), 0.0)
    return volume.astype("float32")[None, ..., None]


@pytest.fixture(scope="module")
def model() -> keras.Model:
    """Normalization, the random layers (identity in serving), then a small net."""
    return build_model()


@pytest.fixture(scope="module")
def plain_model() -> keras.Model:
    """The same without the random layers."""
    return build_model(random_layers=False)


def run_fresh(script: str, cwd, timeout: int = 240, isolated: bool = True) -> dict:
    """Run ``script`` in a fresh TensorFlow interpreter; it prints ``RESULT <json>`` last."""
    env = {"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return run_script(script, env=env, cwd=cwd, timeout=timeout, isolated=isolated, checkout=False)


# The serving process: keras_nii made unimportable before anything else runs.
_SERVE = textwrap.dedent(
    """
    import importlib.machinery, importlib.util, json, os, sys

    # -I keeps the working directory and PYTHON* variables off sys.path; the
    # editable install of keras_nii still puts a finder on sys.meta_path and
    # may put the checkout on sys.path: take both away
    for finder in list(sys.meta_path):
        if finder is importlib.machinery.PathFinder:
            continue
        try:
            found = finder.find_spec("keras_nii", None)
        except Exception:
            found = None
        if found is not None:
            sys.meta_path.remove(finder)
    sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "keras_nii"))]
    importlib.invalidate_caches()
    assert importlib.util.find_spec("keras_nii") is None, "keras_nii is still importable"

    import numpy as np
    import tensorflow as tf

    export_dir, x_path, out_path = sys.argv[1:4]
    loaded = tf.saved_model.load(export_dir)
    x = np.load(x_path)
    out = loaded.serve(tf.constant(x))
    np.save(out_path, np.asarray(out))

    # every op of the serving graph, nested functions included
    ops = set()
    for concrete in loaded.serve.concrete_functions:
        graph_def = concrete.graph.as_graph_def()
        ops.update(node.op for node in graph_def.node)
        for function in graph_def.library.function:
            ops.update(node.op for node in function.node_def)
    assert "keras_nii" not in sys.modules
    leaked = sorted(name for name in sys.modules if name.startswith("keras_nii"))
    print("RESULT " + json.dumps({"ops": sorted(ops), "leaked": leaked}))
    """
)


@pytest.mark.parametrize("random_layers", [False, True], ids=["plain", "random_layers"])
def test_exported_model_serves_without_keras_nii(model, plain_model, random_layers, tmp_path):
    model = model if random_layers else plain_model
    x = raw_volume()
    expected = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    if random_layers:
        # the random layers are active in training: the test model is not trivial
        trained = keras.ops.convert_to_numpy(model(x, training=True))
        assert not np.allclose(trained, expected, atol=1e-3)
    assert np.all(np.isfinite(expected))

    export_dir = tmp_path / "exported"
    model.export(str(export_dir), format="tf_saved_model", verbose=False)
    assert (export_dir / "saved_model.pb").is_file()
    np.save(tmp_path / "x.npy", x)
    work = tmp_path / "cwd"
    work.mkdir()
    script = _SERVE.replace(
        "export_dir, x_path, out_path = sys.argv[1:4]",
        f"export_dir, x_path, out_path = {str(export_dir)!r}, "
        f"{str(tmp_path / 'x.npy')!r}, {str(tmp_path / 'out.npy')!r}",
    )
    result = run_fresh(script, cwd=work)
    assert result["leaked"] == []
    served = np.load(tmp_path / "out.npy")
    assert served.shape == expected.shape
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)

    ops = set(result["ops"])
    assert "Conv3D" in ops, sorted(ops)  # the inspection saw the real graph
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}, sorted(ops)


def test_exported_model_serves_other_shapes(plain_model, tmp_path):
    # the spatial size is not fixed by the export: other volumes go through
    export_dir = tmp_path / "exported"
    plain_model.export(str(export_dir), verbose=False)
    import tensorflow as tf

    loaded = tf.saved_model.load(str(export_dir))  # keep a reference while serving
    for x in (raw_volume()[:, :8, :10, :9], np.concatenate([raw_volume()] * 2)):
        served = loaded.serve(tf.constant(x)).numpy()
        expected = keras.ops.convert_to_numpy(plain_model.predict(x, verbose=0))
        np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)


_LOAD_KERAS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import keras_nii  # registers the layers

    model_path, x_path, out_path = sys.argv[1:4]
    model = keras.saving.load_model(model_path)
    np.save(out_path, keras.ops.convert_to_numpy(model.predict(np.load(x_path), verbose=0)))
    names = [type(layer).__name__ for layer in model.layers]
    print("RESULT " + json.dumps({"layers": names}))
    """
)


def test_keras_file_loads_in_a_fresh_process(model, tmp_path):
    x = raw_volume()
    expected = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    path = tmp_path / "model.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    script = _LOAD_KERAS.replace(
        "model_path, x_path, out_path = sys.argv[1:4]",
        f"model_path, x_path, out_path = {str(path)!r}, "
        f"{str(tmp_path / 'x.npy')!r}, {str(tmp_path / 'out.npy')!r}",
    )
    # not isolated: keras_nii is imported from the installed (editable) package
    result = run_fresh(script, cwd=tmp_path, isolated=False)
    assert result["layers"] == [type(layer).__name__ for layer in model.layers]
    assert "ZScoreNormalization" in result["layers"]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6, rtol=0)


def test_augmented_model_exports_the_wrapped_model(plain_model, tmp_path):
    from keras_nii.training import AugmentedModel

    augmentation = keras.layers.Pipeline([keras_nii.layers.RandomFlip3D(seed=0)])
    wrapper = AugmentedModel(plain_model, augmentation)
    export_dir = tmp_path / "exported"
    wrapper.export(str(export_dir), verbose=False)
    import tensorflow as tf

    x = raw_volume()
    loaded = tf.saved_model.load(str(export_dir))  # keep a reference while serving
    served = loaded.serve(tf.constant(x)).numpy()
    expected = keras.ops.convert_to_numpy(plain_model.predict(x, verbose=0))
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)
