"""keras_nii.plot.show_slices."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

from keras_nii.io import load_nifti, save_nifti
from keras_nii.phantoms import make_phantom

pytest.importorskip("matplotlib")

from keras_nii import plot  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def phantom(tmp_path):
    image, label, affine = make_phantom((24, 20, 16), seed=3, orientation="LPS", n_lesions=2)
    save_nifti(image, tmp_path / "image.nii.gz", affine=affine)
    save_nifti(label, tmp_path / "label.nii.gz", affine=affine)
    return load_nifti(tmp_path / "image.nii.gz"), load_nifti(
        tmp_path / "label.nii.gz", dtype="uint8"
    )


def test_three_panels_named_by_orientation(phantom):
    image, _ = phantom
    fig = plot.show_slices(image, title="a phantom")
    assert len(fig.axes) == 3
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["sagittal, axis 0 = 12", "coronal, axis 1 = 10", "axial, axis 2 = 8"]
    assert fig.get_suptitle() == "a phantom"
    # each panel shows the slice laid out (vertical, horizontal): axial = (y, x)
    assert fig.axes[2].images[0].get_array().shape == (20, 24)


def test_overlays_and_saved_png(phantom, tmp_path):
    image, label = phantom
    lesion = tuple(int(v) for v in np.argwhere(label.array[..., 0]).mean(axis=0))
    path = tmp_path / "slices.png"
    fig = plot.show_slices(image, label, label.array, index=lesion, path=path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5000
    for ax in fig.axes:
        # the image and the translucent mask; the prediction as a contour
        assert len(ax.images) == 2
        assert ax.images[1].get_array()[..., 3].max() > 0
        assert len(ax.collections) >= 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["reference", "prediction"]


def test_plain_arrays_probabilities_and_index(tmp_path):
    volume = np.random.default_rng(0).normal(size=(10, 12, 14, 2)).astype("float32")
    probabilities = np.zeros((10, 12, 14), np.float32)
    probabilities[2:5, 3:6, 4:7] = 0.9
    fig = plot.show_slices(volume, prediction=probabilities, index=(3, 4, 5))
    assert [ax.get_title() for ax in fig.axes] == ["axis 0 = 3", "axis 1 = 4", "axis 2 = 5"]
    assert all(len(ax.collections) >= 1 for ax in fig.axes)
    # a slice without any predicted voxel draws no contour (and no warning)
    fig = plot.show_slices(volume, prediction=probabilities, index=-1)
    assert all(len(ax.collections) == 0 for ax in fig.axes)
    fig.savefig(tmp_path / "x.pdf")
    assert (tmp_path / "x.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"volume": np.zeros((4, 4))}, "volume must be"),
        ({"mask": np.zeros((5, 4, 4))}, "same voxel grid"),
        ({"index": (1, 2)}, "index must be"),
        ({"index": (1, 2, 9)}, "out of range"),
    ],
)
def test_bad_arguments(kwargs, message):
    arguments = {"volume": np.zeros((4, 4, 4))} | kwargs
    with pytest.raises(ValueError, match=message):
        plot.show_slices(**arguments)


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install keras-nii\[plot\]"):
        plot.show_slices(np.zeros((4, 4, 4)))
