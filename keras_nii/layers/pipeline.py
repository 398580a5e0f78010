"""Pipeline3D: a chain of layers where consecutive spatial layers resample once.

Every interpolation blurs and costs a pass over the volume. Run one after the
other, a flip, a random affine and an elastic deformation interpolate the
image twice (the flip is exact) and the mask's staircase twice.
:class:`Pipeline3D` runs the same layers with the same draws, but expresses
each spatial layer's draw as a map from output to input coordinates
(:mod:`keras_nii.ops.compose`), composes the maps of every run of
consecutive spatial layers and samples the run's input once at the composed
coordinates: trilinear for images, nearest-neighbour for masks, at the same
coordinates for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from keras_nii.layers.base import IMAGES, MASKS, VolumeLayer, register
from keras_nii.ops.compose import compose, sample
from keras_nii.ops.xla import call_compiled, tensorflow_graph_on_cpu

__all__ = ["Pipeline3D"]


def _spatial(layer: Any) -> bool:
    """A keras-nii layer whose draw is a coordinate map."""
    return (
        isinstance(layer, VolumeLayer)
        and layer.SPATIAL
        and callable(getattr(layer, "coordinate_map", None))
    )


def _voxelwise(layer: Any) -> bool:
    """A keras-nii layer whose output at a voxel depends on that voxel's value alone."""
    return isinstance(layer, VolumeLayer) and bool(getattr(layer, "VOXELWISE", False))


def _draws_from_data(layer: Any, keys: Sequence[str]) -> bool:
    check = getattr(layer, "draws_from_data", None)
    return bool(check(keys)) if callable(check) else False


@register
class Pipeline3D(keras.layers.Layer):
    """Applies layers one after the other, fusing consecutive spatial layers.

    A drop-in for ``keras.layers.Pipeline`` over keras-nii layers (any other
    Keras layer runs as is, between them). Each layer draws exactly what it
    draws alone, from its own seed, so ``Pipeline3D(layers)`` and
    ``keras.layers.Pipeline(layers)`` differ only by interpolation: every run
    of two or more consecutive spatial layers (:class:`RandomFlip3D`,
    :class:`RandomRotation90_3D`, :class:`RandomAffine3D` and its
    specializations, :class:`RandomElasticDeformation3D`, the crops and
    :class:`Resize3D`) is composed into one map from output to input voxels,
    and the run's input is sampled once there:

    - flips, 90-degree rotations and crops are exact index maps; a run made
      of them only stays exact (a gather, no interpolation);
    - affine maps compose by matrix product; an elastic field is evaluated
      (trilinearly: it is a smooth B-spline) where the maps after it send
      the output grid;
    - images are sampled trilinearly when any non-exact layer of the run
      asks for ``interpolation="linear"`` (nearest-neighbour otherwise),
      masks always nearest-neighbour, at the same coordinates;
    - each layer's edge handling (``fill_mode``, ``fill_value``) is applied
      at its own place in the run, as when it runs alone.

    Voxel-wise intensity layers (:class:`RandomIntensityShift`,
    :class:`RandomIntensityScale`, :class:`RandomGaussianNoise`: the output
    at a voxel depends on that voxel's value and per-sample draws only) do not
    break a run: one that sits between spatial layers is applied after the
    run's resampling, on the run's output grid (so noise is not smoothed by
    the interpolations after it, and a constant fill value gets shifted or
    scaled with the rest of the volume). The other layers end a run and
    start the next: the blur and the bias field (they depend on position: a
    blur or a field moved across a zoom or a crop would change its width),
    gamma, contrast and the normalizations (they read statistics of the
    whole volume, which a crop or a fill changes), any layer that is not
    keras-nii's, and a :class:`RandomCrop3D` whose draw reads the mask
    (``foreground_probability > 0``), which needs the mask of its own input.
    Place them before or after the spatial layers to keep one resampling.

    With ``training=False`` the random layers are left out (they are the
    identity at inference) and the deterministic ones (crop or pad, resize)
    still fuse. Under TensorFlow in a graph on a CPU without XLA (``fit``
    without a GPU, a ``tf.data`` map) each fused run is compiled with XLA, as
    the layers compile themselves.

    Args:
        layers: the layers, in the order they apply.
        seed: an int that seeds the random keras-nii layers given no seed of
            their own (layer ``i`` of ``layers`` gets ``seed + i``), so that
            one number makes the whole pipeline reproducible; layers with a
            seed keep it.
        **kwargs: base layer keyword arguments (``name``...).

    Input shape:
        what the layers take: for keras-nii layers, ``(batch, x, y, z, c)``
        or ``(x, y, z, c)``, or a dict with the keys ``"images"`` and
        ``"segmentation_masks"``.

    Output shape:
        what the last layer returns.

    Example:

    ```python
    from keras_nii import layers

    augment = layers.Pipeline3D(
        [
            layers.RandomFlip3D(axes=(0, 1, 2)),
            layers.RandomAffine3D(degrees=15, scales=0.1),
            layers.RandomElasticDeformation3D(max_displacement=4),
            layers.RandomGaussianNoise(std=(0, 0.05)),
        ],
        seed=0,
    )
    out = augment({"images": images, "segmentation_masks": masks})
    ```
    """

    def __init__(self, layers: Sequence[keras.layers.Layer], seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(layers, (list, tuple)) or not all(
            isinstance(layer, keras.layers.Layer) for layer in layers
        ):
            raise ValueError(f"layers must be a list of Keras layers, got {layers!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        if seed is not None:
            for index, layer in enumerate(layers):
                if isinstance(layer, VolumeLayer) and layer.RANDOM and layer.seed is None:
                    _reseed(layer, seed + index)
        self._pipeline_layers = list(layers)
        # as keras.layers.Pipeline: stay tf.data compatible (no conversion of inputs)
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True

    @property
    def layers(self) -> list:
        return self._pipeline_layers

    # -- planning ------------------------------------------------------------------

    def _plan(
        self, active: Sequence[int], keys: Sequence[str], training: bool = True
    ) -> list[tuple[int, ...]]:
        """The ``active`` positions of ``self.layers`` grouped: fused runs, and single layers.

        At inference a random layer that changes the shape (``RandomCrop3D``:
        its central window) runs on its own.
        """
        groups: list[tuple[int, ...]] = []
        run: list[int] = []

        def flush() -> None:
            if sum(_spatial(self._pipeline_layers[i]) for i in run) >= 2:
                groups.append(tuple(run))
            else:
                groups.extend((i,) for i in run)
            run.clear()

        for index in active:
            layer = self._pipeline_layers[index]
            same_format = not run or self._pipeline_layers[run[0]].data_format == getattr(
                layer, "data_format", None
            )
            if not training and getattr(layer, "CHANGES_SHAPE", False):
                flush()
                groups.append((index,))
            elif _spatial(layer):
                if _draws_from_data(layer, keys) or not same_format:
                    flush()
                run.append(index)
            elif _voxelwise(layer) and run and same_format:
                run.append(index)
            else:
                flush()
                groups.append((index,))
        flush()
        return groups

    # -- calling -------------------------------------------------------------------

    def _called_on_its_own(self) -> bool:
        try:
            return self._get_call_context().entry_layer is self
        except AttributeError:  # pragma: no cover - a Keras without call contexts
            return True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if training is None:
            # as the keras-nii layers: set by fit / predict when they call;
            # called on its own the pipeline augments, inside a model it does not
            training = self._called_on_its_own()
        training = bool(training)
        active = [
            index
            for index, layer in enumerate(self._pipeline_layers)
            if training
            or not (isinstance(layer, VolumeLayer) and layer.RANDOM)
            or layer.CHANGES_SHAPE
        ]
        keys = tuple(inputs) if isinstance(inputs, dict) else (IMAGES,)
        outputs = inputs
        for group in self._plan(active, keys, training):
            if len(group) > 1:
                outputs = self._call_fused(outputs, group)
                continue
            layer = self._pipeline_layers[group[0]]
            if layer._call_has_training_arg:
                outputs = layer(outputs, training=training)
            else:
                outputs = layer(outputs)
        return outputs

    def _call_fused(self, inputs: Any, group: tuple[int, ...]) -> Any:
        lead = self._pipeline_layers[group[0]]
        data, was_dict = lead._split(inputs)
        data = {
            key: value if hasattr(value, "shape") else ops.convert_to_tensor(value)
            for key, value in data.items()
        }
        ranks = lead._check_inputs(data)
        if IMAGES in data:
            data[IMAGES] = lead._prepare_images(data[IMAGES])
        else:
            data[MASKS] = ops.convert_to_tensor(data[MASKS])
        canonical = {key: lead._to_canonical(value, ranks[key]) for key, value in data.items()}
        if tensorflow_graph_on_cpu() and all(self._pipeline_layers[i].supports_jit for i in group):
            # as the layers do alone: 6-8x faster than plain graph ops on a CPU
            # (within the compile table's bound)
            out = call_compiled(self, "_run", canonical, group)
        else:
            out = self._run(canonical, group)
        out = {key: lead._from_canonical(value, ranks[key]) for key, value in out.items()}
        return out if was_dict else out[IMAGES]

    def _run(self, canonical: dict, group: tuple[int, ...]) -> dict:
        """One fused run on canonical data: the draws, one resampling, the voxel-wise layers."""
        reference = canonical.get(IMAGES, canonical.get(MASKS))
        shape = ops.shape(reference)
        batch, spatial = shape[0], tuple(shape[1:4])
        maps, after = [], []
        for index in group:
            layer = self._pipeline_layers[index]
            if not _spatial(layer):
                after.append(layer)
                continue
            if not maps and _draws_from_data(layer, tuple(canonical)):
                transformation = layer.draw_transformation(canonical)
            else:
                transformation = layer.get_random_transformation(batch, spatial)
            maps.append(layer.coordinate_map(transformation, spatial, batch))
            spatial = tuple(layer.compute_spatial_output_shape(spatial))
        composed = compose(maps)
        out = {}
        if IMAGES in canonical:
            out[IMAGES] = sample(canonical[IMAGES], composed)
        if MASKS in canonical:
            out[MASKS] = sample(canonical[MASKS], composed, mask=True)
        for layer in after:
            out = layer._transform(out)
        return out

    # -- shapes, building, config ----------------------------------------------------

    def build(self, input_shape: Any) -> None:
        self.built = True

    def compute_output_shape(self, input_shape: Any) -> Any:
        for layer in self._pipeline_layers:
            input_shape = layer.compute_output_shape(input_shape)
        return input_shape

    def compute_output_spec(self, inputs: Any, training: bool | None = None) -> Any:
        spec = inputs
        for layer in self._pipeline_layers:
            if isinstance(layer, VolumeLayer):
                if layer.RANDOM and not layer.CHANGES_SHAPE and training is False:
                    continue
                spec = layer.compute_output_spec(spec)
                continue
            if not layer.built:
                shapes = keras.tree.map_structure(lambda t: tuple(t.shape), spec)
                layer.build(shapes)
            spec = layer.compute_output_spec(spec)
        return spec

    # Keras saves no SeedGenerator state (a layer reloaded from a .keras file
    # draws from its seed again, its first draw): the pipeline saves the
    # streams of its layers, so that a reloaded pipeline draws what the saved
    # one would have drawn next.

    def _generators(self) -> dict:
        return {
            f"seed_state_{index}": layer.generator
            for index, layer in enumerate(self._pipeline_layers)
            if isinstance(getattr(layer, "generator", None), keras.random.SeedGenerator)
        }

    def save_own_variables(self, store: Any) -> None:
        super().save_own_variables(store)
        for key, generator in self._generators().items():
            store[key] = keras.ops.convert_to_numpy(generator.state)

    def load_own_variables(self, store: Any) -> None:
        keys = set(store.keys())
        for key, generator in self._generators().items():
            if key in keys:
                state = generator.state
                state.assign(ops.convert_to_tensor(store[key], dtype=state.dtype))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "layers": keras.saving.serialize_keras_object(self._pipeline_layers),
                "seed": self.seed,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict) -> Pipeline3D:
        layers = config.get("layers")
        if not isinstance(layers, (list, tuple)):
            raise ValueError(
                f"Pipeline3D config must hold a list of serialized layers under 'layers', "
                f"got {layers!r}"
            )
        config = dict(config)
        config["layers"] = [keras.saving.deserialize_keras_object(layer) for layer in layers]
        return cls(**config)


def _reseed(layer: VolumeLayer, seed: int) -> None:
    """Give a layer created without a seed the stream ``seed`` would have given it."""
    layer.seed = seed
    state = layer.generator.state
    state.assign(ops.convert_to_tensor([seed, 0], dtype=state.dtype))
