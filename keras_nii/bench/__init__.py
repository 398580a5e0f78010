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
``elastic``, ``intensity``, ``pipeline``, ``read``, ``feed`` (one epoch through the
PyDataset's worker processes and through its Grain loader), ``train``; see
``OPERATIONS``, one module of this package each. ``pipeline`` is the usual chain, flip ->
random affine -> elastic -> Gaussian noise on image + mask: keras-nii's ``Pipeline3D``
(one resampling) and the same layers one after the other, each as one compiled
function, against MONAI ``Compose`` (with and without ``lazy=True``) and TorchIO
``Compose``.
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

Adding an operation
-------------------
A new operation is one new module, ``keras_nii/bench/<name>.py``: a function
decorated with :func:`keras_nii.bench.core.operation` (its name, its place in
the run order, and optionally its targets) that adds keras-nii's rows and its
peers' rows to the :class:`~keras_nii.bench.core.Context` it is given
(``ctx.keras_rows`` for a compiled keras-nii function, ``ctx.add`` for any
other callable). The runner imports every module of the package, so nothing
else has to change; :mod:`keras_nii.bench.core` holds the registry, the timing,
the rows, the targets, the table and the command.
"""

from keras_nii.bench.core import (
    BACKENDS,
    GPU_TARGETS,
    build_parser,
    check_targets,
    format_table,
    machine_info,
    main,
    operation_names,
    run_benchmarks,
)

#: the operations, in the order they run and print (one module of this package each)
OPERATIONS = operation_names()

__all__ = [
    "OPERATIONS",
    "BACKENDS",
    "GPU_TARGETS",
    "build_parser",
    "check_targets",
    "format_table",
    "machine_info",
    "main",
    "run_benchmarks",
]
