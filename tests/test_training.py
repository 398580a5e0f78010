"""AugmentedModel: paired on-device augmentation in the training step.

The central check trains on an image that is its own mask (``x = mask`` as
float) through a network that is the identity (a 1x1 Conv3D with its kernel
fixed to ones, no bias) with a learning rate of 0 and the MSE loss: the loss is
then exactly 0 on every batch if and only if the augmented image and mask the
step trains on are still the same volume, voxel for voxel. A control that
augments the images only gives a positive loss, so the check can fail.

Runs under whichever backend ``KERAS_BACKEND`` selects; the parts that need
TensorFlow (XLA, ``tf.distribute``) are skipped under the others.
"""

from __future__ import annotations

import importlib
import json
import textwrap
import warnings

import keras
import numpy as np
import pytest

import keras_nii.layers
from keras_nii.training import AugmentedModel
from tests.scripts import run_script

BACKEND = keras.backend.backend()
tf_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="needs the TensorFlow backend")

_LAYER_MODULES = ("flip", "affine", "elastic", "intensity", "normalization", "crop")


def layer_class(name: str):
    """A keras-nii layer class by name, or None while it has not landed yet."""
    found = getattr(keras_nii.layers, name, None)
    if found is not None:
        return found
    for module in _LAYER_MODULES:
        full = f"keras_nii.layers.{module}"
        try:
            mod = importlib.import_module(full)
        except ModuleNotFoundError as err:
            if err.name == full:
                continue
            raise
        found = getattr(mod, name, None)
        if found is not None:
            return found
    return None


def require(name: str):
    found = layer_class(name)
    if found is None:
        pytest.skip(f"keras_nii layer {name} is not available yet")
    return found


def spatial_layers(seed: int = 0) -> list:
    """The keras-nii spatial layers, images sampled nearest so binary stays binary."""
    layers = [
        require("RandomFlip3D")(seed=seed + 1),
        require("RandomAffine3D")(
            degrees=25, scales=0.15, translation=2, interpolation="nearest", seed=seed + 2
        ),
    ]
    elastic = layer_class("RandomElasticDeformation3D")
    if elastic is not None:
        layers.append(
            elastic(
                num_control_points=4,
                max_displacement=2.0,
                interpolation="nearest",
                seed=seed + 3,
            )
        )
    return layers


def spatial_pipeline(seed: int = 0) -> keras.layers.Pipeline:
    return keras.layers.Pipeline(spatial_layers(seed))


def identity_net() -> keras.Model:
    """y = x exactly: a 1x1x1 convolution with kernel 1 and no bias."""
    inputs = keras.Input((None, None, None, 1))
    outputs = keras.layers.Conv3D(1, 1, use_bias=False, kernel_initializer="ones")(inputs)
    return keras.Model(inputs, outputs)


def masks(n: int = 4, size: int = 8, seed: int = 0) -> np.ndarray:
    """Random binary int32 masks, asymmetric enough that any flip changes them."""
    rng = np.random.default_rng(seed)
    return (rng.random((n, size, size, size, 1)) > 0.6).astype("int32")


@keras.saving.register_keras_serializable(package="keras_nii_tests")
class ImagesOnly(keras.layers.Layer):
    """Control: augments the images and leaves the masks as they are (misaligned)."""

    def __init__(self, augmentation: keras.layers.Layer, **kwargs):
        super().__init__(**kwargs)
        self.augmentation = augmentation

    def call(self, inputs, training=True):
        if isinstance(inputs, dict):
            out = dict(inputs)
            out["images"] = self.augmentation(inputs["images"], training=training)
            return out
        return self.augmentation(inputs, training=training)


def fit_losses(augmentation, x, y, *, epochs=3, jit_compile="auto", batch_size=2) -> list:
    model = AugmentedModel(identity_net(), augmentation)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return history.history["loss"]


def seed_states(augmentation) -> list[np.ndarray]:
    layers = augmentation.layers if hasattr(augmentation, "layers") else [augmentation]
    states = [
        np.array(keras.ops.convert_to_numpy(layer.generator.state)).astype("int64")
        for layer in layers
    ]
    assert states, "the augmentation has no random layer"
    return states


# ----------------------------------------------------------------------------
# alignment during fit


def test_fit_trains_on_aligned_pairs():
    y = masks()
    x = y.astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = fit_losses(spatial_pipeline(), x, y)
    assert losses == [0.0, 0.0, 0.0]
    # under JAX the step is traced; the augmentation must be built before it
    # (or Keras warns that the Pipeline "looks like it has unbuilt state")
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "unbuilt state" in m], messages


def test_control_images_only_augmentation_is_caught():
    # the same check with images augmented alone must fail: the test has teeth
    y = masks()
    x = y.astype("float32")
    losses = fit_losses(ImagesOnly(spatial_pipeline()), x, y)
    assert all(loss > 0.01 for loss in losses), losses
    # shuffle=False and a learning rate of 0: the epochs differ only by their
    # augmentations; a random stream stuck between epochs would repeat the loss
    assert len(set(losses)) > 1, losses


@pytest.mark.parametrize("name", ["RandomFlip3D", "RandomAffine3D", "RandomElasticDeformation3D"])
def test_each_spatial_layer_keeps_pairs_aligned(name):
    cls = require(name)
    kwargs = {
        "RandomFlip3D": {},
        "RandomAffine3D": {"degrees": 30, "shear": 10, "interpolation": "nearest"},
        "RandomElasticDeformation3D": {
            "num_control_points": 4,
            "max_displacement": 2.0,
            "interpolation": "nearest",
        },
    }[name]
    y = masks(seed=1)
    x = y.astype("float32")
    model = AugmentedModel(identity_net(), cls(seed=7, **kwargs))
    xa, ya = (keras.ops.convert_to_numpy(t) for t in model.augment(x, y))
    assert not np.array_equal(xa, x)
    np.testing.assert_array_equal(xa, ya.astype("float32"))
    # the same layer on the images alone moves them away from their masks
    control = AugmentedModel(identity_net(), ImagesOnly(cls(seed=7, **kwargs)))
    xc, yc = (keras.ops.convert_to_numpy(t) for t in control.augment(x, y))
    np.testing.assert_array_equal(yc, y)
    assert not np.array_equal(xc, yc.astype("float32"))


def test_augment_changes_the_data_and_keeps_the_mask_dtype():
    y = masks()
    x = y.astype("float32")
    model = AugmentedModel(identity_net(), spatial_pipeline())
    xa, ya = model.augment(x, y)
    xa = keras.ops.convert_to_numpy(xa)
    ya_dtype = keras.backend.standardize_dtype(ya.dtype)
    ya = keras.ops.convert_to_numpy(ya)
    assert xa.shape == x.shape and ya.shape == y.shape
    assert ya_dtype == "int32"
    assert set(np.unique(ya)) <= {0, 1}
    # the augmentation really moved voxels, in every sample
    for i in range(len(x)):
        assert not np.array_equal(xa[i], x[i]), f"sample {i} was not augmented"
    # ... and moved the image and its mask the same way
    np.testing.assert_array_equal(xa, ya.astype("float32"))
    # one draw per sample: the samples were not all transformed alike
    moved = [np.flatnonzero(xa[i] != x[i]).tolist() for i in range(len(x))]
    assert len({tuple(m) for m in moved}) > 1


def test_random_stream_advances_during_fit():
    y = masks()
    x = y.astype("float32")
    pipeline = spatial_pipeline()
    model = AugmentedModel(identity_net(), pipeline)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    start = seed_states(pipeline)
    first = keras.ops.convert_to_numpy(model.augment(x, y)[0])
    after_one = seed_states(pipeline)
    per_call = [b - a for a, b in zip(start, after_one, strict=True)]
    assert all(np.any(step != 0) for step in per_call), per_call
    # 2 epochs of 2 batches: the state moves exactly as 4 eager calls would
    # move it, so every step drew afresh and its state was kept (under JAX,
    # where the step is a pure function, the new state must be threaded out)
    model.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0)
    after_fit = seed_states(pipeline)
    for a, b, step in zip(after_one, after_fit, per_call, strict=True):
        np.testing.assert_array_equal(b - a, 4 * step)
    # the state written back by fit drives the next draws: a new augmentation
    second = keras.ops.convert_to_numpy(model.augment(x, y)[0])
    assert not np.array_equal(first, second)


# ----------------------------------------------------------------------------
# TensorFlow: XLA and tf.distribute


@tf_only
def test_jit_compile_under_tensorflow():
    y = masks()
    x = y.astype("float32")
    model = AugmentedModel(identity_net(), spatial_pipeline())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=True)
    # Keras silently falls back to jit_compile=False for layers without XLA support
    assert model.jit_compile is True, [str(w.message) for w in caught]
    history = model.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0)
    assert history.history["loss"] == [0.0, 0.0]
    control = fit_losses(ImagesOnly(spatial_pipeline()), x, y, epochs=1, jit_compile=True)
    assert control[0] > 0.01


@tf_only
def test_tensorflow_step_without_xla_augments_with_xla(xla_room):
    # Keras trains without XLA on a CPU-only TensorFlow; the augmentation alone
    # is then compiled with XLA (the resampler is several times faster there)
    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        pytest.skip("a CPU-only TensorFlow check (with a GPU, Keras's fit uses XLA itself)")
    xla = xla_room
    model = AugmentedModel(identity_net(), spatial_pipeline())
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=False)
    y = masks()
    x = y.astype("float32")
    before = xla.compiled_programs()
    step = tf.function(model._step_augment)
    for _ in range(2):
        xa, ya = (keras.ops.convert_to_numpy(t) for t in step(x, y))
    tf.function(model._step_augment)(x, y)  # a new trace of the same step
    assert xla.is_compiled(model)
    assert xla.compiled_programs() == before + 1  # compiled once, for the whole chain
    model._step_augment(x, y)  # an eager step stays eager
    assert xla.compiled_programs() == before + 1
    # ... and it augments: images and masks moved together, the mask an int.
    # (TensorFlow's XLA Philox draws other numbers than its CPU kernel for
    # the same seed, so the draws are not the eager ones, and need not be.)
    assert ya.dtype == np.int32
    assert not np.array_equal(xa, x)
    np.testing.assert_array_equal(xa, ya.astype("float32"))
    # a step that is itself compiled with XLA augments inside it, as is
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=True)
    tf.function(model._step_augment, jit_compile=True)(x[:1], y[:1])
    assert xla.compiled_programs() == before + 1


_MIRRORED = textwrap.dedent(
    """
    import json, os
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    import keras
    import numpy as np
    from keras_nii.layers.affine import RandomAffine3D
    from keras_nii.layers.flip import RandomFlip3D
    from keras_nii.training import AugmentedModel


    class ImagesOnly(keras.layers.Layer):
        def __init__(self, augmentation, **kwargs):
            super().__init__(**kwargs)
            self.augmentation = augmentation

        def call(self, inputs, training=True):
            out = dict(inputs)
            out["images"] = self.augmentation(inputs["images"], training=training)
            return out


    def pipeline():
        return keras.layers.Pipeline([
            RandomFlip3D(seed=1),
            RandomAffine3D(degrees=25, translation=2, interpolation="nearest", seed=2),
        ])


    def net():
        inputs = keras.Input((None, None, None, 1))
        conv = keras.layers.Conv3D(1, 1, use_bias=False, kernel_initializer="ones")
        return keras.Model(inputs, conv(inputs))


    rng = np.random.default_rng(0)
    y = (rng.random((8, 8, 8, 8, 1)) > 0.6).astype("int32")
    x = y.astype("float32")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result = {"replicas": strategy.num_replicas_in_sync}
    for name, make in (("aligned", pipeline), ("control", lambda: ImagesOnly(pipeline()))):
        with strategy.scope():
            model = AugmentedModel(net(), make())
            model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        result[name] = [float(v) for v in history.history["loss"]]
    print("RESULT " + json.dumps(result))
    """
)


@tf_only
def test_mirrored_strategy_on_two_cpu_devices():
    env = {"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = run_script(_MIRRORED, env=env, timeout=300, checkout=False)
    assert result["replicas"] == 2
    assert result["aligned"] == [0.0, 0.0]
    assert all(loss > 0.01 for loss in result["control"]), result


# ----------------------------------------------------------------------------
# everything but training is the wrapped model's


def dense_net(size: int = 8) -> keras.Model:
    """A network that is not flip-equivariant (a dense map over all voxels)."""
    inputs = keras.Input((size, size, size, 1))
    flat = keras.layers.Flatten()(inputs)
    dense = keras.layers.Dense(
        size**3, kernel_initializer=keras.initializers.RandomNormal(0, 0.05, seed=3)
    )
    outputs = keras.layers.Reshape((size, size, size, 1))(dense(flat))
    return keras.Model(inputs, outputs)


def always_flip() -> keras.layers.Layer:
    return require("RandomFlip3D")(axes=(0,), probability=1.0, seed=0)


def test_evaluate_and_predict_use_the_wrapped_model_alone():
    rng = np.random.default_rng(2)
    x = rng.random((4, 8, 8, 8, 1)).astype("float32")
    y = rng.random((4, 8, 8, 8, 1)).astype("float32")
    net = dense_net()
    model = AugmentedModel(net, always_flip())
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")

    plain = keras.ops.convert_to_numpy(net.predict(x, verbose=0))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.predict(x, verbose=0)), plain)

    expected = float(np.mean((plain - y) ** 2))
    xa, ya = (keras.ops.convert_to_numpy(t) for t in model.augment(x, y))
    np.testing.assert_array_equal(xa, x[:, ::-1])  # the flip did happen
    augmented = float(np.mean((keras.ops.convert_to_numpy(net.predict(xa, verbose=0)) - ya) ** 2))
    assert abs(augmented - expected) > 1e-3 * expected  # the two are distinguishable
    loss = model.evaluate(x, y, batch_size=2, verbose=0)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_save_writes_the_wrapped_model(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.random((2, 8, 8, 8, 1)).astype("float32")
    net = dense_net()
    model = AugmentedModel(net, spatial_pipeline())
    path = tmp_path / "net.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert not isinstance(loaded, AugmentedModel)
    assert isinstance(loaded, keras.Model)
    assert [type(layer).__name__ for layer in loaded.layers] == [
        type(layer).__name__ for layer in net.layers
    ]
    for mine, theirs in zip(net.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded.predict(x, verbose=0)),
        keras.ops.convert_to_numpy(net.predict(x, verbose=0)),
    )


def test_classification_targets_pass_through():
    rng = np.random.default_rng(4)
    x = (rng.random((4, 8, 8, 8, 1)) > 0.5).astype("float32")
    # the target is the fraction of foreground voxels: exact in float32, and
    # invariant under flips, which change the images
    y = x.mean(axis=(1, 2, 3, 4)).astype("float32")
    flips = require("RandomFlip3D")(probability=1.0, seed=0)
    inputs = keras.Input((8, 8, 8, 1))
    net = keras.Model(inputs, keras.layers.GlobalAveragePooling3D()(inputs))
    model = AugmentedModel(net, flips)

    xa, ya = model.augment(x, y)
    assert ya is y
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(xa), x[:, ::-1, ::-1, ::-1])

    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    history = model.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0)
    assert history.history["loss"] == [0.0, 0.0]
    # a (b, 1) target is not a volume either
    xa, ya = model.augment(x, y[:, None])
    assert ya.shape == (4, 1)


# ----------------------------------------------------------------------------
# config


def _jsonable(config: dict) -> dict:
    """A config as JSON gives it back (tuples become lists)."""
    return json.loads(json.dumps(config))


def test_config_round_trip():
    y = masks()
    x = y.astype("float32")
    model = AugmentedModel(identity_net(), spatial_pipeline(seed=10), name="augmented")
    config = model.get_config()
    clone = AugmentedModel.from_config(config)
    assert isinstance(clone, AugmentedModel)
    assert clone.name == "augmented"
    assert clone.get_config() == config
    assert [type(layer).__name__ for layer in clone.augmentation.layers] == [
        type(layer).__name__ for layer in model.augmentation.layers
    ]
    # the seeds came along: the clone draws the original's augmentations
    original = [keras.ops.convert_to_numpy(t) for t in model.augment(x, y)]
    cloned = [keras.ops.convert_to_numpy(t) for t in clone.augment(x, y)]
    assert not np.array_equal(original[0], x)
    for a, b in zip(original, cloned, strict=True):
        np.testing.assert_array_equal(a, b)
    # and through Keras's own (JSON) serialization
    blob = json.dumps(keras.saving.serialize_keras_object(model))
    again = keras.saving.deserialize_keras_object(json.loads(blob))
    assert isinstance(again, AugmentedModel)
    assert [layer.get_config() for layer in again.augmentation.layers] == [
        layer.get_config() for layer in model.augmentation.layers
    ]
    assert _jsonable(again.model.get_config()) == _jsonable(model.model.get_config())


def test_bad_arguments():
    with pytest.raises(ValueError, match="model"):
        AugmentedModel("not a model", spatial_pipeline())
    with pytest.raises(ValueError, match="augmentation"):
        AugmentedModel(identity_net(), lambda d: d)


@pytest.mark.parametrize("other", ["spatial", "batch"])
def test_images_and_masks_of_other_sizes_stop_the_step(other):
    # the step checks the pair itself, whatever the augmentation is (here one
    # that checks nothing): voxels of x and y that do not correspond are an
    # error naming both shapes, not a deep one from a reshape, or a silent fit
    y = masks(n=2)
    x = y.astype("float32")
    y = y[:, :, :, :-2] if other == "spatial" else y[:1]
    model = AugmentedModel(identity_net(), ImagesOnly(spatial_pipeline()))
    with pytest.raises(ValueError, match="same batch and spatial sizes") as error:
        model.augment(x, y)
    assert str(x.shape) in str(error.value) and str(y.shape) in str(error.value)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    with pytest.raises(ValueError, match="same batch and spatial sizes"):
        model.train_on_batch(x, y)
    # keras-nii layers check the pair on their own too
    with pytest.raises(ValueError, match="same batch and spatial sizes"):
        AugmentedModel(identity_net(), spatial_pipeline()).augment(x, y)
    # other channel counts are fine: one label map for two modalities
    two = np.concatenate([x, x], axis=-1)
    xa, ya = AugmentedModel(identity_net(), spatial_pipeline()).augment(two, masks(n=2))
    assert tuple(ya.shape) == (2, 8, 8, 8, 1) and tuple(xa.shape) == (2, 8, 8, 8, 2)
    # a network whose output is smaller than its input (valid convolutions)
    # evaluates on targets of the output's size, as before
    inputs = keras.Input((None, None, None, 1))
    valid = keras.Model(inputs, keras.layers.Conv3D(1, 3, padding="valid")(inputs))
    shrinking = AugmentedModel(valid, spatial_pipeline())
    shrinking.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    assert np.isfinite(shrinking.evaluate(x, np.zeros((2, 6, 6, 6, 1), "float32"), verbose=0))


def test_a_unet_trains_on_volumes_of_varied_odd_sizes(tmp_path):
    """The first hour's 99 x 117 x 95 volumes, small: no padding argument anywhere.

    unet3d pads inside the model and crops back, in every backend; the
    volumes differ in size on every axis but the first two share a depth
    (Keras's TensorFlow pipeline learns its shapes from two batches).
    """
    import nibabel as nib

    from keras_nii import NiftiDataset
    from keras_nii.models import DiceLoss, unet3d

    rng = np.random.default_rng(0)
    images, masks = [], []
    for i, shape in enumerate([(11, 13, 7), (9, 14, 7), (10, 9, 11), (7, 6, 5)]):
        image = rng.normal(100, 20, shape).astype(np.float32)
        mask = (image > 110).astype(np.uint8)
        for array, folder, out in ((image, "img", images), (mask, "lab", masks)):
            path = tmp_path / folder / f"s{i}.nii.gz"
            path.parent.mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(array, np.eye(4)), path)
            out.append(str(path))
    keras.utils.set_random_seed(0)
    net = unet3d(filters=2, levels=2, normalization=keras_nii.layers.ZScoreNormalization())
    net.compile("adam", DiceLoss(bce_weight=1.0))
    train = NiftiDataset(images[:3], masks[:3], batch_size=1, shuffle=True, seed=0)
    val = NiftiDataset(images[3:], masks[3:], batch_size=1)
    history = net.fit(train, validation_data=val, epochs=2, verbose=0)
    losses = history.history["loss"] + history.history["val_loss"]
    assert all(np.isfinite(v) for v in losses), losses
    x, _ = train[0]
    assert net.predict_on_batch(x).shape == (*x.shape[:4], 1)
