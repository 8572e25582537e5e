"""The result image: decode what ComfyUI returned, lay it out on a grid, encode it as WebP.

Pure but CPU-heavy (Pillow decoding and encoding): callers run it in a worker thread. Writing
the result file is the post-processor's (`fategen.queue.postprocess`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image

from fategen.errors import ImageError


def grid_shape(count: int) -> tuple[int, int]:
    """``(columns, rows)`` for ``count`` images: 1 -> 1x1, 2 -> 2x1, 3 -> 3x1 (three in a row:
    no empty black cell, as a 2x2 grid of three would leave), 4 -> 2x2.

    Beyond 4 the grid stays as square as it can (5 and 6 -> 3x2, ...).
    """
    if count < 1:
        raise ValueError(f"a grid needs at least one image, got {count}")
    if count == 3:
        return 3, 1
    columns = math.ceil(math.sqrt(count))
    return columns, math.ceil(count / columns)


def make_grid(images: Sequence[Image.Image]) -> Image.Image:
    """Lay the images out row by row, left to right.

    One image is returned as it is. Otherwise the result is RGB on black: every cell is as wide
    as the widest image and as tall as the tallest, each image is centred in its cell (images of
    unequal size leave black borders), and cells with no image (the fourth of three) stay black.

    Raises:
        ImageError: no images.
    """
    if not images:
        raise ImageError("ComfyUI returned no images")
    if len(images) == 1:
        return images[0]
    columns, rows = grid_shape(len(images))
    cell_width = max(image.width for image in images)
    cell_height = max(image.height for image in images)
    grid = Image.new("RGB", (columns * cell_width, rows * cell_height), (0, 0, 0))
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        x = column * cell_width + (cell_width - image.width) // 2
        y = row * cell_height + (cell_height - image.height) // 2
        grid.paste(image if image.mode == "RGB" else image.convert("RGB"), (x, y))
    return grid


def decode_images(blobs: Sequence[bytes]) -> list[Image.Image]:
    """Decode image files (PNG, as ComfyUI saves them, or any format Pillow reads) fully.

    Raises:
        ImageError: one of them is corrupt or not an image.
    """
    images: list[Image.Image] = []
    for blob in blobs:
        try:
            image = Image.open(io.BytesIO(blob))
            image.load()
        except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, bomb errors...
            raise ImageError("ComfyUI returned an image that cannot be decoded") from exc
        images.append(image)
    return images


def encode_webp(image: Image.Image, *, quality: int = 90, method: int = 4) -> bytes:
    """Lossy WebP. ``method`` trades time for size (0 fast .. 6 slow; see STACK.md's timings)."""
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="WEBP", quality=quality, method=method)
    except (OSError, ValueError) as exc:
        raise ImageError("the result image cannot be encoded as WebP") from exc
    return buffer.getvalue()
