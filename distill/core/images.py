"""Image conversion, grids, PNG and .npz sample files (numpy + Pillow only).

Input images follow the project convention: float32 N x C x H x W in [-1, 1].
Written files use uint8 N x H x W x C so any outside tool can read them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from distill.core.fileio import atomic_write


def to_uint8(images: np.ndarray) -> np.ndarray:
    """N x C x H x W floats in [-1, 1] -> N x H x W x C uint8 (round((x + 1) * 127.5), clipped)."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"expected N x C x H x W images, got shape {x.shape}")
    u = np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(u.transpose(0, 2, 3, 1))


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1, pad_value: int = 0) -> np.ndarray:
    """Tile N x C x H x W images into one H' x W' x C uint8 image with ``nrow`` images per row.

    ``nrow`` defaults to ceil(sqrt(N)). Empty cells and the ``pad``-pixel gaps are ``pad_value``.
    """
    u = to_uint8(images)
    n, h, w, c = u.shape
    ncol = max(1, int(nrow) if nrow else math.ceil(math.sqrt(max(n, 1))))
    nrows = max(1, math.ceil(n / ncol))
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y : y + h, x : x + w] = u[i]
    return grid


def _to_pil(grid: np.ndarray, scale: int = 1) -> Image.Image:
    """H x W x C uint8 (C = 1 or 3) -> RGB PIL image, nearest-upscaled by ``scale``."""
    rgb = np.repeat(grid, 3, axis=2) if grid.shape[2] == 1 else grid[..., :3]
    img = Image.fromarray(np.ascontiguousarray(rgb))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def save_grid_png(images: np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 4) -> Path:
    """Write a grid of N x C x H x W images as an RGB PNG, upscaled ``scale`` times (nearest)."""
    img = _to_pil(make_grid(images, nrow), scale)
    return atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"), ".png")


def save_side_by_side_png(
    rows: list[tuple[str, np.ndarray]], path: str | Path, nrow: int | None = None, scale: int = 4
) -> Path:
    """Stack one labelled grid per row (e.g. ("teacher w=2", images), ("student w=2", images)) into one PNG.

    Each entry's images become a single strip (``nrow`` defaults to all images in
    one row); the label is drawn to the left of the strip.
    """
    if not rows:
        raise ValueError("no rows to draw")
    strips = [(label, _to_pil(make_grid(imgs, nrow or len(imgs)), scale)) for label, imgs in rows]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(label, font=font)) for label, _ in strips) + 8
    gap = 4
    width = label_w + max(s.width for _, s in strips)
    height = sum(s.height for _, s in strips) + gap * (len(strips) - 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for label, strip in strips:
        canvas.paste(strip, (label_w, y))
        draw.text((4, y + max(0, strip.height // 2 - 6)), label, fill=(0, 0, 0), font=font)
        y += strip.height + gap
    return atomic_write(Path(path), lambda tmp: canvas.save(tmp, format="PNG"), ".png")


def save_samples_npz(path: str | Path, images: np.ndarray, labels: np.ndarray, **extra: Any) -> Path:
    """Write samples as .npz: ``images`` uint8 N x H x W x C, ``labels`` int64 N, plus ``extra`` keys.

    ``images`` may be float N x C x H x W in [-1, 1] (converted) or already uint8 N x H x W x C.
    Extra values are stored as numpy arrays (scalars become 0-d arrays; strings stay strings).
    """
    images = np.asarray(images)
    u8 = images if images.dtype == np.uint8 else to_uint8(images)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if u8.ndim != 4 or u8.shape[0] != labels.shape[0]:
        raise ValueError(f"images {u8.shape} and labels {labels.shape} do not match")
    arrays = {"images": u8, "labels": labels, **{k: np.asarray(v) for k, v in extra.items()}}
    return atomic_write(Path(path), lambda tmp: np.savez_compressed(tmp, **arrays), ".npz")


def load_samples_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read a samples .npz into a dict; 0-d extra arrays come back as Python scalars."""
    with np.load(path, allow_pickle=False) as z:
        return {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}
