"""Resampling to a voxel spacing and back: keras_nii.spacing, load_nifti(spacing=),
save_nifti(like=) of a resampled volume, NiftiDataset(spacing=).

References are independent of the module: world positions come from the files'
own affines (nibabel), values from ``scipy.ndimage.map_coordinates`` at sample
points computed from those affines, and label maps from per-label
``map_coordinates`` then ``np.argmax``.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from keras_nii.data import NiftiDataset
from keras_nii.io import NiftiError, load_nifti, save_nifti
from keras_nii.spacing import Resampling, resample_axes, resample_to_spacing, spacing_grid

EPS32 = float(np.finfo(np.float32).eps)


def rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def grid_affine(kind, zooms):
    """A voxel-to-world affine: RAS, LPS, PSR (axes permuted) or oblique."""
    zooms = np.asarray(zooms, float)
    if kind == "RAS":
        directions = np.eye(3)
    elif kind == "LPS":
        directions = np.diag([-1.0, -1.0, 1.0])
    elif kind == "PSR":  # voxel axes: posterior, superior, right
        directions = np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]], float)
    elif kind == "oblique":
        directions = rotation((1, 2, 3), 25) @ np.diag([-1.0, 1.0, 1.0])
    else:
        raise AssertionError(kind)
    affine = np.eye(4)
    affine[:3, :3] = directions * zooms
    affine[:3, 3] = (-7.0, 12.5, -3.25)
    return affine


def write(path, data, affine):
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def world_of(affine, shape):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def source_index(file_affine, world):
    """Continuous voxel indices, in the file's own voxel order, of world points."""
    inverse = np.linalg.inv(file_affine)
    return world @ inverse[:3, :3].T + inverse[:3, 3]


GRADIENT = np.array([0.7, -1.3, 2.1])


def linear_field(world):
    return 5.0 + world @ GRADIENT


CASES = [
    ("oblique", (1.0, 1.1, 2.5), (0.8, 0.8, 0.8)),
    ("LPS", (0.7, 0.7, 3.0), (1.0, 1.0, 1.0)),
    ("PSR", (1.2, 0.9, 1.0), (0.6, None, 1.5)),  # PSR: RAS+ axes are (z, x, y) of the file
    ("RAS", (0.5, 0.5, 4.0), (1.5, 1.5, 1.5)),
]


@pytest.mark.parametrize("kind, zooms, spacing", CASES)
def test_linear_field_is_reproduced(tmp_path, kind, zooms, spacing):
    shape = (14, 11, 9)
    affine = grid_affine(kind, zooms)
    data = linear_field(world_of(affine, shape)).astype(np.float32)
    path = write(tmp_path / "field.nii.gz", data, affine)

    vol = load_nifti(path, spacing=spacing)
    plain = load_nifti(path)
    # the spacing asked for, the source's own where None, the directions kept
    want = [s if s is not None else have for s, have in zip(spacing, plain.spacing, strict=True)]
    np.testing.assert_allclose(vol.spacing, want, rtol=1e-12)
    np.testing.assert_allclose(
        vol.affine[:3, :3] / vol.spacing, plain.affine[:3, :3] / plain.spacing, atol=1e-12
    )
    assert vol.axcodes == ("R", "A", "S")
    assert vol.resampling is not None

    world = world_of(vol.affine, vol.shape[:3])
    expected = linear_field(world)
    inside = np.all(
        (source_index(affine, world) >= -1e-9)
        & (source_index(affine, world) <= np.array(shape) - 1 + 1e-9),
        axis=-1,
    )
    assert inside.mean() > 0.5
    tolerance = 8 * EPS32 * np.abs(data).max()
    np.testing.assert_allclose(vol.array[..., 0][inside], expected[inside], rtol=0, atol=tolerance)


@pytest.mark.parametrize("kind, zooms, spacing", CASES)
def test_new_grid_covers_the_field_of_view(kind, zooms, spacing):
    shape = (14, 11, 9)
    affine = grid_affine(kind, zooms)
    new_shape, new_affine, _, _ = spacing_grid(shape, affine, spacing)
    # corners of both fields of view (voxel edges), in the old grid's indices
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in new_shape], indexing="ij"))
    corners = corners.reshape(3, -1).T
    old = (np.linalg.inv(affine) @ new_affine @ np.c_[corners, np.ones(len(corners))].T)[:3]
    for axis in range(3):
        lo, hi = old[axis].min(), old[axis].max()
        assert lo <= -0.5 + 1e-9 and hi >= shape[axis] - 0.5 - 1e-9
        # overhangs by less than one new voxel in all
        new_voxel = np.linalg.norm(new_affine[:3, axis]) / np.linalg.norm(affine[:3, axis])
        assert (hi - lo) - shape[axis] < new_voxel + 1e-9


def test_values_match_scipy_map_coordinates(tmp_path):
    rng = np.random.default_rng(0)
    affine = grid_affine("oblique", (0.9, 1.3, 2.2))
    data = rng.normal(size=(13, 10, 8, 2)).astype(np.float32)
    path = write(tmp_path / "noise.nii", data, affine)
    vol = load_nifti(path, spacing=(0.7, 1.0, 1.1))
    canonical = nib.as_closest_canonical(nib.load(path))
    source = np.asarray(canonical.dataobj, dtype=np.float64)
    index = source_index(canonical.affine, world_of(vol.affine, vol.shape[:3]))
    points = np.moveaxis(index, -1, 0)
    for c in range(2):
        ref = ndimage.map_coordinates(source[..., c], points, order=1, mode="nearest")
        np.testing.assert_allclose(vol.array[..., c], ref, rtol=0, atol=1e-5)


def label_reference(labels, points, values):
    probabilities = np.stack(
        [
            ndimage.map_coordinates(
                (labels == v).astype(np.float64), points, order=1, mode="nearest"
            )
            for v in values
        ],
        -1,
    )
    top2 = np.sort(probabilities, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 1e-5
    return np.asarray(values)[np.argmax(probabilities, -1)], decided


@pytest.mark.parametrize("layout", ["C", "F", "flipped"])
def test_label_interpolation_is_per_label_linear_then_argmax(layout):
    rng = np.random.default_rng(1)
    labels = ndimage.zoom(rng.integers(0, 4, (5, 4, 3)), 3, order=0).astype(np.int16) * 3 - 1
    labels = np.asarray(labels, order="F" if layout == "F" else "C")
    if layout == "flipped":
        labels = labels[::-1, :, ::-1]
    scale, shift = np.array([0.45, 1.6, 0.7]), np.array([-0.2, 0.3, 0.05])
    shape = (32, 8, 13)
    out = resample_axes(labels, shape, scale, shift)
    assert out.dtype == labels.dtype
    axes = [shift[d] + scale[d] * np.arange(shape[d]) for d in range(3)]
    points = np.array(np.meshgrid(*axes, indexing="ij"))
    ref, decided = label_reference(labels, points, np.unique(labels))
    assert decided.mean() > 0.9
    np.testing.assert_array_equal(out[decided], ref[decided])

    nearest = resample_axes(labels, shape, scale, shift, interpolation="nearest")
    rounded = np.floor(points + 0.5)  # round half up, as documented
    clipped = [np.clip(rounded[d], 0, labels.shape[d] - 1).astype(int) for d in range(3)]
    np.testing.assert_array_equal(nearest, labels[tuple(clipped)])


def test_one_label_and_bool_masks():
    zeros = np.zeros((6, 6, 6), np.uint8)
    out, _ = resample_to_spacing(zeros, np.eye(4), (0.5, 2.0, 1.0))
    assert out.shape == (12, 3, 6) and out.dtype == np.uint8 and not out.any()
    mask = np.zeros((8, 8, 8), bool)
    mask[2:6, 3:5, 1:7] = True
    out, how = resample_to_spacing(mask, np.eye(4), 0.5)
    assert out.dtype == bool
    back = how.invert(out)
    np.testing.assert_array_equal(back, mask)


def spheres(shape, affine, radii, centres):
    world = world_of(affine, shape)
    labels = np.zeros(shape, np.uint8)
    for value, (radius, centre) in enumerate(zip(radii, centres, strict=True), start=1):
        labels[np.sum((world - centre) ** 2, axis=-1) <= radius**2] = value
    return labels


def dice(a, b, value):
    a, b = a == value, b == value
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.parametrize(
    "kind, zooms, spacing",
    [
        ("LPS", (1.0, 1.0, 3.0), (1.0, 1.0, 1.0)),  # thick slices to isotropic
        ("oblique", (1.0, 1.0, 3.0), (0.5, 0.5, 1.5)),
        ("PSR", (1.0, 1.0, 1.0), (0.7, 0.7, 0.7)),
    ],
)
@pytest.mark.parametrize("interpolation", ["label", "nearest"])
def test_label_round_trip_lands_on_the_source_grid(tmp_path, kind, zooms, spacing, interpolation):
    shape = tuple(int(round(28 / z)) for z in zooms)
    affine = grid_affine(kind, zooms)
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    offsets = np.array([(-6.0, -5.0, -4.0), (5.0, 4.0, 3.0), (6.0, -6.0, 5.0)])
    labels = spheres(shape, affine, (3.0, 4.0, 5.0), centre + offsets)
    assert all(np.count_nonzero(labels == v) < 600 for v in (1, 2, 3))  # small structures
    source = write(tmp_path / "labels.nii.gz", labels.astype(np.int16), affine)

    vol = load_nifti(source, dtype="int32", spacing=spacing, interpolation=interpolation)
    assert vol.shape[:3] != labels.shape
    out = save_nifti(vol.array, tmp_path / "back.nii.gz", like=vol, interpolation=interpolation)

    written, original = nib.load(str(out)), nib.load(source)
    assert written.shape == original.shape
    np.testing.assert_array_equal(written.affine, original.affine)
    assert written.get_data_dtype() == np.dtype("int32")
    back = np.asarray(written.dataobj)
    for value in (1, 2, 3):
        assert dice(back, labels, value) >= 0.95, (value, dice(back, labels, value))


def test_image_round_trip_keeps_the_source_encoding(tmp_path):
    affine = grid_affine("LPS", (0.8, 0.8, 2.5))
    shape = (20, 18, 8)
    field = linear_field(world_of(affine, shape))
    source = write(tmp_path / "image.nii.gz", field.astype(np.float32), affine)
    vol = load_nifti(source, spacing=1.0)
    out = save_nifti(vol.array, tmp_path / "back.nii.gz", like=vol)
    written = nib.load(str(out))
    assert written.shape == shape and written.get_data_dtype() == np.float32
    np.testing.assert_array_equal(written.affine, nib.load(source).affine)
    back = np.asarray(written.dataobj)
    # a linear field goes there and back unchanged wherever both sample points are inside
    interior = (slice(1, -1),) * 3
    np.testing.assert_allclose(
        back[interior], field[interior], atol=32 * EPS32 * np.abs(field).max()
    )


def test_resampling_object_is_exact_and_invertible():
    affine = grid_affine("oblique", (1.0, 2.0, 3.0))
    data = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    out, how = resample_to_spacing(data, affine, (0.5, 2.0, None))
    assert isinstance(how, Resampling)
    assert how.shape == out.shape == (12, 5, 4)
    assert how.source_shape == (6, 5, 4)
    # affine @ index equals the old affine at the old index shift + scale * index
    index = np.array([3.0, 2.0, 1.0])
    np.testing.assert_allclose(
        how.affine @ [*index, 1], affine @ [*(how.shift + how.scale * index), 1], atol=1e-12
    )
    # an axis kept is copied, not interpolated
    np.testing.assert_array_equal(how.scale[1:], [1.0, 1.0])
    # data is linear along each axis: exact back, but for the edge voxels of axis 0,
    # whose new neighbours outside the old grid hold the edge value
    back = how.invert(out)
    assert back.shape == data.shape
    np.testing.assert_allclose(back[1:-1], data[1:-1], rtol=0, atol=1e-5)
    assert not np.allclose(back[0], data[0])


def test_dataset_resamples_image_and_mask_onto_one_grid(tmp_path):
    affine = grid_affine("LPS", (0.8, 0.8, 2.5))
    shape = (20, 18, 8)
    rng = np.random.default_rng(3)
    images, masks = [], []
    for i in range(2):
        labels = spheres(shape, affine, (3.0,), [affine[:3, :3] @ (10, 9, 4) + affine[:3, 3]])
        images.append(write(tmp_path / f"img{i}.nii.gz", rng.normal(size=shape), affine))
        masks.append(write(tmp_path / f"mask{i}.nii.gz", labels, affine))
    spacing = (1.0, 1.0, 1.0)
    plain = NiftiDataset(images, masks, batch_size=2, spacing=spacing)
    x, y = plain[0]
    want_x = load_nifti(images[1], spacing=spacing).array
    want_y = load_nifti(masks[1], dtype="int32", spacing=spacing).array
    assert x.shape[1:4] == y.shape[1:4] == want_x.shape[:3]
    np.testing.assert_array_equal(x[1], want_x)
    np.testing.assert_array_equal(y[1], want_y)

    cache = tmp_path / "cache"
    for cached in ("memory", cache):
        fine = NiftiDataset(images, masks, batch_size=2, spacing=spacing, cache=cached)
        coarse = NiftiDataset(images, masks, batch_size=2, spacing=2.0, cache=cached)
        for _ in range(2):  # fill, then read the cache
            np.testing.assert_array_equal(fine[0][0], x)
            np.testing.assert_array_equal(fine[0][1], y)
            assert coarse[0][0].shape[1:4] == load_nifti(images[0], spacing=2.0).shape[:3]
    # one entry per file and spacing
    assert len(list(cache.glob("*.npy"))) == 2 * 4

    from_folder_images = tmp_path / "images"
    from_folder_images.mkdir()
    for i, path in enumerate(images):
        (from_folder_images / f"s{i}.nii.gz").write_bytes(open(path, "rb").read())
    ds = NiftiDataset.from_folder(from_folder_images, batch_size=2, spacing=spacing)
    np.testing.assert_array_equal(ds[0], x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spacing": (1.0, 1.0)}, "3 entries"),
        ({"spacing": (1.0, -1.0, 1.0)}, "positive"),
        ({"spacing": "1mm"}, "spacing must be"),
        ({"spacing": (1.0, float("nan"), 1.0)}, "positive and finite"),
        ({"spacing": 1.0, "interpolation": "cubic"}, "interpolation must be"),
        ({"interpolation": "nearest"}, "pass spacing="),
        ({"spacing": 1.0, "dtype": "int32", "interpolation": "linear"}, "needs a float array"),
        ({"spacing": 1.0, "interpolation": "label"}, "needs an integer or bool"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    path = write(tmp_path / "a.nii", np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(ValueError, match=message):
        load_nifti(path, **kwargs)
    if "spacing" in kwargs and "interpolation" not in kwargs and "dtype" not in kwargs:
        with pytest.raises(ValueError, match=message):
            NiftiDataset([path], spacing=kwargs["spacing"])


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(*[st.integers(2, 9)] * 3),
    zooms=st.tuples(*[st.floats(0.4, 4.0)] * 3),
    spacing=st.tuples(*[st.one_of(st.none(), st.floats(0.4, 4.0))] * 3),
    axis=st.tuples(*[st.floats(-1.0, 1.0)] * 3).filter(lambda v: np.linalg.norm(v) > 0.1),
    degrees=st.floats(-180.0, 180.0),
    flips=st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
)
def test_property_linear_fields_survive_any_grid(shape, zooms, spacing, axis, degrees, flips):
    affine = np.eye(4)
    affine[:3, :3] = rotation(axis, degrees) @ np.diag(np.array(flips) * zooms)
    affine[:3, 3] = (3.0, -2.0, 1.0)
    data = linear_field(world_of(affine, shape)).astype(np.float32)
    out, how = resample_to_spacing(data, affine, spacing)
    assert out.shape == how.shape
    kept = [s is None for s in spacing]
    np.testing.assert_array_equal(np.array(out.shape)[kept], np.array(shape)[kept])
    world = world_of(how.affine, out.shape)
    index = source_index(affine, world)
    inside = np.all((index >= -1e-9) & (index <= np.array(shape) - 1 + 1e-9), axis=-1)
    tolerance = 8 * EPS32 * max(np.abs(data).max(), 1.0)
    np.testing.assert_allclose(out[inside], linear_field(world)[inside], rtol=0, atol=tolerance)
    # the new grid covers the old field of view along every axis
    extent = np.array(out.shape) * how.scale
    assert np.all(extent >= np.array(shape) - 1e-3 * how.scale - 1e-9)
    assert np.all(extent < np.array(shape) + how.scale)


def test_dataset_puts_modalities_of_other_resolutions_on_the_first_ones_grid(tmp_path):
    rng = np.random.default_rng(8)
    t1_affine = grid_affine("LPS", (1.0, 1.0, 1.0))
    flair_affine = grid_affine("LPS", (1.0, 1.0, 3.0))
    flair_affine[:3, 3] += (0.4, -0.3, 1.1)  # another field of view, same directions
    t1 = write(tmp_path / "t1.nii.gz", rng.normal(size=(16, 14, 18)).astype(np.float32), t1_affine)
    flair_data = rng.normal(size=(15, 14, 6)).astype(np.float32)
    flair = write(tmp_path / "flair.nii.gz", flair_data, flair_affine)
    labels = (rng.random((15, 14, 6)) > 0.7).astype(np.uint8)  # a mask on the FLAIR's grid
    mask = write(tmp_path / "mask.nii.gz", labels, flair_affine)
    with pytest.raises(NiftiError, match="not on the same voxel grid"):
        NiftiDataset([[t1, flair]])[0]

    for cache in (None, "memory", tmp_path / "cache"):
        x, y = NiftiDataset([[t1, flair]], [mask], spacing=(1.0, 1.0, 1.0), cache=cache)[0]
        reference = load_nifti(t1, spacing=(1.0, 1.0, 1.0))
        np.testing.assert_array_equal(x[0, ..., 0], reference.array[..., 0])
        # the FLAIR and the mask, sampled from their own files at the T1's voxel centres
        for path, ref_of in ((flair, None), (mask, "labels")):
            canonical = nib.as_closest_canonical(nib.load(path))
            source = np.asarray(canonical.dataobj, dtype=np.float64)
            index = source_index(canonical.affine, world_of(reference.affine, x.shape[1:4]))
            points = np.moveaxis(index, -1, 0)
            if ref_of is None:
                want = ndimage.map_coordinates(source, points, order=1, mode="nearest")
                np.testing.assert_allclose(x[0, ..., 1], want, atol=1e-5)
            else:
                want, decided = label_reference(source.astype(int), points, [0, 1])
                assert decided.mean() > 0.8
                np.testing.assert_array_equal(y[0, ..., 0][decided], want[decided])

    tilted = grid_affine("oblique", (1.0, 1.0, 3.0))
    other = write(tmp_path / "tilted.nii.gz", flair_data, tilted)
    with pytest.raises(NiftiError, match="cannot be resampled onto the grid of .*not parallel"):
        NiftiDataset([[t1, other]], spacing=1.0)[0]


@pytest.mark.parametrize(
    "row, halfway, want",
    [
        ([7, 7, 7, 3, 3], 2.5, 3),  # the background (7, most frequent) is not the smallest label
        ([0, 0, 0, 3, 3], 2.5, 0),  # the background is the smallest
        ([0, 0, 0, 3, 5], 3.5, 3),  # two labels that are not the background
    ],
)
def test_label_ties_go_to_the_smaller_label(row, halfway, want):
    labels = np.array(row, np.int16).reshape(5, 1, 1)
    out = resample_axes(labels, (1, 1, 1), (1.0, 1.0, 1.0), (halfway, 0.0, 0.0))
    assert out.ravel().tolist() == [want]


def test_save_like_a_resampled_volume_resamples_before_the_dtype_cast(tmp_path):
    affine = grid_affine("LPS", (0.8, 0.8, 2.5))
    shape = (12, 10, 6)
    field = 100.0 + 10.0 * linear_field(world_of(affine, shape))
    source = write(tmp_path / "image.nii.gz", field.astype(np.float32), affine)
    vol = load_nifti(source, spacing=1.0)
    as_float = save_nifti(vol.array, tmp_path / "float.nii.gz", like=vol)
    as_int = save_nifti(vol.array, tmp_path / "int.nii.gz", like=vol, dtype="int16")
    written = nib.load(str(as_int))
    assert written.get_data_dtype() == np.int16 and written.shape == shape
    # the image was resampled linearly, then cast (not cast, then resampled as labels)
    want = np.asarray(nib.load(str(as_float)).dataobj).astype(np.int16)
    np.testing.assert_array_equal(np.asarray(written.dataobj), want)
