"""On-device paired augmentation during ``fit``.

Spatial augmentation at the front of a model cannot see the labels, yet a
segmentation mask has to be warped with its image. :class:`AugmentedModel`
wraps a model and an augmentation (a keras-nii layer or a
``keras.layers.Pipeline`` / ``keras.Sequential`` of them): its training step
runs the augmentation on ``{"images": x, "segmentation_masks": y}`` inside the
compiled step, on the device, then trains the wrapped model on the result.
Everything else (``predict``, ``evaluate``, ``save``, ``export``) is the wrapped
model's, untouched by augmentation.

Backends: the TensorFlow and PyTorch training steps augment and then call the
standard Keras step; the JAX step runs the augmentation statelessly (its seed
state is part of the step's non-trainable state), so it works under ``jax.jit``
and keeps its random stream advancing. ``jit_compile=True`` and
``tf.distribute`` strategies work under TensorFlow (each replica augments its
own shard).
"""

from __future__ import annotations

import copy
from typing import Any

import keras

from keras_nii.layers.base import IMAGES, MASKS
from keras_nii.ops.xla import call_compiled, tensorflow_graph_on_cpu

__all__ = ["AugmentedModel"]


@keras.saving.register_keras_serializable(package="keras_nii")
class AugmentedModel(keras.Model):
    """A model whose training step augments image and mask together.

    Args:
        model: the ``keras.Model`` to train. Inference, evaluation, saving and
            export use it alone.
        augmentation: a layer (or ``keras.layers.Pipeline`` /
            ``keras.Sequential`` of layers) that takes
            ``{"images": x, "segmentation_masks": y}`` and returns the same
            dict, applying one random draw per sample to both (the keras-nii
            layers do). When the targets ``y`` are not volumes of the same
            rank as ``x`` (classification, regression) only the images are
            augmented.

    Example:

    ```python
    import keras
    import keras_nii
    from keras_nii import layers

    net = keras.Sequential([...])           # a 3D segmentation network, normalization first
    augment = keras.layers.Pipeline([        # spatial: image and mask together
        layers.RandomFlip3D(seed=1),
        layers.RandomAffine3D(degrees=15, scales=0.1, seed=2),
    ])
    model = keras_nii.AugmentedModel(net, augment)
    model.compile("adam", "binary_crossentropy")  # jit_compile="auto": XLA on GPU only
    model.fit(keras_nii.NiftiDataset(images, labels, shape=(64, 64, 64)))
    net.export("exported", verbose=False)   # no augmentation in the export

    Intensity augmentation (noise, gamma) belongs after the normalization:
    inside ``net``, behind its normalization layer, where a random layer is
    active during ``fit`` only.
    ```
    """

    def __init__(self, model: keras.Model, augmentation: keras.layers.Layer, **kwargs: Any):
        super().__init__(**kwargs)
        if not isinstance(model, keras.layers.Layer):
            raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
        if not isinstance(augmentation, keras.layers.Layer):
            raise ValueError(
                f"augmentation must be a keras layer or Pipeline, got {type(augmentation).__name__}"
            )
        self.model = model
        self.augmentation = augmentation

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        return self.model(inputs, training=training)

    def build(self, input_shape: Any) -> None:
        if not self.model.built:
            self.model.build(input_shape)
        self._build_augmentation(input_shape)
        self.built = True

    def _build_augmentation(self, input_shape: Any) -> None:
        """Build the augmentation now, by a symbolic call, not in the training step.

        Keras builds a Pipeline on its first call by tracing it symbolically.
        Inside the JAX training step that trace fails (the trainer has moved
        the variables' values into the step's state, and the nested trace sees
        none), and Keras warns that the layer "looks like it has unbuilt state".
        Built here, before the step, the first call finds it built.
        """
        if self.augmentation.built:
            return
        try:
            shape = tuple(input_shape)
            if len(shape) in (4, 5) and all(s is None or isinstance(s, int) for s in shape):
                self.augmentation(keras.KerasTensor(shape, dtype=self.compute_dtype), training=True)
        except Exception:  # noqa: BLE001 - an augmentation that needs masks builds at first use
            pass

    def _check_pair(self, x: Any, y: Any, ignore: bool = False) -> bool:
        """A ValueError naming both shapes when ``y``'s voxels cannot be ``x``'s.

        Images and masks must agree in batch and spatial sizes (the channels
        may differ); the channel axis is the augmentation's ``data_format``.
        With ``ignore``, whether they differ, instead of the error.
        """
        formats = [
            getattr(layer, "data_format", None) for layer in self.augmentation._flatten_layers()
        ]
        data_format = next((f for f in formats if f), keras.backend.image_data_format())
        rank = len(x.shape)
        channel = rank - 4 if data_format == "channels_first" else rank - 1
        sizes = zip(tuple(x.shape), tuple(y.shape), strict=True)
        pairs = [(a, b) for axis, (a, b) in enumerate(sizes) if axis != channel]
        differ = any(a is not None and b is not None and a != b for a, b in pairs)
        if differ and not ignore:
            raise ValueError(
                "AugmentedModel: the images x and the segmentation masks y of a batch must "
                f"have the same batch and spatial sizes; got x of shape {tuple(x.shape)} and "
                f"y of shape {tuple(y.shape)}"
            )
        return differ

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Any:
        """Keras's loss, after the pair check of the step for a network whose output has
        its input's size (under JAX, Keras computes the loss symbolically before the first
        step, where unaligned masks failed with a broadcasting error)."""
        shapes = [getattr(t, "shape", None) for t in (x, y, y_pred)]
        same_rank = all(shape is not None and len(shape) == len(shapes[0]) for shape in shapes)
        if same_rank and not self._check_pair(x, y_pred, ignore=True):
            self._check_pair(x, y)
        return super().compute_loss(x, y, y_pred, sample_weight, training)

    def augment(self, x: Any, y: Any = None) -> tuple[Any, Any]:
        """Apply the augmentation to a batch, as the training step does."""
        if y is not None and len(getattr(y, "shape", ())) == len(x.shape):
            self._check_pair(x, y)
            out = self.augmentation({IMAGES: x, MASKS: y}, training=True)
            return out[IMAGES], out[MASKS]
        return self.augmentation(x, training=True), y

    if keras.backend.backend() == "jax":

        def train_step(self, state: Any, data: Any) -> Any:
            trainable, non_trainable, optimizer_vars, metrics_vars = state
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            mapping = list(zip(self.non_trainable_variables, non_trainable, strict=True))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                x, y = self.augment(x, y)
            non_trainable = [
                scope.get_current_value(variable) for variable in self.non_trainable_variables
            ]
            state = (trainable, non_trainable, optimizer_vars, metrics_vars)
            return super().train_step(state, (x, y, sample_weight))

    else:

        def train_step(self, data: Any) -> Any:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            x, y = self._step_augment(x, y)
            return super().train_step((x, y, sample_weight))

    def _step_augment(self, x: Any, y: Any) -> tuple[Any, Any]:
        """:meth:`augment`, compiled with XLA when TensorFlow's step is not.

        Keras trains without XLA on a TensorFlow machine without a GPU (its
        ``jit_compile="auto"``), where the resampling layers are several
        times slower as plain graph ops (random affine on 128^3: 87 against
        13 ms per volume). The augmentation alone is then compiled with XLA
        inside the step (one XLA cluster for the whole chain); its seed
        variables advance as before. Not under a ``tf.distribute`` strategy
        (Keras leaves XLA out there too), not in an eager step, nor for an
        augmentation with a layer that does not support XLA; and within the
        bound of :func:`keras_nii.ops.xla.call_compiled`'s table.
        """
        if (
            self.jit_compile
            or not tensorflow_graph_on_cpu()
            or not all(layer.supports_jit for layer in self.augmentation._flatten_layers())
        ):
            return self.augment(x, y)
        return call_compiled(self, "augment", x, y)

    # saving and export are the wrapped model's: augmentation is for training only

    def save(self, filepath: Any, *args: Any, **kwargs: Any) -> Any:
        """Save the wrapped model (without the augmentation)."""
        return self.model.save(filepath, *args, **kwargs)

    def export(self, filepath: Any, *args: Any, **kwargs: Any) -> Any:
        """Export the wrapped model (without the augmentation)."""
        return self.model.export(filepath, *args, **kwargs)

    def get_config(self) -> dict:
        config = super().get_config()
        config["model"] = keras.saving.serialize_keras_object(self.model)
        config["augmentation"] = keras.saving.serialize_keras_object(self.augmentation)
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects: Any = None) -> AugmentedModel:
        # deep copy: deserializing a Functional model empties its config dict in
        # place, which would break the caller's config for a second use
        config = copy.deepcopy(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"), custom_objects)
        augmentation = keras.saving.deserialize_keras_object(
            config.pop("augmentation"), custom_objects
        )
        return cls(model, augmentation, **config)
