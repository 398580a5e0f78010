"""keras_nii.fingerprint and ``keras-nii plan`` against NumPy on synthetic datasets.

The expected figures are recomputed here from the files with nibabel and
NumPy alone (``nib.as_closest_canonical`` for the RAS+ axes, ``get_fdata``
for the intensities), never through ``keras_nii.load_nifti``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import keras_nii
from keras_nii.cli import main
from keras_nii.io import NiftiError
from keras_nii.phantoms import make_phantom
from keras_nii.plan import Plan, fingerprint

ROOT = Path(__file__).resolve().parents[1]


def _save(array, affine, path, dtype=None):
    img = nib.Nifti1Image(array, affine)
    if dtype is not None:
        img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)
    return str(path)


def _reference(pairs, use_labels=True):
    """Per file (canonical spacing, foreground values, labels) with nibabel + NumPy."""
    out = []
    for image, label in pairs:
        img = nib.as_closest_canonical(nib.load(image))
        data = np.asarray(img.get_fdata(dtype=np.float32))
        spacing = nib.affines.voxel_sizes(img.affine)
        codes = "".join(nib.aff2axcodes(nib.load(image).affine))
        if use_labels and label is not None:
            lab = np.rint(nib.as_closest_canonical(nib.load(label)).get_fdata()).astype(int)
            values = data[lab != 0]
        else:
            lab = None
            values = data[data != 0]
        out.append(
            {
                "shape": data.shape[:3],
                "spacing": spacing,
                "codes": codes,
                "values": values.astype(np.float64),
                "labels": lab,
                "data": data,
            }
        )
    return out


# --------------------------------------------------------------------------- MR-like


@pytest.fixture(scope="module")
def mr_set(tmp_path_factory):
    """Five phantoms: several shapes, spacings and orientations, with lesion labels."""
    root = tmp_path_factory.mktemp("mr")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    cases = [
        ((20, 18, 16), "RAS", (1.0, 1.0, 1.0)),
        ((16, 20, 18), "LPS", (1.2, 0.9, 1.1)),
        ((18, 16, 20), "oblique", (0.8, 1.0, 1.3)),
        ((24, 16, 12), "PSR", (1.0, 1.5, 2.0)),
        ((16, 16, 16), "LAS", (0.9, 0.9, 1.0)),
    ]
    pairs = []
    for i, (shape, orientation, spacing) in enumerate(cases):
        image, label, affine = make_phantom(
            shape, seed=i, orientation=orientation, spacing=spacing, n_lesions=(2, 3)
        )
        name = f"sub-{i:02d}.nii.gz"
        if i == 1:  # one stored as scaled int16
            img = nib.Nifti1Image(np.rint(image * 10).astype(np.int16), affine)
            img.header.set_slope_inter(0.1, 0.0)
            nib.save(img, root / "images" / name)
            image_path = str(root / "images" / name)
        else:
            image_path = _save(image, affine, root / "images" / name)
        label = label.copy()
        label[label == 1] = 1 + (i % 2)  # labels 1 and 2
        pairs.append((image_path, _save(label, affine, root / "labels" / name, np.uint8)))
    return root, pairs


def test_figures_match_numpy(mr_set):
    root, pairs = mr_set
    plan = fingerprint(root / "images", root / "labels")
    reference = _reference(pairs)
    assert [f["image"] for f in plan.files] == [p[0] for p in pairs]
    assert [f["label"] for f in plan.files] == [p[1] for p in pairs]

    for record, ref in zip(plan.files, reference, strict=True):
        assert tuple(record["shape"]) == ref["shape"]
        np.testing.assert_allclose(record["spacing"], ref["spacing"], rtol=1e-6)
        assert record["orientation"] == ref["codes"]
        figures = record["intensity"][0]
        values = ref["values"]
        assert figures["foreground_voxels"] == values.size > 0
        np.testing.assert_allclose(
            [figures["p0.5"], figures["p99.5"]], np.percentile(values, [0.5, 99.5]), rtol=1e-6
        )
        np.testing.assert_allclose(figures["mean"], values.mean(), rtol=1e-6)
        np.testing.assert_allclose(figures["std"], values.std(), rtol=1e-5)
        assert figures["min"] == pytest.approx(values.min(), rel=1e-6)
        assert figures["max"] == pytest.approx(values.max(), rel=1e-6)
        values_, counts = np.unique(ref["labels"], return_counts=True)
        assert list(record["labels"]) == [str(v) for v in values_]
        for v, c in zip(values_, counts, strict=True):
            assert record["labels"][str(v)]["voxels"] == c
            assert record["labels"][str(v)]["fraction"] == pytest.approx(c / ref["labels"].size)

    data = plan.dataset
    assert data["n_files"] == 5 and data["foreground"] == "labels"
    spacings = np.array([r["spacing"] for r in reference])
    np.testing.assert_allclose(data["spacing"]["median"], np.median(spacings, 0), rtol=1e-6)
    np.testing.assert_allclose(data["spacing"]["p10"], np.percentile(spacings, 10, 0), rtol=1e-6)
    shapes = np.array([r["shape"] for r in reference])
    np.testing.assert_allclose(data["shape"]["median"], np.median(shapes, 0))
    assert data["shape"]["min"] == list(shapes.min(0))
    assert data["orientations"] == dict(Counter(r["codes"] for r in reference))
    assert set(data["orientations"]) >= {"LPS", "PSR", "LAS"}

    # the dataset's figures pool every foreground voxel of every file
    pooled = np.concatenate([r["values"] for r in reference])
    figures = data["intensity"][0]
    assert figures["foreground_voxels"] == figures["sampled_voxels"] == pooled.size
    np.testing.assert_allclose(
        [figures["p0.5"], figures["p99.5"]], np.percentile(pooled, [0.5, 99.5]), rtol=1e-6
    )
    np.testing.assert_allclose(figures["mean"], pooled.mean(), rtol=1e-6)
    np.testing.assert_allclose(figures["std"], pooled.std(), rtol=1e-5)
    all_labels = np.concatenate([r["labels"].ravel() for r in reference])
    for value in (0, 1, 2):
        assert data["labels"][str(value)]["fraction"] == pytest.approx(np.mean(all_labels == value))

    # the suggestions: isotropic enough, so the median spacing; MR: per-sample z-score
    np.testing.assert_allclose(plan.target_spacing, np.median(spacings, 0), rtol=1e-6)
    at_target = np.floor(shapes * spacings / np.median(spacings, 0) + 0.5)
    assert plan.median_shape == [int(v) for v in np.floor(np.median(at_target, 0) + 0.5)]
    assert plan.patch_size == [16 * math.ceil(m / 16) for m in plan.median_shape]
    assert plan.modality == "mr"
    assert plan.normalization["scheme"] == "zscore"
    assert plan.normalization["nonzero"] is True  # the phantoms' background is exactly 0


def test_without_labels_the_foreground_is_the_nonzero_voxels(mr_set):
    root, pairs = mr_set
    plan = fingerprint([p[0] for p in pairs])
    assert plan.dataset["foreground"] == "nonzero" and plan.dataset["labels"] is None
    reference = _reference(pairs, use_labels=False)
    pooled = np.concatenate([r["values"] for r in reference])
    figures = plan.dataset["intensity"][0]
    assert figures["foreground_voxels"] == pooled.size
    np.testing.assert_allclose(figures["mean"], pooled.mean(), rtol=1e-6)
    np.testing.assert_allclose(figures["p99.5"], np.percentile(pooled, 99.5), rtol=1e-6)
    assert all("labels" not in f for f in plan.files)


def test_subsampled_percentiles_stay_close_and_reproduce(mr_set):
    root, pairs = mr_set
    exact = fingerprint(root / "images").dataset["intensity"][0]
    sampled = fingerprint(root / "images", samples=2500, seed=3)
    figures = sampled.dataset["intensity"][0]
    assert figures["sampled_voxels"] == 5 * 500 < figures["foreground_voxels"]
    # mean and std stay exact; percentiles are estimates
    assert figures["mean"] == pytest.approx(exact["mean"], rel=1e-9)
    assert figures["std"] == pytest.approx(exact["std"], rel=1e-9)
    spread = exact["p99.5"] - exact["p0.5"]
    assert abs(figures["p99.5"] - exact["p99.5"]) < 0.05 * spread
    assert abs(figures["p0.5"] - exact["p0.5"]) < 0.05 * spread
    again = fingerprint(root / "images", samples=2500, seed=3).dataset["intensity"][0]
    assert again == figures


def test_mr_without_a_zero_background_is_zscored_over_all_voxels(tmp_path):
    rng = np.random.default_rng(0)
    paths = [
        _save(
            rng.normal(100, 10, (12, 12, 12)).astype(np.float32), np.eye(4), tmp_path / f"{i}.nii"
        )
        for i in range(3)
    ]
    plan = fingerprint(paths)
    assert plan.normalization == {
        "scheme": "zscore",
        "per_sample": True,
        "nonzero": False,
        "median_nonzero_fraction": 1.0,
    }
    [layer] = plan.normalization_layers()
    assert type(layer).__name__ == "ZScoreNormalization"
    assert layer.nonzero is False and layer.mean is None


# --------------------------------------------------------------------------- CT-like


def _ct_volume(rng, shape):
    """Air at -1000 HU around a soft-tissue box (~40 HU) holding a bone slab (~1000 HU)."""
    volume = np.full(shape, -1000.0)
    body = tuple(slice(s // 5, s - s // 5) for s in shape)
    volume[body] = rng.normal(40, 15, volume[body].shape)
    organ = tuple(slice(s // 3, s - s // 3) for s in shape)
    volume[organ] = rng.normal(120, 20, volume[organ].shape)
    bone = (slice(shape[0] // 5, shape[0] // 5 + 2), *body[1:])
    volume[bone] = rng.normal(1000, 100, volume[bone].shape)
    label = np.zeros(shape, np.uint8)
    label[organ] = 1
    label[bone] = 2
    return np.rint(volume).astype(np.int16), label


@pytest.fixture(scope="module")
def ct_set(tmp_path_factory):
    """Anisotropic int16 CT-like scans: 0.7-0.8 mm in-plane, 2.5 to 5 mm slices."""
    root = tmp_path_factory.mktemp("ct")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    rng = np.random.default_rng(7)
    cases = [
        ((40, 36, 10), (0.7, 0.7, 5.0)),
        ((36, 40, 12), (0.8, 0.8, 5.0)),
        ((44, 40, 9), (0.75, 0.75, 5.0)),
        ((40, 40, 20), (0.7, 0.7, 2.5)),
        ((36, 36, 12), (0.8, 0.8, 4.0)),
    ]
    pairs = []
    for i, (shape, spacing) in enumerate(cases):
        volume, label = _ct_volume(rng, shape)
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # stored LPS
        name = f"ct_{i}.nii.gz"
        pairs.append(
            (
                _save(volume, affine, root / "images" / name),
                _save(label, affine, root / "labels" / name),
            )
        )
    return root, pairs, cases


def test_ct_plan_clips_and_zscores_with_the_dataset_statistics(ct_set):
    root, pairs, cases = ct_set
    plan = fingerprint(root / "images", root / "labels")
    assert plan.modality == "ct"
    reference = _reference(pairs)
    pooled = np.concatenate([r["values"] for r in reference])
    low, high = np.percentile(pooled, [0.5, 99.5])
    norm = plan.normalization
    assert norm["scheme"] == "ct" and norm["foreground"] == "labels"
    np.testing.assert_allclose(norm["clip"], [low, high], rtol=1e-9)
    np.testing.assert_allclose([norm["mean"], norm["std"]], [pooled.mean(), pooled.std()])
    assert all(f["orientation"] == "LPS" for f in plan.files)

    # the thick axis (median 5 mm > 3 x 0.75 mm) gets the 10th percentile of its spacings
    spacings = np.array([c[1] for c in cases])
    median = np.median(spacings, 0)
    assert median[2] > 3 * median.min()
    expected = [median[0], median[1], np.percentile(spacings[:, 2], 10)]
    np.testing.assert_allclose(plan.target_spacing, expected, rtol=1e-9)
    assert plan.dataset["thick_axes"] == [2]
    assert expected[2] == pytest.approx(2.5 + 0.4 * 1.5)  # between the 2.5 and 4 mm scans

    # the layers: a clip to [low, high] HU, then (x - mean) / std
    window, zscore = plan.normalization_layers()
    assert (type(window).__name__, type(zscore).__name__) == (
        "IntensityWindow",
        "ZScoreNormalization",
    )
    scan = reference[0]["data"][None, ..., None]
    out = np.asarray(zscore(window(scan)))
    expected = (np.clip(scan.astype(np.float64), low, high) - pooled.mean()) / pooled.std()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_modality_can_be_given(ct_set, mr_set):
    root, _, _ = ct_set
    plan = fingerprint(root / "images", root / "labels", modality="mr")
    assert plan.modality == "mr" and plan.normalization["scheme"] == "zscore"
    assert "as given" in plan.modality_reason
    mr_root, _ = mr_set
    plan = fingerprint(mr_root / "images", mr_root / "labels", modality="ct")
    assert plan.normalization["scheme"] == "ct"
    assert len(plan.normalization_layers()) == 2


def test_thick_axis_never_finer_than_the_other_axes(tmp_path):
    # slices of 4 mm in most scans, 0.5 mm in two: the 10th percentile (0.5 mm)
    # is finer than the 1 mm in-plane spacing, so the target stops at 1 mm
    paths = []
    for i, z in enumerate([4.0] * 6 + [0.5] * 2):
        affine = np.diag([1.0, 1.0, z, 1.0])
        paths.append(_save(np.ones((8, 8, 8), np.float32), affine, tmp_path / f"{i}.nii"))
    plan = fingerprint(paths)
    assert np.percentile([4.0] * 6 + [0.5] * 2, 10) < 1.0
    assert plan.target_spacing == [1.0, 1.0, 1.0]


def test_patch_size_rule(tmp_path):
    # 50 x 50 x 15 voxels of 2 x 2 x 6 mm: the median case fits in 64 x 64 x 16
    paths = [
        _save(
            np.ones((50, 50, 15), np.float32), np.diag([2.0, 2.0, 6.0, 1.0]), tmp_path / f"{i}.nii"
        )
        for i in range(3)
    ]
    plan = fingerprint(paths)
    assert plan.target_spacing == [2.0, 2.0, 6.0]
    assert plan.median_shape == [50, 50, 15]
    assert plan.patch_size == [64, 64, 16]
    # under a budget of 32768 voxels, the axis of largest extent in mm loses 16
    # voxels at a time: x (128 mm) -> 48, y (128 mm) -> 48, then x, y and z are
    # all 96 mm and x (larger than z, before y) -> 32
    small = fingerprint(paths, max_voxels=32768)
    assert small.patch_size == [32, 48, 16]
    assert math.prod(small.patch_size) <= 32768
    # the patch never goes below one step per axis
    assert fingerprint(paths, max_voxels=100).patch_size == [16, 16, 16]
    assert fingerprint(paths, divisor=8).patch_size == [56, 56, 16]


# --------------------------------------------------------------------------- errors, JSON


def test_errors_name_the_file_or_argument(tmp_path, mr_set):
    root, pairs = mr_set
    with pytest.raises(ValueError, match="modality"):
        fingerprint(root / "images", modality="pet")
    with pytest.raises(ValueError, match="max_voxels"):
        fingerprint(root / "images", max_voxels=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .nii or .nii.gz files"):
        fingerprint(tmp_path / "empty")
    labels = tmp_path / "labels"
    labels.mkdir()
    for _, label in pairs[:-1]:
        os.symlink(label, labels / os.path.basename(label))
    with pytest.raises(ValueError, match="1 image.s. without a label map"):
        fingerprint(root / "images", labels)
    with pytest.raises(ValueError, match="labels has 1 file"):
        fingerprint([p[0] for p in pairs], [pairs[0][1]])
    # a label map on another grid
    with pytest.raises(NiftiError, match=os.path.basename(pairs[1][1])):
        fingerprint([pairs[0][0], pairs[1][0]], [pairs[0][1], pairs[0][1]])
    # an unreadable file is named
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file")
    with pytest.raises(NiftiError, match="bad.nii.gz"):
        fingerprint([bad])


def test_json_round_trip(tmp_path, ct_set):
    root, _, _ = ct_set
    plan = fingerprint(root / "images", root / "labels")
    path = tmp_path / "plan.json"
    text = plan.to_json(path)
    data = json.loads(path.read_text())
    assert json.loads(text) == data
    for key in ("target_spacing", "median_shape", "patch_size", "normalization", "files"):
        assert key in data
    assert len(data["files"]) == 5
    again = Plan.from_json(path)
    assert again.to_dict() == plan.to_dict()
    assert [type(x).__name__ for x in again.normalization_layers()] == [
        "IntensityWindow",
        "ZScoreNormalization",
    ]
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a keras-nii plan"):
        Plan.from_json(tmp_path / "other.json")


def test_package_exports_fingerprint_and_imports_no_keras():
    assert keras_nii.fingerprint is fingerprint
    code = (
        "import sys, keras_nii; keras_nii.fingerprint; import keras_nii.plan; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'keras', 'tensorflow', 'jax'}))"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------- CLI


def test_cli_plan_prints_a_table(capsys, mr_set):
    root, pairs = mr_set
    code = main(["plan", str(root / "images"), str(root / "labels")])
    out, err = capsys.readouterr()
    assert code == 0, err
    plan = fingerprint(root / "images", root / "labels")
    for image, _ in pairs:
        assert os.path.basename(image) in out
    assert "target_spacing   " + " x ".join(f"{v:.4g}" for v in plan.target_spacing) in out
    assert "patch_size       " + " x ".join(str(v) for v in plan.patch_size) in out
    assert "z-score per sample over the non-zero voxels" in out
    assert "orientations     RAS 2" in out
    assert "keras-nii plan: [" not in err  # no progress bar: stderr is not a terminal


def test_cli_plan_json_and_progress(capsys, tmp_path, ct_set):
    root, _, _ = ct_set
    target = tmp_path / "plan.json"
    code = main(
        ["plan", str(root / "images"), str(root / "labels"), "--json", str(target), "--progress"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"wrote {target}" in out and "clip to [" in out
    assert "5/5 ct_4.nii.gz" in err and "[" + "#" * 30 + "]" in err
    data = json.loads(target.read_text())
    expected = fingerprint(root / "images", root / "labels").to_dict()
    assert data == json.loads(json.dumps(expected))
    # '-': the JSON alone, on stdout
    code = main(["plan", str(root / "images"), "--json", "-", "--modality", "mr"])
    out, _ = capsys.readouterr()
    assert code == 0
    data = json.loads(out)
    assert data["normalization"]["scheme"] == "zscore" and data["files"][0]["label"] is None


def test_cli_plan_errors(capsys, tmp_path):
    code = main(["plan", str(tmp_path / "missing")])
    _, err = capsys.readouterr()
    assert code == 1 and "missing: no such folder" in err
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.nii").write_bytes(b"\0" * 10)
    code = main(["plan", str(tmp_path / "images")])
    _, err = capsys.readouterr()
    assert code == 1 and "broken.nii" in err


def test_cli_plan_runs_without_tensorflow(mr_set):
    root, _ = mr_set
    code = (
        "import sys; from keras_nii.cli import main; "
        f"code = main(['plan', {str(root / 'images')!r}]); "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'keras', 'tensorflow', 'jax'}); "
        "print('RESULT', code, heavy)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert "RESULT 0 []" in proc.stdout, proc.stderr


# --------------------------------------------------------------------------- augmentation


def _drawn(layer, shape=(16, 16, 16), batch=32):
    return np.asarray(layer.get_random_transformation(batch, shape)["matrices"])


def test_augmentation_for_thick_slices_stays_in_plane(ct_set):
    root, _, _ = ct_set
    plan = fingerprint(root / "images", root / "labels")
    assert plan.thick_axes() == [2]
    flip, affine = plan.augmentation_layers(seed=1)
    assert type(flip).__name__ == "RandomFlip3D" and flip.seed == 1 and affine.seed == 2
    assert affine.spacing == tuple(plan.target_spacing)
    matrices = _drawn(affine)
    # axis 2 maps onto itself: every output voxel samples its own slice
    np.testing.assert_allclose(matrices[:, 2], np.broadcast_to([0, 0, 1, 0], (32, 4)), atol=1e-6)
    np.testing.assert_allclose(matrices[:, :2, 2], 0, atol=1e-6)
    assert np.abs(matrices[:, 0, 1]).max() > 0.5  # rotated in the plane


def test_augmentation_for_isotropic_data_rotates_about_every_axis(mr_set):
    root, _ = mr_set
    plan = fingerprint(root / "images", root / "labels")
    assert plan.thick_axes() == []
    _, affine = plan.augmentation_layers()
    matrices = _drawn(affine)
    assert np.abs(matrices[:, 2, :2]).max() > 0.1 and np.abs(matrices[:, 0, 1:3]).max() > 0.1
    assert affine.spacing == tuple(plan.target_spacing)


def test_channels_of_a_4d_file_each_get_their_figures(tmp_path):
    # two modalities in one 4D file: CT-like channel 0, another scale in channel 1
    rng = np.random.default_rng(5)
    data = np.stack(
        [rng.normal(40, 10, (10, 12, 8)), rng.normal(500, 50, (10, 12, 8))], axis=-1
    ).astype(np.float32)
    data[:3, :, :, 0] = -1000.0
    data[:3, :, :, 1] = 0.0
    label = np.zeros((10, 12, 8), np.uint8)
    label[4:8, 3:9, 2:6] = 1
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    image_path = _save(data, affine, tmp_path / "two.nii.gz")
    label_path = _save(label, affine, tmp_path / "two_label.nii.gz")
    plan = fingerprint([image_path], [label_path])
    assert plan.files[0]["channels"] == 2 and plan.dataset["channels"] == 2
    for channel in range(2):
        values = data[..., channel][label != 0].astype(np.float64)
        figures = plan.dataset["intensity"][channel]
        np.testing.assert_allclose(
            [figures["p0.5"], figures["p99.5"], figures["mean"], figures["std"]],
            [*np.percentile(values, [0.5, 99.5]), values.mean(), values.std()],
            rtol=1e-5,
        )
    assert plan.modality == "ct"  # air in every file (over all channels)
    assert len(plan.normalization["clip"]) == 2 and len(plan.normalization["mean"]) == 2
    # one IntensityWindow cannot clip two channels to different windows
    with pytest.raises(ValueError, match="different clipping windows"):
        plan.normalization_layers()
    # images with different channel counts are refused
    single = _save(data[..., 0], affine, tmp_path / "one.nii.gz")
    with pytest.raises(ValueError, match="different numbers of channels"):
        fingerprint([image_path, single])


def test_bids_folders_pair_by_subject_with_modalities_as_channels(tmp_path, capsys):
    # sub-XX_FLAIR + sub-XX_T1w beside sub-XX_mask: pair_by="bids", as from_folder pairs them
    rng = np.random.default_rng(7)
    images, labels = tmp_path / "rawdata", tmp_path / "derivatives"
    images.mkdir()
    labels.mkdir()
    affine = np.diag([1.0, 1.2, 2.0, 1.0])
    data = {}
    for subject in ("sub-01", "sub-02"):
        flair = rng.normal(300, 30, (10, 12, 8)).astype(np.float32)
        t1 = rng.normal(80, 8, (10, 12, 8)).astype(np.float32)
        mask = np.zeros((10, 12, 8), np.uint8)
        mask[2:7, 3:9, 1:6] = 1
        _save(flair, affine, images / f"{subject}_FLAIR.nii.gz")
        _save(t1, affine, images / f"{subject}_T1w.nii.gz")
        _save(mask, affine, labels / f"{subject}_mask.nii.gz")
        data[subject] = (flair, t1, mask)
    with pytest.raises(ValueError, match="without a label map"):
        fingerprint(images, labels)  # identical names: nothing pairs
    plan = fingerprint(images, labels, pair_by="bids")
    assert [len(r["image"]) for r in plan.files] == [2, 2]
    assert plan.dataset["channels"] == 2 and plan.dataset["n_files"] == 2
    for channel in range(2):  # FLAIR then T1w: name order
        values = np.concatenate([d[channel][d[2] != 0] for d in data.values()]).astype(np.float64)
        figures = plan.dataset["intensity"][channel]
        np.testing.assert_allclose(
            [figures["mean"], figures["std"]], [values.mean(), values.std()], rtol=1e-5
        )
    assert "sub-01_FLAIR.nii.gz + sub-01_T1w.nii.gz" in plan.report()
    # the command line too
    assert main(["plan", str(images), str(labels), "--pair-by", "bids", "--no-progress"]) == 0
    assert "sub-02_FLAIR.nii.gz + sub-02_T1w.nii.gz" in capsys.readouterr().out
    # a modality off the subject's grid is refused, naming the file
    _save(data["sub-02"][1][:9], affine, images / "sub-02_T1w.nii.gz")
    with pytest.raises(NiftiError, match="sub-02_T1w.nii.gz: not on the voxel grid of"):
        fingerprint(images, labels, pair_by="bids")
    with pytest.raises(ValueError, match="pair_by applies to folders"):
        fingerprint([str(images / "sub-01_T1w.nii.gz")], pair_by="bids")


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="images: .*nowhere is not a directory"):
        fingerprint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="images must be a folder or a list"):
        fingerprint(3)


def test_the_ct_phantom_task_is_planned_as_ct(tmp_path):
    from keras_nii.phantoms import make_ct_dataset

    pairs = make_ct_dataset(
        tmp_path, 4, seed=2, in_plane=(32, 40), slices=(8, 12), slice_spacing=(3.0, 5.0)
    )
    plan = fingerprint(tmp_path / "images", tmp_path / "labels")
    assert plan.modality == "ct" and plan.normalization["scheme"] == "ct"
    assert plan.dataset["thick_axes"] == [2]  # 3-5 mm slices, 0.6-0.9 mm in-plane
    reference = _reference([(str(i), str(lab)) for i, lab in pairs])
    pooled = np.concatenate([r["values"] for r in reference])
    np.testing.assert_allclose(plan.normalization["clip"], np.percentile(pooled, [0.5, 99.5]))
    np.testing.assert_allclose(plan.normalization["mean"], pooled.mean())
    spacings = np.array([r["spacing"] for r in reference])
    np.testing.assert_allclose(plan.target_spacing[2], np.percentile(spacings[:, 2], 10))
