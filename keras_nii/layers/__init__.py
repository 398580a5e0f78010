"""3D preprocessing and augmentation layers that run inside the model graph."""

from keras_nii.layers.affine import (
    RandomAffine3D,
    RandomRotation3D,
    RandomTranslation3D,
    RandomZoom3D,
)
from keras_nii.layers.base import VolumeLayer
from keras_nii.layers.crop import CenterCropOrPad3D, RandomCrop3D, Resize3D
from keras_nii.layers.elastic import RandomElasticDeformation3D
from keras_nii.layers.flip import RandomFlip3D, RandomRotation90_3D
from keras_nii.layers.intensity import (
    RandomBiasField,
    RandomContrast3D,
    RandomGamma,
    RandomGaussianBlur3D,
    RandomGaussianNoise,
    RandomIntensityScale,
    RandomIntensityShift,
)
from keras_nii.layers.normalization import (
    IntensityWindow,
    MinMaxNormalization,
    ZScoreNormalization,
)
from keras_nii.layers.pipeline import Pipeline3D

__all__ = [
    "VolumeLayer",
    "CenterCropOrPad3D",
    "Resize3D",
    "RandomCrop3D",
    "ZScoreNormalization",
    "MinMaxNormalization",
    "IntensityWindow",
    "RandomElasticDeformation3D",
    "RandomBiasField",
    "RandomContrast3D",
    "RandomGamma",
    "RandomGaussianBlur3D",
    "RandomGaussianNoise",
    "RandomIntensityScale",
    "RandomIntensityShift",
    "RandomFlip3D",
    "RandomRotation90_3D",
    "RandomAffine3D",
    "RandomRotation3D",
    "RandomZoom3D",
    "RandomTranslation3D",
    "Pipeline3D",
]
