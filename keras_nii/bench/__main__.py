"""``python -m keras_nii.bench``: the ``keras-nii bench`` command."""

from keras_nii.bench.core import main

if __name__ == "__main__":
    raise SystemExit(main())
