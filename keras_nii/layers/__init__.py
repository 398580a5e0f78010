"""3D preprocessing and augmentation layers that run inside the model graph."""

from keras_nii.layers.base import VolumeLayer

__all__ = ["VolumeLayer"]
