"""Benchmarks: keras-nii's layers and reader against MONAI, TorchIO and NumPy/SciPy.

Usage::

    keras-nii bench [--size 128] [--batch 2] [--backend tensorflow|jax]
                    [--json FILE] [--only NAME ...] [--repeats 10]
    python -m keras_nii.bench ...

or from Python: ``keras_nii.bench.run_benchmarks(size=64, only=["affine"])``
returns the table as a list of dicts, ``keras_nii.bench.main(argv)`` is the
command.

What is measured
----------------
Every operation runs on float32 volumes of ``size**3`` voxels with one
channel (a batch of ``--batch`` synthetic phantoms from
:mod:`keras_nii.phantoms`) and, where the library supports one, a paired int32
label mask. For every implementation the first call is timed on its own
(``first ms``: tracing and XLA compilation for keras-nii, warm-up for the
others), then ``--repeats`` calls are timed and their median is reported as
milliseconds per volume and volumes per second. Every timed call ends with
its results on the host: keras-nii outputs are converted to NumPy
(TensorFlow) or waited for with ``block_until_ready`` (JAX), so the time is
the device's, not the dispatch's. ``ratio`` is the row's time per volume over
the reference row of its operation (marked ``*``: keras-nii's compiled layer
for the layer operations, ``NiftiDataset`` without cache for ``read``, the
step without augmentation for ``train``), so ``ratio > 1`` means slower than
keras-nii.

Operations (``--only`` picks some): ``zscore``, ``flip``, ``affine``,
``elastic``, ``intensity``, ``pipeline``, ``read``, ``train``; see
``OPERATIONS``. ``pipeline`` is the usual chain, flip -> random affine ->
Gaussian noise on image + mask, as one compiled function (for keras-nii) or
one ``Compose`` (for the peers).
``zscore`` and ``flip`` carry a ``copy`` row, ``x + s`` with a run-time
scalar ``s = 0`` in the same compiled framework (a plain ``x`` or ``x + 0``
would be folded into a buffer alias by XLA and measure nothing): the cost of
one read and one write of the batch, the floor for a voxel-wise layer.

keras-nii runs compiled: under TensorFlow in ``tf.function(jit_compile=True)``
(XLA; a second ``graph`` row is ``tf.function`` without XLA, where, on a
machine without a GPU, each random layer compiles its own work with XLA, as
in a ``fit`` without XLA, and the deterministic ones run as plain graph ops);
under JAX in ``jax.jit``. A Keras random layer cannot simply be called inside
``jax.jit``: its ``SeedGenerator`` state is a Keras variable, and assigning a
traced value to it leaks the tracer out of the trace (``UnexpectedTracerError``
on the next call). Keras's own trainers run layers statelessly; the benchmark
does the same (see ``_JaxRunner``): the variables' values are passed into the
jitted function, the layers run inside ``keras.StatelessScope(state_mapping=...)``,
and the advanced seed states come back as outputs, to be fed to the next call.

``train`` times ``model.train_on_batch`` of a tiny 3D U-Net (2 levels, 8/16
filters, ``min(size, 64)**3``) compiled with Keras's default
``jit_compile="auto"`` (XLA under JAX and on TensorFlow GPUs, TensorFlow graph
without XLA on CPU-only machines, where XLA's Conv3D is far slower), with and
without ``keras_nii.training.AugmentedModel`` running RandomFlip3D +
RandomAffine3D + RandomGaussianNoise on image and mask inside the step; the
difference is reported as the augmentation's overhead per step.

Peers: MONAI (with ``set_track_meta(False)``: plain tensors, its fastest
mode) one volume at a time, as its transforms are written; for the affine
also plain PyTorch (``F.affine_grid`` + ``F.grid_sample`` on the whole batch,
the mask with the same grid), Kornia's ``RandomAffine3D`` (whole batch, the
mask replaying the image's draw) and plain JAX
(``jax.scipy.ndimage.map_coordinates`` under ``jax.jit``, vmapped over the
batch, on JAX's default device). The torch peers run on the GPU when torch sees one
(``runtime`` says ``torch cuda``; every timed call ends with
``torch.cuda.synchronize()``), else on the CPU with
``torch.set_num_threads(os.cpu_count())``. TorchIO works on CPU tensors
only, one subject at a time (it resamples with SimpleITK, whose thread count
is reported too). The NumPy/SciPy references are single-threaded. A peer
that cannot be imported is listed as ``not installed``.

Installing the peers
--------------------
torch must be installed first, and on machines without a GPU as the CPU
build, or a plain ``torch`` requirement pulls a multi-GB CUDA build::

    pip install torch==2.13.0          # on CPU machines: the CPU build
    pip install "keras-nii[bench]"     # scipy, monai, torchio, kornia

Targets (checked after the table, and in the JSON's ``targets``): z-score and
flip within 3x of the plain copy; random affine on image + mask at most half
the time per volume of the fastest peer; ``NiftiDataset`` without cache
within 10 % of a plain ``nibabel`` loop, and each cache at least 10x faster
than no cache; on a GPU (meant for ``--backend jax --batch 8 --size 128``),
the throughputs of :data:`GPU_TARGETS`, set for an H200.

The backend is chosen before Keras is imported: ``--backend`` sets
``KERAS_BACKEND``; if Keras was already imported with another backend, the
command runs itself again in a subprocess (``python -m keras_nii.bench``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "OPERATIONS",
    "BACKENDS",
    "GPU_TARGETS",
    "main",
    "run_benchmarks",
    "check_targets",
    "machine_info",
]

#: the operations, in the order they run and print
OPERATIONS = ("zscore", "flip", "affine", "elastic", "intensity", "pipeline", "read", "train")
BACKENDS = ("tensorflow", "jax")
MIN_SIZE = 8  # the smallest phantom
READ_FILES = 8  # volumes in the ``read`` dataset
TRAIN_MAX_SIZE = 64  # the U-Net of ``train`` sees min(size, 64)**3

# the random affine of the ``affine`` operation and of the training augmentation
AFFINE_DEGREES = 30.0
AFFINE_SCALES = (0.9, 1.1)
# the elastic deformation: TorchIO's defaults, for keras-nii and TorchIO
ELASTIC_POINTS = 7
ELASTIC_DISPLACEMENT = 7.5

_CHILD_ENV = "KERAS_NII_BENCH_CHILD"
_VERSIONED = (
    "keras-nii",
    "keras",
    "tensorflow",
    "jax",
    "jaxlib",
    "torch",
    "monai",
    "torchio",
    "SimpleITK",
    "scipy",
    "numpy",
    "nibabel",
)

Row = dict[str, Any]


class _Unavailable(Exception):
    """A peer (or a keras-nii piece) that cannot be imported: a row, not a crash."""

    def __init__(self, status: str, note: str = ""):
        super().__init__(status)
        self.status = status
        self.note = note


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #


def _try_import(name: str) -> Any:
    """Import a module, or raise _Unavailable("not installed")."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise _Unavailable("not installed", f"import {name} failed: {err}") from err


def _keras_nii_attr(module: str, name: str) -> Any:
    """``keras_nii.<module>.<name>``, or _Unavailable("missing") if not (yet) there."""
    try:
        return getattr(importlib.import_module(f"keras_nii.{module}"), name)
    except (ImportError, AttributeError) as err:
        raise _Unavailable("missing", f"keras_nii.{module}.{name} not found ({err})") from err


def _measure(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(first call ms, median ms of ``repeats`` more calls); ``fn`` must synchronize."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * first, 1000.0 * statistics.median(times)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- #
# the context shared by the operations
# --------------------------------------------------------------------------- #


class _Context:
    def __init__(self, size: int, batch: int, repeats: int, log: Callable[[str], None]):
        import keras

        self.size, self.batch, self.repeats, self.log = size, batch, repeats, log
        self.keras = keras
        self.backend = keras.backend.backend()
        if self.backend not in BACKENDS:
            raise ValueError(
                f"the benchmark runs under the TensorFlow or JAX backend, not {self.backend!r}; "
                "pass --backend tensorflow or --backend jax"
            )
        self.cores = _cpu_count()
        self.rows: list[Row] = []
        self._data: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._torch: Any = None

    # -- data ---------------------------------------------------------------

    def data(self, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(images (B, s, s, s, 1) float32, masks (B, s, s, s, 1) int32) phantoms."""
        size = self.size if size is None else size
        if size not in self._data:
            from keras_nii.phantoms import make_phantom

            images, masks = [], []
            for i in range(self.batch):
                image, label, _ = make_phantom((size,) * 3, seed=i)
                images.append(image[..., None])
                masks.append(label.astype(np.int32)[..., None])
            self._data[size] = (np.stack(images), np.stack(masks))
        return self._data[size]

    def torch(self) -> Any:
        if self._torch is None:
            torch = _try_import("torch")
            torch.set_num_threads(os.cpu_count() or 1)
            self._torch = torch
        return self._torch

    def torch_device(self) -> str:
        """Where the torch peers run: ``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
        return "cuda" if self.torch().cuda.is_available() else "cpu"

    def torch_runtime(self) -> str:
        return "torch cuda" if self.torch_device() == "cuda" else "torch"

    def torch_synced(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` followed by a wait for the GPU's queued work (torch runs asynchronously there)."""
        torch = self.torch()
        if self.torch_device() != "cuda":
            return fn

        def run() -> Any:
            out = fn()
            torch.cuda.synchronize()
            return out

        return run

    def monai_pairs(self, tfm: Callable[[dict], Any]) -> Callable[[], Any]:
        """MONAI's dict transform ``tfm`` on each image + label pair, one sample at a time."""
        vols, mvols = self.torch_volumes()
        return self.torch_synced(
            lambda: [tfm({"image": v, "label": m}) for v, m in zip(vols, mvols, strict=True)]
        )

    def torch_volumes(
        self, unit: bool = False, device: str | None = None
    ) -> tuple[list[Any], list[Any]]:
        """The batch as per-volume channels-first torch tensors (C, X, Y, Z) on
        ``device`` (default: :meth:`torch_device`)."""
        torch = self.torch()
        device = self.torch_device() if device is None else device
        images, masks = self.data()
        if unit:
            images = images / images.max()
        to = [torch.from_numpy(np.ascontiguousarray(np.moveaxis(v, -1, 0))) for v in images]
        mo = [torch.from_numpy(np.ascontiguousarray(np.moveaxis(v, -1, 0))) for v in masks]
        return [v.to(device) for v in to], [m.to(device) for m in mo]

    def torch_batch(self) -> tuple[Any, Any]:
        """The batch as channels-first torch tensors (B, 1, X, Y, Z) on :meth:`torch_device`."""
        torch = self.torch()
        images, masks = self.data()
        device = self.torch_device()
        move = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))  # noqa: E731
        return move(images).to(device), move(masks).to(device)

    def torch_threads(self) -> str:
        return str(self.torch().get_num_threads())

    def itk_threads(self) -> str:
        try:
            sitk = importlib.import_module("SimpleITK")
            return str(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
        except Exception:
            return "?"

    # -- rows ---------------------------------------------------------------

    def add(
        self,
        operation: str,
        variant: str,
        library: str,
        runtime: str,
        threads: str,
        fn: Callable[[], Callable[[], Any]],
        *,
        volumes: int | None = None,
        reference: bool = False,
        note: str = "",
        repeats: int | None = None,
    ) -> Row:
        """Time ``fn()()`` (``fn`` sets up and returns the callable) and add a row."""
        volumes = self.batch if volumes is None else volumes
        row: Row = {
            "operation": operation,
            "variant": variant,
            "library": library,
            "runtime": runtime,
            "threads": threads,
            "status": "ok",
            "first_call_ms": None,
            "ms_per_call": None,
            "volumes_per_call": volumes,
            "ms_per_volume": None,
            "volumes_per_s": None,
            "ratio": None,
            "reference": reference,
            "note": note,
        }
        self.log(f"{operation:9s} {variant:12s} {library} ({runtime})")
        try:
            call = fn()
            first, median = _measure(call, self.repeats if repeats is None else repeats)
        except _Unavailable as err:
            row["status"] = err.status
            row["note"] = "; ".join(n for n in (note, err.note) if n)
        except Exception as err:  # a broken peer or layer is a row, not a crash
            message = " ".join(str(err).split())[:300]
            row["status"] = "error"
            row["note"] = "; ".join(n for n in (note, f"{type(err).__name__}: {message}") if n)
        else:
            row["first_call_ms"] = first
            row["ms_per_call"] = median
            row["ms_per_volume"] = median / volumes
            row["volumes_per_s"] = 1000.0 * volumes / median if median > 0 else math.inf
        if row["status"] != "ok":
            self.log(f"          -> {row['status']}: {row['note']}")
        self.rows.append(row)
        return row

    # -- keras-nii, compiled --------------------------------------------------

    def keras_rows(
        self,
        operation: str,
        variant: str,
        make: Callable[[], tuple[Callable[[Any], Any], list[Any]]],
        inputs: Callable[[], Any],
        *,
        reference: bool = False,
        graph_row: bool = True,
        note: str = "",
    ) -> None:
        """Rows for a keras-nii function: compiled, and (TensorFlow) plain graph.

        ``make()`` returns ``(fn, layers)``: ``fn(inputs)`` applies the layers
        (with ``training=True``); ``layers`` are those whose variables (seed
        states) the JAX runner threads through.
        """
        if self.backend == "tensorflow":
            modes = [("tensorflow XLA", True)] + (
                [("tensorflow graph", False)] if graph_row else []
            )
        else:
            modes = [("jax jit", True)]
        for i, (runtime, jit) in enumerate(modes):

            def setup(jit: bool = jit) -> Callable[[], Any]:
                fn, layers = make()
                return _compiled(self.backend, fn, layers, inputs(), jit=jit)

            self.add(
                operation,
                variant,
                "keras-nii",
                runtime,
                str(self.cores),
                setup,
                reference=reference and i == 0,
                note=note,
            )

    def tensors(self, *arrays: np.ndarray) -> Any:
        out = tuple(self.keras.ops.convert_to_tensor(a) for a in arrays)
        return out if len(out) > 1 else out[0]


def _compiled(backend: str, fn: Callable[[Any], Any], layers: list[Any], inputs: Any, *, jit: bool):
    """A no-argument callable that runs ``fn(inputs)`` compiled and synchronizes."""
    if backend == "tensorflow":
        import tensorflow as tf

        # every row traces its own function: keep TF's retracing warning quiet
        tf.get_logger().setLevel("ERROR")
        compiled = tf.function(fn, jit_compile=jit)

        def run() -> Any:
            return tf.nest.map_structure(lambda t: t.numpy(), compiled(inputs))

        return run
    return _JaxRunner(fn, layers, inputs)


class _JaxRunner:
    """Runs Keras layers in ``jax.jit`` statelessly, threading their state.

    Calling a random Keras layer directly inside ``jax.jit`` assigns a traced
    seed to its ``SeedGenerator`` variable, which leaks the tracer. Instead the
    current values of the layers' variables go in as an argument, the layers
    run in a ``keras.StatelessScope`` mapping each variable to its value, and
    the values the scope ends with (the advanced seed states) come out; the
    runner keeps them for the next call, so every call draws anew. This is
    what Keras's JAX trainer does with ``stateless_call``, for any function of
    several layers.
    """

    def __init__(self, fn: Callable[[Any], Any], layers: list[Any], inputs: Any):
        import jax
        import keras

        self._jax = jax
        seen: set[int] = set()
        self.variables = []
        for layer in layers:
            for variable in layer.variables:
                if id(variable) not in seen:
                    seen.add(id(variable))
                    self.variables.append(variable)
        variables = self.variables

        def pure(values: list[Any], inputs: Any) -> tuple[Any, list[Any]]:
            mapping = list(zip(variables, values, strict=True))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                out = fn(inputs)
            new = []
            for variable, old in zip(variables, values, strict=True):
                value = scope.get_current_value(variable)
                new.append(old if value is None else value)
            return out, new

        self._jitted = jax.jit(pure)
        self.state = [v.value for v in variables]
        self.inputs = inputs

    def __call__(self) -> Any:
        out, self.state = self._jitted(self.state, self.inputs)
        return self._jax.block_until_ready(out)

    def commit(self) -> None:
        """Write the threaded state back into the Keras variables."""
        for variable, value in zip(self.variables, self.state, strict=True):
            variable.assign(value)


def _copy_fn(ctx: _Context) -> tuple[Callable[[Any], Any], list[Any]]:
    ops = ctx.keras.ops
    zero = ops.convert_to_tensor(np.float32(0.0))

    def copy(x: Any) -> Any:
        # a run-time scalar: XLA cannot fold ``x + s`` into the input buffer
        return x + zero

    return copy, []


# --------------------------------------------------------------------------- #
# the operations
# --------------------------------------------------------------------------- #


def _layers(module: str, *names: str) -> list[Any]:
    return [_keras_nii_attr(f"layers.{module}", name) for name in names]


def _apply(layers: list[Any]) -> Callable[[Any], Any]:
    def fn(x: Any) -> Any:
        for layer in layers:
            x = layer(x, training=True)
        return x

    return fn


def _bench_copy(ctx: _Context, operation: str) -> None:
    images, _ = ctx.data()
    ctx.keras_rows(
        operation,
        "copy",
        lambda: _copy_fn(ctx),
        lambda: ctx.tensors(images),
        graph_row=False,
        note="x + s (s = 0 at run time): one read + one write of the batch",
    )


def _bench_zscore(ctx: _Context) -> None:
    images, _ = ctx.data()

    def make() -> tuple[Callable, list]:
        (cls,) = _layers("normalization", "ZScoreNormalization")
        layer = cls(nonzero=True)
        return _apply([layer]), [layer]

    _bench_copy(ctx, "zscore")
    ctx.keras_rows("zscore", "nonzero", make, lambda: ctx.tensors(images), reference=True)

    def monai() -> Callable[[], Any]:
        mt = _monai()
        tfm = mt.NormalizeIntensity(nonzero=True)
        vols, _ = ctx.torch_volumes()
        return ctx.torch_synced(lambda: [tfm(v) for v in vols])

    ctx.add("zscore", "nonzero", "MONAI", _lazy(ctx.torch_runtime), _lazy(ctx.torch_threads), monai)

    def torchio() -> Callable[[], Any]:
        tio = _try_import("torchio")
        tfm = tio.ZNormalization(masking_method=lambda x: x > 0)
        subjects = _subjects(ctx, tio, masks=False)
        return lambda: [tfm(s) for s in subjects]

    ctx.add("zscore", "nonzero", "TorchIO", "torch", _lazy(ctx.torch_threads), torchio)

    def numpy_ref() -> Callable[[], Any]:
        def run() -> list[np.ndarray]:
            out = []
            for v in images:
                inside = v != 0
                values = v[inside]
                std = values.std()
                out.append(np.where(inside, (v - values.mean()) / (std if std > 0 else 1), 0))
            return out

        return run

    ctx.add("zscore", "nonzero", "NumPy", "numpy", "1", numpy_ref)


def _bench_flip(ctx: _Context) -> None:
    images, masks = ctx.data()

    def make() -> tuple[Callable, list]:
        (cls,) = _layers("flip", "RandomFlip3D")
        layer = cls(axes=(0, 1, 2), probability=0.5, seed=0)
        return _apply([layer]), [layer]

    _bench_copy(ctx, "flip")
    ctx.keras_rows(
        "flip",
        "image+mask",
        make,
        lambda: dict(
            zip(("images", "segmentation_masks"), ctx.tensors(images, masks), strict=True)
        ),
        reference=True,
    )
    ctx.keras_rows("flip", "image", make, lambda: ctx.tensors(images), graph_row=False)

    def monai() -> Callable[[], Any]:
        mt = _monai()
        tfm = mt.Compose(
            [mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=a) for a in range(3)]
        )
        return ctx.monai_pairs(tfm)

    ctx.add(
        "flip",
        "image+mask",
        "MONAI",
        _lazy(ctx.torch_runtime),
        _lazy(ctx.torch_threads),
        monai,
        note="RandFlipd per axis",
    )

    def torchio() -> Callable[[], Any]:
        tio = _try_import("torchio")
        tfm = tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5)
        subjects = _subjects(ctx, tio)
        return lambda: [tfm(s) for s in subjects]

    ctx.add("flip", "image+mask", "TorchIO", "torch", _lazy(ctx.torch_threads), torchio)

    def numpy_ref() -> Callable[[], Any]:
        rng = np.random.default_rng(0)

        def run() -> list[Any]:
            out = []
            for v, m in zip(images, masks, strict=True):
                axes = tuple(a for a in range(3) if rng.random() < 0.5)
                out.append(
                    (np.ascontiguousarray(np.flip(v, axes)), np.ascontiguousarray(np.flip(m, axes)))
                )
            return out

        return run

    ctx.add("flip", "image+mask", "NumPy", "numpy", "1", numpy_ref)


def _bench_affine(ctx: _Context) -> None:
    images, masks = ctx.data()

    def make() -> tuple[Callable, list]:
        (cls,) = _layers("affine", "RandomAffine3D")
        layer = cls(degrees=AFFINE_DEGREES, scales=AFFINE_SCALES, seed=0)
        return _apply([layer]), [layer]

    paired = lambda: dict(  # noqa: E731
        zip(("images", "segmentation_masks"), ctx.tensors(images, masks), strict=True)
    )
    note = f"rotation +-{AFFINE_DEGREES:g} deg per axis, scale {AFFINE_SCALES}; trilinear + nearest"
    ctx.keras_rows("affine", "image+mask", make, paired, reference=True, note=note)
    ctx.keras_rows("affine", "image", make, lambda: ctx.tensors(images), graph_row=False)

    def monai(with_mask: bool) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            tfm = _monai_rand_affine(ctx, with_mask)
            if with_mask:
                return ctx.monai_pairs(tfm)
            vols, _ = ctx.torch_volumes()
            return ctx.torch_synced(lambda: [tfm({"image": v}) for v in vols])

        return setup

    def torchio(with_mask: bool) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            tio = _try_import("torchio")
            tfm = tio.RandomAffine(scales=AFFINE_SCALES, degrees=AFFINE_DEGREES)
            subjects = _subjects(ctx, tio, masks=with_mask)
            return lambda: [tfm(s) for s in subjects]

        return setup

    def scipy_ref(with_mask: bool) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            ndimage = _try_import("scipy.ndimage")
            rng = np.random.default_rng(0)
            centre = (np.asarray(images.shape[1:4]) - 1) / 2.0

            def run() -> list[Any]:
                out = []
                for v, m in zip(images, masks, strict=True):
                    matrix = _random_rotation(rng) @ np.diag(rng.uniform(*AFFINE_SCALES, size=3))
                    offset = centre - matrix @ centre
                    img = ndimage.affine_transform(v[..., 0], matrix, offset, order=1)
                    if with_mask:
                        out.append(
                            (img, ndimage.affine_transform(m[..., 0], matrix, offset, order=0))
                        )
                    else:
                        out.append(img)
                return out

            return run

        return setup

    def torch_grid(with_mask: bool) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            torch = ctx.torch()
            functional = torch.nn.functional
            device = ctx.torch_device()
            x, m = ctx.torch_batch()
            m_float = m.float()  # grid_sample samples floating-point tensors only
            generator = torch.Generator(device=device)
            generator.manual_seed(0)

            def run() -> Any:
                theta = _torch_thetas(torch, x.shape[0], device, generator)
                grid = functional.affine_grid(theta, list(x.shape), align_corners=False)
                out = functional.grid_sample(x, grid, mode="bilinear", align_corners=False)
                if not with_mask:
                    return out
                labels = functional.grid_sample(m_float, grid, mode="nearest", align_corners=False)
                return out, labels.to(m.dtype)

            return ctx.torch_synced(run)

        return setup

    def kornia(with_mask: bool) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            augmentation = _try_import("kornia.augmentation")
            x, m = ctx.torch_batch()
            m_float = m.float()
            options = dict(degrees=AFFINE_DEGREES, scale=(AFFINE_SCALES,) * 3, p=1.0)
            image_tfm = augmentation.RandomAffine3D(resample="bilinear", **options)
            mask_tfm = augmentation.RandomAffine3D(resample="nearest", **options)

            def run() -> Any:
                params = image_tfm.forward_parameters(x.shape)  # one draw per sample
                out = image_tfm(x, params=params)
                if not with_mask:
                    return out
                labels = mask_tfm(m_float, params=params)  # the image's draw, on the mask
                return out, labels.to(m.dtype)

            return ctx.torch_synced(run)

        return setup

    def jax_warp(with_mask: bool) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            jax = _try_import("jax")
            ndimage = _try_import("jax.scipy.ndimage")
            jnp = jax.numpy
            x, m = jnp.asarray(images[..., 0]), jnp.asarray(masks[..., 0])
            shape = images.shape[1:4]
            centre = jnp.asarray([(n - 1) / 2.0 for n in shape], jnp.float32)[:, None, None, None]
            axes = [jnp.arange(n, dtype=jnp.float32) for n in shape]
            grid = jnp.stack(jnp.meshgrid(*axes, indexing="ij")) - centre  # (3, x, y, z)

            def warp(volume: Any, mask: Any, key: Any) -> Any:
                linear = _jax_random_linear(jax, key)
                coords = list(jnp.einsum("ij,jxyz->ixyz", linear, grid) + centre)
                out = ndimage.map_coordinates(volume, coords, order=1, mode="constant")
                if not with_mask:
                    return out
                return out, ndimage.map_coordinates(mask, coords, order=0, mode="constant")

            batched = jax.jit(lambda key: jax.vmap(warp)(x, m, jax.random.split(key, len(images))))
            keys = iter(jax.random.split(jax.random.PRNGKey(0), 10_000))
            return lambda: jax.block_until_ready(batched(next(keys)))

        return setup

    for with_mask in (True, False):
        variant = "image+mask" if with_mask else "image"
        ctx.add(
            "affine",
            variant,
            "JAX",
            "jax jit map_coordinates",
            str(ctx.cores),
            jax_warp(with_mask),
            note="jax.scipy.ndimage.map_coordinates, vmapped over the batch (order 1 + order 0)",
        )
        ctx.add(
            "affine",
            variant,
            "PyTorch",
            _lazy(lambda: f"{ctx.torch_runtime()} affine_grid"),
            _lazy(ctx.torch_threads),
            torch_grid(with_mask),
            note="F.affine_grid + F.grid_sample on the whole batch (bilinear + nearest)",
        )
        ctx.add(
            "affine",
            variant,
            "Kornia",
            _lazy(ctx.torch_runtime),
            _lazy(ctx.torch_threads),
            kornia(with_mask),
            note="RandomAffine3D on the whole batch; the mask replays the image's draw",
        )
        ctx.add(
            "affine",
            variant,
            "MONAI",
            _lazy(ctx.torch_runtime),
            _lazy(ctx.torch_threads),
            monai(with_mask),
            note="RandAffined",
        )
        ctx.add(
            "affine",
            variant,
            "TorchIO",
            "torch+SimpleITK",
            _lazy(lambda: f"{ctx.torch_threads()}/{ctx.itk_threads()}"),
            torchio(with_mask),
        )
        ctx.add(
            "affine",
            variant,
            "SciPy",
            "scipy.ndimage",
            "1",
            scipy_ref(with_mask),
            note="affine_transform order=1 (+ order=0 mask)",
        )


def _monai_rand_affine(ctx: _Context, with_mask: bool) -> Any:
    """MONAI's ``RandAffined`` with the bench's ranges, on the torch peers' device."""
    mt = _monai()
    return mt.RandAffined(
        keys=["image", "label"] if with_mask else ["image"],
        prob=1.0,
        rotate_range=(math.radians(AFFINE_DEGREES),) * 3,
        scale_range=(AFFINE_SCALES[1] - 1.0,) * 3,
        mode=("bilinear", "nearest") if with_mask else ("bilinear",),
        padding_mode="zeros",
        device=ctx.torch().device(ctx.torch_device()),
    )


def _bench_elastic(ctx: _Context) -> None:
    images, masks = ctx.data()

    def make() -> tuple[Callable, list]:
        (cls,) = _layers("elastic", "RandomElasticDeformation3D")
        layer = cls(
            num_control_points=ELASTIC_POINTS, max_displacement=ELASTIC_DISPLACEMENT, seed=0
        )
        return _apply([layer]), [layer]

    paired = lambda: dict(  # noqa: E731
        zip(("images", "segmentation_masks"), ctx.tensors(images, masks), strict=True)
    )
    note = f"{ELASTIC_POINTS}^3 control points, max displacement {ELASTIC_DISPLACEMENT} voxels"
    ctx.keras_rows("elastic", "image+mask", make, paired, reference=True, note=note)

    def monai() -> Callable[[], Any]:
        mt = _monai()
        tfm = mt.Rand3DElasticd(
            keys=["image", "label"],
            sigma_range=(5.0, 8.0),
            magnitude_range=(100.0, 200.0),
            prob=1.0,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
            device=ctx.torch().device(ctx.torch_device()),
        )
        return ctx.monai_pairs(tfm)

    ctx.add(
        "elastic",
        "image+mask",
        "MONAI",
        _lazy(ctx.torch_runtime),
        _lazy(ctx.torch_threads),
        monai,
        note="Rand3DElasticd sigma 5-8, magnitude 100-200 (dense Gaussian-smoothed field)",
    )

    def torchio() -> Callable[[], Any]:
        tio = _try_import("torchio")
        tfm = tio.RandomElasticDeformation(
            num_control_points=ELASTIC_POINTS, max_displacement=ELASTIC_DISPLACEMENT
        )
        subjects = _subjects(ctx, tio)
        return lambda: [tfm(s) for s in subjects]

    ctx.add(
        "elastic",
        "image+mask",
        "TorchIO",
        "torch+SimpleITK",
        _lazy(lambda: f"{ctx.torch_threads()}/{ctx.itk_threads()}"),
        torchio,
    )

    def scipy_ref() -> Callable[[], Any]:
        ndimage = _try_import("scipy.ndimage")
        rng = np.random.default_rng(0)
        shape = images.shape[1:4]
        grid = np.stack(
            np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
        )

        def run() -> list[Any]:
            out = []
            for v, m in zip(images, masks, strict=True):
                coarse = rng.uniform(
                    -ELASTIC_DISPLACEMENT, ELASTIC_DISPLACEMENT, size=(3, *(ELASTIC_POINTS,) * 3)
                ).astype(np.float32)
                zoom = [n / ELASTIC_POINTS for n in shape]
                field = np.stack([ndimage.zoom(c, zoom, order=3) for c in coarse])
                coords = grid + field
                out.append(
                    (
                        ndimage.map_coordinates(v[..., 0], coords, order=1),
                        ndimage.map_coordinates(m[..., 0], coords, order=0),
                    )
                )
            return out

        return run

    ctx.add(
        "elastic",
        "image+mask",
        "SciPy",
        "scipy.ndimage",
        "1",
        scipy_ref,
        note="cubic zoom of a coarse field + map_coordinates",
    )


def _bench_intensity(ctx: _Context) -> None:
    images, _ = ctx.data()
    unit = (images / images.max()).astype(np.float32)

    def make() -> tuple[Callable, list]:
        shift, gamma, noise = _layers(
            "intensity", "RandomIntensityShift", "RandomGamma", "RandomGaussianNoise"
        )
        layers = [
            shift(offset=0.1, seed=0),
            gamma(gamma=(0.7, 1.5), seed=1),
            noise(std=0.1, seed=2),
        ]
        return _apply(layers), layers

    ctx.keras_rows(
        "intensity",
        "shift+gamma+noise",
        make,
        lambda: ctx.tensors(unit),
        reference=True,
        note="RandomIntensityShift -> RandomGamma -> RandomGaussianNoise",
    )

    def monai() -> Callable[[], Any]:
        mt = _monai()
        tfm = mt.Compose(
            [
                mt.RandShiftIntensity(offsets=0.1, prob=1.0),
                mt.RandAdjustContrast(prob=1.0, gamma=(0.7, 1.5)),
                mt.RandGaussianNoise(prob=1.0, std=0.1),
            ]
        )
        vols, _ = ctx.torch_volumes(unit=True)
        return ctx.torch_synced(lambda: [tfm(v) for v in vols])

    ctx.add(
        "intensity",
        "shift+gamma+noise",
        "MONAI",
        _lazy(ctx.torch_runtime),
        _lazy(ctx.torch_threads),
        monai,
        note="RandShiftIntensity + RandAdjustContrast + RandGaussianNoise",
    )

    def torchio() -> Callable[[], Any]:
        tio = _try_import("torchio")
        tfm = tio.Compose([tio.RandomGamma(log_gamma=(-0.35, 0.4)), tio.RandomNoise(std=0.1)])
        subjects = _subjects(ctx, tio, masks=False, unit=True)
        return lambda: [tfm(s) for s in subjects]

    ctx.add(
        "intensity",
        "gamma+noise",
        "TorchIO",
        "torch",
        _lazy(ctx.torch_threads),
        torchio,
        note="TorchIO has no random intensity shift: RandomGamma + RandomNoise only",
    )

    def numpy_ref() -> Callable[[], Any]:
        rng = np.random.default_rng(0)

        def run() -> list[np.ndarray]:
            out = []
            for v in unit:
                x = v + rng.uniform(-0.1, 0.1)
                lo, hi = x.min(), x.max()
                x = ((x - lo) / (hi - lo)) ** rng.uniform(0.7, 1.5) * (hi - lo) + lo
                out.append(x + rng.normal(0.0, 0.1, size=x.shape).astype(np.float32))
            return out

        return run

    ctx.add("intensity", "shift+gamma+noise", "NumPy", "numpy", "1", numpy_ref)


def _bench_pipeline(ctx: _Context) -> None:
    images, masks = ctx.data()

    def make() -> tuple[Callable, list]:
        flip, affine, noise = (
            _keras_nii_attr("layers.flip", "RandomFlip3D"),
            _keras_nii_attr("layers.affine", "RandomAffine3D"),
            _keras_nii_attr("layers.intensity", "RandomGaussianNoise"),
        )
        layers = [
            flip(axes=(0, 1, 2), probability=0.5, seed=0),
            affine(degrees=AFFINE_DEGREES, scales=AFFINE_SCALES, seed=1),
            noise(std=0.1, seed=2),
        ]
        return _apply(layers), layers

    ctx.keras_rows(
        "pipeline",
        "image+mask",
        make,
        lambda: dict(
            zip(("images", "segmentation_masks"), ctx.tensors(images, masks), strict=True)
        ),
        reference=True,
        note="RandomFlip3D -> RandomAffine3D -> RandomGaussianNoise (images only)",
    )

    def monai() -> Callable[[], Any]:
        mt = _monai()
        flips = [mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=a) for a in range(3)]
        noise = mt.RandGaussianNoised(keys=["image"], prob=1.0, std=0.1)
        tfm = mt.Compose([*flips, _monai_rand_affine(ctx, with_mask=True), noise])
        return ctx.monai_pairs(tfm)

    ctx.add(
        "pipeline",
        "image+mask",
        "MONAI",
        _lazy(ctx.torch_runtime),
        _lazy(ctx.torch_threads),
        monai,
        note="RandFlipd per axis + RandAffined + RandGaussianNoised",
    )

    def torchio() -> Callable[[], Any]:
        tio = _try_import("torchio")
        tfm = tio.Compose(
            [
                tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5),
                tio.RandomAffine(scales=AFFINE_SCALES, degrees=AFFINE_DEGREES),
                tio.RandomNoise(std=0.1),
            ]
        )
        subjects = _subjects(ctx, tio)
        return lambda: [tfm(s) for s in subjects]

    ctx.add(
        "pipeline",
        "image+mask",
        "TorchIO",
        "torch+SimpleITK",
        _lazy(lambda: f"{ctx.torch_threads()}/{ctx.itk_threads()}"),
        torchio,
        note="RandomFlip + RandomAffine + RandomNoise",
    )


def _bench_read(ctx: _Context) -> None:
    import nibabel as nib

    from keras_nii.phantoms import make_dataset

    with tempfile.TemporaryDirectory(prefix="keras-nii-bench-") as tmp:
        ctx.log(f"read      writing {READ_FILES} phantoms of {ctx.size}^3 to {tmp}")
        pairs = make_dataset(Path(tmp) / "data", READ_FILES, shape=(ctx.size,) * 3, seed=0)
        paths = [str(image) for image, _ in pairs]
        n = len(paths)

        def dataset(cache: Any) -> Callable[[], Any]:
            cls = _keras_nii_attr("data", "NiftiDataset")
            ds = cls(paths, batch_size=ctx.batch, cache=cache)

            def epoch() -> int:
                count = 0
                for i in range(len(ds)):
                    batch = ds[i]
                    x = batch[0] if isinstance(batch, tuple) else batch
                    count += int(np.asarray(x).shape[0])
                if count != n:
                    raise RuntimeError(f"one epoch gave {count} volumes, expected {n}")
                return count

            return epoch

        ctx.add(
            "read",
            "no cache",
            "keras-nii",
            "NiftiDataset",
            "1",
            lambda: dataset(None),
            volumes=n,
            reference=True,
            note=f"one epoch of {n} .nii.gz files, batch {ctx.batch}",
        )
        ctx.add(
            "read",
            "memory cache",
            "keras-nii",
            "NiftiDataset",
            "1",
            lambda: dataset("memory"),
            volumes=n,
            note="first call fills the cache",
        )
        ctx.add(
            "read",
            "dir cache",
            "keras-nii",
            "NiftiDataset",
            "1",
            lambda: dataset(str(Path(tmp) / "cache")),
            volumes=n,
            note="first call fills the cache",
        )

        def plain() -> Callable[[], Any]:
            return lambda: [nib.load(p).get_fdata(dtype=np.float32) for p in paths]

        ctx.add(
            "read",
            "no cache",
            "nibabel",
            "python loop",
            "1",
            plain,
            volumes=n,
            note="nibabel.load(p).get_fdata(dtype=float32)",
        )


def _unet(keras: Any, size: int, name: str) -> Any:
    """A tiny 2-level 3D U-Net (8 and 16 filters) for ``size**3`` single-channel volumes."""
    layers = keras.layers

    def block(x: Any, filters: int, prefix: str) -> Any:
        for i in range(2):
            x = layers.Conv3D(
                filters, 3, padding="same", activation="relu", name=f"{prefix}_conv{i}"
            )(x)
        return x

    inputs = keras.Input((size, size, size, 1), name="images")
    down = block(inputs, 8, "down")
    bottom = block(layers.MaxPooling3D(2)(down), 16, "bottom")
    up = layers.UpSampling3D(2)(bottom)
    x = block(layers.Concatenate()([up, down]), 8, "up")
    outputs = layers.Conv3D(1, 1, activation="sigmoid", name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def _bench_train(ctx: _Context) -> None:
    keras = ctx.keras
    size = min(ctx.size, TRAIN_MAX_SIZE)
    size -= size % 2  # one 2x pooling level
    images, masks = ctx.data(size)
    x, y = images, masks.astype(np.float32)
    unet_note = f"U-Net 2 levels, 8/16 filters, {size}^3, Adam, BCE; train_on_batch"
    compiled: list[Any] = []

    def step(model: Any) -> Callable[[], Any]:
        # Keras's default jit_compile="auto": XLA under JAX and on TensorFlow
        # GPUs; TensorFlow graph (no XLA) on CPU-only machines
        model.compile(optimizer="adam", loss="binary_crossentropy")
        compiled.append(model)
        return lambda: model.train_on_batch(x, y)

    def runtime() -> str:
        if ctx.backend == "jax":
            return "jax jit"
        if compiled and compiled[-1].jit_compile:
            return "tensorflow XLA"
        return "tensorflow graph"

    def plain() -> Callable[[], Any]:
        keras.utils.set_random_seed(0)
        return step(_unet(keras, size, "unet"))

    base = ctx.add(
        "train",
        "no augmentation",
        "keras-nii",
        "keras fit",
        str(ctx.cores),
        plain,
        reference=True,
        note=unet_note,
    )
    base["runtime"] = runtime()

    how: list[str] = []

    def augmented() -> Callable[[], Any]:
        flip, affine, noise = (
            _keras_nii_attr("layers.flip", "RandomFlip3D"),
            _keras_nii_attr("layers.affine", "RandomAffine3D"),
            _keras_nii_attr("layers.intensity", "RandomGaussianNoise"),
        )
        augmentation = [
            flip(seed=0),
            affine(degrees=AFFINE_DEGREES, scales=AFFINE_SCALES, seed=1),
            noise(std=0.1, seed=2),
        ]
        keras.utils.set_random_seed(0)
        unet = _unet(keras, size, "unet_aug")
        try:
            wrapper = _keras_nii_attr("training", "AugmentedModel")
        except _Unavailable:
            wrapper = None
        if wrapper is not None:
            how.append("keras_nii.training.AugmentedModel: image + mask augmented in train_step")
            return step(wrapper(unet, keras.layers.Pipeline(augmentation)))
        how.append("AugmentedModel not available: layers at the front of the model (image only)")
        inputs = keras.Input((size, size, size, 1))
        out = inputs
        for layer in augmentation:
            out = layer(out)
        return step(keras.Model(inputs, unet(out)))

    compiled.clear()
    row = ctx.add(
        "train",
        "augmented",
        "keras-nii",
        "keras fit",
        str(ctx.cores),
        augmented,
        note="RandomFlip3D + RandomAffine3D + RandomGaussianNoise on device",
    )
    row["runtime"] = runtime()
    if how:
        row["note"] = "; ".join([row["note"], *how])
    for r in (base, row):
        if r["status"] == "ok":
            r["note"] += f"; {r['ms_per_call']:.1f} ms/step"
    if base["status"] == "ok" and row["status"] == "ok":
        extra = row["ms_per_call"] - base["ms_per_call"]
        row["augmentation_overhead_ms_per_step"] = extra
        row["augmentation_overhead_percent"] = 100.0 * extra / base["ms_per_call"]
        row["note"] += (
            f"; augmentation adds {extra:.1f} ms/step ({row['augmentation_overhead_percent']:.0f} %)"
        )


# --------------------------------------------------------------------------- #
# peer helpers
# --------------------------------------------------------------------------- #


def _monai() -> Any:
    """``monai.transforms``, with metadata tracking off (plain tensors: its fastest mode)."""
    _try_import("torch")
    data = _try_import("monai.data")
    data.set_track_meta(False)
    return _try_import("monai.transforms")


def _subjects(ctx: _Context, tio: Any, masks: bool = True, unit: bool = False) -> list[Any]:
    vols, mvols = ctx.torch_volumes(unit=unit, device="cpu")  # TorchIO works on the CPU
    out = []
    for v, m in zip(vols, mvols, strict=True):
        entries = {"image": tio.ScalarImage(tensor=v)}
        if masks:
            entries["label"] = tio.LabelMap(tensor=m)
        out.append(tio.Subject(**entries))
    return out


class _lazy(str):  # noqa: N801 - used like a function
    """A thread count computed when the row is made (after the peer imported)."""

    def __new__(cls, fn: Callable[[], str]) -> _lazy:
        try:
            value = fn()
        except Exception:
            value = "-"
        return super().__new__(cls, value)


def _torch_thetas(torch: Any, n: int, device: str, generator: Any) -> Any:
    """``n`` random ``(3, 4)`` matrices for ``torch.nn.functional.affine_grid``:
    a rotation of up to :data:`AFFINE_DEGREES` about each axis after a scaling
    by :data:`AFFINE_SCALES` per axis, about the volume's centre (the origin of
    ``affine_grid``'s normalized coordinates), drawn on ``device``."""
    angles = torch.rand(n, 3, generator=generator, device=device)
    angles = (2.0 * angles - 1.0) * math.radians(AFFINE_DEGREES)
    low, high = AFFINE_SCALES
    scales = low + (high - low) * torch.rand(n, 3, generator=generator, device=device)
    cos, sin = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def matrix(rows: list[list[Any]]) -> Any:
        return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)

    cx, cy, cz = cos.unbind(1)
    sx, sy, sz = sin.unbind(1)
    rx = matrix([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
    ry = matrix([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rz = matrix([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
    linear = rz @ ry @ rx * scales[:, None, :]  # (rz ry rx) @ diag(scales)
    return torch.cat([linear, torch.zeros(n, 3, 1, device=device)], dim=2)


def _jax_random_linear(jax: Any, key: Any) -> Any:
    """One random ``(3, 3)`` map, drawn like :func:`_torch_thetas`'s, in JAX."""
    jnp = jax.numpy
    angle_key, scale_key = jax.random.split(key)
    limit = math.radians(AFFINE_DEGREES)
    ax, ay, az = jax.random.uniform(angle_key, (3,), minval=-limit, maxval=limit)
    scales = jax.random.uniform(scale_key, (3,), minval=AFFINE_SCALES[0], maxval=AFFINE_SCALES[1])
    cx, cy, cz, sx, sy, sz = (f(a) for f in (jnp.cos, jnp.sin) for a in (ax, ay, az))
    rx = jnp.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    ry = jnp.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rz = jnp.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return rz @ ry @ rx * scales[None, :]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-AFFINE_DEGREES, AFFINE_DEGREES, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


_BENCHES: dict[str, Callable[[_Context], None]] = {
    "zscore": _bench_zscore,
    "flip": _bench_flip,
    "affine": _bench_affine,
    "elastic": _bench_elastic,
    "intensity": _bench_intensity,
    "pipeline": _bench_pipeline,
    "read": _bench_read,
    "train": _bench_train,
}


# --------------------------------------------------------------------------- #
# the public API
# --------------------------------------------------------------------------- #


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_only(only: Iterable[str] | None) -> list[str]:
    if only is None:
        return list(OPERATIONS)
    if isinstance(only, str):
        only = [only]
    only = list(only)
    unknown = [name for name in only if name not in OPERATIONS]
    if unknown:
        raise ValueError(f"unknown operation(s) {unknown}; choose from {list(OPERATIONS)}")
    if not only:
        raise ValueError(f"only must name at least one of {list(OPERATIONS)}")
    return [name for name in OPERATIONS if name in only]


def run_benchmarks(
    size: int = 128,
    batch: int = 2,
    repeats: int = 10,
    only: Iterable[str] | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> list[Row]:
    """Run the benchmarks under the current Keras backend; return the table.

    Args:
        size: volumes are ``size**3`` voxels (>= 8); ``train`` uses
            ``min(size, 64)``.
        batch: volumes per call (>= 1).
        repeats: timed calls after the first (>= 1); their median is reported.
        only: operation names from :data:`OPERATIONS` (default: all).
        log: called with a progress line before each measurement.

    Returns:
        One dict per row, with the keys ``operation``, ``variant``,
        ``library``, ``runtime``, ``threads``, ``status`` (``"ok"``, ``"not
        installed"``, ``"missing"`` for a keras-nii piece not there, or
        ``"error"``), ``first_call_ms``, ``ms_per_call``, ``volumes_per_call``,
        ``ms_per_volume``, ``volumes_per_s``, ``ratio`` (the row's time per
        volume over its operation's reference row), ``reference`` and
        ``note``; times are ``None`` when the status is not ``"ok"``.
    """
    size = _check_int("size", size, MIN_SIZE)
    batch = _check_int("batch", batch, 1)
    repeats = _check_int("repeats", repeats, 1)
    names = _check_only(only)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    ctx = _Context(size, batch, repeats, log or (lambda line: None))
    for name in names:
        _BENCHES[name](ctx)
    _fill_ratios(ctx.rows)
    return ctx.rows


def _fill_ratios(rows: list[Row]) -> None:
    for operation in {row["operation"] for row in rows}:
        group = [row for row in rows if row["operation"] == operation]
        ref = next((r for r in group if r["reference"] and r["status"] == "ok"), None)
        if ref is None:
            continue
        for row in group:
            if row["status"] == "ok" and ref["ms_per_volume"]:
                row["ratio"] = row["ms_per_volume"] / ref["ms_per_volume"]


def _find(
    rows: list[Row],
    operation: str,
    variant: str | None = None,
    library: str | None = None,
    reference: bool | None = None,
) -> Row | None:
    for row in rows:
        if (
            row["operation"] == operation
            and row["status"] == "ok"
            and (variant is None or row["variant"] == variant)
            and (library is None or row["library"] == library)
            and (reference is None or row["reference"] == reference)
            and not row["runtime"].endswith("graph")
        ):
            return row
    return None


#: GPU throughput targets (volumes per second, 128^3, batch 8, JAX), set for an H200
GPU_TARGETS = {("affine", "image+mask"): 15_000.0, ("zscore", "nonzero"): 40_000.0}


def check_targets(rows: list[Row], machine: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The project's speed targets, for the rows that were measured.

    ``machine`` (as :func:`machine_info` returns it) adds the GPU throughput
    targets of :data:`GPU_TARGETS` when it lists a GPU; they are set for an
    H200 (on another card the figure is reported against the same number,
    the card named).
    """
    out: list[dict[str, Any]] = []

    def target(
        name: str, goal: str, value: float, limit: float, higher_is_better: bool = False
    ) -> None:
        met = value >= limit if higher_is_better else value <= limit
        out.append({"target": name, "goal": goal, "measured": round(value, 3), "met": bool(met)})

    for operation, variant in (("zscore", "nonzero"), ("flip", "image")):
        layer = _find(rows, operation, variant, "keras-nii")
        copy = _find(rows, operation, "copy", "keras-nii")
        if layer and copy:
            target(
                f"{operation} vs copy",
                "keras-nii / copy <= 3",
                layer["ms_per_volume"] / copy["ms_per_volume"],
                3.0,
            )
    layer = _find(rows, "affine", "image+mask", "keras-nii")
    peers = [
        r
        for r in rows
        if r["operation"] == "affine"
        and r["variant"] == "image+mask"
        and r["library"] != "keras-nii"
        and r["status"] == "ok"
    ]
    if layer and peers:
        fastest = min(peers, key=lambda r: r["ms_per_volume"])
        target(
            "affine image+mask vs fastest peer",
            f"keras-nii / {fastest['library']} <= 0.5",
            layer["ms_per_volume"] / fastest["ms_per_volume"],
            0.5,
        )
    gpus = (machine or {}).get("gpus") or []
    if gpus:
        for (operation, variant), limit in GPU_TARGETS.items():
            layer = _find(rows, operation, variant, "keras-nii")
            if layer:
                target(
                    f"{operation} {variant} on {gpus[0]}",
                    f"keras-nii >= {limit:,.0f} volumes/s (set for an H200)",
                    layer["volumes_per_s"],
                    limit,
                    higher_is_better=True,
                )
    cold = _find(rows, "read", "no cache", "keras-nii")
    plain = _find(rows, "read", "no cache", "nibabel")
    if cold and plain:
        target(
            "read without cache vs nibabel loop",
            "NiftiDataset / nibabel <= 1.1",
            cold["ms_per_volume"] / plain["ms_per_volume"],
            1.1,
        )
    for variant in ("memory cache", "dir cache"):
        cached = _find(rows, "read", variant, "keras-nii")
        if cold and cached:
            target(
                f"read {variant} speed-up",
                "no cache / cached >= 10",
                cold["ms_per_volume"] / cached["ms_per_volume"],
                10.0,
                higher_is_better=True,
            )
    return out


def machine_info(backend: str | None = None) -> dict[str, Any]:
    """CPU, cores, GPUs, backend and library versions of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpus: list[str] = []
    if "tensorflow" in sys.modules:
        try:
            tf = sys.modules["tensorflow"]
            for device in tf.config.list_physical_devices("GPU"):
                details = tf.config.experimental.get_device_details(device)
                gpus.append(str(details.get("device_name", device.name)))
        except Exception:
            pass
    if "jax" in sys.modules and not gpus:
        try:
            gpus = [str(d.device_kind) for d in sys.modules["jax"].devices() if d.platform != "cpu"]
        except Exception:
            pass
    if "torch" in sys.modules and not gpus:
        try:
            torch = sys.modules["torch"]
            if torch.cuda.is_available():
                gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:
            pass
    if backend is None and "keras" in sys.modules:
        backend = sys.modules["keras"].backend.backend()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": _cpu_count(),
        "gpus": gpus,
        "backend": backend,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _dist_version(name) for name in _VERSIONED},
    }


# --------------------------------------------------------------------------- #
# the command
# --------------------------------------------------------------------------- #


def _positive(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-nii bench",
        description=(
            "Time keras-nii's layers and NiftiDataset against MONAI, TorchIO and NumPy/SciPy "
            "(those installed), on synthetic phantoms."
        ),
        epilog=(
            "Peers: pip install torch==2.13.0 (first: the CPU build), then "
            'pip install "keras-nii[bench]".'
        ),
    )
    parser.add_argument(
        "--size",
        type=_positive(MIN_SIZE),
        default=128,
        help="volumes are SIZE^3 voxels (default 128; >= 8)",
    )
    parser.add_argument(
        "--batch", type=_positive(1), default=2, help="volumes per call (default 2)"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="Keras backend (default: KERAS_BACKEND or Keras's configuration)",
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        default=None,
        help="also write the table and machine information as JSON",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        choices=OPERATIONS,
        default=None,
        help=f"operations to run, among {', '.join(OPERATIONS)} (default: all)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive(1),
        default=10,
        help="timed calls after the warm-up; the median is reported (default 10)",
    )
    return parser


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "inf"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_table(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    header = (
        "operation",
        "variant",
        "library",
        "runtime",
        "threads",
        "first ms",
        "ms/vol",
        "vol/s",
        "ratio",
        "status / note",
    )
    lines = []
    for row in rows:
        ok = row["status"] == "ok"
        ratio = (
            "ref"
            if row["reference"] and ok
            else (f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-")
        )
        status = (
            row["note"]
            if ok
            else f"{row['status'].upper()}" + (f": {row['note']}" if row["note"] else "")
        )
        lines.append(
            (
                row["operation"],
                row["variant"],
                row["library"] + ("*" if row["reference"] else ""),
                row["runtime"],
                str(row["threads"]),
                _number(row["first_call_ms"]),
                _number(row["ms_per_volume"]),
                _number(row["volumes_per_s"]),
                ratio,
                status,
            )
        )
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
        for i, h in enumerate(header)
    ]
    right = {5, 6, 7, 8}

    def fmt(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts[:-1]) + "  " + cells[-1]

    out = [fmt(header), fmt(["-" * w for w in widths[:-1]] + ["-" * len(header[-1])])]
    previous = None
    for line in lines:
        if previous is not None and line[0] != previous:
            out.append("")
        out.append(fmt(line))
        previous = line[0]
    return "\n".join(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """The ``keras-nii bench`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.backend is not None:
        if "keras" in sys.modules:
            current = sys.modules["keras"].backend.backend()
            if current != args.backend:
                if os.environ.get(_CHILD_ENV):
                    parser.error(
                        f"Keras runs with the {current!r} backend and could not be switched to "
                        f"{args.backend!r}"
                    )
                # Keras picks its backend once, at import: run again in a fresh process
                env = dict(os.environ, KERAS_BACKEND=args.backend, **{_CHILD_ENV: "1"})
                return subprocess.call([sys.executable, "-m", "keras_nii.bench", *argv], env=env)
        else:
            os.environ["KERAS_BACKEND"] = args.backend

    def log(line: str) -> None:
        print(f"[bench] {line}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    rows = run_benchmarks(args.size, args.batch, args.repeats, args.only, log=log)
    info = machine_info()
    targets = check_targets(rows, info)
    settings = {
        "size": args.size,
        "batch": args.batch,
        "repeats": args.repeats,
        "only": args.only or list(OPERATIONS),
        "backend": info["backend"],
    }

    print(
        f"keras-nii bench: {info['backend']} backend, {args.size}^3 float32 volumes, "
        f"batch {args.batch}, median of {args.repeats} after 1 warm-up call"
    )
    print(
        f"{info['cpu']}, {info['usable_cores']} usable cores"
        + (f", GPU: {', '.join(info['gpus'])}" if info["gpus"] else ", no GPU")
    )
    print(format_table(rows))
    if targets:
        print()
        print("targets:")
        for t in targets:
            verdict = "met " if t["met"] else "MISSED"
            print(f"  {verdict}  {t['target']}: {t['goal']}; measured {t['measured']:.2f}")
    for row in rows:
        if "augmentation_overhead_ms_per_step" in row:
            print(
                f"\ntraining step: augmentation adds {row['augmentation_overhead_ms_per_step']:.1f} "
                f"ms/step ({row['augmentation_overhead_percent']:.0f} %)"
            )
    print(
        f"\n({time.perf_counter() - start:.0f} s; * = the reference of the ratio column; "
        "ratio > 1: slower than the reference)"
    )

    if args.json:
        document = {"settings": settings, "machine": info, "rows": rows, "targets": targets}
        path = Path(args.json)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_jsonable(document), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
