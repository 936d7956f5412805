"""Samples to a PNG grid (8-bit grey or RGB), encoded by Pillow."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from diffexport.fileio import write_atomic


def to_grid(samples: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0), pad: int = 1) -> np.ndarray:
    """``[N, C, H, W]`` floats (C = 1 or 3) -> one ``[rows, cols, C]`` uint8 image, samples on a near-square grid."""
    n, c, h, w = samples.shape
    if c not in (1, 3):
        raise ValueError(f"a PNG grid needs 1 or 3 channels, got {c}")
    lo, hi = value_range
    img = np.clip((samples - lo) / (hi - lo) * 255 + 0.5, 0, 255).astype(np.uint8)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = img[i].transpose(1, 2, 0)
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit PNG (grey or RGB, written by Pillow) of ``image`` [H, W, 1 | 3] uint8."""
    from PIL import Image  # matplotlib's own image dependency

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def save_png_grid(samples: np.ndarray, path: str | Path, value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """Write ``samples`` [N, C, H, W] (C = 1 or 3, values in ``value_range``) as one PNG grid."""
    write_atomic(path, png_bytes(to_grid(np.asarray(samples, dtype=np.float32), value_range)))
    return Path(path)
