"""Pipeline3D: consecutive spatial layers fused into one resampling.

The references are independent of the fusion: the same layers run one after
the other by ``keras.layers.Pipeline`` (bit for bit where no interpolation is
involved), and the composed map rebuilt in NumPy from each layer's own draw
and sampled with ``scipy.ndimage.map_coordinates``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from scipy import ndimage

from keras_nii import layers
from keras_nii.layers.elastic import dense_displacement
from keras_nii.training import AugmentedModel
from tests.layers.conftest import BACKEND, compiled, tensorflow_only, to_numpy

SHAPE = (2, 16, 16, 16, 1)


def volumes(seed: int = 0, shape=SHAPE) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": rng.random(shape).astype("float32"),
        "segmentation_masks": rng.integers(0, 4, shape).astype("int32"),
    }


def both(make, data, **kwargs):
    """The same layers (made twice, same seeds) unfused and fused."""
    unfused = to_numpy(keras.layers.Pipeline(make())(data, training=True))
    fused = to_numpy(layers.Pipeline3D(make(), **kwargs)(data, training=True))
    return unfused, fused


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------
# exact runs: fused equals unfused bit for bit


def exact_chain():
    return [
        layers.RandomFlip3D(seed=1),
        layers.RandomRotation90_3D(seed=2),
        layers.RandomIntensityShift(0.3, seed=3),
        layers.RandomCrop3D((12, 10, 14), seed=4),
        # integer translations through the affine path, nearest sampling
        layers.RandomTranslation3D(
            translation=((2, 2), (-3, -3), (1, 1)),
            interpolation="nearest",
            fill_mode="nearest",
            seed=5,
        ),
        layers.RandomFlip3D(axes=(1,), probability=0.7, seed=6),
        layers.CenterCropOrPad3D((10, 10, 10)),
    ]


def test_exact_chain_equals_unfused_bit_for_bit():
    unfused, fused = both(exact_chain, volumes())
    assert_identical(unfused, fused)
    assert fused["images"].shape == (2, 10, 10, 10, 1)
    assert fused["segmentation_masks"].dtype == np.int32


def test_exact_chain_with_padding_and_fills():
    # crops larger than the input pad (0 for RandomCrop3D, fill_value for
    # CenterCropOrPad3D), and a flip between them must not move the pads
    def make():
        return [
            layers.CenterCropOrPad3D((20, 12, 16), fill_value=-2.0),
            layers.RandomFlip3D(seed=1),
            layers.RandomCrop3D((22, 14, 14), seed=2),
            layers.RandomRotation90_3D(planes=((1, 2),), seed=3),
        ]

    data = volumes(shape=(2, 16, 16, 16, 1))
    unfused, fused = both(make, data)
    assert_identical(unfused, fused)
    assert (fused["images"] == -2.0).any() and (fused["images"] == 0.0).any()


def test_rank4_and_channels_first_and_images_only():
    x = volumes(shape=(2, 16, 16, 16, 3))["images"]

    def make(data_format="channels_last"):
        return [
            layers.RandomFlip3D(data_format=data_format, seed=1),
            layers.RandomRotation90_3D(data_format=data_format, seed=2),
        ]

    unfused, fused = both(make, x[0])
    np.testing.assert_array_equal(unfused, fused)
    assert fused.shape == (16, 16, 16, 3)
    first = np.moveaxis(x, -1, 1)
    unfused, fused = both(lambda: make("channels_first"), first)
    np.testing.assert_array_equal(unfused, fused)
    assert fused.shape == first.shape


def test_voxelwise_layers_move_past_spatial_ones_and_others_break_the_run():
    data = volumes()

    # shift between two exact maps: applied after them, the same values
    def moved():
        return [
            layers.RandomFlip3D(seed=1),
            layers.RandomIntensityScale(0.5, seed=2),
            layers.RandomRotation90_3D(seed=3),
        ]

    unfused, fused = both(moved, data)
    assert_identical(unfused, fused)

    # a blur between two affine layers is a barrier: each affine resamples on
    # its own, exactly as unfused
    def barrier():
        return [
            layers.RandomAffine3D(degrees=20, seed=1),
            layers.RandomGaussianBlur3D(sigma=1.0, seed=2),
            layers.RandomAffine3D(degrees=20, seed=3),
            keras.layers.Identity(),
            layers.RandomAffine3D(degrees=20, seed=4),
        ]

    unfused, fused = both(barrier, data)
    assert_identical(unfused, fused)


# ----------------------------------------------------------------------------
# general runs: one resampling at the composed coordinates


def _matrix_apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(3, 4) @ points (3, N)."""
    return matrix[:, :3] @ points + matrix[:, 3:4]


def _inside(points: np.ndarray, shape) -> np.ndarray:
    high = np.asarray(shape, dtype=float)[:, None] - 1.0
    return np.all((points >= -1e-3) & (points <= high + 1e-3), axis=0)


def _clamp(points: np.ndarray, shape) -> np.ndarray:
    return np.clip(points, 0.0, np.asarray(shape, dtype=float)[:, None] - 1.0)


def _draw(layer_factory, batch, shape):
    """What a fresh copy of the layer draws first."""
    layer = layer_factory()
    transformation = layer.get_random_transformation(batch, shape)
    return {key: to_numpy(value) for key, value in transformation.items()}


def test_flip_affine_elastic_matches_a_numpy_composition():
    shape = (16, 16, 16)
    flip = lambda: layers.RandomFlip3D(seed=11)  # noqa: E731
    affine = lambda: layers.RandomAffine3D(degrees=20, scales=0.1, translation=1, seed=12)  # noqa: E731
    elastic = lambda: layers.RandomElasticDeformation3D(  # noqa: E731
        num_control_points=5, max_displacement=2.0, seed=13
    )
    data = volumes(3)
    fused = to_numpy(layers.Pipeline3D([flip(), affine(), elastic()])(data, training=True))

    flips = _draw(flip, 2, shape)["flips"]
    matrices = _draw(affine, 2, shape)["matrices"]
    control = _draw(elastic, 2, shape)["control_points"]
    field = to_numpy(dense_displacement(control, shape, (2.0, 2.0, 2.0)))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    for b in range(2):
        q = grid + field[b].reshape(-1, 3).T  # elastic, then its nearest edges
        q = _clamp(q, shape)
        p = _matrix_apply(matrices[b].astype(float), q)  # affine, constant edges
        inside = _inside(p, shape)
        last = np.asarray(shape, dtype=float)[:, None] - 1.0
        r = np.where(flips[b][:, None], last - p, p)  # flip
        image = ndimage.map_coordinates(
            data["images"][b, ..., 0].astype(float), _clamp(r, shape), order=1
        )
        image = np.where(inside, image, 0.0).reshape(shape)
        np.testing.assert_allclose(fused["images"][b, ..., 0], image, atol=1e-4)
        mask = ndimage.map_coordinates(
            data["segmentation_masks"][b, ..., 0], _clamp(r, shape), order=0
        )
        mask = np.where(inside, mask, 0).reshape(shape)
        assert np.mean(fused["segmentation_masks"][b, ..., 0] != mask) < 2e-3


def test_elastic_before_an_affine_is_evaluated_at_the_affine_points():
    shape = (16, 16, 16)
    elastic = lambda: layers.RandomElasticDeformation3D(  # noqa: E731
        num_control_points=4, max_displacement=3.0, seed=21
    )
    affine = lambda: layers.RandomAffine3D(  # noqa: E731
        degrees=25, fill_mode="constant", fill_value=0.5, seed=22
    )
    rot = lambda: layers.RandomRotation90_3D(planes=((0, 1),), seed=23)  # noqa: E731
    data = volumes(4)
    fused = to_numpy(layers.Pipeline3D([elastic(), affine(), rot()])(data, training=True))

    control = _draw(elastic, 2, shape)["control_points"]
    field = to_numpy(dense_displacement(control, shape, (3.0, 3.0, 3.0)))
    matrices = _draw(affine, 2, shape)["matrices"]
    ks = _draw(rot, 2, shape)["k"][:, 0]
    for b in range(2):
        # the reference output of the rotation is np.rot90 of its input, so
        # compose elastic + affine on the grid, then turn the result
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
        p = _matrix_apply(matrices[b].astype(float), grid.reshape(3, -1))
        inside = _inside(p, shape)
        p = _clamp(p, shape)
        shift = np.stack(
            [
                ndimage.map_coordinates(field[b, ..., axis], p, order=1, mode="nearest")
                for axis in range(3)
            ]
        )
        q = _clamp(p + shift, shape)
        image = ndimage.map_coordinates(data["images"][b, ..., 0].astype(float), q, order=1)
        image = np.where(inside, image, 0.5).reshape(shape)
        expected = np.rot90(image, ks[b], axes=(0, 1))
        np.testing.assert_allclose(fused["images"][b, ..., 0], expected, atol=1e-4)


def test_a_rotation_and_its_inverse_fused_are_the_identity():
    n = 32
    g = np.arange(n, dtype="float32")
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    smooth = np.sin(x / 3.0) * np.cos(y / 4.0) + 0.5 * np.sin(z / 5.0)
    images = smooth[None, ..., None].astype("float32")

    def make():
        return [
            layers.RandomRotation3D(degrees=((0, 0), (0, 0), (25, 25)), seed=1),
            layers.RandomRotation3D(degrees=((0, 0), (0, 0), (-25, -25)), seed=2),
        ]

    unfused, fused = both(make, images)
    c = (n - 1) / 2
    interior = (x - c) ** 2 + (y - c) ** 2 < (0.4 * n) ** 2
    fused_error = np.abs(fused[0, ..., 0] - smooth)[interior].max()
    unfused_error = np.abs(unfused[0, ..., 0] - smooth)[interior].max()
    assert fused_error < 1e-4
    assert unfused_error > 1e-2  # two interpolations blur


def test_fused_image_and_mask_stay_aligned():
    # the image is its own mask: after the chain, the image thresholded at
    # 1/2 must match the mask; trilinear-then-threshold and nearest already
    # differ along the boundary after one interpolation (Dice 0.979 here),
    # two interpolations move them further apart (0.956)
    n = 32
    g = np.arange(n, dtype="float32") - (n - 1) / 2
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    radius = np.sqrt((x / 11.0) ** 2 + (y / 8.0) ** 2 + (z / 9.0) ** 2)
    mask = (radius < 1.0).astype("int32")[None, ..., None]
    data = {"images": mask.astype("float32"), "segmentation_masks": mask}

    def make():
        return [
            layers.RandomFlip3D(seed=1),
            layers.RandomAffine3D(degrees=20, scales=0.1, seed=2),
            layers.RandomElasticDeformation3D(num_control_points=5, max_displacement=3, seed=3),
        ]

    unfused, fused = both(make, data)

    def dice(out):
        a, b = out["images"] >= 0.5, out["segmentation_masks"] == 1
        return 2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b))

    assert dice(fused) > 0.97
    assert dice(fused) > dice(unfused) + 0.01
    # the fused and unfused masks differ only along the boundary
    assert np.mean(fused["segmentation_masks"] != unfused["segmentation_masks"]) < 0.02


# ----------------------------------------------------------------------------
# inference, seeds, symbolic use, config, saving


def test_inference_drops_random_layers_and_fuses_the_deterministic_ones():
    x = volumes()["images"]

    def make():
        return [
            layers.RandomFlip3D(seed=1),
            layers.CenterCropOrPad3D((12, 12, 12)),
            layers.Resize3D((20, 8, 12)),
        ]

    pipeline = layers.Pipeline3D(make())
    out = to_numpy(pipeline(x, training=False))
    expected = to_numpy(keras.layers.Pipeline(make()[1:])(x))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    model = keras.Sequential([keras.Input(SHAPE[1:]), pipeline])
    assert model.output_shape == (None, 20, 8, 12, 1)
    np.testing.assert_allclose(to_numpy(model(x)), expected, atol=1e-5)


def test_inference_takes_the_central_window_of_a_random_crop():
    # as RandomCrop3D alone: its declared shape holds at inference too
    data = volumes()

    def make():
        return [
            layers.RandomFlip3D(seed=1),
            layers.RandomCrop3D((12, 10, 14), seed=2),
            layers.RandomAffine3D(degrees=10, seed=3),
            layers.Resize3D((8, 8, 8)),
        ]

    out = to_numpy(layers.Pipeline3D(make())(data, training=False))
    chain = make()
    expected = to_numpy(chain[3](chain[1](data, training=False)))
    np.testing.assert_allclose(out["images"], expected["images"], atol=1e-5)
    np.testing.assert_array_equal(out["segmentation_masks"], expected["segmentation_masks"])
    model = keras.Sequential([keras.Input(SHAPE[1:]), layers.Pipeline3D(make())])
    assert model.output_shape == (None, 8, 8, 8, 1)
    np.testing.assert_allclose(
        to_numpy(model.predict(data["images"], verbose=0)), expected["images"], atol=1e-5
    )
    # images and masks of other sizes are an error naming both, fused or not
    other = {"images": data["images"], "segmentation_masks": data["segmentation_masks"][:, 1:]}
    for training in (True, False):
        with pytest.raises(ValueError, match="same batch and spatial sizes"):
            layers.Pipeline3D(make())(other, training=training)


def test_pipeline_seed_seeds_the_layers_without_one():
    x = volumes()["images"]

    def make():
        return [layers.RandomFlip3D(), layers.RandomAffine3D(degrees=10, seed=7)]

    a = layers.Pipeline3D(make(), seed=3)
    b = layers.Pipeline3D(make(), seed=3)
    assert a.layers[0].seed == 3 and a.layers[1].seed == 7
    np.testing.assert_array_equal(to_numpy(a(x)), to_numpy(b(x)))
    c = layers.Pipeline3D(make(), seed=4)
    assert not np.array_equal(to_numpy(a(x)), to_numpy(c(x)))


def test_config_round_trip():
    pipeline = layers.Pipeline3D(exact_chain(), seed=2, name="augment")
    config = pipeline.get_config()
    again = layers.Pipeline3D.from_config(config)
    assert again.name == "augment" and again.seed == 2
    assert [type(layer) for layer in again.layers] == [type(layer) for layer in pipeline.layers]
    assert again.get_config() == config
    data = volumes()
    assert_identical(to_numpy(pipeline(data)), to_numpy(again(data)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="layers"):
        layers.Pipeline3D([layers.RandomFlip3D(), "flip"])
    with pytest.raises(ValueError, match="seed"):
        layers.Pipeline3D([layers.RandomFlip3D()], seed=1.5)


def test_saved_and_reloaded_in_a_fresh_process_draws_the_same_next(tmp_path):
    x = volumes()["images"]
    pipeline = layers.Pipeline3D(
        [
            layers.RandomFlip3D(),
            layers.RandomAffine3D(degrees=15),
            layers.RandomElasticDeformation3D(num_control_points=4, max_displacement=2),
            layers.RandomGaussianNoise(std=0.1),
        ],
        seed=5,
    )
    model = keras.Sequential([keras.Input(SHAPE[1:]), pipeline])
    pipeline(x)  # advance the streams before saving
    path = tmp_path / "augment.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    expected = to_numpy(pipeline(x))
    script = textwrap.dedent(
        f"""
        import numpy as np, keras
        import keras_nii
        model = keras.saving.load_model({str(path)!r})
        pipeline = model.layers[0]
        assert type(pipeline).__name__ == "Pipeline3D"
        out = pipeline(np.load({str(tmp_path / "x.npy")!r}), training=True)
        np.save({str(tmp_path / "out.npy")!r}, keras.ops.convert_to_numpy(out))
        """
    )
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)


# ----------------------------------------------------------------------------
# compiled, and in training


def test_compiled_fused_equals_compiled_unfused():
    data = volumes()
    unfused = keras.layers.Pipeline(exact_chain())
    fused = layers.Pipeline3D(exact_chain())
    expected = to_numpy(compiled(lambda d: unfused(d, training=True))(data))
    assert_identical(expected, to_numpy(compiled(lambda d: fused(d, training=True))(data)))
    # and a general chain compiles, keeping shapes, dtypes and labels
    general = layers.Pipeline3D(
        [
            layers.RandomFlip3D(seed=1),
            layers.RandomAffine3D(degrees=20, seed=2),
            layers.RandomElasticDeformation3D(num_control_points=4, max_displacement=2, seed=3),
            layers.RandomGaussianNoise(std=0.1, seed=4),
        ]
    )
    out = to_numpy(compiled(lambda d: general(d, training=True))(data))
    assert out["images"].shape == SHAPE and out["images"].dtype == np.float32
    assert out["segmentation_masks"].dtype == np.int32
    assert set(np.unique(out["segmentation_masks"])) <= {0, 1, 2, 3}


@tensorflow_only
def test_tensorflow_graph_on_cpu_compiles_each_fused_run(xla_room):
    import tensorflow as tf

    xla = xla_room

    if tf.config.list_logical_devices("GPU"):
        pytest.skip("the graph path compiles on CPU-only TensorFlow")
    data = volumes()

    def make():
        return [
            layers.RandomFlip3D(seed=1),
            layers.RandomAffine3D(degrees=20, seed=2),
            layers.RandomIntensityScale(0.5, seed=4),
        ]

    reference = layers.Pipeline3D(make())
    expected = to_numpy(tf.function(lambda d: reference(d, training=True), jit_compile=True)(data))
    pipeline = layers.Pipeline3D(make())
    out = to_numpy(tf.function(lambda d: pipeline(d, training=True))(data))
    assert xla.is_compiled(pipeline)
    for key in expected:
        np.testing.assert_allclose(out[key], expected[key], atol=1e-5, err_msg=key)
    # dynamic spatial sizes: not compiled (XLA would compile a program for
    # every size met, beyond the compile table's bound), plain graph ops, which
    # draw what the eager kernels draw
    spec = {
        "images": tf.TensorSpec((None, None, None, None, 1), tf.float32),
        "segmentation_masks": tf.TensorSpec((None, None, None, None, 1), tf.int32),
    }
    dynamic = layers.Pipeline3D(make())
    out = to_numpy(tf.function(lambda d: dynamic(d, training=True), input_signature=[spec])(data))
    assert not xla.is_compiled(dynamic)
    eager = to_numpy(layers.Pipeline3D(make())(data, training=True))
    for key in expected:
        np.testing.assert_allclose(out[key], eager[key], atol=1e-5, err_msg=key)


def _aligned_fit(jit_compile) -> tuple[list, list, list]:
    # the image is its own mask and the network the identity: the loss is 0
    # on every batch iff image and mask got the same coordinates
    rng = np.random.default_rng(0)
    y = (rng.random((4, 12, 12, 12, 1)) > 0.6).astype("int32")
    x = y.astype("float32")
    inputs = keras.Input((None, None, None, 1))
    outputs = keras.layers.Conv3D(1, 1, use_bias=False, kernel_initializer="ones")(inputs)
    pipeline = layers.Pipeline3D(
        [
            layers.RandomFlip3D(seed=1),
            layers.RandomAffine3D(degrees=25, scales=0.15, interpolation="nearest", seed=2),
            layers.RandomElasticDeformation3D(
                num_control_points=4, max_displacement=2.0, interpolation="nearest", seed=3
            ),
        ]
    )
    model = AugmentedModel(keras.Model(inputs, outputs), pipeline)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=jit_compile)
    before = [to_numpy(layer.generator.state).copy() for layer in pipeline.layers]
    history = model.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0)
    after = [to_numpy(layer.generator.state).copy() for layer in pipeline.layers]
    return history.history["loss"], before, after


@pytest.mark.parametrize(
    "jit_compile",
    [False, True] if BACKEND == "tensorflow" else ["auto"],
)
def test_augmented_model_trains_on_aligned_pairs(jit_compile):
    losses, before, after = _aligned_fit(jit_compile)
    assert losses == [0.0, 0.0]
    assert all(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_maps_honour_spacing():
    # millimetre parameters reach the fused maps: one nearest interpolation
    # between exact maps, so fused and unfused agree up to rounding ties
    def make():
        return [
            layers.RandomFlip3D(seed=1),
            layers.RandomAffine3D(
                degrees=20, translation=3, spacing=(1.0, 1.0, 3.0), interpolation="nearest", seed=2
            ),
            layers.RandomRotation90_3D(planes=((0, 1),), seed=3),
        ]

    unfused, fused = both(make, volumes(5))
    for key in unfused:
        assert np.mean(unfused[key] != fused[key]) < 1e-3, key

    def make_elastic():
        return [
            layers.RandomElasticDeformation3D(
                num_control_points=5,
                max_displacement=4.0,
                spacing=(1.0, 2.0, 4.0),
                interpolation="nearest",
                seed=4,
            ),
            layers.RandomFlip3D(seed=5),
        ]

    unfused, fused = both(make_elastic, volumes(6))
    for key in unfused:
        assert np.mean(unfused[key] != fused[key]) < 1e-3, key


@tensorflow_only
def test_runs_in_a_tf_data_map():
    import tensorflow as tf

    def mapped(pipeline):
        # (TensorFlow draws differently in graphs and eagerly: compare graphs)
        ds = tf.data.Dataset.from_tensors(volumes()).map(lambda d: pipeline(d, training=True))
        return {key: value.numpy() for key, value in next(iter(ds)).items()}

    fused = mapped(layers.Pipeline3D(exact_chain()))
    assert_identical(mapped(keras.layers.Pipeline(exact_chain())), fused)
