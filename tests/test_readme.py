"""The README's Python blocks run as written, on phantoms, so the docs cannot drift.

Every fenced block opened with ```` ```python ```` in README.md is executed, in
order, in one namespace (a later block may use what an earlier one defined),
with the working directory a folder of synthetic files named as the README
names them (see ``readme_folder``). Only the number of epochs is changed:
``keras.Model.fit`` runs one epoch, whatever ``epochs=`` says.

A block that cannot run here (it needs a cluster, a bucket, an optional
package or hours of training) is preceded by a line
``<!-- readme-test: skip REASON -->`` (the last non-blank line before the
fence); it is reported as skipped with its reason. Blocks of other languages
(```` ```bash ````, plain ```` ``` ````) are not run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = "<!-- readme-test: skip"

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def readme_blocks(text: str) -> list[dict]:
    """The python blocks of a Markdown text: code, first line, heading, skip reason."""
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()]
        line = before.count("\n") + 1
        previous = next((ln.strip() for ln in reversed(before.splitlines()) if ln.strip()), "")
        heading, fenced = "", False
        for text_line in before.splitlines():  # the last heading outside code blocks
            if text_line.startswith("```"):
                fenced = not fenced
            elif not fenced and re.match(r"#+ ", text_line):
                heading = text_line.lstrip("#").strip()
        skip = None
        if previous.startswith(SKIP):
            skip = previous[len(SKIP) :].rstrip("->").strip() or "marked skip"
        blocks.append({"code": match.group(1), "line": line, "heading": heading, "skip": skip})
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_extraction():
    text = (
        "# A\n```python\nx = 1\n```\n\n<!-- readme-test: skip needs a GPU -->\n"
        "```python\ny = 2\n```\n```bash\n# not a heading\n```\n## B\n```python\nz = x\n```\n"
    )
    blocks = readme_blocks(text)
    assert [b["code"] for b in blocks] == ["x = 1\n", "y = 2\n", "z = x\n"]
    assert [b["skip"] for b in blocks] == [None, "needs a GPU", None]
    assert [b["line"] for b in blocks] == [2, 7, 14]
    assert [b["heading"] for b in blocks] == ["A", "A", "B"]
    # the tour of the README is run, not skipped
    run = {b["heading"] for b in BLOCKS if b["skip"] is None}
    for heading in (
        "Reading and writing with exact geometry",
        "Feeding `model.fit`",
        "Layers in the model graph",
        "Segmentation: image and mask augmented together",
        "Predicting on scans",
    ):
        assert heading in run, heading


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    from keras_nii.io import save_nifti

    path.parent.mkdir(parents=True, exist_ok=True)
    save_nifti(array, path, affine=affine)


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory):
    """The files the README's blocks name, as small phantoms (16^3-24^3 voxels)."""
    from keras_nii.phantoms import make_dataset, make_phantom

    folder = tmp_path_factory.mktemp("readme")
    for i, subject in enumerate(("sub-01", "sub-02")):
        image, label, affine = make_phantom((24, 24, 24), seed=i, orientation="LPS")
        _write(folder / f"{subject}_T1w.nii.gz", image, affine)
        _write(folder / f"{subject}_FLAIR.nii.gz", np.sqrt(image), affine)
        _write(folder / f"{subject}_mask.nii.gz", label.astype(np.uint8), affine)
        # the same subjects in BIDS and nnU-Net layouts
        _write(folder / "rawdata" / f"{subject}_T1w.nii.gz", image, affine)
        _write(folder / "derivatives" / f"{subject}_desc-lesion_mask.nii.gz", label, affine)
        _write(folder / "imagesTr" / f"case_{i:05d}_0000.nii.gz", image, affine)
        _write(folder / "labelsTr" / f"case_{i:05d}.nii.gz", label, affine)
    image, _, affine = make_phantom((20, 16, 12), seed=5, orientation="PSR")
    _write(folder / "scan.nii.gz", image, affine)
    make_dataset(folder, 2, shape=(16, 16, 16), seed=0)  # images/, labels/
    make_dataset(folder / "val", 1, shape=(16, 16, 16), seed=1)
    return folder


@pytest.fixture(scope="module")
def namespace(readme_folder):
    import keras

    original_fit = keras.Model.fit

    def one_epoch(self, *args, **kwargs):
        kwargs["epochs"] = 1
        return original_fit(self, *args, **kwargs)

    cwd = os.getcwd()
    os.chdir(readme_folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keras.Model, "fit", one_epoch)
        keras.utils.set_random_seed(0)
        yield {"__name__": "readme"}
    os.chdir(cwd)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b['line']}" for b in BLOCKS])
def test_readme_block_runs(block, namespace):
    if block["skip"] is not None:
        pytest.skip(f"README.md:{block['line']} ({block['heading']}): {block['skip']}")
    code = compile(block["code"], f"README.md:{block['line']}", "exec")
    try:
        exec(code, namespace)
    except Exception as err:
        raise AssertionError(
            f"README.md line {block['line']} (section {block['heading']!r}) failed: "
            f"{type(err).__name__}: {err}"
        ) from err
