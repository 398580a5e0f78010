"""``affine``: RandomAffine3D on image + mask (and image alone) against JAX, PyTorch, Kornia,
MONAI, TorchIO and SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from keras_nii.bench.core import (
    Context,
    Row,
    Target,
    apply_layers,
    find_row,
    keras_nii_layers,
    operation,
    try_import,
)

# the random affine of the ``affine`` operation (and of the pipeline and training augmentation)
AFFINE_DEGREES = 30.0
AFFINE_SCALES = (0.9, 1.1)


def _targets(rows: list[Row], target: Target) -> None:
    layer = find_row(rows, "affine", "image+mask", "keras-nii")
    peers = [
        r
        for r in rows
        if r["operation"] == "affine"
        and r["variant"] == "image+mask"
        and r["library"] != "keras-nii"
        and r["status"] == "ok"
    ]
    if layer and peers:
        fastest = min(peers, key=lambda r: r["ms_per_volume"])
        target(
            "affine image+mask vs fastest peer",
            f"keras-nii / {fastest['library']} <= 0.5",
            layer["ms_per_volume"] / fastest["ms_per_volume"],
            0.5,
        )


@operation("affine", order=30, targets=_targets)
def bench_affine(ctx: Context) -> None:
    images, masks = ctx.data()

    def make() -> tuple[Callable, list]:
        (cls,) = keras_nii_layers("affine", "RandomAffine3D")
        layer = cls(degrees=AFFINE_DEGREES, scales=AFFINE_SCALES, seed=0)
        return apply_layers([layer]), [layer]

    paired = lambda: dict(  # noqa: E731
        zip(("images", "segmentation_masks"), ctx.tensors(images, masks), strict=True)
    )
    note = f"rotation +-{AFFINE_DEGREES:g} deg per axis, scale {AFFINE_SCALES}; trilinear + nearest"
    ctx.keras_rows("affine", "image+mask", make, paired, reference=True, note=note)
    ctx.keras_rows("affine", "image", make, lambda: ctx.tensors(images), graph_row=False)

    def monai(with_mask: bool) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            tfm = monai_rand_affine(ctx, with_mask)
            if with_mask:
                return ctx.monai_pairs(tfm)
            vols, _ = ctx.torch_volumes()
            return ctx.torch_synced(lambda: [tfm({"image": v}) for v in vols])

        return setup

    def torchio(with_mask: bool) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            tio = try_import("torchio")
            tfm = tio.RandomAffine(scales=AFFINE_SCALES, degrees=AFFINE_DEGREES)
            subjects = ctx.torchio_subjects(tio, masks=with_mask)
            return lambda: [tfm(s) for s in subjects]

        return setup

    def scipy_ref(with_mask: bool) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            ndimage = try_import("scipy.ndimage")
            rng = np.random.default_rng(0)
            centre = (np.asarray(images.shape[1:4]) - 1) / 2.0

            def run() -> list[Any]:
                out = []
                for v, m in zip(images, masks, strict=True):
                    matrix = _random_rotation(rng) @ np.diag(rng.uniform(*AFFINE_SCALES, size=3))
                    offset = centre - matrix @ centre
                    img = ndimage.affine_transform(v[..., 0], matrix, offset, order=1)
                    if with_mask:
                        out.append(
                            (img, ndimage.affine_transform(m[..., 0], matrix, offset, order=0))
                        )
                    else:
                        out.append(img)
                return out

            return run

        return setup

    def torch_grid(with_mask: bool) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            torch = ctx.torch()
            functional = torch.nn.functional
            device = ctx.torch_device()
            x, m = ctx.torch_batch()
            m_float = m.float()  # grid_sample samples floating-point tensors only
            generator = torch.Generator(device=device)
            generator.manual_seed(0)

            def run() -> Any:
                theta = _torch_thetas(torch, x.shape[0], device, generator)
                grid = functional.affine_grid(theta, list(x.shape), align_corners=False)
                out = functional.grid_sample(x, grid, mode="bilinear", align_corners=False)
                if not with_mask:
                    return out
                labels = functional.grid_sample(m_float, grid, mode="nearest", align_corners=False)
                return out, labels.to(m.dtype)

            return ctx.torch_synced(run)

        return setup

    def kornia(with_mask: bool) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            augmentation = try_import("kornia.augmentation")
            x, m = ctx.torch_batch()
            m_float = m.float()
            options = dict(degrees=AFFINE_DEGREES, scale=(AFFINE_SCALES,) * 3, p=1.0)
            image_tfm = augmentation.RandomAffine3D(resample="bilinear", **options)
            mask_tfm = augmentation.RandomAffine3D(resample="nearest", **options)

            def run() -> Any:
                params = image_tfm.forward_parameters(x.shape)  # one draw per sample
                out = image_tfm(x, params=params)
                if not with_mask:
                    return out
                labels = mask_tfm(m_float, params=params)  # the image's draw, on the mask
                return out, labels.to(m.dtype)

            return ctx.torch_synced(run)

        return setup

    def jax_warp(with_mask: bool) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            jax = try_import("jax")
            ndimage = try_import("jax.scipy.ndimage")
            jnp = jax.numpy
            x, m = jnp.asarray(images[..., 0]), jnp.asarray(masks[..., 0])
            shape = images.shape[1:4]
            centre = jnp.asarray([(n - 1) / 2.0 for n in shape], jnp.float32)[:, None, None, None]
            axes = [jnp.arange(n, dtype=jnp.float32) for n in shape]
            grid = jnp.stack(jnp.meshgrid(*axes, indexing="ij")) - centre  # (3, x, y, z)

            def warp(volume: Any, mask: Any, key: Any) -> Any:
                linear = _jax_random_linear(jax, key)
                coords = list(jnp.einsum("ij,jxyz->ixyz", linear, grid) + centre)
                out = ndimage.map_coordinates(volume, coords, order=1, mode="constant")
                if not with_mask:
                    return out
                return out, ndimage.map_coordinates(mask, coords, order=0, mode="constant")

            batched = jax.jit(lambda key: jax.vmap(warp)(x, m, jax.random.split(key, len(images))))
            keys = iter(jax.random.split(jax.random.PRNGKey(0), 10_000))
            return lambda: jax.block_until_ready(batched(next(keys)))

        return setup

    for with_mask in (True, False):
        variant = "image+mask" if with_mask else "image"
        ctx.add(
            "affine",
            variant,
            "JAX",
            "jax jit map_coordinates",
            str(ctx.cores),
            jax_warp(with_mask),
            note="jax.scipy.ndimage.map_coordinates, vmapped over the batch (order 1 + order 0)",
        )
        ctx.add_torch(
            "affine",
            variant,
            "PyTorch",
            torch_grid(with_mask),
            runtime_suffix=" affine_grid",
            note="F.affine_grid + F.grid_sample on the whole batch (bilinear + nearest)",
        )
        ctx.add_torch(
            "affine",
            variant,
            "Kornia",
            kornia(with_mask),
            note="RandomAffine3D on the whole batch; the mask replays the image's draw",
        )
        ctx.add_torch(
            "affine",
            variant,
            "MONAI",
            monai(with_mask),
            note="RandAffined",
        )
        ctx.add_torchio(
            "affine",
            variant,
            torchio(with_mask),
            resamples=True,
        )
        ctx.add(
            "affine",
            variant,
            "SciPy",
            "scipy.ndimage",
            "1",
            scipy_ref(with_mask),
            note="affine_transform order=1 (+ order=0 mask)",
        )


def monai_rand_affine(ctx: Context, with_mask: bool) -> Any:
    """MONAI's ``RandAffined`` with the bench's ranges, on the torch peers' device."""
    mt = ctx.monai()
    return mt.RandAffined(
        keys=["image", "label"] if with_mask else ["image"],
        prob=1.0,
        rotate_range=(math.radians(AFFINE_DEGREES),) * 3,
        scale_range=(AFFINE_SCALES[1] - 1.0,) * 3,
        mode=("bilinear", "nearest") if with_mask else ("bilinear",),
        padding_mode="zeros",
        device=ctx.torch().device(ctx.torch_device()),
    )


def _torch_thetas(torch: Any, n: int, device: str, generator: Any) -> Any:
    """``n`` random ``(3, 4)`` matrices for ``torch.nn.functional.affine_grid``:
    a rotation of up to :data:`AFFINE_DEGREES` about each axis after a scaling
    by :data:`AFFINE_SCALES` per axis, about the volume's centre (the origin of
    ``affine_grid``'s normalized coordinates), drawn on ``device``."""
    angles = torch.rand(n, 3, generator=generator, device=device)
    angles = (2.0 * angles - 1.0) * math.radians(AFFINE_DEGREES)
    low, high = AFFINE_SCALES
    scales = low + (high - low) * torch.rand(n, 3, generator=generator, device=device)
    cos, sin = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def matrix(rows: list[list[Any]]) -> Any:
        return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)

    cx, cy, cz = cos.unbind(1)
    sx, sy, sz = sin.unbind(1)
    rx = matrix([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
    ry = matrix([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rz = matrix([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
    linear = rz @ ry @ rx * scales[:, None, :]  # (rz ry rx) @ diag(scales)
    return torch.cat([linear, torch.zeros(n, 3, 1, device=device)], dim=2)


def _jax_random_linear(jax: Any, key: Any) -> Any:
    """One random ``(3, 3)`` map, drawn like :func:`_torch_thetas`'s, in JAX."""
    jnp = jax.numpy
    angle_key, scale_key = jax.random.split(key)
    limit = math.radians(AFFINE_DEGREES)
    ax, ay, az = jax.random.uniform(angle_key, (3,), minval=-limit, maxval=limit)
    scales = jax.random.uniform(scale_key, (3,), minval=AFFINE_SCALES[0], maxval=AFFINE_SCALES[1])
    cx, cy, cz, sx, sy, sz = (f(a) for f in (jnp.cos, jnp.sin) for a in (ax, ay, az))
    rx = jnp.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    ry = jnp.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rz = jnp.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return rz @ ry @ rx * scales[None, :]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-AFFINE_DEGREES, AFFINE_DEGREES, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx
