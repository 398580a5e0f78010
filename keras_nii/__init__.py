"""keras-nii: train and ship Keras models on NIfTI medical volumes."""

# importing the package registers the layers and the Dice loss, so .keras files load
from keras_nii import layers, models
from keras_nii.data import NiftiDataset
from keras_nii.inference import predict_nifti
from keras_nii.io import NiftiError, Volume, load_nifti, save_nifti
from keras_nii.training import AugmentedModel

__version__ = "0.1.0"

__all__ = [
    "layers",
    "models",
    "AugmentedModel",
    "NiftiDataset",
    "predict_nifti",
    "NiftiError",
    "Volume",
    "load_nifti",
    "save_nifti",
    "__version__",
]
