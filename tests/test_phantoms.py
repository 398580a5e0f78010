"""Tests for keras_nii.phantoms: synthetic NIfTI phantoms and datasets."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from keras_nii import load_nifti, save_nifti
from keras_nii.phantoms import ORIENTATIONS, make_dataset, make_phantom

SHAPE = (24, 24, 24)


def _contrast(image: np.ndarray, label: np.ndarray) -> float:
    lesion = label > 0
    tissue = (image > 0) & ~lesion
    return float(image[lesion].mean() / image[tissue].mean())


def test_same_seed_gives_identical_arrays():
    a = make_phantom(SHAPE, seed=7)
    b = make_phantom(SHAPE, seed=7)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype
        assert x.tobytes() == y.tobytes()


def test_different_seeds_differ():
    a_image, a_label, _ = make_phantom(SHAPE, seed=1)
    b_image, b_label, _ = make_phantom(SHAPE, seed=2)
    assert not np.array_equal(a_image, b_image)
    assert not np.array_equal(a_label, b_label)


def test_dtypes_shapes_and_intensities():
    image, label, affine = make_phantom(SHAPE, seed=0)
    assert image.shape == label.shape == SHAPE
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert affine.shape == (4, 4)
    assert set(np.unique(label).tolist()) == {0, 1}
    assert np.all(np.isfinite(image))
    head = image > 0
    assert 0.1 < head.mean() < 0.7
    # background is exactly zero, never negative
    assert image.min() == 0.0
    assert 200 < image[head & (label == 0)].mean() < 600
    assert 650 < image[label > 0].mean() < 1200


@pytest.mark.parametrize("seed", range(6))
def test_lesions_nonempty_inside_head_and_bright(seed):
    image, label, _ = make_phantom(SHAPE, seed=seed)
    assert label.sum() > 0
    head = image > 0
    assert np.all(head[label > 0])
    # lesions do not touch the edge of the field of view
    assert not label[[0, -1]].any() and not label[:, [0, -1]].any()
    assert not label[:, :, [0, -1]].any()
    assert _contrast(image, label) > 1.6


def test_n_lesions_exact_and_zero():
    _, label, _ = make_phantom(SHAPE, seed=3, n_lesions=0)
    assert label.sum() == 0
    _, one, _ = make_phantom(SHAPE, seed=3, n_lesions=1)
    _, three, _ = make_phantom(SHAPE, seed=3, n_lesions=(3, 3))
    assert one.sum() > 0 and three.sum() > 0


def test_tiny_grid_still_has_lesion_voxels():
    for seed in range(5):
        _, label, _ = make_phantom((8, 9, 10), seed=seed, n_lesions=1)
        assert label.sum() > 0


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "LAS", "PSR", "LIA"])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.2, 1.0, 0.9)])
def test_affine_axcodes_and_spacing(orientation, spacing):
    image, label, affine = make_phantom(
        (20, 24, 28), seed=0, orientation=orientation, spacing=spacing
    )
    assert image.shape == label.shape == (20, 24, 28)
    assert "".join(nib.aff2axcodes(affine)) == orientation
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), spacing)
    # the grid is centred on the world origin
    centre = affine @ np.array([(n - 1) / 2 for n in image.shape] + [1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


def test_oblique_is_rotated_ras():
    _, _, affine = make_phantom(SHAPE, seed=0, orientation="oblique", spacing=(1.2, 1.0, 0.9))
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), (1.2, 1.0, 0.9))
    directions = affine[:3, :3] / nib.affines.voxel_sizes(affine)
    # not axis-aligned: the first voxel axis leaves the x axis by >= 15 degrees
    assert np.degrees(np.arccos(abs(directions[0, 0]))) > 15
    np.testing.assert_allclose(directions.T @ directions, np.eye(3), atol=1e-12)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_written_pair_loads_consistently(tmp_path, orientation):
    image, label, affine = make_phantom(SHAPE, seed=5, orientation=orientation)
    image_path = save_nifti(image, tmp_path / "image.nii.gz", affine=affine)
    label_path = save_nifti(label, tmp_path / "label.nii.gz", affine=affine)
    img_vol = load_nifti(image_path)
    lab_vol = load_nifti(label_path, dtype="uint8")
    assert img_vol.axcodes == lab_vol.axcodes == ("R", "A", "S")
    np.testing.assert_allclose(img_vol.affine, lab_vol.affine)
    im, lb = img_vol.array[..., 0], lab_vol.array[..., 0]
    assert lb.sum() == label.sum() > 0
    assert _contrast(im, lb) > 1.5
    stored = nib.load(image_path)
    expected = "RAS" if orientation == "oblique" else orientation
    assert "".join(nib.aff2axcodes(stored.affine)) == expected


def test_canonical_arrays_equal_across_orientations(tmp_path):
    """Same seed, same (cubic) shape: the same world content in every storage order."""
    loaded = {}
    for orientation in ORIENTATIONS:
        image, label, affine = make_phantom(SHAPE, seed=11, orientation=orientation)
        ip = save_nifti(image, tmp_path / f"{orientation}_image.nii", affine=affine)
        lp = save_nifti(label, tmp_path / f"{orientation}_label.nii", affine=affine)
        loaded[orientation] = (load_nifti(ip), load_nifti(lp, dtype="uint8"))
    ras_image, ras_label = loaded["RAS"]
    for orientation in ("LPS", "LAS", "PSR", "oblique"):
        image, label = loaded[orientation]
        np.testing.assert_array_equal(image.array, ras_image.array)
        np.testing.assert_array_equal(label.array, ras_label.array)
    # RAS and LPS storage of the same voxels: the same world positions too
    np.testing.assert_allclose(loaded["LPS"][0].affine, ras_image.affine, atol=1e-9)


def test_ras_and_lps_equal_for_non_cubic_shape_and_spacing():
    shape, spacing = (20, 24, 28), (1.2, 1.0, 0.9)
    ras = make_phantom(shape, seed=4, orientation="RAS", spacing=spacing)
    lps = make_phantom(shape, seed=4, orientation="LPS", spacing=spacing)
    assert not np.array_equal(ras[0], lps[0])  # stored differently ...
    # ... but identical once flipped back, with identical world geometry
    np.testing.assert_array_equal(ras[0], lps[0][::-1, ::-1, :])
    np.testing.assert_array_equal(ras[1], lps[1][::-1, ::-1, :])
    corner_ras = ras[2] @ [0, 0, 0, 1]
    corner_lps = lps[2] @ [shape[0] - 1, shape[1] - 1, 0, 1]
    np.testing.assert_allclose(corner_ras, corner_lps)


def test_make_dataset_writes_pairs(tmp_path):
    folder = tmp_path / "data"
    pairs = make_dataset(folder, 4, shape=SHAPE, seed=0)
    assert len(pairs) == 4
    names = []
    for i, (ip, lp) in enumerate(pairs):
        assert ip.name == lp.name == f"case_{i:03d}.nii.gz"
        assert ip.parent == folder / "images" and lp.parent == folder / "labels"
        assert ip.is_file() and lp.is_file()
        names.append(ip.name)
    assert sorted(p.name for p in (folder / "images").iterdir()) == names
    assert sorted(p.name for p in (folder / "labels").iterdir()) == names

    orientations = ("RAS", "LPS", "oblique")
    spacings = ((1.0, 1.0, 1.0), (1.2, 1.0, 0.9))
    for i, (ip, lp) in enumerate(pairs):
        stored, stored_label = nib.load(ip), nib.load(lp)
        expected = "RAS" if orientations[i % 3] == "oblique" else orientations[i % 3]
        assert "".join(nib.aff2axcodes(stored.affine)) == expected
        np.testing.assert_allclose(nib.affines.voxel_sizes(stored.affine), spacings[i % 2])
        np.testing.assert_allclose(stored.affine, stored_label.affine)
        assert stored_label.get_data_dtype() == np.uint8
        if i == 1:  # stored as int16 with a slope
            assert stored.get_data_dtype() == np.int16
            assert stored.dataobj.slope not in (0.0, 1.0)
        else:
            assert stored.get_data_dtype() == np.float32
        image = load_nifti(ip).array[..., 0]
        label = load_nifti(lp, dtype="uint8").array[..., 0]
        assert label.sum() > 0
        assert _contrast(image, label) > 1.5


def test_make_dataset_int16_case_matches_phantom(tmp_path):
    pairs = make_dataset(tmp_path, 2, shape=SHAPE, seed=3, orientations=("LPS",))
    image, _, affine = make_phantom(
        SHAPE, seed=np.random.default_rng([3, 1]), orientation="LPS", spacing=(1.2, 1.0, 0.9)
    )
    vol = load_nifti(pairs[1][0], canonical=False)
    assert nib.load(pairs[1][0]).get_data_dtype() == np.int16
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    # int16 with a slope of max/30000: within half a quantization step
    np.testing.assert_allclose(vol.array[..., 0], image, atol=image.max() / 30000)


def test_make_dataset_deterministic(tmp_path):
    a = make_dataset(tmp_path / "a", 3, shape=SHAPE, seed=9, compress=False)
    b = make_dataset(tmp_path / "b", 3, shape=SHAPE, seed=9, compress=False)
    c = make_dataset(tmp_path / "c", 3, shape=SHAPE, seed=10, compress=False)
    for (ai, al), (bi, bl), (ci, _) in zip(a, b, c, strict=True):
        assert ai.suffix == ".nii"
        assert (
            np.asarray(nib.load(ai).dataobj).tobytes() == np.asarray(nib.load(bi).dataobj).tobytes()
        )
        assert (
            np.asarray(nib.load(al).dataobj).tobytes() == np.asarray(nib.load(bl).dataobj).tobytes()
        )
        assert not np.array_equal(
            np.asarray(nib.load(ai).dataobj), np.asarray(nib.load(ci).dataobj)
        )


def test_make_dataset_refuses_to_overwrite(tmp_path):
    pairs = make_dataset(tmp_path, 3, shape=SHAPE, seed=0)
    before = [p.read_bytes() for pair in pairs for p in pair]
    with pytest.raises(ValueError, match="overwrite"):
        make_dataset(tmp_path, 2, shape=SHAPE, seed=1)
    with pytest.raises(ValueError, match="overwrite"):
        make_dataset(tmp_path, 2, shape=SHAPE, seed=1, compress=False)
    assert [p.read_bytes() for pair in pairs for p in pair] == before
    # with overwrite=True the old cases are replaced, none left behind
    new = make_dataset(tmp_path, 2, shape=SHAPE, seed=1, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [ip.name for ip, _ in new]
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [lp.name for _, lp in new]


def test_make_dataset_in_folder_with_other_files(tmp_path):
    (tmp_path / "README.txt").write_text("mine")
    make_dataset(tmp_path, 1, shape=SHAPE)
    assert (tmp_path / "README.txt").read_text() == "mine"


@pytest.mark.parametrize("bad", ["XYZ", "RRS", "ras+", "", None, "obliqe"])
def test_bad_orientation(bad):
    with pytest.raises(ValueError, match="orientation"):
        make_phantom(SHAPE, seed=0, orientation=bad)


def test_bad_orientation_in_dataset(tmp_path):
    with pytest.raises(ValueError, match="orientations"):
        make_dataset(tmp_path, 1, shape=SHAPE, orientations=("RAS", "up"))
    with pytest.raises(ValueError, match="orientations"):
        make_dataset(tmp_path, 1, shape=SHAPE, orientations="RAS")
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True, None])
def test_bad_n(tmp_path, bad):
    with pytest.raises(ValueError, match="n must"):
        make_dataset(tmp_path, bad, shape=SHAPE)
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"shape": (24, 24)}, "shape"),
        ({"shape": (4, 24, 24)}, "shape"),
        ({"shape": (24.0, 24, 24)}, "shape"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, float("nan"), 1.0)}, "spacing"),
        ({"n_lesions": -1}, "n_lesions"),
        ({"n_lesions": (3, 1)}, "n_lesions"),
        ({"n_lesions": (1, 2, 3)}, "n_lesions"),
    ],
)
def test_bad_phantom_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_phantom(**{"shape": SHAPE, "seed": 0, **kwargs})


def test_bad_dataset_arguments(tmp_path):
    with pytest.raises(ValueError, match="spacings"):
        make_dataset(tmp_path, 1, shape=SHAPE, spacings=((1.0, 1.0),))
    with pytest.raises(ValueError, match="spacings"):
        make_dataset(tmp_path, 1, shape=SHAPE, spacings=())
    with pytest.raises(ValueError, match="seed"):
        make_dataset(tmp_path, 1, shape=SHAPE, seed=-1)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(ValueError, match="folder"):
        make_dataset(not_a_folder, 1, shape=SHAPE)


def test_phantoms_code_needs_only_numpy_and_nibabel():
    # other tests of this process import Keras, so check the module's own imports
    # rather than sys.modules (tests/test_lazy_import.py checks a fresh process)
    import ast

    import keras_nii.phantoms as phantoms

    tree = ast.parse(open(phantoms.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"tensorflow", "keras", "jax", "torch", "scipy"}
