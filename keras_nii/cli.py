"""The ``keras-nii`` command: ``demo``, ``info``, ``plan``, ``predict``, ``export`` and ``bench``.

Run ``keras-nii --help``, or ``keras-nii COMMAND --help``. Expected problems
(a missing or damaged file, a bad argument) end the command with one line,
``keras-nii: error: ...``, on stderr and a non-zero exit status; ``--traceback``
shows the full Python traceback instead. TensorFlow and Keras are imported only
by the commands that run a model, and then without TensorFlow's own log lines
(see :mod:`keras_nii.quiet`) unless ``--verbose`` is given.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

PROG = "keras-nii"

# the errors that are the user's to fix: reported in one line, no traceback
_EXPECTED = (ValueError, OSError, ImportError)


class CommandError(Exception):
    """An error to report in one line (the message says what to do)."""


def _quiet(args: argparse.Namespace | None, module: str = "keras") -> None:
    """Import Keras (or TensorFlow) without TensorFlow's log lines, unless --verbose."""
    if args is not None and getattr(args, "verbose", False):
        return
    from keras_nii.quiet import quiet_tensorflow

    quiet_tensorflow(module)


def _version() -> str:
    from keras_nii import __version__

    return __version__


# --------------------------------------------------------------------------- #
# info
# --------------------------------------------------------------------------- #


def _format_number(value: float) -> str:
    return f"{value:.6g}"


def _info_lines(path: str) -> list[str]:
    """The description of one NIfTI file (or URL), as lines; NiftiError if it is unreadable."""
    from keras_nii import remote
    from keras_nii.storage import NiftiError

    if remote.is_url(path):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="keras-nii-info-") as tmp:
            local = remote.fetch(path, tmp)
            try:
                lines = _file_info_lines(local)
            except NiftiError as err:
                raise NiftiError(str(err).replace(local, remote.display(path))) from None
        return [line.replace(local, remote.display(path)) for line in lines]
    return _file_info_lines(path)


def _file_info_lines(path: str) -> list[str]:
    import nibabel as nib

    from keras_nii.io import _read_image, load_nifti

    img = _read_image(path)  # the same checks as load_nifti, without reading the data
    # read (and checked: data, geometry) first, so a bad file is one error line
    volume = load_nifti(path, canonical=True, dtype="float32", nonfinite="keep")
    header = img.header
    shape = tuple(int(s) for s in img.shape)
    affine = volume.source_affine  # the checked one (a bad sform gives way to the qform)
    sizes = nib.affines.voxel_sizes(affine)
    spatial_unit, time_unit = header.get_xyzt_units()
    slope, inter = img.dataobj.slope, img.dataobj.inter
    own = "".join(nib.aff2axcodes(affine))
    oblique = np.degrees(nib.affines.obliquity(affine))

    data = volume.array
    finite = np.isfinite(data)
    n_bad = int(data.size - np.count_nonzero(finite))
    values = data[finite] if n_bad else data

    version = "NIfTI-2" if isinstance(header, nib.Nifti2Header) else "NIfTI-1"
    single = isinstance(img, (nib.Nifti1Image, nib.Nifti2Image))  # Nifti1Image is a Nifti1Pair
    pair = "" if single else " (.hdr/.img pair)"
    lines = [path]
    lines.append(f"  format        {version}{pair}")
    dims = " x ".join(str(s) for s in shape)
    lines.append(f"  shape         {dims}   (RAS+ array from load_nifti: {volume.shape})")
    lines.append(
        f"  dtype         {img.get_data_dtype().name} on disk ({img.get_data_dtype().str})"
    )
    if (np.isfinite(slope) and slope != 1.0) or (np.isfinite(inter) and inter != 0.0):
        lines.append(
            f"  scaling       slope {_format_number(slope)}, intercept {_format_number(inter)}"
            " (applied on load: value = stored * slope + intercept)"
        )
    else:
        lines.append("  scaling       none (slope 1, intercept 0)")
    unit = spatial_unit if spatial_unit not in (None, "unknown") else "units unknown"
    spacing = " x ".join(_format_number(float(s)) for s in sizes)
    lines.append(
        f"  spacing       {spacing} {unit}"
        + (
            f"; time step {_format_number(float(header.get_zooms()[3]))} {time_unit}"
            if len(shape) > 3 and len(header.get_zooms()) > 3
            else ""
        )
    )
    orientation = f"  orientation   {own} (voxel axes of the file)"
    orientation += f", {''.join(volume.axcodes)} after canonical reorientation (load_nifti default)"
    lines.append(orientation)
    if float(np.max(oblique)) > 1e-3:
        lines.append(
            "  oblique       voxel axes tilted from the world axes by up to "
            f"{float(np.max(oblique)):.1f} degrees (codes name the closest axes)"
        )
    codes = (int(header["sform_code"]), int(header["qform_code"]))
    lines.append(f"  affine        (sform_code {codes[0]}, qform_code {codes[1]})")
    for row in affine:
        lines.append("                [" + "  ".join(f"{v:10.4f}" for v in row) + "]")
    if values.size:
        lines.append(
            f"  intensities   (scaled) min {_format_number(float(values.min()))}, "
            f"max {_format_number(float(values.max()))}, "
            f"mean {_format_number(float(np.mean(values, dtype=np.float64)))}; "
            f"non-finite voxels: {n_bad}"
        )
    else:
        lines.append(f"  intensities   no finite values; non-finite voxels: {n_bad}")
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    failed = 0
    for i, path in enumerate(args.files):
        try:
            lines = _info_lines(path)
        except MemoryError:  # describing it (statistics), after load_nifti read it
            _error(f"{path}: too large for the memory at hand to describe")
            failed += 1
            continue
        except _EXPECTED as err:
            _error(_message(err, path))
            failed += 1
            continue
        if i:
            print()
        print("\n".join(lines), flush=True)
    if failed and len(args.files) > 1:
        _error(f"{failed} of {len(args.files)} file(s) could not be read")
    return 1 if failed else 0


# --------------------------------------------------------------------------- #
# plan
# --------------------------------------------------------------------------- #


class _ProgressBar:
    """``[#####.....] 12/40 name`` on stderr, redrawn in place."""

    WIDTH = 30

    def __init__(self, stream: Any):
        self.stream = stream
        self.drawn = 0

    def __call__(self, done: int, total: int, path: str) -> None:
        filled = self.WIDTH * done // total
        line = f"{PROG} plan: [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total} "
        line += os.path.basename(path)
        self.stream.write("\r" + line.ljust(self.drawn))
        self.drawn = len(line)
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def _cmd_plan(args: argparse.Namespace) -> int:
    from keras_nii.plan import fingerprint

    for folder in (args.images_dir, args.labels_dir):
        if folder is not None and not os.path.isdir(folder):
            raise CommandError(f"{folder}: no such folder")
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    plan = fingerprint(
        args.images_dir,
        args.labels_dir,
        modality=args.modality,
        max_voxels=args.max_voxels,
        progress=_ProgressBar(sys.stderr) if show else None,
        pair_by=args.pair_by,
    )
    if args.json == "-":
        sys.stdout.write(plan.to_json())
        return 0
    print(plan.report(), flush=True)
    if args.json is not None:
        plan.to_json(args.json)
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- #
# predict
# --------------------------------------------------------------------------- #


class _ModelFailed(Exception):
    """The model raised on a batch of windows."""

    def __init__(self, err: Exception, batch_shape: tuple[int, ...]):
        super().__init__(str(err))
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # Keras puts ANSI bold in messages
        text = " ".join(text.split())
        text = text.replace("Exception encountered when calling ", "in ")
        if len(text) > 300:
            text = text[:297] + "..."
        self.reason = f"{type(err).__name__}: {text}" if text else type(err).__name__
        self.batch_shape = batch_shape


class _Guarded:
    """A model as predict_volume calls it, whose own failures become _ModelFailed."""

    def __init__(self, model: Any):
        from keras_nii.inference import size_divisor

        self.input_shape = getattr(model, "input_shape", None)
        self.size_divisor = size_divisor(model)
        self._run = model.predict_on_batch if hasattr(model, "predict_on_batch") else model

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        try:
            out = self._run(batch)
            if isinstance(out, dict):
                out = next(iter(out.values()))
            return np.asarray(out)
        except Exception as err:  # whatever the backend raises for a bad input
            raise _ModelFailed(err, tuple(batch.shape)) from err


def _cmd_predict(args: argparse.Namespace) -> int:
    from keras_nii.io import NIFTI_SUFFIXES

    # check what can be checked before TensorFlow is imported
    if not os.path.exists(args.model):
        raise CommandError(f"model {args.model}: no such file or folder")
    from keras_nii import remote

    def exists(path: str) -> bool:
        return remote.exists(path) if remote.is_url(path) else os.path.exists(path)

    for scan in args.inputs:
        if not exists(scan):
            raise CommandError(f"{remote.display(scan)}: no such file")
    if not args.output_path.lower().endswith(NIFTI_SUFFIXES):
        raise CommandError(
            f"output {args.output_path} must end with one of {', '.join(NIFTI_SUFFIXES)}"
        )
    for scan in args.inputs:
        if remote.is_url(scan) or remote.is_url(args.output_path):
            same = remote.overwritten_url(args.output_path, [scan]) is not None
        else:
            same = os.path.abspath(scan) == os.path.abspath(args.output_path) or (
                os.path.exists(args.output_path) and os.path.samefile(scan, args.output_path)
            )
        if same:
            raise CommandError(f"refusing to write {args.output_path}: it is an input scan")
    if exists(args.output_path) and not args.overwrite:
        raise CommandError(f"{args.output_path} already exists; pass --overwrite to replace it")
    if args.patch_size is not None and min(args.patch_size) < 1:
        raise CommandError(f"--patch-size must be three positive integers, got {args.patch_size}")
    tta = None
    if args.tta is not None:
        if "flips" in args.tta:
            if len(args.tta) > 1:
                raise CommandError("--tta flips already holds every flip: give it alone")
            tta = "flips"
        else:
            tta = list(args.tta)
    if args.uncertainty is not None:
        if tta is None:
            raise CommandError("--uncertainty needs --tta: it is the variance across the flips")
        if not args.uncertainty.lower().endswith(NIFTI_SUFFIXES):
            raise CommandError(
                f"--uncertainty {args.uncertainty} must end with one of {', '.join(NIFTI_SUFFIXES)}"
            )
        if os.path.abspath(args.uncertainty) == os.path.abspath(args.output_path):
            raise CommandError("--uncertainty and OUT are the same file")
        for scan in args.inputs:
            if os.path.abspath(scan) == os.path.abspath(args.uncertainty) or (
                os.path.exists(args.uncertainty) and os.path.samefile(scan, args.uncertainty)
            ):
                raise CommandError(f"refusing to write {args.uncertainty}: it is an input scan")
        if os.path.exists(args.uncertainty) and not args.overwrite:
            raise CommandError(f"{args.uncertainty} already exists; pass --overwrite to replace it")

    _quiet(args, "tensorflow" if os.path.isdir(args.model) else "keras")
    from keras_nii.inference import load_model, predict_nifti

    model = _Guarded(load_model(args.model))
    try:
        written = predict_nifti(
            model,
            args.inputs if len(args.inputs) > 1 else args.inputs[0],
            args.output_path,
            patch_size=args.patch_size,
            overlap=args.overlap,
            batch_size=args.batch_size,
            output=args.output,
            threshold=args.threshold,
            blend=args.blend,
            margin=args.margin,
            size_divisor=args.size_divisor,
            spacing=args.spacing,
            tta=tta,
            uncertainty_path=args.uncertainty,
        )
    except _ModelFailed as err:
        shape = " x ".join(str(s) for s in err.batch_shape[1:4])
        raise CommandError(
            f"the model failed on windows of {shape} voxels of {', '.join(args.inputs)} "
            f"({err.reason}); if it needs input sizes that are multiples of some N (a U-Net: "
            "2**levels), pass --size-divisor N"
        ) from err

    import tempfile

    import nibabel as nib

    with tempfile.TemporaryDirectory(prefix="keras-nii-predict-") as tmp:
        # read back what was written (from the store, for a URL)
        local = remote.fetch(str(written), tmp) if remote.is_url(str(written)) else str(written)
        img = nib.load(local)
        summary = (
            f"wrote {remote.display(str(written))}: {' x '.join(str(s) for s in img.shape)} "
            f"{img.get_data_dtype().name}"
        )
        if args.output == "labels":
            labels = np.asarray(img.dataobj)
            summary += f", {int(np.count_nonzero(labels))} non-zero voxel(s)"
    print(summary + ", on the grid of " + remote.display(args.inputs[0]))
    if args.uncertainty is not None:
        print(f"wrote {args.uncertainty}: the variance across {len(_tta_names(tta))} predictions")
    return 0


def _tta_names(tta: Any) -> list[tuple[int, ...]]:
    from keras_nii.inference import tta_flips

    return tta_flips(tta)


# --------------------------------------------------------------------------- #
# export
# --------------------------------------------------------------------------- #


def _keras_file(path: str) -> str:
    """The .keras file MODEL names: itself, or the one in a training run's folder."""
    if os.path.isdir(path):
        found = sorted(name for name in os.listdir(path) if name.endswith(".keras"))
        if "model.keras" in found:
            found = ["model.keras"]
        if len(found) != 1:
            raise CommandError(
                f"model {path}: a folder must hold one .keras file (or model.keras), "
                f"found {len(found)}"
            )
        return os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise CommandError(f"model {path}: no such file or folder")
    if not path.endswith(".keras"):
        raise CommandError(f"model {path}: expected a .keras file")
    return path


def _cmd_export(args: argparse.Namespace) -> int:
    from keras_nii.export import export_model, format_of

    source = _keras_file(args.model)
    fmt = args.format or format_of(args.output_path)
    if os.path.exists(args.output_path) and not args.overwrite:
        raise CommandError(f"{args.output_path} already exists; pass --overwrite to replace it")
    _quiet(args)
    signature = export_model(
        source, args.output_path, fmt, opset=args.opset, overwrite=args.overwrite
    )
    print(f"wrote {signature.path} ({signature.format}) from {source}")
    for line in signature.lines():
        print(line)
    return 0


# --------------------------------------------------------------------------- #
# demo
# --------------------------------------------------------------------------- #


def _cmd_demo(args: argparse.Namespace) -> int:
    _quiet(args)
    from keras_nii.demo import run_demo

    run_demo(
        args.out,
        quick=args.quick,
        epochs=args.epochs,
        cases=args.cases,
        seed=args.seed,
        overwrite=args.overwrite,
        json_path=args.json,
    )
    return 0


# --------------------------------------------------------------------------- #
# bench
# --------------------------------------------------------------------------- #


def _cmd_bench(rest: Sequence[str]) -> int:
    import importlib

    try:
        bench = importlib.import_module("keras_nii.bench")
    except ModuleNotFoundError as err:
        if err.name != "keras_nii.bench":
            raise
        raise CommandError(
            "the benchmark is not available in this installation (keras_nii.bench is missing)"
        ) from err
    return int(bench.main(list(rest)) or 0)


# --------------------------------------------------------------------------- #
# parsing
# --------------------------------------------------------------------------- #


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _spacing_entry(text: str) -> float | None:
    if text.lower() in ("keep", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a spacing in mm (or 'keep'), got {text!r}"
        ) from None
    if not (value > 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive spacing in mm, got {text!r}")
    return value


def _tta_entry(text: str) -> str | tuple[int, ...]:
    """'flips', or the axes of one flip written as digits ('0', '12', '012')."""
    if text == "flips":
        return text
    if not text or any(c not in "012" for c in text) or len(set(text)) != len(text):
        raise argparse.ArgumentTypeError(
            f"expected 'flips' or the axes of a flip as digits (0, 1, 2, 01, 012 ...), got {text!r}"
        )
    return tuple(int(c) for c in text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``keras-nii`` (``bench`` arguments are the benchmark's own)."""
    from keras_nii._defaults import DEMO as DEFAULTS
    from keras_nii._defaults import DEMO_QUICK as QUICK

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train and ship Keras models on NIfTI volumes.",
        epilog="Run 'keras-nii COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the full Python traceback of an error instead of one line",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="let TensorFlow print its own log lines (hidden by default)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a 3D U-Net on a synthetic CT task (organ + lesion), end to end, in minutes",
        description=(
            "Write a Decathlon-like CT dataset (every scan its own shape, anisotropic voxels, "
            "RAS / LPS / oblique, int16 Hounsfield units; labels organ and lesion), plan it "
            "(fingerprint), train a 3D U-Net on class-balanced patches at (a multiple of) the "
            "plan's spacing with augmentation in the training step and whole-scan validation, "
            "export it, predict the held-out scans on their own grids (predict_nifti with "
            "spacing= and flip TTA) and report their Dice per class."
        ),
    )
    demo.add_argument(
        "--out",
        default=DEFAULTS["out"],
        metavar="DIR",
        help="folder for the data, the model and the predictions (default: %(default)s)",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a sub-minute first look: fewer, smaller scans and 2 epochs (Dice not the point)",
    )
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"training epochs (default: {DEFAULTS['epochs']}, --quick {QUICK['epochs']})",
    )
    demo.add_argument(
        "--cases",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"training scans (default: {DEFAULTS['cases']}, --quick {QUICK['cases']})",
    )
    demo.add_argument(
        "--seed",
        type=_non_negative_int,
        default=DEFAULTS["seed"],
        metavar="N",
        help="seed of the data, the sampling, the augmentation and the weights "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="also write the figures as JSON (heldout_dice: class label -> Dice)",
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the demo's files in an existing, non-empty --out folder",
    )
    demo.set_defaults(handler=_cmd_demo)

    info = commands.add_parser(
        "info",
        help="describe NIfTI files: shape, dtype, voxel sizes, orientation, affine, intensities",
        description=(
            "For each file: the stored shape and on-disk dtype, the scaling (scl_slope / "
            "scl_inter), voxel sizes, orientation codes (the file's own and after canonical "
            "RAS+ reorientation), the affine, and the intensity range. An unreadable file is "
            "reported in one line and the next file is read; the exit status is 1 if any failed."
        ),
    )
    info.add_argument(
        "files", nargs="+", metavar="FILE", help="NIfTI files (.nii, .nii.gz, .hdr/.img)"
    )
    info.set_defaults(handler=_cmd_info)

    plan = commands.add_parser(
        "plan",
        help="fingerprint a dataset: spacings, shapes, intensities, labels; suggest a setup",
        description=(
            "Read every NIfTI file of IMAGES_DIR (and the label map of the same name in "
            "LABELS_DIR) and print, per file and for the dataset: shape, voxel spacing (median "
            "and 10th percentile per axis), orientation, foreground intensities (0.5 / 99.5 "
            "percentiles, mean, std; the foreground is the label maps' non-zero voxels, else "
            "the images' non-zero voxels) and label fractions. Then the suggestions: "
            "target_spacing, median_shape at that spacing, patch_size and the normalization "
            "(CT: clip + dataset z-score; MR: per-sample z-score). See keras_nii.plan."
        ),
    )
    plan.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of .nii / .nii.gz images")
    plan.add_argument("labels_dir", nargs="?", metavar="LABELS_DIR", help="folder of label maps")
    plan.add_argument(
        "--pair-by",
        default="stem",
        metavar="RULE",
        help=(
            "how images and label maps are paired by subject: stem (identical names), bids "
            "(sub-01[_ses-1]), nnunet (case_0000_0000 with case_0000) or a regular expression "
            "with a group 'key' (default: %(default)s)"
        ),
    )
    plan.add_argument(
        "--json",
        metavar="FILE",
        help="also write the plan as JSON to FILE ('-': print only the JSON, on stdout)",
    )
    plan.add_argument(
        "--modality",
        choices=("auto", "ct", "mr"),
        default="auto",
        help="auto: CT if the intensities are Hounsfield units (default: %(default)s)",
    )
    plan.add_argument(
        "--max-voxels",
        type=_positive_int,
        default=128**3,
        metavar="N",
        help="voxel budget of the suggested patch (default: %(default)s = 128^3)",
    )
    plan.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (default: when stderr is a terminal)",
    )
    plan.set_defaults(handler=_cmd_plan)

    predict = commands.add_parser(
        "predict",
        help="run a saved model on a NIfTI scan, writing the result in the scan's space",
        description=(
            "Run MODEL (a .keras file, an exported .onnx or .tflite file, or an exported "
            "SavedModel folder) on a scan and write "
            "the prediction as a NIfTI file on the scan's own grid (same shape, affine and "
            "voxel order). Several IN files are the modalities of one subject, in the channel "
            "order the model was trained with. Large scans are predicted in overlapping "
            "windows (--patch-size), blended."
        ),
    )
    predict.add_argument(
        "model",
        metavar="MODEL",
        help="a .keras, .onnx (ONNX Runtime) or .tflite (LiteRT) file, or a SavedModel folder",
    )
    predict.add_argument("inputs", nargs="+", metavar="IN", help="the scan (or its modalities)")
    predict.add_argument(
        "output_path", metavar="OUT", help="the NIfTI file to write (.nii or .nii.gz)"
    )
    predict.add_argument(
        "--patch-size",
        type=_positive_int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="sliding-window size (default: the model's fixed input size, else the whole scan)",
    )
    predict.add_argument(
        "--size-divisor",
        type=_positive_int,
        metavar="N",
        help="pad the scan to multiples of N voxels for the model, and crop the result back "
        "(default: what the model records, 2**levels for a keras-nii unet3d, else 1)",
    )
    predict.add_argument(
        "--overlap",
        type=_fraction,
        default=0.5,
        metavar="F",
        help="overlap of neighbouring windows, in [0, 1) (default: %(default)s)",
    )
    predict.add_argument(
        "--batch-size",
        type=_positive_int,
        default=2,
        metavar="N",
        help="windows per model call (default: %(default)s)",
    )
    predict.add_argument(
        "--output",
        choices=("labels", "probabilities"),
        default="labels",
        help="labels: argmax, or probability > --threshold for one channel; probabilities: "
        "the model's float output (default: %(default)s)",
    )
    predict.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        metavar="T",
        help="threshold of a one-channel output for --output labels (default: %(default)s)",
    )
    predict.add_argument(
        "--margin",
        type=_non_negative_int,
        default=0,
        metavar="M",
        help="voxels discarded at inner window faces (default: %(default)s)",
    )
    predict.add_argument(
        "--blend",
        choices=("gaussian", "constant"),
        default="gaussian",
        help="weighting of overlapping windows (default: %(default)s)",
    )
    predict.add_argument(
        "--spacing",
        type=_spacing_entry,
        nargs=3,
        metavar=("SX", "SY", "SZ"),
        help="the voxel spacing in mm the model was trained at ('keep' keeps an axis): the "
        "scan is resampled to it, and the probabilities back to the scan's grid",
    )
    predict.add_argument(
        "--tta",
        type=_tta_entry,
        nargs="+",
        metavar="FLIP",
        help="test-time augmentation: 'flips' (all 8 combinations of axis flips) or the flips "
        "to average, as axis digits (e.g. --tta 0 1 01); the unflipped prediction is always "
        "included",
    )
    predict.add_argument(
        "--uncertainty",
        metavar="FILE",
        help="with --tta: also write the voxel-wise variance across the augmented "
        "predictions to FILE (.nii or .nii.gz)",
    )
    predict.add_argument("--overwrite", action="store_true", help="replace an existing OUT file")
    predict.set_defaults(handler=_cmd_predict)

    export = commands.add_parser(
        "export",
        help="export a .keras model as a SavedModel, an ONNX or a LiteRT file",
        description=(
            "Export MODEL (a .keras file, or a training run's folder holding one) as a "
            "deployable artifact with its preprocessing inside: a SavedModel folder "
            "(TensorFlow), a .onnx file (ONNX Runtime) or a .tflite file (LiteRT, builtin ops "
            "only). Spatial sizes stay symbolic. Prints the artifact's input and output "
            "signature ('?' for a symbolic size)."
        ),
    )
    export.add_argument("model", metavar="MODEL", help="a .keras file, or a folder holding one")
    export.add_argument(
        "output_path",
        metavar="OUT",
        help="a folder (savedmodel), a .onnx file (onnx) or a .tflite file (litert)",
    )
    export.add_argument(
        "--format",
        choices=("savedmodel", "onnx", "litert"),
        help="default: from OUT's suffix (.onnx, .tflite, else a SavedModel folder)",
    )
    export.add_argument("--opset", type=_positive_int, metavar="N", help="ONNX opset version")
    export.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    export.set_defaults(handler=_cmd_export)

    commands.add_parser(
        "bench",
        help="time the layers and data loading against MONAI, TorchIO, SciPy (see 'keras-nii bench --help')",
        add_help=False,
    )
    return parser


# --------------------------------------------------------------------------- #
# entry point
# --------------------------------------------------------------------------- #


def _message(err: BaseException, path: str | None = None) -> str:
    """One line that says what went wrong (and where)."""
    text = str(err).strip()
    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    elif isinstance(err, ImportError) and not text:
        text = f"cannot import {err.name}"
    text = " ".join(text.split()) or type(err).__name__
    if path is not None and not text.startswith(path):
        text = f"{path}: {text}"
    return text if len(text) <= 600 else text[:597] + "..."


def _error(text: str) -> None:
    print(f"{PROG}: error: {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``keras-nii`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # the command is the first word that is not an option; bench parses its own arguments
    command_at = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
    show_traceback = "--traceback" in argv[:command_at]
    try:
        if command_at < len(argv) and argv[command_at] == "bench":
            if all(word in ("--traceback", "--verbose") for word in argv[:command_at]):
                rest = argv[command_at + 1 :]
                if "--verbose" not in argv[:command_at] and not {"-h", "--help"} & set(rest):
                    _quiet(None)
                return _cmd_bench(argv[command_at + 1 :])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return int(args.handler(args) or 0)
    except (CommandError, *_EXPECTED) as err:
        if show_traceback:
            raise
        _error(_message(err))
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
