"""Small image helpers shared by stages: grids of samples with optional captions."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def make_grid(images: np.ndarray | Sequence[np.ndarray], cols: int | None = None, pad: int = 2,
              captions: Sequence[str] | None = None, caption_height: int = 12) -> Image.Image:
    """Tile (N, H, W, 3) uint8 images into one picture, `cols` per row, with optional captions."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"make_grid: expected (N, H, W, 3) uint8 images, got shape {arr.shape}")
    n, h, w, _ = arr.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell_h = h + (caption_height if captions else 0)
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (cell_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = pad + (i % cols) * (w + pad), pad + (i // cols) * (cell_h + pad)
        grid.paste(Image.fromarray(arr[i]), (x, y))
        if captions:
            draw.text((x, y + h), captions[i][: max(1, w // 6)], fill=(0, 0, 0))
    return grid
