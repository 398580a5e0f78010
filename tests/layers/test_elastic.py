"""RandomElasticDeformation3D: one smooth, bounded field for images and masks."""

import numpy as np
import pytest
from keras import ops
from scipy import ndimage

from keras_nii.layers import RandomElasticDeformation3D
from keras_nii.layers.elastic import dense_displacement
from tests.layers.conftest import to_numpy

SHAPE = (14, 16, 12)


def ramp(batch, shape=SHAPE):
    """Channel ``a`` holds the voxel index along axis ``a``."""
    grid = np.stack(np.indices(shape), axis=-1).astype("float32")
    return np.repeat(grid[None], batch, axis=0)


def smooth_volume(rng, batch=2, shape=SHAPE, channels=3):
    noise = rng.normal(size=(batch, *shape, channels))
    return ndimage.gaussian_filter(noise, sigma=(0, 2, 2, 2, 0)).astype("float32")


def bspline_reference(control_points, shape, bound):
    """The dense field of one sample's control grid, by scipy's B-spline evaluation.

    The grid is extended by one linearly extrapolated point (clipped to ``bound``)
    at each end of each axis, then evaluated as a cubic B-spline (no prefilter)
    with the control points spanning the volume corner to corner.
    """
    grid = np.asarray(control_points, dtype="float64")
    bound = np.asarray(bound, dtype="float64")
    for axis in range(3):
        first = np.take(grid, [0], axis) * 2 - np.take(grid, [1], axis)
        last = np.take(grid, [-1], axis) * 2 - np.take(grid, [-2], axis)
        grid = np.concatenate(
            [np.clip(first, -bound, bound), grid, np.clip(last, -bound, bound)], axis
        )
    coords = [
        np.arange(n) * (g - 3) / max(n - 1, 1) + 1
        for n, g in zip(shape, grid.shape[:3], strict=True)
    ]
    mesh = np.meshgrid(*coords, indexing="ij")
    return np.stack(
        [ndimage.map_coordinates(grid[..., c], mesh, order=3, prefilter=False) for c in range(3)],
        axis=-1,
    )


def test_zero_displacement_or_probability_is_the_identity(rng):
    images = rng.normal(size=(2, *SHAPE, 3)).astype("float32")
    masks = rng.integers(0, 4, size=(2, *SHAPE, 1)).astype("int32")
    data = {"images": images, "segmentation_masks": masks}
    for kwargs in ({"max_displacement": 0.0}, {"probability": 0.0}):
        nearest = RandomElasticDeformation3D(interpolation="nearest", seed=1, **kwargs)
        out = to_numpy(nearest(data))
        np.testing.assert_array_equal(out["images"], images)
        np.testing.assert_array_equal(out["segmentation_masks"], masks)
        assert out["segmentation_masks"].dtype == np.int32
        linear = RandomElasticDeformation3D(fill_mode="constant", seed=1, **kwargs)
        out = to_numpy(linear(data))
        np.testing.assert_allclose(out["images"], images, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out["segmentation_masks"], masks)


@pytest.mark.parametrize("fill_mode", ["nearest", "constant", "reflect"])
def test_image_and_mask_share_the_field(rng, fill_mode):
    images = smooth_volume(rng)
    threshold = 0.05
    masks = (images > threshold).astype("int32")
    layer = RandomElasticDeformation3D(
        num_control_points=5,
        max_displacement=3.0,
        interpolation="nearest",
        fill_mode=fill_mode,
        seed=7,
    )
    out = to_numpy(layer({"images": images, "segmentation_masks": masks}))
    assert out["segmentation_masks"].dtype == np.int32
    # the image moved, and the mask moved with it, voxel for voxel
    assert not np.array_equal(out["segmentation_masks"], masks)
    np.testing.assert_array_equal(
        out["segmentation_masks"], (out["images"] > threshold).astype("int32")
    )


def test_image_and_mask_agree_with_linear_interpolation():
    # a tilted linear ramp and a threshold: one flat boundary across a 20^3 volume
    # (with linear sampling the two differ only within about half a voxel of it)
    x, y, z = np.indices((20, 20, 20)).astype("float32")
    ramp_image = 0.8 * x + 0.35 * y + 0.2 * z
    images = np.stack([ramp_image, ramp_image[::-1]])[..., None]
    threshold = float(np.median(images)) + 0.123
    masks = (images > threshold).astype("uint8")
    data = {"images": images, "segmentation_masks": masks}

    def warp(seed):
        layer = RandomElasticDeformation3D(num_control_points=5, max_displacement=5.0, seed=seed)
        return to_numpy(layer(data))

    out = warp(3)
    assert out["segmentation_masks"].dtype == np.uint8
    assert np.mean(out["segmentation_masks"] != masks) > 0.01
    agreement = np.mean(out["segmentation_masks"] == (out["images"] > threshold))
    assert agreement >= 0.98
    # a mask warped by another field agrees clearly less
    other = warp(4)["segmentation_masks"]
    assert np.mean(other == (out["images"] > threshold)) < agreement - 0.01


@pytest.mark.parametrize("points, max_displacement", [(7, 4.0), ((4, 6, 5), (2.0, 3.5, 1.0))])
def test_displacement_is_the_bspline_field_bounded_and_smooth(points, max_displacement):
    layer = RandomElasticDeformation3D(
        num_control_points=points, max_displacement=max_displacement, seed=11
    )
    batch = 2
    transformation = layer.get_random_transformation(batch, SHAPE)
    control = to_numpy(transformation["control_points"])
    assert control.shape == (batch, *layer.num_control_points, 3)
    bound = np.asarray(layer.max_displacement, dtype="float32")
    assert np.all(np.abs(control) <= bound)

    # linear interpolation of a coordinate ramp returns the source coordinate itself
    source = to_numpy(layer.transform_images(ops.convert_to_tensor(ramp(batch)), transformation))
    identity = ramp(batch)
    size = np.asarray(SHAPE, dtype="float32")
    for b in range(batch):
        expected = bspline_reference(control[b], SHAPE, bound)
        # fill_mode="nearest": sources outside the volume are clamped to its edge
        np.testing.assert_allclose(
            source[b], np.clip(identity[b] + expected, 0, size - 1), atol=2e-5
        )
    field = source - identity
    eps = 1e-4
    assert np.all(np.abs(field) <= bound + eps)
    assert np.abs(field).max() > 0.1
    # smooth: along an axis with g control points, neighbours differ by at most
    # 2 * max_displacement * (g - 1) / (size - 1) (the B-spline's slope bound),
    # where neither neighbour was clamped at the volume's edge
    inside = np.all((source > 0) & (source < size - 1), axis=-1, keepdims=True)
    for axis in range(3):
        g = layer.num_control_points[axis]
        limit = 2 * bound * (g - 1) / (SHAPE[axis] - 1) + eps
        step = np.abs(np.diff(field, axis=axis + 1))
        both = np.logical_and(
            np.take(inside, range(SHAPE[axis] - 1), axis + 1),
            np.take(inside, range(1, SHAPE[axis]), axis + 1),
        )
        assert np.all(np.where(both, step, 0) <= limit)
        assert both.mean() > 0.5


def test_dense_displacement_matches_the_reference(rng):
    control = rng.uniform(-2, 2, size=(2, 5, 4, 6, 3)).astype("float32")
    field = to_numpy(dense_displacement(control, SHAPE, (2.0, 2.0, 2.0)))
    assert field.shape == (2, *SHAPE, 3)
    for b in range(2):
        np.testing.assert_allclose(
            field[b], bspline_reference(control[b], SHAPE, (2.0, 2.0, 2.0)), atol=1e-5
        )
    # unclipped (extrapolating along three axes reaches 27x the largest control
    # value), the spline passes through the corner control points
    field = to_numpy(dense_displacement(control, SHAPE, (100.0, 100.0, 100.0)))
    np.testing.assert_allclose(field[:, 0, 0, 0], control[:, 0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(field[:, -1, -1, -1], control[:, -1, -1, -1], atol=1e-5)
    # and it reproduces a linear field exactly
    linear = np.stack(np.indices(control.shape[1:4]), axis=-1)
    linear = np.repeat(0.1 * linear[None].astype("float32"), 2, axis=0)
    field = to_numpy(dense_displacement(linear, SHAPE, (6.0, 6.0, 6.0)))
    grid = np.stack(np.indices(SHAPE), axis=-1)
    steps = (np.asarray(control.shape[1:4]) - 1) / (np.asarray(SHAPE) - 1)
    np.testing.assert_allclose(field[0], 0.1 * grid * steps, atol=1e-5)


def test_locked_borders_keep_the_faces_in_place():
    batch = 2
    identity = ramp(batch)
    locked = RandomElasticDeformation3D(max_displacement=3.0, seed=5)
    field = to_numpy(locked(identity)) - identity
    faces = [
        field[:, 0],
        field[:, -1],
        field[:, :, 0],
        field[:, :, -1],
        field[:, :, :, 0],
        field[:, :, :, -1],
    ]
    for face in faces:
        assert np.abs(face).max() < 1e-4
    assert np.abs(field).max() > 0.5

    free = RandomElasticDeformation3D(max_displacement=3.0, locked_borders=False, seed=5)
    transformation = free.get_random_transformation(batch, SHAPE)
    dense = to_numpy(dense_displacement(transformation["control_points"], SHAPE, (3.0,) * 3))
    corners = dense[:, [0, -1]][:, :, [0, -1]][:, :, :, [0, -1]]
    assert np.abs(corners).max() > 0.1


def test_each_sample_its_own_field_and_seeds_reproduce(rng):
    images = np.repeat(smooth_volume(rng, 1), 2, axis=0)
    out = to_numpy(RandomElasticDeformation3D(max_displacement=3.0, seed=2)(images))
    assert not np.allclose(out[0], out[1])
    again = to_numpy(RandomElasticDeformation3D(max_displacement=3.0, seed=2)(images))
    np.testing.assert_array_equal(out, again)
    other = to_numpy(RandomElasticDeformation3D(max_displacement=3.0, seed=3)(images))
    assert not np.allclose(out, other)


def test_probability_selects_samples():
    # a sample left alone gets an all-zero grid, i.e. the identity (tested above)
    layer = RandomElasticDeformation3D(max_displacement=3.0, probability=0.5, seed=4)
    transformation = layer.get_random_transformation(40, SHAPE)
    moved = np.abs(to_numpy(transformation["control_points"])).max(axis=(1, 2, 3, 4)) > 0
    assert 10 < moved.sum() < 30


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_images_keep_their_dtype(rng, dtype):
    images = smooth_volume(rng)
    layer = RandomElasticDeformation3D(seed=0)
    transformation = layer.get_random_transformation(2, SHAPE)
    reference = to_numpy(layer.transform_images(ops.convert_to_tensor(images), transformation))
    out = layer.transform_images(ops.cast(images, dtype), transformation)
    assert ops.dtype(out) == dtype
    np.testing.assert_allclose(to_numpy(ops.cast(out, "float32")), reference, atol=0.02)
    # under a mixed precision policy, float16 in, float16 out
    mixed = RandomElasticDeformation3D(seed=0, dtype="mixed_float16")
    assert ops.dtype(mixed(ops.cast(images, "float16"))) == "float16"


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_control_points": 3}, "num_control_points"),
        ({"num_control_points": (5, 5)}, "num_control_points"),
        ({"num_control_points": 5.0}, "num_control_points"),
        ({"max_displacement": -1.0}, "max_displacement"),
        ({"max_displacement": (1.0, 2.0)}, "max_displacement"),
        ({"max_displacement": float("inf")}, "max_displacement"),
        ({"locked_borders": 1}, "locked_borders"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"fill_mode": "wrap"}, "fill_mode"),
        ({"fill_value": "zero"}, "fill_value"),
        ({"probability": 1.5}, "probability"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RandomElasticDeformation3D(**kwargs)


def test_config_round_trip():
    layer = RandomElasticDeformation3D(
        num_control_points=(4, 5, 6), max_displacement=(1.0, 2.0, 3.0), locked_borders=False
    )
    clone = RandomElasticDeformation3D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.num_control_points == (4, 5, 6)
    assert clone.max_displacement == (1.0, 2.0, 3.0)
    assert clone.spacing is None
    in_mm = RandomElasticDeformation3D(max_displacement=3.0, spacing=(0.5, 1.0, 3.0))
    clone = RandomElasticDeformation3D.from_config(in_mm.get_config())
    assert clone.get_config() == in_mm.get_config()
    assert clone.spacing == (0.5, 1.0, 3.0)


def test_displacement_in_mm(rng):
    # 3 mm on a 0.5 x 1 x 3 mm grid is 6, 3 and 1 voxels: the same draws and
    # the same output as the voxel layer given those bounds
    images = smooth_volume(rng)
    masks = (images[..., :1] > 0).astype("int32")
    data = {"images": images, "segmentation_masks": masks}
    in_mm = RandomElasticDeformation3D(max_displacement=3.0, spacing=(0.5, 1.0, 3.0), seed=5)
    in_voxels = RandomElasticDeformation3D(max_displacement=(6.0, 3.0, 1.0), seed=5)
    out, expected = to_numpy(in_mm(data)), to_numpy(in_voxels(data))
    np.testing.assert_array_equal(out["segmentation_masks"], expected["segmentation_masks"])
    np.testing.assert_allclose(out["images"], expected["images"], atol=1e-6)
    assert not np.allclose(out["images"], images, atol=1e-3)

    # the field itself, on a ramp: within 3 mm along every axis, and near it
    layer = RandomElasticDeformation3D(max_displacement=3.0, spacing=(0.5, 1.0, 3.0), seed=6)
    field = to_numpy(layer(ramp(4), training=True)) - ramp(4)
    interior = field[:, 2:-2, 2:-2, 2:-2]  # away from the extrapolated edges
    largest_mm = np.abs(interior).max(axis=(0, 1, 2, 3)) * np.array([0.5, 1.0, 3.0])
    assert np.all(largest_mm <= 3.0 + 1e-4), largest_mm
    assert np.all(largest_mm >= 1.0), largest_mm


def test_in_plane_only_deformation_keeps_slices():
    # (d, d, 0) mm: every voxel samples its own slice (thick axis 2)
    layer = RandomElasticDeformation3D(max_displacement=(4.0, 4.0, 0.0), spacing=(1, 1, 5), seed=7)
    field = to_numpy(layer(ramp(2), training=True)) - ramp(2)
    assert np.abs(field[..., 2]).max() < 1e-5  # float32 rounding of the weights
    assert np.abs(field[..., :2]).max() > 0.5


@pytest.mark.parametrize("spacing", [(1.0, 2.0), (0, 1, 1), "iso", (1, 1, float("inf"))])
def test_bad_spacing_names_itself(spacing):
    with pytest.raises(ValueError, match="spacing"):
        RandomElasticDeformation3D(spacing=spacing)


EXAMPLES = [
    lambda: RandomElasticDeformation3D(
        num_control_points=(5, 6, 5),
        max_displacement=(2.0, 3.0, 2.5),
        interpolation="linear",
        fill_mode="constant",
        probability=0.8,
        spacing=(1.0, 1.5, 2.0),
        seed=3,
    ),
]
