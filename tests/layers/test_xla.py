"""keras_nii.ops.xla: the CPU-XLA detection and the fusion barrier before resampling."""

import keras
import numpy as np
import pytest

from keras_nii.layers import RandomAffine3D, RandomFlip3D
from keras_nii.ops.xla import jax_on_cpu, materialize, tensorflow_xla_on_cpu
from tests.layers.conftest import BACKEND, compiled, tensorflow_only, to_numpy


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "uint8", "bool"])
def test_materialize_returns_its_input_exactly(rng, dtype):
    x = (
        rng.normal(0, 50, size=(2, 5, 4, 3, 1)) > 0
        if dtype == "bool"
        else rng.normal(0, 50, size=(2, 5, 4, 3, 1))
    ).astype(dtype)
    for flag in (True, False):

        def fn(t, flag=flag):
            # the flag must be a run-time value: here a comparison on the data
            first = keras.ops.cast(keras.ops.reshape(t, (-1,))[0], "float32")
            return materialize(t, lambda: (first >= 0.0) if flag else (first < -1e30))

        for run in (fn, compiled(fn)):
            out = to_numpy(run(keras.ops.convert_to_tensor(x)))
            assert keras.backend.standardize_dtype(out.dtype) == dtype
            np.testing.assert_array_equal(out, x)


@tensorflow_only
def test_tensorflow_barrier_only_under_xla():
    import tensorflow as tf

    def ops_of(jit):
        fn = tf.function(lambda t: materialize(t, lambda: t[0] > 0), jit_compile=jit)
        graph = fn.get_concrete_function(tf.TensorSpec((4,), tf.float32)).graph
        return {op.type for op in graph.get_operations()}

    assert tensorflow_xla_on_cpu() is False  # eager
    barrier = {"If", "StatelessIf"}
    # under XLA for a CPU only (with a GPU, the ops would be placed there)
    assert bool(ops_of(True) & barrier) == (not tf.config.list_logical_devices("GPU"))
    assert not ops_of(False) & barrier


@pytest.mark.skipif(BACKEND != "jax", reason="JAX-specific check")
def test_jax_barrier_is_a_conditional_on_cpu():
    import jax

    assert jax_on_cpu() == (jax.default_backend() == "cpu")
    jaxpr = str(jax.make_jaxpr(lambda t: materialize(t, lambda: t[0] > 0))(np.ones(4, "float32")))
    assert ("cond" in jaxpr) == jax_on_cpu()


def test_flip_then_affine_compiled_equals_the_two_steps(rng):
    # the barrier in front of the resampler changes nothing in the result
    x = rng.normal(size=(2, 12, 10, 8, 1)).astype("float32")
    y = (rng.random((2, 12, 10, 8, 1)) > 0.5).astype("int32")
    flip = RandomFlip3D(probability=1.0, seed=0)
    affine = RandomAffine3D(degrees=20, scales=(0.9, 1.1), seed=1)
    data = {
        "images": keras.ops.convert_to_tensor(x),
        "segmentation_masks": keras.ops.convert_to_tensor(y),
    }
    flips = flip.get_random_transformation(2, (12, 10, 8))
    warp = affine.get_random_transformation(2, (12, 10, 8))

    def both(d):
        d = {
            "images": flip.transform_images(d["images"], flips),
            "segmentation_masks": flip.transform_segmentation_masks(d["segmentation_masks"], flips),
        }
        return {
            "images": affine.transform_images(d["images"], warp),
            "segmentation_masks": affine.transform_segmentation_masks(
                d["segmentation_masks"], warp
            ),
        }

    fused = to_numpy(compiled(both)(data))
    flipped = {
        "images": np.flip(x, axis=(1, 2, 3)),
        "segmentation_masks": np.flip(y, axis=(1, 2, 3)),
    }
    steps = to_numpy(
        {
            "images": affine.transform_images(
                keras.ops.convert_to_tensor(flipped["images"].copy()), warp
            ),
            "segmentation_masks": affine.transform_segmentation_masks(
                keras.ops.convert_to_tensor(flipped["segmentation_masks"].copy()), warp
            ),
        }
    )
    np.testing.assert_allclose(fused["images"], steps["images"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fused["segmentation_masks"], steps["segmentation_masks"])


def test_resampling_stays_differentiable_through_the_barrier(rng):
    # d(sum of a linear resampling)/d(input) = how often each input voxel is
    # read, weighted: for an identity map, exactly 1 everywhere
    from keras_nii.ops.resample import affine_coordinates, resample

    x = rng.normal(size=(1, 5, 4, 3, 1)).astype("float32")
    identity = np.concatenate([np.eye(3), np.zeros((3, 1))], axis=1)[None].astype("float32")

    def total(t):
        coordinates = affine_coordinates(keras.ops.convert_to_tensor(identity), (5, 4, 3))
        return keras.ops.sum(resample(t, coordinates))

    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def grad(t):
            with tf.GradientTape() as tape:
                tape.watch(t)
                value = total(t)
            return tape.gradient(value, t)

        g = grad(tf.constant(x)).numpy()
    elif BACKEND == "jax":
        import jax

        g = np.asarray(jax.jit(jax.grad(total))(x))
    else:
        import torch

        t = torch.tensor(x, requires_grad=True)
        total(t).backward()
        g = t.grad.numpy()
    np.testing.assert_allclose(g, np.ones_like(x), atol=1e-6)


@tensorflow_only
def test_random_layers_in_a_tensorflow_graph_run_compiled(xla_room):
    # fit on a TensorFlow machine without a GPU traces a graph without XLA;
    # a random layer then runs its draw and transforms as one XLA function
    import tensorflow as tf

    from keras_nii.layers import ZScoreNormalization

    xla = xla_room

    gpu = bool(tf.config.list_logical_devices("GPU"))
    rng = np.random.default_rng(0)
    masks = (rng.random((2, 10, 9, 8, 1)) > 0.5).astype("int32")
    data = {"images": masks.astype("float32"), "segmentation_masks": masks}
    affine = RandomAffine3D(degrees=25, translation=2, interpolation="nearest", seed=0)
    zscore = ZScoreNormalization()

    @tf.function
    def graph(d):
        return affine(d, training=True), zscore(d["images"])

    moved, _ = graph(data)
    assert xla.is_compiled(affine) == (not gpu)
    assert not xla.is_compiled(zscore)  # deterministic layers stay plain graph ops
    images, labels = moved["images"].numpy(), moved["segmentation_masks"].numpy()
    assert labels.dtype == np.int32 and not np.array_equal(labels, masks)
    np.testing.assert_array_equal(images, labels.astype("float32"))  # still one draw

    # not with training off (the identity), nor eagerly
    other = RandomAffine3D(degrees=25, seed=1)
    tf.function(lambda t: other(t, training=False))(data["images"])
    other(data["images"], training=True)
    assert not xla.is_compiled(other)
    # nor for a layer that says it does not support XLA
    plain = RandomAffine3D(degrees=25, seed=2)
    plain.supports_jit = False
    tf.function(lambda t: plain(t, training=True))(data["images"])
    assert not xla.is_compiled(plain)


@tensorflow_only
def test_the_compiled_table_does_not_keep_layers_alive(xla_room):
    import gc
    import weakref

    import tensorflow as tf

    xla = xla_room

    def use_one() -> weakref.ref:
        layer = RandomFlip3D(seed=0)
        tf.function(lambda t: layer(t, training=True))(np.zeros((1, 4, 4, 4, 1), "float32"))
        assert xla.is_compiled(layer) == (not tf.config.list_logical_devices("GPU"))
        return weakref.ref(layer)

    gc.collect()
    held = len(xla._TABLE.entries)
    gone = use_one()
    gc.collect()
    assert gone() is None
    assert len(xla._TABLE.entries) == held  # its entry (the tf.function, its graphs) released


def _compiled_calls(concrete) -> int:
    """How many functions of a traced graph are marked for XLA compilation."""
    library = concrete.graph.as_graph_def().library
    return sum(bool(f.attr["_XlaMustCompile"].b) for f in library.function)


def _cpu_only_tensorflow():
    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        pytest.skip("a CPU-only TensorFlow check (with a GPU, nothing is compiled by keras-nii)")
    return tf


@tensorflow_only
def test_the_compile_table_is_bounded(xla_room):
    # one layer fed many shapes compiles at most table_size() programs (TF
    # never frees one); past it, the layer runs as plain graph ops, same result
    tf = _cpu_only_tensorflow()
    xla = xla_room
    xla.set_table_size(xla.compiled_programs() + 2)
    layer = RandomFlip3D(probability=1.0, seed=0)
    fn = tf.function(lambda t: layer(t, training=True))
    rng = np.random.default_rng(0)
    shapes = [(1, 4, 5, 6, 1), (1, 5, 5, 6, 1), (1, 6, 5, 6, 1), (1, 7, 5, 6, 1)]
    inputs = [rng.normal(size=shape).astype("float32") for shape in shapes]
    before = xla.compiled_programs()
    with pytest.warns(RuntimeWarning, match="CenterCropOrPad3D"):
        for x in inputs:
            np.testing.assert_array_equal(fn(x).numpy(), np.flip(x, axis=(1, 2, 3)))
    assert xla.compiled_programs() == before + 2
    calls = [_compiled_calls(fn.get_concrete_function(tf.TensorSpec(s))) for s in shapes]
    assert calls == [1, 1, 0, 0]
    # a shape seen before finds its program again: nothing new is compiled
    np.testing.assert_array_equal(fn(inputs[0]).numpy(), np.flip(inputs[0], axis=(1, 2, 3)))
    assert xla.compiled_programs() == before + 2
    again = tf.function(lambda t: layer(t, training=True))
    again(inputs[1])
    assert xla.compiled_programs() == before + 2
    with pytest.raises(ValueError, match="size"):
        xla.set_table_size(-1)


@tensorflow_only
def test_sizes_unknown_past_the_batch_are_not_compiled(xla_room):
    # XLA would compile one program per size met at run time, beyond any count
    tf = _cpu_only_tensorflow()
    xla = xla_room
    layer = RandomFlip3D(probability=1.0, seed=0)
    before = xla.compiled_programs()
    dynamic = tf.function(
        lambda t: layer(t, training=True),
        input_signature=[tf.TensorSpec((None, None, None, None, 1))],
    )
    for n in (4, 5):
        x = np.arange(n * 4 * 3, dtype="float32").reshape(1, n, 4, 3, 1)
        np.testing.assert_array_equal(dynamic(x).numpy(), np.flip(x, axis=(1, 2, 3)))
    assert xla.compiled_programs() == before and not xla.is_compiled(layer)
    # an unknown batch size alone is compiled (fit's last, smaller batch)
    batch = tf.function(
        lambda t: layer(t, training=True), input_signature=[tf.TensorSpec((None, 4, 4, 3, 1))]
    )
    x = np.arange(2 * 48, dtype="float32").reshape(2, 4, 4, 3, 1)
    np.testing.assert_array_equal(batch(x).numpy(), np.flip(x, axis=(1, 2, 3)))
    assert xla.compiled_programs() == before + 1


_GROWTH = """
import os, sys
import numpy as np
import tensorflow as tf
from keras_nii.layers import RandomAffine3D

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

layer = RandomAffine3D(degrees=10, seed=0)
fn = tf.function(lambda t: layer(t, training=True))
fn(tf.zeros((1, 8, 8, 8, 1)))
base = rss()
for n in range(9, 9 + int(sys.argv[1])):
    fn(tf.zeros((1, n, n, 8, 1)))
print(rss() - base)
"""


@tensorflow_only
def test_many_shapes_grow_the_process_by_a_bounded_amount(tmp_path):
    # a random affine traced into a graph for 6 new shapes: unbounded, each
    # compiled an XLA program that TensorFlow keeps (31 MB a shape with its
    # graphs: ~190 MB); bounded to 1 program, about 75 MB (8.5 MB a shape for
    # the graphs of the caller's tf.function, which it keeps)
    import os
    import subprocess
    import sys

    _cpu_only_tensorflow()
    script = tmp_path / "growth.py"
    script.write_text(_GROWTH)
    env = dict(os.environ, KERAS_NII_XLA_TABLE_SIZE="1", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, str(script), "6"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    growth = float(out.stdout.strip().splitlines()[-1])
    assert growth < 130, f"RSS grew by {growth:.0f} MB over 6 shapes"
