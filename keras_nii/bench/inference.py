"""``inference``: ``predict_nifti`` on one scan through Keras and through ONNX Runtime.

A 2-level :func:`keras_nii.models.unet3d` (8 filters, 3 classes) with the
dataset-fingerprint normalization inside (``IntensityWindow`` clip, then a
fixed-statistics ``ZScoreNormalization``) is saved as ``.keras`` and exported
to ``.onnx`` (:func:`keras_nii.export.export_model`, under TensorFlow). One
phantom scan of ``(1.5 size)^3`` voxels is predicted in ``(0.75 size)^3``
windows with overlap 0.5 (192^3 and 96^3 at the default ``--size 128``), the
whole ``predict_nifti``: read, windows, model, blend, labels, write.

- ``steady``: the model loaded once in this process, then the median time per
  scan (Keras on the current backend: ``predict_on_batch``; ONNX Runtime:
  :class:`keras_nii.serving.OnnxModel`, CPU, its default threads).
- ``first prediction``: a fresh Python process that loads the file and
  predicts the scan once, timed from its start to the written prediction; its
  ``startup_ms`` (in the JSON and the note) is the part from the start to the
  model loaded (the interpreter, the imports -- TensorFlow or only ONNX
  Runtime -- and the model file).

Targets: ONNX Runtime's steady state no slower than Keras's, and its start-up
at least 3x faster.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from keras_nii.bench.core import Context, Row, Target, Unavailable, find_row, operation

#: repeats of the steady-state scans (each is a whole prediction)
STEADY_REPEATS = 3

_CHILD = """
import json, sys, time
from keras_nii.inference import load_model, predict_nifti
model = load_model(sys.argv[1])
loaded = time.time()
predict_nifti(model, sys.argv[2], sys.argv[3], patch_size=(%d,) * 3, overlap=0.5)
print("RESULT " + json.dumps({"loaded": loaded, "done": time.time()}))
"""


def _sizes(size: int) -> tuple[int, int]:
    """The scan's and the window's edge: multiples of 4 (the U-Net's divisor)."""
    return max(8, (3 * size // 2) // 4 * 4), max(8, (3 * size // 4) // 4 * 4)


def _inference_targets(rows: list[Row], target: Target) -> None:
    keras_steady = find_row(rows, "inference", "steady", reference=True)
    ort_steady = next(
        (
            r
            for r in rows
            if r["operation"] == "inference"
            and r["variant"] == "steady"
            and r["runtime"] == "onnxruntime"
            and r["status"] == "ok"
        ),
        None,
    )
    if keras_steady and ort_steady:
        target(
            "inference steady state",
            "ONNX Runtime no slower per scan than Keras (ratio <= 1)",
            ort_steady["ms_per_volume"] / keras_steady["ms_per_volume"],
            1.0,
        )
    starts = {
        r["runtime"]: r.get("startup_ms")
        for r in rows
        if r["operation"] == "inference"
        and r["variant"] == "first prediction"
        and r["status"] == "ok"
    }
    keras_start = next((v for k, v in starts.items() if k != "onnxruntime" and v), None)
    if keras_start and starts.get("onnxruntime"):
        target(
            "inference start-up",
            "ONNX Runtime starts (process + imports + load) >= 3x faster than Keras",
            keras_start / starts["onnxruntime"],
            3.0,
            higher_is_better=True,
        )


@operation("inference", order=90, targets=_inference_targets)
def bench_inference(ctx: Context) -> None:
    keras = ctx.keras
    scan_edge, window = _sizes(ctx.size)
    folder = Path(tempfile.mkdtemp(prefix="keras_nii_bench_inference_"))
    note = (
        f"predict_nifti {scan_edge}^3 scan, {window}^3 windows, overlap 0.5; unet3d 2 levels, "
        "8 filters, IntensityWindow + fixed z-score inside"
    )
    repeats = min(ctx.repeats, STEADY_REPEATS)
    files: dict[str, Any] = {}

    def prepare() -> dict[str, Any]:
        if files:
            return files
        import nibabel as nib

        from keras_nii.layers import IntensityWindow, ZScoreNormalization
        from keras_nii.models import unet3d
        from keras_nii.phantoms import make_phantom

        image, _, affine = make_phantom((scan_edge,) * 3, seed=0)
        files["scan"] = str(folder / "scan.nii.gz")
        nib.save(nib.Nifti1Image(image.astype("float32"), affine), files["scan"])
        keras.utils.set_random_seed(0)
        normalization = keras.Sequential(
            [
                IntensityWindow(0.0, 1000.0, output_range=(0.0, 1000.0)),
                ZScoreNormalization(mean=420.0, std=150.0),
            ]
        )
        files["model"] = unet3d(
            (None, None, None, 1), num_classes=3, filters=8, levels=2, normalization=normalization
        )
        files["keras"] = str(folder / "model.keras")
        files["model"].save(files["keras"])
        return files

    def predict(model: Any) -> Any:
        from keras_nii.inference import predict_nifti

        scan = prepare()["scan"]
        return lambda: predict_nifti(
            model, scan, folder / "prediction.nii.gz", patch_size=(window,) * 3, overlap=0.5
        )

    def onnx_file() -> str:
        if "onnx" not in files:
            if ctx.backend != "tensorflow":
                raise Unavailable("missing", "the ONNX export is timed under TensorFlow only")
            for name in ("onnxruntime", "tf2onnx"):
                try:
                    __import__(name)
                except ImportError as err:
                    raise Unavailable(
                        "not installed", f"{name}: pip install 'keras-nii[onnx]'"
                    ) from err
            from keras_nii.export import export_model

            files["onnx"] = str(folder / "model.onnx")
            export_model(prepare()["model"], files["onnx"])
        return files["onnx"]

    def keras_steady() -> Any:
        from keras_nii.inference import load_model

        return predict(load_model(prepare()["keras"]))

    def onnx_steady() -> Any:
        from keras_nii.serving import OnnxModel

        return predict(OnnxModel(onnx_file()))

    runtime = f"keras {ctx.backend}"
    ctx.add(
        "inference",
        "steady",
        "keras-nii",
        runtime,
        str(ctx.cores),
        keras_steady,
        volumes=1,
        reference=True,
        note=note,
        repeats=repeats,
    )
    ctx.add(
        "inference",
        "steady",
        "keras-nii",
        "onnxruntime",
        str(ctx.cores),
        onnx_steady,
        volumes=1,
        note=note,
        repeats=repeats,
    )

    def fresh(path_of: Any, startups: list[float]) -> Any:
        def setup() -> Any:
            path, scan = path_of(), prepare()["scan"]
            env = dict(os.environ, KERAS_BACKEND=ctx.backend, TF_CPP_MIN_LOG_LEVEL="2")
            root = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)

            def run() -> None:
                out = str(folder / "fresh.nii.gz")
                start = time.time()
                proc = subprocess.run(
                    [sys.executable, "-c", _CHILD % window, path, scan, out],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=1800,
                )
                if proc.returncode != 0:
                    raise RuntimeError(
                        proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"
                    )
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
                startups.append(1000.0 * (json.loads(line[len("RESULT ") :])["loaded"] - start))

            return run

        return setup

    try:
        _fresh_rows(ctx, runtime, fresh, prepare, onnx_file)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _fresh_rows(ctx: Context, runtime: str, fresh: Any, prepare: Any, onnx_file: Any) -> None:
    for runtime_name, path_of in [
        (runtime, lambda: prepare()["keras"]),
        ("onnxruntime", onnx_file),
    ]:
        startups: list[float] = []
        row = ctx.add(
            "inference",
            "first prediction",
            "keras-nii",
            runtime_name,
            str(ctx.cores),
            fresh(path_of, startups),
            volumes=1,
            repeats=1,
            note="a fresh process: start, imports, load, one scan",
        )
        if row["status"] == "ok" and startups:
            row["startup_ms"] = statistics.median(startups)
            row["note"] += f"; start-up + load {row['startup_ms'] / 1000:.1f} s"
