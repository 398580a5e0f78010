"""Pair image files with label maps by a subject key (``NiftiDataset.from_folder(pair_by=...)``).

A dataset folder names its files by a convention; the subject key is the part
of a file name (without ``.nii`` / ``.nii.gz``) that an image shares with its
label map. Built in:

- ``"stem"``: the whole name (``case01.nii.gz`` with ``case01.nii.gz``).
- ``"bids"``: the BIDS subject and session entities, ``sub-<label>`` and an
  optional ``_ses-<label>`` at the start of the name: ``sub-01_ses-1_T1w``
  pairs with ``sub-01_ses-1_mask`` or ``sub-01_ses-1_desc-lesion_mask``.
  Several images of one key (``sub-01_T1w``, ``sub-01_FLAIR``) are the
  subject's modalities, in file-name order.
- ``"nnunet"``: nnU-Net's ``imagesTr`` / ``labelsTr`` layout: images
  ``<case>_<XXXX>`` with ``XXXX`` the channel index (``case_00000_0000``,
  ``case_00000_0001``), label maps ``<case>``. Channels are ordered by index
  and every case must have the same ones.

Or a regular expression (a string or compiled pattern), searched in each name:
the key is its group named ``key`` (else its first group, else the whole
match); a group named ``channel`` orders a subject's modalities. Or a function
of the name that returns the key.

A file whose name the rule does not match, an image without a label map, a
label map without an image, two label maps of one key and subjects with
different numbers of modalities are refused with a ``ValueError`` that lists
the files.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CONVENTIONS", "pair_files"]

_BIDS = r"^(?P<key>sub-[A-Za-z0-9]+(?:_ses-[A-Za-z0-9]+)?)(?=_|$)"

#: The built-in conventions: name -> (rule for images, rule for label maps).
CONVENTIONS: dict[str, tuple[str | None, str | None]] = {
    "stem": (None, None),
    "bids": (_BIDS, _BIDS),
    "nnunet": (r"^(?P<key>.+)_(?P<channel>\d{4})$", r"^(?P<key>.+)$"),
}

Rule = str | re.Pattern | Callable[[str], Any] | None


def _keyer(rule: Rule, argument: str) -> Callable[[str], tuple[str, str] | None]:
    """A function name -> (key, channel sort key), or None when the name does not match."""
    if rule is None:
        return lambda name: (name, "")
    if isinstance(rule, (str, re.Pattern)):
        try:
            pattern = re.compile(rule)
        except re.error as err:
            raise ValueError(f"{argument}: not a valid regular expression {rule!r}: {err}") from err

        def key(name: str) -> tuple[str, str] | None:
            match = pattern.search(name)
            if match is None:
                return None
            groups = match.groupdict()
            if groups.get("key") is not None:
                value = groups["key"]
            elif pattern.groups:
                value = match.group(1)
            else:
                value = match.group(0)
            if not value:
                return None
            channel = groups.get("channel")
            return value, name if channel is None else channel

        return key
    if callable(rule):

        def key(name: str) -> tuple[str, str] | None:
            value = rule(name)
            return None if value is None or value == "" else (str(value), name)

        return key
    raise ValueError(
        f"{argument} must be one of {sorted(CONVENTIONS)}, a regular expression or a "
        f"function of the file name, got {rule!r}"
    )


def _listing(paths: list[Path], limit: int = 5) -> str:
    text = ", ".join(str(p) for p in paths[:limit])
    return text + (f" ... ({len(paths)} in all)" if len(paths) > limit else "")


def pair_files(
    images: dict[str, Path],
    labels: dict[str, Path] | None,
    pair_by: Rule = "stem",
    *,
    images_dir: Any = None,
    labels_dir: Any = None,
) -> tuple[list[Any], list[str] | None]:
    """Group images by subject key and pair them with label maps.

    Args:
        images: ``{name stem: path}`` of the image files.
        labels: ``{name stem: path}`` of the label maps, or ``None``.
        pair_by: a built-in convention (:data:`CONVENTIONS`), a regular
            expression, or a function of the name stem (see the module).
        images_dir, labels_dir: the folders, for messages.

    Returns:
        ``(images, labels)`` for :class:`keras_nii.NiftiDataset`, sorted by
        key: one path per subject, or a list of paths (modalities) when some
        subject has several; the label maps, or ``None``.
    """
    if isinstance(pair_by, str) and pair_by in CONVENTIONS:
        image_rule, label_rule = CONVENTIONS[pair_by]
    elif isinstance(pair_by, str) and re.fullmatch(r"[a-z]+", pair_by):
        raise ValueError(
            f"pair_by must be one of {sorted(CONVENTIONS)}, a regular expression "
            f"or a function of the file name, got {pair_by!r}"
        )
    else:
        image_rule = label_rule = pair_by
    image_key = _keyer(image_rule, "pair_by")
    label_key = _keyer(label_rule, "pair_by")
    what = f"pair_by={pair_by!r}" if not callable(pair_by) else "the pair_by function"

    subjects: dict[str, list[tuple[str, Path]]] = {}
    unmatched = []
    for stem, path in images.items():
        found = image_key(stem)
        if found is None:
            unmatched.append(path)
            continue
        subjects.setdefault(found[0], []).append((found[1], path))
    if labels is not None:
        by_key: dict[str, list[Path]] = {}
        for stem, path in labels.items():
            found = label_key(stem)
            if found is None:
                unmatched.append(path)
                continue
            by_key.setdefault(found[0], []).append(path)
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} file(s) whose name does not match {what}: {_listing(unmatched)}"
        )
    keys = sorted(subjects)
    ordered = [[p for _, p in sorted(subjects[k], key=lambda item: item[0])] for k in keys]
    counts = {len(group) for group in ordered}
    if len(counts) > 1:
        most = max(counts)
        short = [group[0] for group in ordered if len(group) < most]
        raise ValueError(
            f"subjects have different numbers of images ({sorted(counts)}) by {what}; "
            f"with fewer than {most}: {_listing(short)}"
        )
    if pair_by == "nnunet":
        channels = {tuple(c for c, _ in sorted(subjects[k])) for k in keys}
        if len(channels) > 1:
            raise ValueError(
                "cases with different channel indices in "
                f"{images_dir}: {sorted(channels)[:3]} (nnU-Net needs the same for every case)"
            )
    image_list = [str(g[0]) if len(g) == 1 else [str(p) for p in g] for g in ordered]
    if max(counts, default=1) == 1:
        image_list = [str(g[0]) for g in ordered]
    if labels is None:
        return image_list, None

    twice = [paths for paths in by_key.values() if len(paths) > 1]
    if twice:
        raise ValueError(
            f"{sum(len(p) for p in twice)} label maps share a subject key by {what}, e.g. "
            f"{_listing(twice[0])}: keep one label map per subject in {labels_dir}"
        )
    unpaired = [group[0] for key, group in zip(keys, ordered, strict=True) if key not in by_key]
    if unpaired:
        raise ValueError(
            f"{len(unpaired)} image(s) without a label map of the same subject ({what}) in "
            f"{labels_dir}: {_listing(unpaired)}"
        )
    orphans = [paths[0] for key, paths in sorted(by_key.items()) if key not in subjects]
    if orphans:
        raise ValueError(
            f"{len(orphans)} label map(s) without an image of the same subject ({what}) in "
            f"{images_dir}: {_listing(orphans)}"
        )
    return image_list, [str(by_key[k][0]) for k in keys]
