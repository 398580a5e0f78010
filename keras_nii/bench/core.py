"""The benchmark's machinery: the operation registry, timing, rows, targets, table and command.

An operation is a module of this package (``keras_nii/bench/<name>.py``) with
one function decorated by :func:`operation`; the function adds its rows (keras-nii's
case and its peers') to the :class:`Context` it is given, and the decorator may
name the operation's speed targets. :func:`operations` imports every module of
the package once and returns the registry in run order, so a new operation is
one new file.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import pkgutil
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("tensorflow", "jax")
MIN_SIZE = 8  # the smallest phantom

CHILD_ENV = "KERAS_NII_BENCH_CHILD"
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
#: ``target(name, goal, measured, limit, higher_is_better=False)``: records one target
Target = Callable[..., None]


# --------------------------------------------------------------------------- #
# the registry of operations
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Operation:
    """One operation of the benchmark (a module of this package)."""

    name: str
    order: int  # operations run and print by increasing order
    run: Callable[[Context], None]  # adds the operation's rows to the context
    targets: Callable[[list[Row], Target], None] | None = None  # checks the measured rows
    copy_floor: str | None = None  # the variant checked against a plain copy (bench_copy)


_REGISTRY: dict[str, Operation] = {}
_DISCOVERED = False


def operation(
    name: str,
    *,
    order: int,
    targets: Callable[[list[Row], Target], None] | None = None,
    copy_floor: str | None = None,
) -> Callable[[Callable[[Context], None]], Callable[[Context], None]]:
    """Register the decorated ``fn(ctx)`` as the operation ``name``.

    ``targets(rows, target)``, if given, calls ``target(...)`` for each speed
    target of the operation that the measured ``rows`` allow to check.
    ``copy_floor`` names the variant of a voxel-wise layer: the operation gets
    a ``copy`` row first (:func:`bench_copy`) and the target that keras-nii's
    row of that variant stays within 3x of it.
    """

    def register(fn: Callable[[Context], None]) -> Callable[[Context], None]:
        known = _REGISTRY.get(name)
        if known is not None and known.run.__module__ != fn.__module__:
            raise ValueError(f"bench operation {name!r} is registered twice")
        _REGISTRY[name] = Operation(name, order, fn, targets, copy_floor)
        return fn

    return register


def operations() -> dict[str, Operation]:
    """The registered operations in run order (the package's modules imported once)."""
    global _DISCOVERED
    if not _DISCOVERED:
        package = importlib.import_module(__package__)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in ("core", "__main__") and not info.name.startswith("_"):
                importlib.import_module(f"{__package__}.{info.name}")
        _DISCOVERED = True
    return dict(sorted(_REGISTRY.items(), key=lambda item: (item[1].order, item[0])))


def operation_names() -> tuple[str, ...]:
    return tuple(operations())


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #


class Unavailable(Exception):
    """A peer (or a keras-nii piece) that cannot be imported: a row, not a crash."""

    def __init__(self, status: str, note: str = ""):
        super().__init__(status)
        self.status = status
        self.note = note


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #


def try_import(name: str) -> Any:
    """Import a module, or raise Unavailable("not installed")."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise Unavailable("not installed", f"import {name} failed: {err}") from err


def keras_nii_attr(module: str, name: str) -> Any:
    """``keras_nii.<module>.<name>``, or Unavailable("missing") if not (yet) there."""
    try:
        return getattr(importlib.import_module(f"keras_nii.{module}"), name)
    except (ImportError, AttributeError) as err:
        raise Unavailable("missing", f"keras_nii.{module}.{name} not found ({err})") from err


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


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- #
# the context shared by the operations
# --------------------------------------------------------------------------- #


class Context:
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
        self.cores = cpu_count()
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
            torch = try_import("torch")
            torch.set_num_threads(os.cpu_count() or 1)
            self._torch = torch
        return self._torch

    def monai(self) -> Any:
        """``monai.transforms``, with metadata tracking off (plain tensors: its fastest mode)."""
        self.torch()
        data = try_import("monai.data")
        data.set_track_meta(False)
        return try_import("monai.transforms")

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
        except Unavailable as err:
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

    def add_torch(
        self,
        operation: str,
        variant: str,
        library: str,
        fn: Callable[[], Callable[[], Any]],
        *,
        runtime_suffix: str = "",
        **options: Any,
    ) -> Row:
        """A row for a peer that runs on torch (on the GPU when torch sees one);
        ``options`` are :meth:`add`'s."""
        runtime = lazy(lambda: f"{self.torch_runtime()}{runtime_suffix}")
        threads = lazy(self.torch_threads)
        return self.add(operation, variant, library, runtime, threads, fn, **options)

    def add_torchio(
        self,
        operation: str,
        variant: str,
        fn: Callable[[], Callable[[], Any]],
        *,
        resamples: bool = False,
        **options: Any,
    ) -> Row:
        """A TorchIO row: CPU torch, and SimpleITK's threads too where it ``resamples``;
        ``options`` are :meth:`add`'s."""
        if resamples:
            runtime = "torch+SimpleITK"
            threads = lazy(lambda: f"{self.torch_threads()}/{self.itk_threads()}")
        else:
            runtime, threads = "torch", lazy(self.torch_threads)
        return self.add(operation, variant, "TorchIO", runtime, threads, fn, **options)

    def torchio_subjects(self, tio: Any, masks: bool = True, unit: bool = False) -> list[Any]:
        """The batch as TorchIO subjects (an ``image`` and, with ``masks``, a ``label``)."""
        vols, mvols = self.torch_volumes(unit=unit, device="cpu")  # TorchIO works on the CPU
        out = []
        for v, m in zip(vols, mvols, strict=True):
            entries = {"image": tio.ScalarImage(tensor=v)}
            if masks:
                entries["label"] = tio.LabelMap(tensor=m)
            out.append(tio.Subject(**entries))
        return out

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
    return JaxRunner(fn, layers, inputs)


class JaxRunner:
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


def _copy_fn(ctx: Context) -> tuple[Callable[[Any], Any], list[Any]]:
    ops = ctx.keras.ops
    zero = ops.convert_to_tensor(np.float32(0.0))

    def copy(x: Any) -> Any:
        # a run-time scalar: XLA cannot fold ``x + s`` into the input buffer
        return x + zero

    return copy, []


# --------------------------------------------------------------------------- #
# building blocks of the operations
# --------------------------------------------------------------------------- #


def keras_nii_layers(module: str, *names: str) -> list[Any]:
    return [keras_nii_attr(f"layers.{module}", name) for name in names]


def apply_layers(layers: list[Any]) -> Callable[[Any], Any]:
    def fn(x: Any) -> Any:
        for layer in layers:
            x = layer(x, training=True)
        return x

    return fn


def bench_copy(ctx: Context, operation: str) -> None:
    images, _ = ctx.data()
    ctx.keras_rows(
        operation,
        "copy",
        lambda: _copy_fn(ctx),
        lambda: ctx.tensors(images),
        graph_row=False,
        note="x + s (s = 0 at run time): one read + one write of the batch",
    )


def _copy_target(rows: list[Row], target: Target, operation: str, variant: str) -> None:
    """keras-nii's ``variant`` row of ``operation`` within 3x of its ``copy`` row."""
    layer = find_row(rows, operation, variant, "keras-nii")
    copy = find_row(rows, operation, "copy", "keras-nii")
    if layer and copy:
        target(
            f"{operation} vs copy",
            "keras-nii / copy <= 3",
            layer["ms_per_volume"] / copy["ms_per_volume"],
            3.0,
        )


class lazy(str):  # noqa: N801 - used like a function
    """A thread count computed when the row is made (after the peer imported)."""

    def __new__(cls, fn: Callable[[], str]) -> lazy:
        try:
            value = fn()
        except Exception:
            value = "-"
        return super().__new__(cls, value)


# --------------------------------------------------------------------------- #
# the public API
# --------------------------------------------------------------------------- #


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_only(only: Iterable[str] | None) -> list[str]:
    names = operation_names()
    if only is None:
        return list(names)
    if isinstance(only, str):
        only = [only]
    only = list(only)
    unknown = [name for name in only if name not in names]
    if unknown:
        raise ValueError(f"unknown operation(s) {unknown}; choose from {list(names)}")
    if not only:
        raise ValueError(f"only must name at least one of {list(names)}")
    return [name for name in names if name in only]


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
        only: operation names from :func:`operation_names` (default: all).
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
    ctx = Context(size, batch, repeats, log or (lambda line: None))
    registry = operations()
    for name in names:
        if registry[name].copy_floor is not None:
            bench_copy(ctx, name)
        registry[name].run(ctx)
    fill_ratios(ctx.rows)
    return ctx.rows


def fill_ratios(rows: list[Row]) -> None:
    for operation in {row["operation"] for row in rows}:
        group = [row for row in rows if row["operation"] == operation]
        ref = next((r for r in group if r["reference"] and r["status"] == "ok"), None)
        if ref is None:
            continue
        for row in group:
            if row["status"] == "ok" and ref["ms_per_volume"]:
                row["ratio"] = row["ms_per_volume"] / ref["ms_per_volume"]


def find_row(
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

    for op in operations().values():
        if op.copy_floor is not None:
            _copy_target(rows, target, op.name, op.copy_floor)
        if op.targets is not None:
            op.targets(rows, target)
    gpus = (machine or {}).get("gpus") or []
    if gpus:
        for (name, variant), limit in GPU_TARGETS.items():
            layer = find_row(rows, name, variant, "keras-nii")
            if layer:
                target(
                    f"{name} {variant} on {gpus[0]}",
                    f"keras-nii >= {limit:,.0f} volumes/s (set for an H200)",
                    layer["volumes_per_s"],
                    limit,
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
        "usable_cores": cpu_count(),
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
    names = operation_names()
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
        choices=names,
        default=None,
        help=f"operations to run, among {', '.join(names)} (default: all)",
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
                if os.environ.get(CHILD_ENV):
                    parser.error(
                        f"Keras runs with the {current!r} backend and could not be switched to "
                        f"{args.backend!r}"
                    )
                # Keras picks its backend once, at import: run again in a fresh process
                env = dict(os.environ, KERAS_BACKEND=args.backend, **{CHILD_ENV: "1"})
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
        "only": args.only or list(operation_names()),
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
