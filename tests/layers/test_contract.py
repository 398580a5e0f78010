"""The contract every keras-nii layer keeps, checked on every public layer.

Each layer test module ends with ``EXAMPLES``: factories of one representative,
non-default instance per layer. This module collects them and checks the
common contract of ``keras_nii/layers/base.py`` on each: serialization,
dict inputs and mask dtypes, ranks and data formats, the training flag,
seeds, per-sample draws, mixed precision, symbolic shapes, and (under
TensorFlow) XLA, ``tf.data`` and the absence of Python ops in the graph; and
a ``.keras`` round trip of a model holding every layer, in a fresh process.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_nii.layers as kl
from keras_nii.layers.base import VolumeLayer
from tests.layers.conftest import BACKEND, tensorflow_only, to_numpy

HERE = Path(__file__).parent
SIZE = 16
BASE_CONFIG_KEYS = {"name", "trainable", "dtype", "data_format", "seed"}


def _collect_examples():
    factories = []
    for path in sorted(HERE.glob("test_*.py")):
        if path.name == Path(__file__).name:
            continue
        spec = importlib.util.spec_from_file_location(f"_contract_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        factories.extend(getattr(module, "EXAMPLES", []))
    return factories


EXAMPLES = _collect_examples()
IDS = [type(factory()).__name__ for factory in EXAMPLES]


def public_layer_classes():
    return {
        name
        for name in kl.__all__
        if isinstance(getattr(kl, name), type)
        and issubclass(getattr(kl, name), VolumeLayer)
        and getattr(kl, name) is not VolumeLayer
    }


def make_batch(batch=2, channels=1, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    grid = np.indices((SIZE, SIZE, SIZE)).astype("float32")
    blob = np.exp(-((grid - SIZE / 2 + 1.5) ** 2).sum(0) / 20.0)
    images = blob[None, ..., None] * 100.0 + rng.normal(0, 5, (batch, SIZE, SIZE, SIZE, channels))
    images = np.abs(images).astype(dtype)
    masks = (blob > 0.3)[None, ..., None].repeat(batch, 0).astype("int32")
    return images, masks


def test_every_public_layer_has_an_example():
    assert public_layer_classes() <= set(IDS), (
        f"layers without an EXAMPLES entry: {sorted(public_layer_classes() - set(IDS))}"
    )
    assert len(IDS) == len(set(IDS)), "one example per layer"


@pytest.fixture(params=EXAMPLES, ids=IDS)
def factory(request):
    return request.param


def test_registered_and_config_round_trip(factory):
    layer = factory()
    cls = type(layer)
    assert keras.saving.get_registered_name(cls) == f"keras_nii>{cls.__name__}"
    config = layer.get_config()
    json.dumps(config)  # plain Python values only
    clone = cls.from_config(config)
    assert clone.get_config() == config
    # every constructor argument, nothing else
    params = {
        name
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    assert params <= set(config), f"missing from get_config: {params - set(config)}"
    assert set(config) <= params | BASE_CONFIG_KEYS, (
        f"not constructor arguments: {set(config) - params - BASE_CONFIG_KEYS}"
    )
    assert layer.supports_jit is True


def test_dict_input_masks_keep_dtype_and_shape(factory):
    layer = factory()
    images, masks = make_batch()
    out = to_numpy(layer({"images": images, "segmentation_masks": masks}, training=True))
    assert set(out) == {"images", "segmentation_masks"}
    assert out["segmentation_masks"].dtype == np.int32
    assert set(np.unique(out["segmentation_masks"])) <= {0, 1}
    expected = layer.compute_output_shape(
        {"images": images.shape, "segmentation_masks": masks.shape}
    )
    assert out["images"].shape == tuple(expected["images"])
    assert out["segmentation_masks"].shape == tuple(expected["segmentation_masks"])
    assert np.all(np.isfinite(out["images"]))
    if not layer.SPATIAL:
        np.testing.assert_array_equal(out["segmentation_masks"], masks)
    # either key may be absent
    only_masks = to_numpy(layer({"segmentation_masks": masks}, training=True))
    assert only_masks["segmentation_masks"].dtype == np.int32


def test_unbatched_input(factory):
    layer = factory()
    images, _ = make_batch()
    out = to_numpy(layer(images[0], training=True))
    assert out.ndim == 4
    assert out.shape == tuple(layer.compute_output_shape(images[0].shape))


def test_bad_rank_and_unknown_key_name_what_was_received(factory):
    layer = factory()
    images, masks = make_batch()
    with pytest.raises(ValueError, match=r"rank|shape"):
        layer(images[0, ..., 0])
    with pytest.raises(ValueError, match="labels"):
        layer({"images": images, "labels": masks})


@pytest.mark.parametrize("training", [True, False])
def test_images_and_masks_of_other_sizes_name_both_shapes(factory, training):
    # the voxels of the two would not correspond: never resample, crop or
    # flip one onto the other's grid
    layer = factory()
    images, masks = make_batch(batch=2)
    for other in (masks[:, :, :, :-2], masks[:1], masks[:, 1:]):
        with pytest.raises(ValueError, match="same batch and spatial sizes") as error:
            layer({"images": images, "segmentation_masks": other}, training=training)
        assert str(images.shape) in str(error.value) and str(other.shape) in str(error.value)
    # symbolic tensors too (a functional model is built on them)
    with pytest.raises(ValueError, match="same batch and spatial sizes"):
        layer(
            {
                "images": keras.Input((SIZE, SIZE, SIZE, 1)),
                "segmentation_masks": keras.Input((SIZE, SIZE, SIZE - 2, 1), dtype="int32"),
            }
        )
    # a different channel count is fine (one mask for two modalities)
    two = np.concatenate([images, images], axis=-1)
    out = to_numpy(layer({"images": two, "segmentation_masks": masks}, training=training))
    assert out["segmentation_masks"].shape[-1] == 1


@tensorflow_only
def test_images_and_masks_of_other_sizes_in_a_tf_data_map_stop_it(factory):
    # sizes unknown as the map is traced: the check runs with the batch
    import tensorflow as tf

    layer = factory()
    images, masks = make_batch(batch=1)
    pairs = [
        {"images": images[0], "segmentation_masks": masks[0]},
        {"images": images[0], "segmentation_masks": masks[0, :, :-2]},
    ]
    spec = {
        "images": tf.TensorSpec((None, None, None, 1), tf.float32),
        "segmentation_masks": tf.TensorSpec((None, None, None, 1), tf.int32),
    }
    dataset = tf.data.Dataset.from_generator(lambda: iter(pairs), output_signature=spec)
    batches = iter(dataset.map(lambda d: layer(d, training=True)))
    next(batches)  # a matching pair passes
    with pytest.raises(tf.errors.InvalidArgumentError, match="same batch and spatial sizes"):
        next(batches)


def test_rank_3_empty_axes_and_complex_inputs_name_the_argument(factory):
    layer = factory()
    images, masks = make_batch()
    with pytest.raises(ValueError, match="images of rank 4"):
        layer(images[0, ..., 0], training=True)
    with pytest.raises(ValueError, match="segmentation_masks of rank 4"):
        layer({"images": images, "segmentation_masks": masks[0, ..., 0]}, training=True)
    for empty in (images[:, :0], images[:, :, :, :0], images[..., :0]):
        with pytest.raises(ValueError, match="images has an empty"):
            layer(empty, training=True)
    with pytest.raises(ValueError, match="segmentation_masks has an empty"):
        layer({"segmentation_masks": masks[:, :, :0]}, training=True)
    with pytest.raises(ValueError, match="images must be real-valued"):
        layer(images.astype("complex64") * (1 + 1j), training=True)


def test_training_false(factory):
    layer = factory()
    images, masks = make_batch()
    data = {"images": images, "segmentation_masks": masks}
    out = to_numpy(layer(data, training=False))
    if layer.CHANGES_SHAPE:
        # the declared output shape holds at inference too, deterministically
        again = to_numpy(layer(data, training=False))
        for key in data:
            assert out[key].shape == tuple(layer.compute_output_shape(images.shape))
            np.testing.assert_array_equal(out[key], again[key])
    elif layer.RANDOM:
        np.testing.assert_array_equal(out["images"], images)
        np.testing.assert_array_equal(out["segmentation_masks"], masks)
    else:
        # deterministic layers always apply
        again = to_numpy(factory()(data, training=True))
        np.testing.assert_allclose(out["images"], again["images"], rtol=1e-6, atol=1e-6)


def test_training_default_follows_the_caller(factory):
    layer = factory()
    if not layer.RANDOM:
        pytest.skip("deterministic layer")
    images, _ = make_batch(batch=3)
    # called on its own, a random layer augments (Keras's rule for its random layers)
    assert not np.array_equal(to_numpy(layer(images)), images)
    # inside a model called without `training` (as model.export serves it): as
    # with training=False, the identity (RandomCrop3D: its central window)
    serving = to_numpy(factory()(images, training=False))
    if not layer.CHANGES_SHAPE:
        np.testing.assert_array_equal(serving, images)
    inputs = keras.Input(images.shape[1:])
    model = keras.Model(inputs, factory()(inputs))
    np.testing.assert_array_equal(to_numpy(model(images)), serving)
    np.testing.assert_array_equal(to_numpy(model.predict(images, verbose=0)), serving)
    assert not np.array_equal(to_numpy(model(images, training=True)), serving)


def test_same_seed_same_output(factory):
    images, masks = make_batch(batch=3)
    data = {"images": images, "segmentation_masks": masks}
    first = to_numpy(factory()(data, training=True))
    second = to_numpy(factory()(data, training=True))
    np.testing.assert_array_equal(first["images"], second["images"])
    np.testing.assert_array_equal(first["segmentation_masks"], second["segmentation_masks"])


def test_each_sample_its_own_draw(factory):
    layer = factory()
    if not layer.RANDOM:
        pytest.skip("deterministic layer")
    images, _ = make_batch(batch=1)
    batch = np.repeat(images, 6, axis=0)
    out = to_numpy(layer(batch, training=True))
    distinct = {out[i].tobytes() for i in range(len(out))}
    assert len(distinct) > 1, "identical samples got identical draws"
    # and the layer's stream advances from call to call
    again = to_numpy(layer(batch, training=True))
    assert not np.array_equal(out, again)


def test_channels_first_matches_channels_last(factory):
    config = factory().get_config()
    cls = type(factory())
    last = cls.from_config({**config, "data_format": "channels_last"})
    first = cls.from_config({**config, "data_format": "channels_first"})
    images, masks = make_batch(channels=2)
    out_last = to_numpy(last({"images": images, "segmentation_masks": masks}, training=True))
    out_first = to_numpy(
        first(
            {
                "images": np.moveaxis(images, -1, 1),
                "segmentation_masks": np.moveaxis(masks, -1, 1),
            },
            training=True,
        )
    )
    np.testing.assert_allclose(
        np.moveaxis(out_first["images"], 1, -1), out_last["images"], rtol=1e-5, atol=1e-4
    )
    np.testing.assert_array_equal(
        np.moveaxis(out_first["segmentation_masks"], 1, -1), out_last["segmentation_masks"]
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16", "float16"])
def test_low_precision_policies(factory, policy):
    images, masks = make_batch()
    reference = to_numpy(factory()({"images": images, "segmentation_masks": masks}))
    config = factory().get_config()
    config["dtype"] = policy
    layer = type(factory()).from_config(config)
    out = layer({"images": images, "segmentation_masks": masks}, training=True)
    assert keras.backend.standardize_dtype(out["images"].dtype) == layer.compute_dtype
    assert keras.backend.standardize_dtype(out["segmentation_masks"].dtype) == "int32"
    values = to_numpy(keras.ops.cast(out["images"], "float32"))
    assert np.all(np.isfinite(values))
    # the same draws, computed at low precision: close to the float32 result
    scale = np.abs(reference["images"]).max() + 1e-6
    assert np.mean(np.abs(values - reference["images"])) / scale < 0.02
    np.testing.assert_array_equal(
        to_numpy(out["segmentation_masks"]), reference["segmentation_masks"]
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_follow_the_layer_policy(factory, dtype):
    images, _ = make_batch()
    layer = factory()
    out = layer(keras.ops.cast(images, dtype), training=True)
    # like every Keras layer, float inputs are cast to the layer's compute dtype
    assert keras.backend.standardize_dtype(out.dtype) == layer.compute_dtype
    assert np.all(np.isfinite(to_numpy(out)))


def test_integer_images_are_cast(factory):
    layer = factory()
    images, _ = make_batch()
    out = layer(images.astype("int16"), training=True)
    assert keras.backend.standardize_dtype(out.dtype) == layer.compute_dtype


def test_symbolic_shapes_with_unknown_sizes(factory):
    layer = factory()
    inputs = keras.Input((None, None, None, 1))
    outputs = layer(inputs)
    assert tuple(outputs.shape) == tuple(layer.compute_output_shape((None, None, None, None, 1)))
    masks = keras.Input((None, None, None, 1), dtype="int32")
    out = layer({"images": inputs, "segmentation_masks": masks})
    assert keras.backend.standardize_dtype(out["segmentation_masks"].dtype) == "int32"


@tensorflow_only
def test_xla_tf_data_and_no_python_ops(factory):
    import tensorflow as tf

    layer = factory()
    images, masks = make_batch()
    data = {"images": images, "segmentation_masks": masks}

    compiled = tf.function(lambda d: layer(d, training=True), jit_compile=True)
    out = compiled(data)
    assert out["images"].shape == tuple(layer.compute_output_shape(images.shape))

    dataset = tf.data.Dataset.from_tensor_slices(data).batch(2).map(lambda d: layer(d))
    batch = next(iter(dataset))
    assert batch["segmentation_masks"].dtype == tf.int32

    graph = (
        tf.function(lambda d: layer(d, training=True))
        .get_concrete_function(
            {
                "images": tf.TensorSpec((None, None, None, None, 1), tf.float32),
                "segmentation_masks": tf.TensorSpec((None, None, None, None, 1), tf.int32),
            }
        )
        .graph.as_graph_def()
    )
    op_types = {node.op for node in graph.node}
    for function in graph.library.function:
        op_types |= {node.op for node in function.node_def}
    assert not op_types & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}


SAVE_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    import keras_nii  # registers the layers
    model = keras.saving.load_model(sys.argv[1])
    x = np.load(sys.argv[2])
    np.save(sys.argv[3], keras.ops.convert_to_numpy(model.predict(x, verbose=0)))
    np.save(sys.argv[4], keras.ops.convert_to_numpy(model(x, training=True)))
    """
)


def test_model_with_every_layer_saves_and_loads_in_a_fresh_process(tmp_path):
    layers = [factory() for factory in EXAMPLES]
    # layers that change the spatial size go last, so that every layer sees a cube
    cube = (None, SIZE, SIZE, SIZE, 1)
    layers.sort(key=lambda layer: tuple(layer.compute_output_shape(cube)) != cube)
    inputs = keras.Input((SIZE, SIZE, SIZE, 1))
    x = inputs
    for layer in layers:
        x = layer(x)
    model = keras.Model(inputs, x)
    images, _ = make_batch()
    path = tmp_path / "all_layers.keras"
    model.save(path)
    expected_predict = to_numpy(model.predict(images, verbose=0))
    expected_train = to_numpy(model(images, training=True))

    np.save(tmp_path / "x.npy", images)
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SAVE_LOAD_SCRIPT,
            str(path),
            str(tmp_path / "x.npy"),
            str(tmp_path / "predict.npy"),
            str(tmp_path / "train.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(
        np.load(tmp_path / "predict.npy"), expected_predict, rtol=1e-5, atol=1e-5
    )
    # the random layers' seed state travels with the file: the same draws follow
    np.testing.assert_allclose(
        np.load(tmp_path / "train.npy"), expected_train, rtol=1e-5, atol=1e-4
    )


SEEDED_PIPELINE_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    from keras_nii import layers

    pipeline = keras.layers.Pipeline(
        [
            layers.RandomFlip3D(seed=1),
            layers.RandomAffine3D(degrees=20, scales=0.1, seed=2),
            layers.RandomElasticDeformation3D(max_displacement=2.0, seed=3),
            layers.RandomGaussianNoise(std=(0.0, 5.0), seed=4),
        ]
    )
    x = np.load(sys.argv[1])
    first = pipeline(x, training=True)
    second = pipeline(x, training=True)
    np.save(sys.argv[2], np.stack([keras.ops.convert_to_numpy(first),
                                   keras.ops.convert_to_numpy(second)]))
    """
)


def test_seeded_pipeline_reproduces_in_a_new_process(tmp_path):
    images, _ = make_batch(batch=2)
    np.save(tmp_path / "x.npy", images)
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    outputs = []
    for run in range(2):
        out = tmp_path / f"run{run}.npy"
        result = subprocess.run(
            [sys.executable, "-c", SEEDED_PIPELINE_SCRIPT, str(tmp_path / "x.npy"), str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(np.load(out))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    # the stream advances within a run, so the two calls of one run differ
    assert not np.array_equal(outputs[0][0], outputs[0][1])
    assert not np.array_equal(outputs[0][0], images)
