"""Defaults that the ``keras-nii`` command shows in its help, without importing what runs them."""

#: The defaults of ``keras-nii demo`` (:func:`keras_nii.demo.run_demo`),
#: tuned to reach its Dice targets in about 4 minutes on 2 CPU cores.
DEMO = {
    "out": "keras-nii-demo",
    "seed": 0,
    "epochs": 16,
    "cases": 12,  # training subjects
    "validation": 2,
    "heldout": 3,
    "in_plane": (160, 260),
    "slices": (60, 150),
    "coarsen": 3.0,  # train at this multiple of the plan's target spacing
    "patch_size": (48, 48, 16),
    "window": (96, 96, 32),  # sliding window of the whole-scan predictions
    "patches_per_volume": 4,
    "label_probabilities": {0: 0.2, 1: 0.4, 2: 0.4},
    "batch_size": 2,
    "filters": 8,
    "levels": 2,
    "learning_rate": 5e-3,
    "validate_every": 4,
}

#: ``keras-nii demo --quick``: a sub-minute first look (fewer, smaller scans, 4 short epochs).
DEMO_QUICK = {
    **DEMO,
    "epochs": 4,
    "cases": 4,
    "validation": 1,
    "heldout": 1,
    "in_plane": (96, 112),
    "slices": (40, 50),
    "coarsen": 4.0,
    "patch_size": (32, 32, 8),
    "window": (64, 64, 16),
    "patches_per_volume": 4,
    "validate_every": 4,
}
