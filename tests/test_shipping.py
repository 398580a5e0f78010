"""Shipping without TensorFlow: ONNX and LiteRT exports with the preprocessing inside.

Every deterministic layer (each option of the normalizations, the window, crop
or pad, resize) and a U-Net with the dataset-fingerprint normalization inside
(a CT-style clip, then a fixed-statistics z-score) are exported once each to
ONNX (tf2onnx) and to LiteRT with builtin ops only; ONNX Runtime and the
LiteRT interpreter must give what ``model.predict`` gives, to 1e-5 relative,
on realistic intensities and on two window sizes from one file (the spatial
sizes are symbolic). The random layers must be the identity, with no random
op left in either graph. ``predict_nifti`` with the ``.onnx`` file must equal
it with the ``.keras`` file on LPS and oblique scans, and run in a process
that imports none of TensorFlow, Keras, JAX or PyTorch. Exports cost seconds
each on a small machine: the module makes five, shared by its tests.

TensorFlow backend (the exporters that run under JAX and PyTorch are checked
in ``test_shipping_backends.py``).
"""

from __future__ import annotations

from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the LiteRT and tf2onnx exports need TensorFlow"
)
ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
pytest.importorskip("tf2onnx", reason="the [onnx] extra is not installed")
litert = pytest.importorskip(
    "ai_edge_litert.interpreter", reason="the [litert] extra is not installed"
)

from keras_nii.cli import main  # noqa: E402
from keras_nii.export import export_model, read_signature  # noqa: E402
from keras_nii.inference import predict_nifti, size_divisor  # noqa: E402
from keras_nii.layers import (  # noqa: E402
    CenterCropOrPad3D,
    IntensityWindow,
    MinMaxNormalization,
    Resize3D,
    ZScoreNormalization,
)
from keras_nii.models import unet3d  # noqa: E402
from keras_nii.phantoms import make_phantom  # noqa: E402
from keras_nii.serving import LiteRTModel, OnnxModel  # noqa: E402
from tests.scripts import run_script  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _layer_examples() -> list:
    """The ``EXAMPLES`` of the layer test modules (one factory a layer, as the contract uses)."""
    import importlib

    factories = []
    for path in sorted((ROOT / "tests" / "layers").glob("test_*.py")):
        if path.stem != "test_contract":
            module = importlib.import_module(f"tests.layers.{path.stem}")
            factories.extend(getattr(module, "EXAMPLES", []))
    return factories


EXAMPLES = _layer_examples()
HEAVY = ("tensorflow", "keras", "jax", "torch")
RANDOM_OPS_ONNX = {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike"}
RANDOM_OPS_ONNX |= {"Multinomial", "Bernoulli"}


def assert_close(got, want, what=""):
    """Equal to 1e-5 relative to the output's magnitude."""
    want = np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * scale, err_msg=what
    )


def scans(rng) -> list[np.ndarray]:
    """Two batches of two-channel volumes with realistic intensities, of two sizes.

    Channel 0 is CT-like (air -1000 HU, soft tissue ~40, bone up to 1500),
    channel 1 MR-like with a zero background. The second sample of the first
    batch has a sparse foreground off the z-score's every-4th-voxel grid.
    """
    out = []
    for shape in [(2, 20, 18, 16), (1, 17, 22, 13)]:
        grid = np.indices(shape[1:]).astype("float64")
        centre = (np.array(shape[1:])[:, None, None, None] - 1) / 2
        r = np.sqrt(
            (((grid - centre) / (np.array(shape[1:])[:, None, None, None] / 2.4)) ** 2).sum(0)
        )
        ct = np.where(
            r < 1, 40 + 15 * rng.normal(size=r.shape), -1000 + 5 * rng.normal(size=r.shape)
        )
        ct = np.where((r > 0.8) & (r < 1), 900 + 300 * rng.random(r.shape), ct)
        mr = np.where(r < 1, 450 + 120 * rng.random(r.shape), 0.0)
        sample = np.stack([ct, mr], axis=-1)
        batch = np.repeat(sample[None], shape[0], axis=0)
        if shape[0] == 2:
            batch[1, ..., 1] = 0
            batch[1, 1::4, 2::4, 3::4, 1] = 700 + 50 * rng.random(
                batch[1, 1::4, 2::4, 3::4, 1].shape
            )
        out.append(batch.astype("float32"))
    return out


def deterministic_layers() -> list:
    return [
        ZScoreNormalization(name="zscore"),
        ZScoreNormalization(nonzero=True, name="zscore_nonzero"),
        ZScoreNormalization(per_channel=False, name="zscore_joint"),
        ZScoreNormalization(mean=[40.0, 450.0], std=[300.0, 120.0], name="zscore_fixed"),
        ZScoreNormalization(mean=100.0, std=250.0, nonzero=True, name="zscore_fixed_nonzero"),
        MinMaxNormalization(name="minmax"),
        MinMaxNormalization(percentiles=(0.5, 99.5), name="minmax_percentiles"),
        MinMaxNormalization(
            percentiles=(2.0, 98.0),
            output_range=(-1.0, 1.0),
            clip=False,
            per_channel=False,
            name="minmax_percentiles_joint",
        ),
        IntensityWindow(-1000.0, 400.0, name="window"),
        IntensityWindow(-160.0, 240.0, output_range=(-160.0, 240.0), clip=True, name="clip"),
        IntensityWindow(0.0, 80.0, output_range=(-1.0, 1.0), clip=False, name="window_noclip"),
        CenterCropOrPad3D((12, 24, 9), fill_value=-1000.0, name="crop_or_pad"),
        Resize3D((10, 14, 12), name="resize"),
        Resize3D((9, 8, 11), interpolation="nearest", name="resize_nearest"),
    ]


@pytest.fixture(scope="module")
def layers_model() -> keras.Model:
    """One output a deterministic layer, and one for all the random layers in a chain."""
    inputs = keras.Input((None, None, None, 2), name="scan")
    outputs = [layer(inputs) for layer in deterministic_layers()]
    # RandomCrop3D last: its output has the crop's size (the central window in serving)
    random = sorted(
        (factory() for factory in EXAMPLES if factory().RANDOM),
        key=lambda layer: type(layer).__name__ == "RandomCrop3D",
    )
    import keras_nii.layers as kl

    public = {
        name
        for name in kl.__all__
        if isinstance(getattr(kl, name), type) and getattr(getattr(kl, name), "RANDOM", False)
    }
    assert public <= {type(layer).__name__ for layer in random}  # every random layer
    x = inputs
    for layer in random:
        x = layer(x)
    outputs.append(keras.layers.Identity(name="random_chain")(x))
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def exported_layers(layers_model, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("layers")
    return {
        "onnx": export_model(layers_model, folder / "layers.onnx"),
        "litert": export_model(layers_model, folder / "layers.tflite"),
    }


def litert_outputs(path, x) -> list[np.ndarray]:
    """Every output of a .tflite file, in the Keras model's order."""
    runner = litert.Interpreter(model_path=str(path)).get_signature_runner()
    (name,) = runner.get_input_details()
    out = runner(**{name: x})
    return [out[key] for key in sorted(out, key=lambda k: int(k.rsplit("_", 1)[-1]))]


def test_every_deterministic_layer_exports_to_onnx_and_litert(layers_model, exported_layers):
    onnx = OnnxModel(exported_layers["onnx"].path)
    names = [t.name for t in onnx.outputs]
    assert names == layers_model.output_names
    for x in scans(np.random.default_rng(0)):
        expected = layers_model.predict(x, verbose=0)
        got_onnx = onnx.session.run(None, {"scan": x})
        got_litert = litert_outputs(exported_layers["litert"].path, x)
        for name, want, a, b in zip(names, expected, got_onnx, got_litert, strict=True):
            assert a.shape == want.shape and b.shape == want.shape, name
            assert_close(a, want, f"ONNX {name} on {x.shape}")
            assert_close(b, want, f"LiteRT {name} on {x.shape}")
        # the random layers are the identity in serving, but for RandomCrop3D
        # (last), which takes the central window, as Keras's RandomCrop does
        (crop,) = [layer for layer in layers_model.layers if type(layer).__name__ == "RandomCrop3D"]
        window = x
        for axis, size in enumerate(crop.shape, start=1):
            start = (x.shape[axis] - size) // 2
            assert start >= 0  # the scans are larger than the window
            window = np.take(window, np.arange(start, start + size), axis=axis)
        np.testing.assert_array_equal(got_onnx[-1], window)
        np.testing.assert_array_equal(got_litert[-1], window)


def test_exported_layers_keep_symbolic_sizes_and_no_random_op(exported_layers):
    for signature in exported_layers.values():
        (scan,) = signature.inputs
        assert scan.shape == (None, None, None, None, 2) and scan.dtype == "float32"
    import onnx

    graph = onnx.load(exported_layers["onnx"].path).graph
    types = {node.op_type for node in graph.node}
    for node in graph.node:  # nested graphs (If branches)
        for attribute in node.attribute:
            if attribute.g is not None:
                types |= {n.op_type for n in attribute.g.node}
    assert not types & RANDOM_OPS_ONNX, types & RANDOM_OPS_ONNX
    interpreter = litert.Interpreter(model_path=exported_layers["litert"].path)
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not {op for op in ops if "RANDOM" in op or "MULTINOMIAL" in op}, ops
    # builtin ops only: no TensorFlow kernel ("Flex") was needed
    assert not {op for op in ops if op.startswith("Flex") or op == "CUSTOM"}, ops


# --------------------------------------------------------------------------- a U-Net


def fingerprint_unet(**kwargs) -> keras.Model:
    """A U-Net whose input goes through the normalization a dataset plan suggests."""
    normalization = keras.Sequential(
        [
            IntensityWindow(0.0, 900.0, output_range=(0.0, 900.0)),  # clip to the foreground range
            ZScoreNormalization(mean=420.0, std=150.0),  # the dataset's foreground statistics
        ],
        name="fingerprint",
    )
    return unet3d(
        (None, None, None, 1),
        num_classes=3,
        filters=4,
        levels=2,
        normalization=normalization,
        **kwargs,
    )


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> dict:
    """The U-Net as .keras, and exported by ``keras-nii export`` in the three formats."""
    folder = tmp_path_factory.mktemp("unet")
    keras.utils.set_random_seed(0)
    model = fingerprint_unet()
    keras_path = folder / "run" / "model.keras"
    keras_path.parent.mkdir()
    model.save(keras_path)
    printed = {}
    for fmt, out in [("onnx", "unet.onnx"), ("litert", "unet.tflite"), ("savedmodel", "unet_sm")]:
        # the run's folder for one, the .keras file and an explicit --format for the others
        source = keras_path.parent if fmt == "onnx" else keras_path
        argv = ["export", str(source), str(folder / out)] + (
            [] if fmt == "onnx" else ["--format", fmt]
        )
        printed[fmt] = run_cli(argv)
    return {"folder": folder, "model": model, "keras": keras_path, "printed": printed}


def run_cli(argv) -> str:
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    assert code == 0, (argv, stdout.getvalue())
    return stdout.getvalue()


def test_export_cli_prints_the_signature_of_each_format(shipped):
    folder, printed = shipped["folder"], shipped["printed"]
    assert f"wrote {folder / 'unet.onnx'} (onnx) from {shipped['keras']}" in printed["onnx"]
    assert "input  image: float32 [?, ?, ?, ?, 1]" in printed["onnx"]
    assert "output probabilities: float32 [?, ?, ?, ?, 3]" in printed["onnx"]
    for fmt in ("litert", "savedmodel"):
        lines = printed[fmt].splitlines()
        assert lines[0].endswith(f"({fmt}) from {shipped['keras']}"), lines
        assert any(
            line.startswith("input ") and "float32 [?, ?, ?, ?, 1]" in line for line in lines
        )
        assert any(
            line.startswith("output ") and "float32 [?, ?, ?, ?, 3]" in line for line in lines
        )
    # what it printed is what the artifact says
    assert read_signature(folder / "unet.tflite").lines() == printed["litert"].splitlines()[1:]


def test_export_cli_refuses_to_overwrite_and_names_bad_models(shipped, tmp_path, capsys):
    folder = shipped["folder"]
    assert main(["export", str(shipped["keras"]), str(folder / "unet.onnx")]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "none.keras"), str(tmp_path / "x.onnx")]) == 1
    assert "none.keras: no such file or folder" in capsys.readouterr().err
    assert (
        main(["export", str(shipped["keras"]), str(tmp_path / "x.onnx"), "--format", "litert"]) == 1
    )
    assert "a .tflite file" in capsys.readouterr().err


def test_unet_with_the_fingerprint_normalization_in_every_runtime(shipped):
    folder, model = shipped["folder"], shipped["model"]
    onnx = OnnxModel(folder / "unet.onnx")
    tflite = LiteRTModel(folder / "unet.tflite")
    from keras_nii.inference import load_model

    saved = load_model(folder / "unet_sm")
    # the U-Net pads by itself (pad_to_fit): no file needs a size divisor
    assert onnx.size_divisor is None and tflite.size_divisor is None
    assert size_divisor(saved) is None and size_divisor(model) == (1, 1, 1)
    rng = np.random.default_rng(1)
    # sizes that are multiples of the U-Net's 4, and sizes that it pads inside the graph
    for shape in [(2, 16, 16, 16), (1, 24, 12, 20), (1, 21, 13, 18)]:
        image, _, _ = make_phantom(shape[1:], seed=int(rng.integers(100)))
        x = np.repeat(image[None, ..., None], shape[0], axis=0).astype("float32")
        x[-1] *= 1.3  # intensities beyond the clip
        expected = model.predict(x, verbose=0)
        for name, run in [("ONNX", onnx), ("LiteRT", tflite), ("SavedModel", saved)]:
            assert_close(run(x), expected, f"{name} on {x.shape}")


# --------------------------------------------------------------------------- predict_nifti


def write_scan(path, orientation, seed) -> str:
    image, _, affine = make_phantom((20, 24, 16), seed=seed, orientation=orientation)
    img = nib.Nifti1Image(image.astype("float32"), affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    nib.save(img, path)
    return str(path)


@pytest.mark.parametrize("orientation", ["LPS", "oblique"])
def test_predict_nifti_with_onnx_equals_keras(shipped, tmp_path, orientation):
    scan = write_scan(tmp_path / "scan.nii.gz", orientation, seed=3)
    onnx_path = str(shipped["folder"] / "unet.onnx")
    options = dict(patch_size=(16, 16, 8), overlap=0.5)
    written = {}
    for kind, model in [("keras", str(shipped["keras"])), ("onnx", onnx_path)]:
        for output in ("probabilities", "labels"):
            out = tmp_path / f"{kind}_{output}.nii.gz"
            predict_nifti(model, scan, out, output=output, **options)
            written[kind, output] = nib.load(out)
    source = nib.load(scan)
    for output in ("probabilities", "labels"):
        a, b = written["keras", output], written["onnx", output]
        np.testing.assert_array_equal(a.affine, source.affine)
        np.testing.assert_array_equal(b.affine, source.affine)
        assert b.shape[:3] == source.shape and b.get_data_dtype() == a.get_data_dtype()
    probabilities = written["keras", "probabilities"].get_fdata()
    assert_close(written["onnx", "probabilities"].get_fdata(), probabilities)
    labels = np.asarray(written["onnx", "labels"].dataobj)
    np.testing.assert_array_equal(labels, np.asarray(written["keras", "labels"].dataobj))
    assert len(np.unique(labels)) > 1  # not a constant prediction
    # and so does the LiteRT file
    tflite = tmp_path / "tflite_probabilities.nii.gz"
    predict_nifti(
        str(shipped["folder"] / "unet.tflite"), scan, tflite, output="probabilities", **options
    )
    assert_close(nib.load(tflite).get_fdata(), probabilities)
    # the command line takes the .onnx file too
    out = tmp_path / "cli_labels.nii.gz"
    printed = run_cli(["predict", onnx_path, scan, str(out), "--patch-size", "16", "16", "8"])
    assert printed.startswith(f"wrote {out}")
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), labels)


def test_predict_nifti_with_onnx_pads_to_the_divisor_and_resamples(tmp_path):
    # a U-Net that takes multiples of 4 only (pad_to_fit=False): its ONNX file
    # says so, and predict_nifti pads 21 x 26 x 15 voxels, in one window; and at 1.5 mm
    keras.utils.set_random_seed(0)
    model = fingerprint_unet(pad_to_fit=False)
    export_model(model, tmp_path / "unet.onnx")
    export_model(model, tmp_path / "unet.tflite")
    image, _, affine = make_phantom(
        (21, 26, 15), seed=5, orientation="LPS", spacing=(1.2, 1.0, 1.3)
    )
    img = nib.Nifti1Image(image.astype("float32"), affine)
    nib.save(img, tmp_path / "odd.nii.gz")
    scan = str(tmp_path / "odd.nii.gz")
    onnx = OnnxModel(tmp_path / "unet.onnx")
    tflite = LiteRTModel(tmp_path / "unet.tflite")
    assert onnx.size_divisor == (4, 4, 4)  # from the file's metadata
    assert tflite.size_divisor == (4, 4, 4)  # from a metadata buffer of the flatbuffer
    for options in [{}, {"spacing": (1.5, 1.5, 1.5)}]:
        want = tmp_path / "keras.nii.gz"
        predict_nifti(model, scan, want, output="probabilities", **options)
        for name, served in [("onnx", onnx), ("tflite", str(tmp_path / "unet.tflite"))]:
            got = tmp_path / f"{name}.nii.gz"
            predict_nifti(served, scan, got, output="probabilities", **options)
            assert nib.load(got).shape[:3] == (21, 26, 15)
            assert_close(nib.load(got).get_fdata(), nib.load(want).get_fdata(), f"{name} {options}")


_SERVE = """
import json, sys
import numpy as np, nibabel as nib
from keras_nii import predict_nifti
model, scan, out = sys.argv[1:4]
predict_nifti(model, scan, out, patch_size=(16, 16, 8), overlap=0.5, output="probabilities")
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))
print("RESULT " + json.dumps({{"heavy": heavy}}))
"""


def test_predict_nifti_with_onnx_imports_no_framework(shipped, tmp_path):
    scan = write_scan(tmp_path / "scan.nii.gz", "LPS", seed=4)
    out = tmp_path / "served.nii.gz"
    result = run_script(
        _SERVE.format(heavy=HEAVY), shipped["folder"] / "unet.onnx", scan, out, timeout=240
    )
    assert result == {"heavy": []}
    # and it predicted what the Keras model predicts
    reference = tmp_path / "keras.nii.gz"
    predict_nifti(shipped["model"], scan, reference, patch_size=(16, 16, 8), output="probabilities")
    assert_close(nib.load(out).get_fdata(), nib.load(reference).get_fdata())


# --------------------------------------------------------------------------- other backends

# Under PyTorch (and JAX, with jax2onnx), Keras's own ONNX exporter: run in a
# process of that backend; it prints the relative errors of each output.
_BACKEND_EXPORT = """
import json, sys
import numpy as np, keras
from keras_nii.export import export_model
from keras_nii.layers import CenterCropOrPad3D, IntensityWindow, MinMaxNormalization, Resize3D
from keras_nii.layers import ZScoreNormalization, RandomAffine3D, RandomFlip3D, RandomGaussianNoise
from keras_nii.serving import OnnxModel
inputs = keras.Input((None, None, None, 1), name="scan")
layers = [
    ZScoreNormalization(), ZScoreNormalization(nonzero=True), ZScoreNormalization(mean=40.0, std=300.0),
    MinMaxNormalization(), MinMaxNormalization(percentiles=(0.5, 99.5)), IntensityWindow(-1000.0, 400.0),
    Resize3D((10, 14, 12)), CenterCropOrPad3D((10, 12, 12)), CenterCropOrPad3D((7, 16, 8), fill_value=-3.0),
]
outputs = [layer(inputs) for layer in layers]
x = inputs
for layer in (RandomFlip3D(seed=0), RandomAffine3D(degrees=10, seed=1), RandomGaussianNoise(std=0.5, seed=2)):
    x = layer(x)
outputs.append(keras.layers.Identity(name="random_chain")(x))
model = keras.Model(inputs, outputs)
export_model(model, sys.argv[1])
onnx = OnnxModel(sys.argv[1])
rng = np.random.default_rng(0)
errors = []
for shape in [(1, 12, 11, 10, 1), (2, 9, 14, 13, 1)]:
    scan = rng.normal(40, 300, size=shape).astype("float32")
    scan[..., :2, :] = 0
    want = [keras.ops.convert_to_numpy(v) for v in model(scan)]
    got = onnx.session.run(None, {onnx.inputs[0].name: scan})
    errors.append([float(np.abs(a - b).max() / max(1.0, np.abs(b).max())) for a, b in zip(got, want)])
    errors[-1].append(bool(np.array_equal(got[-1], scan)))
print("RESULT " + json.dumps({"errors": errors, "symbolic": onnx.input_shape}))
"""


@pytest.mark.parametrize("backend, needs", [("torch", "torch"), ("jax", "jax2onnx")])
def test_onnx_export_from_another_backend(tmp_path, backend, needs):
    import importlib.util

    if importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed")
    env = {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = run_script(_BACKEND_EXPORT, tmp_path / "layers.onnx", env=env, timeout=400)
    assert result["symbolic"] == [None, None, None, None, 1]
    for errors in result["errors"]:
        *relative, identity = errors
        assert max(relative) < 1e-5, relative
        assert identity  # the random layers are the identity


# --------------------------------------------------------------------------- arguments


def test_export_arguments_are_checked(tmp_path):
    model = keras.Sequential([keras.Input((None, None, None, 1)), IntensityWindow(0.0, 1.0)])
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(model, tmp_path / "m.onnx", "torchscript")
    with pytest.raises(ValueError, match="writes a .onnx file"):
        export_model(model, tmp_path / "m.tflite", "onnx")
    with pytest.raises(ValueError, match="SavedModel is a folder"):
        export_model(model, tmp_path / "m.keras", "savedmodel")
    with pytest.raises(ValueError, match="does not exist"):
        export_model(model, tmp_path / "no" / "m.onnx")
    with pytest.raises(ValueError, match="expected a .keras file"):
        export_model(str(tmp_path / "m.h5"), tmp_path / "m.onnx")
    # never deletes what is not its own kind of artifact, nor the model's own folder
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a SavedModel folder"):
        export_model(model, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "keep"
    model.save(tmp_path / "notes" / "model.keras")
    with pytest.raises(ValueError, match="holds the model being exported"):
        export_model(str(tmp_path / "notes" / "model.keras"), tmp_path / "notes", overwrite=True)
    (tmp_path / "bad.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ValueError, match="bad.onnx: ONNX Runtime cannot load it"):
        OnnxModel(tmp_path / "bad.onnx")
