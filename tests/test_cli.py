"""The keras-nii command: info, predict, demo, bench, --help, --version, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import keras_nii
from keras_nii.cli import main
from keras_nii.io import load_nifti, save_nifti
from keras_nii.phantoms import make_phantom


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error_lines(err: str) -> list[str]:
    """stderr lines written by keras-nii (TensorFlow may log its own at import)."""
    return [line for line in err.splitlines() if line.startswith("keras-nii")]


# --------------------------------------------------------------------------- info


def test_info_describes_nibabel_files(capsys, nibabel_data):
    code, out, err = _run(
        capsys, "info", nibabel_data / "anatomical.nii", nibabel_data / "example4d.nii.gz"
    )
    assert code == 0, err
    assert not _error_lines(err)
    assert "33 x 41 x 25" in out
    assert "128 x 96 x 24 x 2" in out
    assert "LAS (voxel axes of the file), RAS after canonical" in out
    assert "spacing       2 x 2 x 2 mm" in out
    assert "spacing       2 x 2 x 2.2 mm" in out
    assert "int16 on disk" in out
    assert "scaling       none" in out
    assert "oblique" in out  # example4d's axes are tilted
    assert "non-finite voxels: 0" in out
    # the affine, row by row
    assert "[   -2.0000      0.0000      0.0000     32.0000]" in out


def test_info_reports_scaling_orientation_and_nonfinite(capsys, tmp_path):
    image, _, affine = make_phantom((12, 10, 8), seed=0, orientation="PSR", spacing=(1, 2, 3))
    image[0, 0, 0] = np.nan
    img = nib.Nifti1Image(image, affine)
    img.header.set_data_dtype(np.float32)
    nib.save(img, tmp_path / "nan.nii.gz")
    scaled = nib.Nifti1Image(np.arange(12 * 10 * 8, dtype=np.int16).reshape(12, 10, 8), affine)
    scaled.header.set_slope_inter(0.5, 10.0)
    nib.save(scaled, tmp_path / "scaled.nii")
    code, out, err = _run(capsys, "info", tmp_path / "nan.nii.gz", tmp_path / "scaled.nii")
    assert code == 0, err
    assert "PSR (voxel axes of the file), RAS after canonical" in out
    assert "spacing       1 x 2 x 3" in out
    assert "(RAS+ array from load_nifti: (8, 12, 10, 1))" in out
    assert "non-finite voxels: 1" in out
    assert "slope 0.5, intercept 10" in out
    assert "min 10, max 489.5" in out


def test_info_bad_files_one_line_each_and_nonzero_exit(capsys, tmp_path, nibabel_data):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    missing = tmp_path / "missing.nii"
    code, out, err = _run(capsys, "info", bad, nibabel_data / "anatomical.nii", missing)
    assert code == 1
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert lines[0].startswith(f"keras-nii: error: {bad}: not a NIfTI file")
    assert lines[1] == f"keras-nii: error: {missing}: no such file"
    assert lines[2] == "keras-nii: error: 2 of 3 file(s) could not be read"
    assert len(lines) == 3
    # the good file in between is still described
    assert "33 x 41 x 25" in out


def test_info_one_bad_file(capsys, tmp_path):
    code, out, err = _run(capsys, "info", tmp_path)
    assert code == 1
    assert out == ""
    assert _error_lines(err) == [f"keras-nii: error: {tmp_path}: is a directory, not a NIfTI file"]


# --------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import keras

    from keras_nii.layers.normalization import ZScoreNormalization
    from keras_nii.models import unet3d

    keras.utils.set_random_seed(0)
    # multiples of 2 only (no padding inside): the CLI pads to the divisor the model records
    model = unet3d(
        filters=2, levels=1, normalization=ZScoreNormalization(nonzero=True), pad_to_fit=False
    )
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    model.save(path)
    return path, model


@pytest.fixture
def lps_scan(tmp_path):
    image, _, affine = make_phantom((16, 12, 8), seed=1, orientation="LPS", spacing=(1.2, 1, 0.9))
    path = tmp_path / "scan.nii.gz"
    save_nifti(image, path, affine=affine)
    return path


def test_predict_writes_labels_on_the_scan(capsys, tmp_path, tiny_model, lps_scan):
    model_path, model = tiny_model
    out_path = tmp_path / "pred.nii.gz"
    code, out, err = _run(capsys, "predict", model_path, lps_scan, out_path)
    assert code == 0, err
    assert f"wrote {out_path}: 16 x 12 x 8 uint8" in out
    scan, written = nib.load(lps_scan), nib.load(out_path)
    assert written.shape == scan.shape
    np.testing.assert_allclose(written.affine, scan.affine)
    assert nib.aff2axcodes(written.affine) == ("L", "P", "S")
    # the labels are the model's RAS+ prediction put back in the file's voxel order
    volume = load_nifti(lps_scan)
    expected = np.asarray(model(volume.array[None], training=False))[0] > 0.5
    np.testing.assert_array_equal(np.asarray(written.dataobj), volume.to_source(expected)[..., 0])


def test_predict_probabilities_windows_and_overwrite(capsys, tmp_path, tiny_model, lps_scan):
    model_path, _ = tiny_model
    out_path = tmp_path / "prob.nii"
    argv = ["predict", model_path, lps_scan, out_path, "--output", "probabilities"]
    argv += ["--patch-size", "8", "8", "8", "--overlap", "0.25", "--batch-size", "3"]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    written = nib.load(out_path)
    assert written.get_data_dtype() == np.float32
    values = np.asarray(written.dataobj)
    assert values.shape == (16, 12, 8)
    assert np.all((values >= 0) & (values <= 1))
    # an existing output is kept unless --overwrite
    code, _, err = _run(capsys, *argv)
    assert code == 1
    assert _error_lines(err) == [
        f"keras-nii: error: {out_path} already exists; pass --overwrite to replace it"
    ]
    code, _, err = _run(capsys, *argv, "--overwrite")
    assert code == 0, err


def test_predict_errors_are_one_line(capsys, tmp_path, tiny_model, lps_scan):
    model_path, _ = tiny_model
    cases = [
        (
            ["predict", tmp_path / "none.keras", lps_scan, tmp_path / "o.nii.gz"],
            f"keras-nii: error: model {tmp_path / 'none.keras'}: no such file or folder",
        ),
        (
            ["predict", model_path, tmp_path / "none.nii.gz", tmp_path / "o.nii.gz"],
            f"keras-nii: error: {tmp_path / 'none.nii.gz'}: no such file",
        ),
        (
            ["predict", model_path, lps_scan, lps_scan, "--overwrite"],
            f"keras-nii: error: refusing to write {lps_scan}: it is an input scan",
        ),
        (
            ["predict", model_path, lps_scan, tmp_path / "o.png"],
            f"keras-nii: error: output {tmp_path / 'o.png'} must end with one of",
        ),
        (
            ["predict", tmp_path, lps_scan, tmp_path / "o.nii.gz"],
            f"keras-nii: error: model {tmp_path}: a folder without saved_model.pb",
        ),
    ]
    for argv, message in cases:
        code, out, err = _run(capsys, *argv)
        assert code == 1, argv
        assert "Traceback" not in err
        lines = _error_lines(err)
        assert len(lines) == 1 and lines[0].startswith(message), (argv, err)
    assert not (tmp_path / "o.nii.gz").exists()


def test_predict_pads_any_scan_size_for_the_model(capsys, tmp_path, tiny_model):
    # the unet3d (levels=1) takes multiples of 2; a 9 x 7 x 5 scan is padded and cropped back
    model_path, model = tiny_model
    rng = np.random.default_rng(0)
    image = rng.uniform(1, 100, (9, 7, 5)).astype(np.float32)
    odd = tmp_path / "odd.nii"
    save_nifti(image, odd)
    code, _, err = _run(
        capsys, "predict", model_path, odd, tmp_path / "o.nii", "--output", "probabilities"
    )
    assert code == 0, err
    written = nib.load(tmp_path / "o.nii")
    assert written.shape == (9, 7, 5)
    # reference: the model on the zero-padded 10 x 8 x 6 volume, cropped by hand
    padded = np.zeros((1, 10, 8, 6, 1), np.float32)
    padded[0, :9, :7, :5, 0] = load_nifti(odd).array[..., 0]
    expected = np.asarray(model.predict_on_batch(padded))[0, :9, :7, :5, 0]
    ras = load_nifti(tmp_path / "o.nii").array[..., 0]
    np.testing.assert_allclose(ras, expected, atol=1e-5)


def test_predict_model_failure_is_one_line(capsys, tmp_path, tiny_model):
    model_path, _ = tiny_model
    odd = tmp_path / "odd.nii"
    save_nifti(np.ones((9, 8, 8), np.float32), odd)
    # a divisor of 1 forced on a model that needs 2: the model fails, in one line
    code, _, err = _run(
        capsys, "predict", model_path, odd, tmp_path / "o.nii", "--size-divisor", "1"
    )
    assert code == 1
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    assert line.startswith("keras-nii: error: the model failed on windows of 9 x 8 x 8 voxels")
    assert line.endswith("pass --size-divisor N")
    assert "multiples of 2" in line  # the model's own SizeDivisor message
    # ... and the suggested fix works
    code, _, err = _run(capsys, "predict", model_path, odd, tmp_path / "o.nii", "--size-divisor", 2)
    assert code == 0, err
    assert nib.load(tmp_path / "o.nii").shape == (9, 8, 8)
    # so does an explicit window of multiples
    code, _, err = _run(
        capsys, "predict", model_path, odd, tmp_path / "p.nii", "--patch-size", 8, 8, 8
    )
    assert code == 0, err


# --------------------------------------------------------------------------- help, version, bench


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "usage: keras-nii [-h]"),
        (["demo"], "usage: keras-nii demo [-h] [--out DIR] [--quick] [--epochs N]"),
        (["info"], "usage: keras-nii info [-h] FILE [FILE ...]"),
        (["predict"], "MODEL IN [IN ...] OUT"),
    ],
)
def test_help(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert expected in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "m.keras", "in.nii", "out.nii", "--overlap", "1.5"])
    assert exit_info.value.code == 2
    assert "argument --overlap: expected a number in [0, 1), got '1.5'" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"keras-nii {keras_nii.__version__}"


def test_bench_gets_the_rest_of_the_arguments(capsys, monkeypatch):
    seen = []
    fake = types.ModuleType("keras_nii.bench")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "keras_nii.bench", fake)
    assert main(["bench", "--size", "16", "--help"]) == 3
    assert seen == [["--size", "16", "--help"]]


def test_bench_missing_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_nii.bench", None)
    code, _, err = _run(capsys, "bench")
    assert code == 1
    assert _error_lines(err) == [
        "keras-nii: error: the benchmark is not available in this installation "
        "(keras_nii.bench is missing)"
    ]


# --------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_quick_end_to_end(capsys, tmp_path):
    import json

    out_dir = tmp_path / "demo"
    figures = tmp_path / "figures.json"
    argv = ["demo", "--quick", "--out", out_dir, "--seed", 3, "--json", figures]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert (out_dir / "model.keras").is_file()
    assert (out_dir / "exported" / "saved_model.pb").is_file()
    assert len(list((out_dir / "data" / "images").glob("case_*.nii.gz"))) == 4
    # the CT-like scans: int16 HU with slope / intercept, every one its own shape
    shapes = set()
    for path in (out_dir / "data" / "images").glob("case_*.nii.gz"):
        img = nib.load(path)
        assert img.get_data_dtype() == np.int16
        assert img.dataobj.inter == -1024
        shapes.add(img.shape)
    assert len(shapes) == 4
    # the patches were cached resampled (memory-mappable .npy)
    assert list((out_dir / "cache").rglob("*.npy"))
    # one progress line per epoch, whole-scan validation on the last
    from keras_nii.demo import QUICK

    lines = [line for line in out.splitlines() if line.strip().startswith("epoch ")]
    assert len(lines) == QUICK["epochs"]
    assert "whole-scan validation Dice organ" in lines[-1]
    assert "training at 4x that" in out
    assert "held-out Dice over 1 scans" in out
    assert "empty prediction 0.000" in out

    # the predictions lie on the held-out scans' own grids, and the reported Dice
    # is NumPy's on the files
    data = json.loads(figures.read_text())
    assert set(data["heldout_dice"]) == {"1", "2"}
    [image_path] = sorted((out_dir / "heldout" / "images").glob("case_*.nii.gz"))
    scan = nib.load(image_path)
    prediction = nib.load(out_dir / "predictions" / image_path.name)
    assert prediction.shape == scan.shape
    np.testing.assert_allclose(prediction.affine, scan.affine)
    truth = np.asarray(nib.load(out_dir / "heldout" / "labels" / image_path.name).dataobj)
    predicted = np.asarray(prediction.dataobj)
    for c in (1, 2):
        t, p = truth == c, predicted == c
        total = t.sum() + p.sum()
        expected = 2.0 * (t & p).sum() / total if total else 1.0
        assert data["heldout_dice"][str(c)] == pytest.approx(expected)
        assert data["heldout"][0][str(c)]["full"] == pytest.approx(2 * t.sum() / (t.sum() + t.size))
    # a quick run already finds the organ (its all-organ reference is under 0.15)
    assert data["heldout_dice"]["1"] > 0.5
    assert str(out_dir / "exported") in out

    # a second run refuses the non-empty folder, before any work
    code, _, err = _run(capsys, *argv)
    assert code == 1
    (line,) = _error_lines(err)
    assert line.startswith(f"keras-nii: error: {out_dir} already exists and is not empty")
    assert "--overwrite" in line


def test_demo_bad_setting_is_one_line(capsys, tmp_path):
    from keras_nii.demo import run_demo

    with pytest.raises(ValueError, match="multiples of 4"):
        run_demo(tmp_path / "d", patch_size=(48, 48, 18))
    with pytest.raises(ValueError, match="unknown demo setting"):
        run_demo(tmp_path / "d", size=32)
    with pytest.raises(ValueError, match="its folder does not exist"):
        run_demo(tmp_path / "d", json_path=tmp_path / "no" / "figures.json")
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "d"), "--epochs", "0"])
    assert "keras-nii demo: error: argument --epochs" in capsys.readouterr().err


# --------------------------------------------------------------------------- entry points


def test_console_script_and_python_m(nibabel_data):
    script = Path(sys.executable).with_name("keras-nii")
    if not script.exists():
        pytest.skip(f"the keras-nii console script is not installed next to {sys.executable}")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [str(script), "info", str(nibabel_data / "anatomical.nii")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "33 x 41 x 25" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "keras_nii", "info", str(nibabel_data / "missing.nii")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"keras-nii: error: {nibabel_data / 'missing.nii'}: no such file" in done.stderr


def test_demo_overwrite_replaces_only_the_demo_files(tmp_path):
    from keras_nii.demo import DemoError, _prepare_folder

    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "exported").mkdir()
    (tmp_path / "model.keras").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DemoError, match="--overwrite"):
        _prepare_folder(tmp_path, overwrite=False)
    assert (tmp_path / "model.keras").exists()
    _prepare_folder(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(DemoError, match="not a folder"):
        _prepare_folder(tmp_path / "notes.txt", overwrite=True)
