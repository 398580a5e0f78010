"""Defaults that the ``keras-nii`` command shows in its help, without importing what runs them."""

#: The defaults of ``keras-nii demo`` (:func:`keras_nii.demo.run_demo`),
#: tuned to learn in a few minutes on 2 CPU cores.
DEMO = {
    "out": "keras-nii-demo",
    "epochs": 20,
    "cases": 32,
    "size": 32,
    "seed": 0,
    "batch_size": 2,
    "filters": 8,
    "learning_rate": 1e-2,
}
