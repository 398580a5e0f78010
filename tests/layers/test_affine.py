"""RandomAffine3D and its specializations against scipy.ndimage.affine_transform.

scipy's ``affine_transform(input, matrix, offset)`` samples the input at
``matrix @ o + offset`` for each output index ``o``: the resampler's output ->
input convention. The tests re-derive that matrix in NumPy (float64) from the
documented forward convention ``y = c + Rz Ry Rx Z S (x - c) + t``.
"""

import keras
import numpy as np
import pytest
import scipy.ndimage as ndi

from keras_nii.layers.affine import (
    RandomAffine3D,
    RandomRotation3D,
    RandomTranslation3D,
    RandomZoom3D,
)
from tests.layers.conftest import to_numpy

N = 16
CENTRE = np.full(3, (N - 1) / 2)
GRID = np.mgrid[0:N, 0:N, 0:N].astype("float64")


def _fixed(values):
    """A collapsed per-axis range: the layer always draws ``values``."""
    return [(float(v), float(v)) for v in values]


def _forward(degrees=(0, 0, 0), scales=(1, 1, 1), shear=(0, 0, 0)):
    """The forward linear map ``Rz @ Ry @ Rx @ Z @ S`` of the documented convention."""
    rx, ry, rz = np.deg2rad(degrees)
    r_x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    r_y = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    r_z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    s01, s02, s12 = np.tan(np.deg2rad(shear))
    s = np.array([[1, s01, s02], [0, 1, s12], [0, 0, 1]])
    return r_z @ r_y @ r_x @ np.diag(scales) @ s


def _inverse(forward, translation=(0, 0, 0)):
    """scipy's (matrix, offset): ``x = c + A^-1 (y - c - t)``."""
    matrix = np.linalg.inv(forward)
    offset = CENTRE - matrix @ (CENTRE + np.asarray(translation, "float64"))
    return matrix, offset


def _interior(matrix, offset, margin=0.01):
    """Output voxels whose source point lies inside the input, off its edges."""
    source = np.einsum("ij,jxyz->ixyz", matrix, GRID) + offset[:, None, None, None]
    return np.all((source >= margin) & (source <= N - 1 - margin), axis=0)


def _scipy(volumes, matrix, offset, order, mode="constant"):
    """Per sample and channel, scipy's affine_transform of a (b, x, y, z, c) batch."""
    out = np.empty(volumes.shape, "float64")
    for i in range(volumes.shape[0]):
        for ch in range(volumes.shape[-1]):
            out[i, ..., ch] = ndi.affine_transform(
                volumes[i, ..., ch].astype("float64"), matrix, offset, order=order, mode=mode
            )
    return out


def _labels():
    """A smooth label map (nested shells, 0..3) on the N^3 grid."""
    radius = np.sqrt(((GRID - CENTRE[:, None, None, None]) ** 2).sum(axis=0))
    return np.digitize(radius, [3.0, 5.0, 7.0]).astype("int32")


def _blob(shift=(0.0, 0.0, 0.0)):
    """A smooth bright blob, unit scale, a little off centre."""
    centre = CENTRE + np.asarray(shift)
    d2 = (
        (GRID - centre[:, None, None, None]) ** 2 * np.array([1.0, 0.6, 1.4])[:, None, None, None]
    ).sum(0)
    return np.exp(-d2 / 18.0).astype("float32")


def _check_against_scipy(layer, matrix, offset, rng):
    images = rng.random((2, N, N, N, 2)).astype("float32")
    masks = np.stack([_labels(), _labels()[::-1]])[..., None]
    # the drawn matrices are the ones derived in NumPy
    drawn = to_numpy(layer.get_random_transformation(2, (N, N, N))["matrices"])
    np.testing.assert_allclose(drawn[:, :, :3], np.broadcast_to(matrix, (2, 3, 3)), atol=1e-6)
    np.testing.assert_allclose(drawn[:, :, 3], np.broadcast_to(offset, (2, 3)), atol=1e-5)

    out = layer({"images": images, "segmentation_masks": masks})
    assert keras.backend.standardize_dtype(out["segmentation_masks"].dtype) == "int32"
    assert keras.backend.standardize_dtype(out["images"].dtype) == "float32"
    out = to_numpy(out)

    inside = _interior(matrix, offset)
    assert inside.mean() > 0.3
    expected = _scipy(images, matrix, offset, order=1)
    np.testing.assert_allclose(out["images"][:, inside], expected[:, inside], atol=1e-4)

    # order 0: the resampler rounds float32 coordinates, scipy float64 ones, so
    # a voxel whose source point lies (almost) exactly halfway between two
    # input voxels may round to the other neighbour; and the resampler keeps a
    # source point up to 1e-3 voxel beyond the edge (so that an identity map
    # keeps its edge voxels) where scipy's "constant" mode fills it. Either
    # can only show on a label border or on the volume's edge: a handful of
    # voxels.
    expected = _scipy(masks, matrix, offset, order=0).astype("int32")
    assert np.mean(out["segmentation_masks"] == expected) >= 0.999
    assert np.mean(out["segmentation_masks"][:, inside] == expected[:, inside]) >= 0.999


def test_fixed_rotation_matches_scipy(rng):
    degrees = (10, -20, 30)
    layer = RandomRotation3D(degrees=_fixed(degrees), seed=1)
    _check_against_scipy(layer, *_inverse(_forward(degrees=degrees)), rng)


def test_fixed_affine_matches_scipy(rng):
    degrees, scales, shear, translation = (10, -20, 30), (1.1, 0.9, 1.2), (5, -8, 3), (1.5, -2, 0.5)
    layer = RandomAffine3D(
        degrees=_fixed(degrees),
        scales=_fixed(scales),
        translation=_fixed(translation),
        shear=_fixed(shear),
        seed=2,
    )
    forward = _forward(degrees=degrees, scales=scales, shear=shear)
    _check_against_scipy(layer, *_inverse(forward, translation), rng)


def test_rotation_direction():
    # +90 degrees about axis 2 turns axis 0 towards axis 1
    n = 15
    volume = np.zeros((1, n, n, n, 1), "float32")
    volume[0, 10, 7, 7, 0] = 1.0
    out = to_numpy(RandomRotation3D(degrees=_fixed((0, 0, 90)), seed=0)(volume))
    assert np.unravel_index(np.argmax(out[0, ..., 0]), (n, n, n)) == (7, 10, 7)
    assert out[0, 7, 10, 7, 0] > 0.99


def test_translation_direction():
    volume = np.zeros((1, N, N, N, 1), "float32")
    volume[0, 5, 7, 9, 0] = 1.0
    out = to_numpy(RandomTranslation3D(translation=_fixed((2, 0, 0)), seed=0)(volume))
    expected = np.zeros_like(volume)
    expected[0, 7, 7, 9, 0] = 1.0
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_zoom_in_makes_content_bigger(interpolation):
    volume = np.zeros((1, N, N, N, 1), "float32")
    volume[0, 6:10, 6:10, 6:10, 0] = 1.0  # 4^3 centered cube
    layer = RandomZoom3D(scales=(2.0, 2.0), interpolation=interpolation, seed=0)
    count = np.sum(to_numpy(layer(volume)) > 0.5)
    assert 6 * 64 <= count <= 10 * 64, count
    layer = RandomZoom3D(scales=(0.5, 0.5), interpolation=interpolation, seed=0)
    volume[0, 4:12, 4:12, 4:12, 0] = 1.0  # 8^3 centered cube
    count = np.sum(to_numpy(layer(volume)) > 0.5)
    assert 0.6 * 64 <= count <= 1.6 * 64, count


def test_anisotropic_zoom_per_axis():
    volume = np.zeros((1, N, N, N, 1), "float32")
    volume[0, 6:10, 6:10, 6:10, 0] = 1.0
    layer = RandomZoom3D(scales=_fixed((2, 1, 1)), isotropic=False, interpolation="nearest", seed=0)
    out = to_numpy(layer(volume))[0, ..., 0] > 0.5
    extent = [np.ptp(np.nonzero(out)[axis]) + 1 for axis in range(3)]
    assert extent == [8, 4, 4]


@pytest.mark.parametrize("fill_mode", ["constant", "reflect"])
def test_nearest_image_that_is_its_own_mask_stays_aligned(fill_mode):
    image = np.stack([_blob(), _blob((1.5, -1.0, 0.5))])[..., None]
    mask = (image > 0.4).astype("int32")
    layer = RandomAffine3D(
        degrees=25,
        scales=0.2,
        translation=2,
        shear=8,
        interpolation="nearest",
        fill_mode=fill_mode,
        seed=5,
    )
    out = to_numpy(layer({"images": image, "segmentation_masks": mask}))
    np.testing.assert_array_equal(out["segmentation_masks"], (out["images"] > 0.4).astype("int32"))
    assert not np.array_equal(out["segmentation_masks"], mask)


def test_linear_image_and_mask_stay_aligned():
    image = np.stack([_blob(), _blob((1.5, -1.0, 0.5)), _blob((-2.0, 0.0, 1.0))])[..., None]
    mask = (image > 0.4).astype("int32")
    layer = RandomAffine3D(degrees=25, scales=0.2, translation=2, shear=8, seed=6)
    out = to_numpy(layer({"images": image, "segmentation_masks": mask}))
    agreement = np.mean(out["segmentation_masks"] == (out["images"] > 0.4))
    assert agreement >= 0.98, agreement
    assert out["segmentation_masks"].sum() > 0.5 * mask.sum()


def test_each_sample_gets_its_own_draw():
    image = np.repeat(_blob()[None, ..., None], 3, axis=0)
    out = to_numpy(RandomAffine3D(degrees=20, scales=0.1, translation=2, seed=7)(image))
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert np.abs(out[i] - out[j]).max() > 1e-2
    matrices = to_numpy(
        RandomAffine3D(degrees=20, seed=7).get_random_transformation(3, (N, N, N))["matrices"]
    )
    assert not np.allclose(matrices[0], matrices[1])


def test_probability_zero_is_identity(rng):
    image = rng.normal(size=(2, N, N, N, 2)).astype("float32")
    mask = rng.integers(0, 4, size=(2, N, N, N, 1)).astype("int32")
    layer = RandomAffine3D(degrees=30, scales=0.3, translation=3, shear=10, probability=0.0, seed=3)
    out = to_numpy(layer({"images": image, "segmentation_masks": mask}))
    np.testing.assert_array_equal(out["images"], image)
    np.testing.assert_array_equal(out["segmentation_masks"], mask)


def test_probability_applies_per_sample():
    layer = RandomRotation3D(degrees=(10, 20), probability=0.5, seed=4)
    matrices = to_numpy(layer.get_random_transformation(64, (N, N, N))["matrices"])
    identity = np.concatenate([np.eye(3), np.zeros((3, 1))], axis=1)
    untouched = np.array([np.array_equal(m, identity) for m in matrices])
    assert 0.25 < untouched.mean() < 0.75


@pytest.mark.parametrize("fill_mode", ["constant", "nearest", "reflect"])
def test_fill_modes_match_scipy_at_the_borders(fill_mode, rng):
    image = rng.random((1, N, N, N, 1)).astype("float32")
    translation = (3.0, -2.0, 0.0)
    layer = RandomTranslation3D(
        translation=_fixed(translation), fill_mode=fill_mode, fill_value=0.0
    )
    out = to_numpy(layer(image))
    matrix, offset = _inverse(np.eye(3), translation)
    expected = _scipy(image, matrix, offset, order=1, mode=fill_mode)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    border = out[0, :3, :, :, 0]
    if fill_mode == "constant":
        assert np.all(border == 0)
    else:
        assert np.all(border != 0)
    if fill_mode == "nearest":
        np.testing.assert_array_equal(out[0, 0, 2:-2], out[0, 3, 2:-2])
    if fill_mode == "reflect":
        np.testing.assert_array_equal(out[0, 2, 2:-2], out[0, 3, 2:-2])


def test_constant_fill_value_for_images_zero_for_masks():
    image = np.ones((1, N, N, N, 1), "float32")
    mask = np.ones((1, N, N, N, 1), "int32")
    layer = RandomTranslation3D(translation=_fixed((4, 0, 0)), fill_value=-5.0)
    out = to_numpy(layer({"images": image, "segmentation_masks": mask}))
    assert np.all(out["images"][0, :4] == -5.0) and np.all(out["images"][0, 4:] == 1.0)
    assert np.all(out["segmentation_masks"][0, :4] == 0) and np.all(
        out["segmentation_masks"][0, 4:] == 1
    )


def test_half_precision_images_keep_their_dtype():
    image = np.stack([_blob()])[..., None].astype("float16")
    out = RandomRotation3D(degrees=20, seed=0, dtype="mixed_float16")(image)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    reference = to_numpy(RandomRotation3D(degrees=20, seed=0)(image.astype("float32")))
    np.testing.assert_allclose(to_numpy(out).astype("float32"), reference, atol=2e-3)


# --------------------------------------------------------------------------- millimetres


def _physical(forward, spacing, translation_mm=(0, 0, 0)):
    """scipy's (matrix, offset) of a forward map in mm: ``D^-1 A D`` in index space."""
    d = np.diag(np.asarray(spacing, "float64"))
    d_inv = np.linalg.inv(d)
    return _inverse(d_inv @ forward @ d, d_inv @ np.asarray(translation_mm, "float64"))


@pytest.mark.parametrize("axis", [2, 0, 1])
def test_fixed_rotation_in_mm_matches_scipy(axis, rng):
    # 30 degrees about one axis of a 1 x 1 x 3 mm volume; about axis 2 (the
    # thick one) the turn is in the isotropic plane, about 0 and 1 it mixes
    # the 1 mm and 3 mm axes and differs from a turn of the voxel grid
    degrees = [0.0, 0.0, 0.0]
    degrees[axis] = 30.0
    spacing = (1.0, 1.0, 3.0)
    layer = RandomRotation3D(degrees=_fixed(degrees), spacing=spacing, seed=1)
    matrix, offset = _physical(_forward(degrees=degrees), spacing)
    _check_against_scipy(layer, matrix, offset, rng)
    voxel_matrix, _ = _inverse(_forward(degrees=degrees))
    assert np.allclose(matrix, voxel_matrix) == (axis == 2)


def test_fixed_affine_in_mm_matches_scipy(rng):
    degrees, scales, shear = (10, -20, 30), (1.1, 0.9, 1.2), (5, -8, 3)
    spacing, translation = (0.8, 1.25, 2.5), (1.5, -2.5, 5.0)  # mm
    layer = RandomAffine3D(
        degrees=_fixed(degrees),
        scales=_fixed(scales),
        translation=_fixed(translation),
        shear=_fixed(shear),
        spacing=spacing,
        seed=2,
    )
    forward = _forward(degrees=degrees, scales=scales, shear=shear)
    _check_against_scipy(layer, *_physical(forward, spacing, translation), rng)


def test_rotation_in_mm_moves_a_point_by_its_physical_distance():
    # +90 degrees about axis 0 turns axis 1 towards axis 2: a point 6 mm from
    # the centre along axis 1 (6 voxels of 1 mm) lands 6 mm along axis 2,
    # which is 2 voxels of 3 mm
    n = 15
    volume = np.zeros((1, n, n, n, 1), "float32")
    volume[0, 7, 13, 7, 0] = 1.0
    layer = RandomRotation3D(degrees=_fixed((90, 0, 0)), spacing=(1, 1, 3), seed=0)
    out = to_numpy(layer(volume))
    assert np.unravel_index(np.argmax(out[0, ..., 0]), (n, n, n)) == (7, 7, 9)
    assert out[0, 7, 7, 9, 0] > 0.99


def test_translation_in_mm():
    volume = np.zeros((1, N, N, N, 1), "float32")
    volume[0, 5, 7, 9, 0] = 1.0
    layer = RandomTranslation3D(translation=_fixed((3, -1, 6)), spacing=(1.5, 0.5, 3), seed=0)
    expected = np.zeros_like(volume)
    expected[0, 7, 5, 11, 0] = 1.0  # (3 / 1.5, -1 / 0.5, 6 / 3) voxels
    np.testing.assert_allclose(to_numpy(layer(volume)), expected, atol=1e-6)


def test_zoom_is_the_same_in_mm_and_in_voxels():
    plain = RandomZoom3D(scales=(0.7, 1.3), isotropic=False, seed=3)
    in_mm = RandomZoom3D(scales=(0.7, 1.3), isotropic=False, spacing=(1, 2, 4), seed=3)
    np.testing.assert_allclose(
        to_numpy(in_mm.get_random_transformation(4, (N, N, N))["matrices"]),
        to_numpy(plain.get_random_transformation(4, (N, N, N))["matrices"]),
        atol=1e-6,
    )


def test_isotropic_spacing_changes_nothing():
    kwargs = {"degrees": 20, "scales": 0.1, "translation": 2, "shear": 5}
    plain = RandomAffine3D(**kwargs, seed=4)
    unit = RandomAffine3D(**kwargs, spacing=(1, 1, 1), seed=4)
    np.testing.assert_allclose(
        to_numpy(unit.get_random_transformation(3, (N, N, N))["matrices"]),
        to_numpy(plain.get_random_transformation(3, (N, N, N))["matrices"]),
        atol=1e-6,
    )


@pytest.mark.parametrize("spacing", [(1, 1), (1, 0, 1), (1, -2, 1), "1mm", (1, float("nan"), 1)])
def test_bad_spacing_names_itself(spacing):
    for make in (
        lambda **kw: RandomAffine3D(**kw),
        lambda **kw: RandomRotation3D(5, **kw),
        lambda **kw: RandomZoom3D(0.1, **kw),
        lambda **kw: RandomTranslation3D(2, **kw),
    ):
        with pytest.raises(ValueError, match="spacing"):
            make(spacing=spacing)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"degrees": (20, 10)}, "degrees"),
        ({"degrees": -5}, "degrees"),
        ({"scales": 1.5}, "scales"),
        ({"scales": (0.0, 1.0)}, "scales"),
        ({"scales": ((0.9, 1.1), (0.8, 1.2), (1, 1)), "isotropic": True}, "isotropic"),
        ({"translation": "a"}, "translation"),
        ({"shear": 90}, "shear"),
        ({"shear": (-100, 10)}, "shear"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"fill_mode": "wrap"}, "fill_mode"),
        ({"fill_value": None}, "fill_value"),
        ({"isotropic": 1}, "isotropic"),
        ({"probability": 1.5}, "probability"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RandomAffine3D(**kwargs)


def test_argument_parsing():
    layer = RandomAffine3D(degrees=10, scales=0.2, translation=(1, 2, 3), shear=(-5, 5))
    assert layer.degrees == ((-10.0, 10.0),) * 3
    np.testing.assert_allclose(layer.scales, ((0.8, 1.2),) * 3)
    assert layer.translation == ((-1.0, 1.0), (-2.0, 2.0), (-3.0, 3.0))
    assert layer.shear == ((-5.0, 5.0),) * 3
    assert RandomZoom3D(scales=(0.5, 2.0)).scales == ((0.5, 2.0),) * 3


def test_isotropic_zoom_draws_one_factor():
    layer = RandomZoom3D(scales=(0.5, 2.0), seed=1)
    matrices = to_numpy(layer.get_random_transformation(8, (N, N, N))["matrices"])
    diagonals = np.diagonal(matrices[:, :, :3], axis1=1, axis2=2)
    np.testing.assert_allclose(diagonals, diagonals[:, :1].repeat(3, axis=1), rtol=1e-6)
    assert np.ptp(diagonals[:, 0]) > 0.1
    anisotropic = RandomZoom3D(scales=(0.5, 2.0), isotropic=False, seed=1)
    matrices = to_numpy(anisotropic.get_random_transformation(8, (N, N, N))["matrices"])
    diagonals = np.diagonal(matrices[:, :, :3], axis1=1, axis2=2)
    assert np.ptp(diagonals, axis=1).max() > 0.1


@pytest.mark.parametrize(
    "layer, own",
    [
        (
            RandomAffine3D(degrees=5, scales=0.1, translation=2, shear=3, isotropic=True, seed=1),
            {"degrees", "scales", "translation", "shear", "isotropic"},
        ),
        (
            RandomRotation3D(degrees=(0, 0, 15), fill_mode="reflect", spacing=(1, 1, 3), seed=2),
            {"degrees"},
        ),
        (RandomZoom3D(scales=(0.8, 1.25), isotropic=False, seed=3), {"scales", "isotropic"}),
        (
            RandomTranslation3D(translation=(4, 4, 2), interpolation="nearest", seed=4),
            {"translation"},
        ),
    ],
)
def test_config_round_trip(layer, own):
    config = layer.get_config()
    common = {
        "interpolation",
        "fill_mode",
        "fill_value",
        "probability",
        "spacing",
        "data_format",
        "seed",
    }
    base = {"name", "trainable", "dtype"}
    assert set(config) == own | common | base
    rebuilt = type(layer).from_config(config)
    assert rebuilt.get_config() == config
    for attribute in (
        "degrees",
        "scales",
        "translation",
        "shear",
        "isotropic",
        "fill_mode",
        "spacing",
    ):
        assert getattr(rebuilt, attribute) == getattr(layer, attribute)


EXAMPLES = [
    lambda: RandomAffine3D(
        degrees=10, scales=(0.9, 1.2), translation=2, shear=5, probability=0.9, seed=3
    ),
    lambda: RandomRotation3D(degrees=(5, 10, 15), fill_mode="reflect", spacing=(1, 1, 2), seed=4),
    lambda: RandomZoom3D(scales=(0.8, 1.25), interpolation="nearest", seed=5),
    lambda: RandomTranslation3D(
        translation=(3, 3, 1), fill_mode="nearest", probability=0.7, seed=6
    ),
]
