"""``python -m keras_nii``: the ``keras-nii`` command."""

import sys

from keras_nii.cli import main

if __name__ == "__main__":
    sys.exit(main())
