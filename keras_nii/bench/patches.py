"""``patches``: class-balanced training patches from CT-like ``.nii.gz`` scans, one epoch a call.

Eight CT-like scans (:func:`keras_nii.phantoms.make_ct_dataset`: int16 HU,
labels background / organ / lesion) of about 200 x 192 x 130 voxels (scaled
down with ``--size`` below 96: patches of ``min(size, 96)^3``, scans about
2.1 x 2.0 x 1.35 times that), 4 patches per scan, batches of 2, the patch
centres balanced over the 3 classes. Each call is one epoch (32 patches), so
``ms/vol`` is per patch and ``vol/s`` patches per second. For a row without a
cache every epoch is cold (every scan decoded); for a cached row the first
call (``first ms``) is the cold epoch that fills the cache and the median is
the cached epoch.

- keras-nii: ``NiftiDataset(patch_size=, patches_per_volume=4,
  label_probabilities={0: 1, 1: 1, 2: 1})``, its batches asked for by two
  threads (as ``workers=2`` does in ``fit``), without a cache, with ``cache="memory"`` and with a directory
  cache (memory-mapped: a patch reads its window only).
- TorchIO: ``Queue(max_length=16, samples_per_volume=4, num_workers=2)`` with a
  ``LabelSampler`` of the same label probabilities, through a
  ``DataLoader(batch_size=2)``.
- MONAI: ``LoadImaged`` -> ``EnsureChannelFirstd`` -> ``RandCropByLabelClassesd
  (ratios=[1, 1, 1], num_samples=4)`` in a ``Dataset`` (2 DataLoader workers)
  and in a ``CacheDataset`` (the loading and ``ClassesToIndicesd`` cached, the
  crop drawn every epoch); a DataLoader item is the 4 patches of one scan.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np

from keras_nii.bench import core
from keras_nii.bench.core import Context, operation

SCANS = 8
PER_VOLUME = 4
BATCH = 2
MAX_PATCH = 96
WEIGHTS = {0: 1.0, 1: 1.0, 2: 1.0}
QUEUE = 16  # TorchIO's queue: the patches of 4 scans
WORKERS = 2  # the peers' loader processes; keras-nii's threads


def _targets(rows: list[core.Row], target: core.Target) -> None:
    def rate(row: core.Row | None, cold: bool) -> float | None:
        """Patches per second: of the first epoch (cold), or of the epochs after it."""
        if row is None:
            return None
        if cold:
            return 1000.0 * row["volumes_per_call"] / row["first_call_ms"]
        return row["volumes_per_s"]

    ours_cold = rate(core.find_row(rows, "patches", "cold", "keras-nii"), True)
    cached = [r for r in rows if r["operation"] == "patches" and r["status"] == "ok"]
    ours_cached = [
        rate(r, False) for r in cached if r["library"] == "keras-nii" and r["variant"] == "cached"
    ]
    peers = [r for r in cached if r["library"] != "keras-nii"]
    peer_cold = [(rate(r, True), r) for r in peers]
    if ours_cold and peer_cold:
        best, row = max(peer_cold, key=lambda item: item[0])
        target(
            "patches cold vs fastest peer",
            f"keras-nii / {row['library']} {row['variant']} >= 1.5 (patches/s, first epoch)",
            ours_cold / best,
            1.5,
            higher_is_better=True,
        )
    if not ours_cached:
        return
    ours = max(ours_cached)
    torchio = core.find_row(rows, "patches", "cold", "TorchIO")
    if torchio:
        target(
            "patches cached vs TorchIO",
            "keras-nii cached / TorchIO Queue >= 10 (patches/s)",
            ours / torchio["volumes_per_s"],
            10.0,
            higher_is_better=True,
        )
    peer_cached = [r for r in peers if r["variant"] == "cached"]
    if peer_cached:
        best = max(peer_cached, key=lambda r: r["volumes_per_s"])
        target(
            "patches cached vs fastest cached peer",
            f"keras-nii cached / {best['library']} cached >= 2 (patches/s)",
            ours / best["volumes_per_s"],
            2.0,
            higher_is_better=True,
        )


@operation("patches", order=75, targets=_targets)
def bench_patches(ctx: Context) -> None:
    patch = min(ctx.size, MAX_PATCH)
    repeats = min(ctx.repeats, 3)  # every call is a whole epoch
    n = SCANS * PER_VOLUME
    with tempfile.TemporaryDirectory(prefix="keras-nii-bench-patches-") as tmp:
        make = core.keras_nii_attr("phantoms", "make_ct_dataset")
        in_plane = (round(2.0 * patch), round(2.2 * patch))
        slices = (round(1.25 * patch), round(1.45 * patch))
        ctx.log(
            f"patches   writing {SCANS} CT-like scans of ~{in_plane[1]}^2 x {slices[1]} to {tmp}"
        )
        pairs = make(Path(tmp) / "data", SCANS, seed=0, in_plane=in_plane, slices=slices)
        images = [str(image) for image, _ in pairs]
        labels = [str(label) for _, label in pairs]
        note = f"{n} patches of {patch}^3 an epoch ({SCANS} scans x {PER_VOLUME}), batch {BATCH}"

        def keras_nii(cache: Any) -> Callable[[], Callable[[], Any]]:
            def setup() -> Callable[[], Any]:
                cls = core.keras_nii_attr("data", "NiftiDataset")
                ds = cls(
                    images,
                    labels,
                    batch_size=BATCH,
                    patch_size=(patch,) * 3,
                    patches_per_volume=PER_VOLUME,
                    label_probabilities=WEIGHTS,
                    queue_length=QUEUE,
                    shuffle=True,
                    seed=0,
                    cache=cache,
                )

                def epoch() -> int:
                    # two threads ask for batches, as PyDataset(workers=2) does in fit
                    with ThreadPool(WORKERS) as pool:
                        count = sum(len(x) for x, _ in pool.imap(ds.__getitem__, range(len(ds))))
                    ds.on_epoch_end()
                    if count != n:
                        raise RuntimeError(f"one epoch gave {count} patches, expected {n}")
                    return count

                return epoch

            return setup

        fills = "first ms: the epoch that fills the cache"
        for variant, cache, how in (
            ("cold", None, "no cache: every epoch decodes the scans"),
            ("cached", "memory", f"cache='memory'; {fills}"),
            ("cached", str(Path(tmp) / "cache"), f"cache=DIR, memory-mapped; {fills}"),
        ):
            ctx.add(
                "patches",
                variant,
                "keras-nii",
                "NiftiDataset",
                str(WORKERS),
                keras_nii(cache),
                volumes=n,
                reference=variant == "cold",
                note=f"{how}; {note}",
                repeats=repeats,
            )

        def torchio() -> Callable[[], Any]:
            tio = core.try_import("torchio")
            torch = ctx.torch()
            subjects = [
                tio.Subject(image=tio.ScalarImage(i), label=tio.LabelMap(m))
                for i, m in zip(images, labels, strict=True)
            ]
            sampler = tio.LabelSampler(
                patch_size=patch, label_name="label", label_probabilities=WEIGHTS
            )
            queue = tio.Queue(
                tio.SubjectsDataset(subjects),
                max_length=QUEUE,
                samples_per_volume=PER_VOLUME,
                sampler=sampler,
                num_workers=2,
            )
            loader = torch.utils.data.DataLoader(queue, batch_size=BATCH, num_workers=0)

            def epoch() -> int:
                count = 0
                for batch in loader:
                    count += int(batch["image"][tio.DATA].shape[0])
                    batch["label"][tio.DATA].numpy()
                if count != n:
                    raise RuntimeError(f"one epoch gave {count} patches, expected {n}")
                return count

            return epoch

        ctx.add_torchio(
            "patches",
            "cold",
            torchio,
            note=f"Queue(max_length={QUEUE}, 2 workers) + LabelSampler; {note}",
            volumes=n,
            repeats=repeats,
        )

        def monai(cached: bool) -> Callable[[], Callable[[], Any]]:
            def setup() -> Callable[[], Any]:
                mt = ctx.monai()
                data = core.try_import("monai.data")
                keys = ["image", "label"]
                load = [
                    mt.LoadImaged(keys=keys, image_only=True),
                    mt.EnsureChannelFirstd(keys=keys, channel_dim="no_channel"),
                ]
                crop = dict(
                    keys=keys,
                    label_key="label",
                    spatial_size=(patch,) * 3,
                    ratios=[WEIGHTS[c] for c in range(3)],
                    num_classes=3,
                    num_samples=PER_VOLUME,
                )
                items = [{"image": i, "label": m} for i, m in zip(images, labels, strict=True)]
                loaders: list[Any] = []

                def make_loader() -> Any:
                    if cached:  # CacheDataset loads every item when it is made: the cold epoch
                        indices = mt.ClassesToIndicesd(keys="label", num_classes=3)
                        crop_t = mt.RandCropByLabelClassesd(indices_key="label_cls_indices", **crop)
                        chain = mt.Compose([*load, indices, crop_t])
                        dataset = data.CacheDataset(
                            items, chain, cache_rate=1.0, num_workers=2, progress=False
                        )
                        workers = 0  # the cache lives in this process
                    else:
                        chain = mt.Compose([*load, mt.RandCropByLabelClassesd(**crop)])
                        dataset, workers = data.Dataset(items, chain), 2
                    return data.DataLoader(dataset, batch_size=1, shuffle=True, num_workers=workers)

                def epoch() -> int:
                    if not loaders:
                        loaders.append(make_loader())
                    loader = loaders[0]
                    count = 0
                    for batch in loader:
                        count += int(batch["image"].shape[0])
                        np.asarray(batch["label"])
                    if count != n:
                        raise RuntimeError(f"one epoch gave {count} patches, expected {n}")
                    return count

                return epoch

            return setup

        ctx.add_torch(
            "patches",
            "cold",
            "MONAI",
            monai(False),
            note=f"Dataset + RandCropByLabelClassesd, 2 workers; {note}",
            volumes=n,
            repeats=repeats,
        )
        ctx.add_torch(
            "patches",
            "cached",
            "MONAI",
            monai(True),
            note=(
                "CacheDataset (load + ClassesToIndicesd) + RandCropByLabelClassesd; "
                f"first ms: the epoch that fills the cache; {note}"
            ),
            volumes=n,
            repeats=repeats,
        )
