"""3D preprocessing and augmentation layers that run inside the model graph."""

from keras_nii.layers.affine import (
    RandomAffine3D,
    RandomRotation3D,
    RandomTranslation3D,
    RandomZoom3D,
)
from keras_nii.layers.base import VolumeLayer
from keras_nii.layers.flip import RandomFlip3D, RandomRotation90_3D

__all__ = [
    "VolumeLayer",
    "RandomFlip3D",
    "RandomRotation90_3D",
    "RandomAffine3D",
    "RandomRotation3D",
    "RandomZoom3D",
    "RandomTranslation3D",
]
