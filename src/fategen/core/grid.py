"""The result image: decode what ComfyUI returned, lay it out on a grid, write it as WebP.

Everything here but `render_result_async` blocks (Pillow decoding and encoding, file I/O): call
it in a worker thread. WebP encoding releases the GIL, so a few renders run in parallel; the
module-level `RENDER_LIMITER` keeps it to two at a time.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import trio
from PIL import Image

from fategen.errors import ImageError

#: Renders running at once in `render_result_async` (each one is CPU-heavy).
RENDER_LIMITER = trio.CapacityLimiter(2)


def grid_shape(count: int) -> tuple[int, int]:
    """``(columns, rows)`` for ``count`` images: 1 -> 1x1, 2 -> 2x1, 3 and 4 -> 2x2.

    Beyond 4 the grid stays as square as it can (5 and 6 -> 3x2, ...).
    """
    if count < 1:
        raise ValueError(f"a grid needs at least one image, got {count}")
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


#: errno values meaning "this filesystem cannot make hard links".
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


def _write_error(path: Path, exc: OSError) -> ImageError:
    return ImageError(f"cannot write the result to {path}: {exc.strerror or exc}")


def write_atomic(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data``, all at once or not at all; never replace a file.

    The data goes to a hidden temporary file in the same directory (``.{name}.{random}.tmp``),
    is flushed and fsynced, then hard-linked to ``path``: the link fails if ``path`` exists, so
    another job's file is never overwritten, and readers never see a half-written file. On
    filesystems without hard links it falls back to check-then-``os.replace`` (a tiny race).
    The temporary file is removed whatever happens.

    Raises:
        ImageError: ``path`` exists, or the file cannot be written (permissions, disk full, ...).
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # No hard links here (some network or FUSE filesystems): check, then rename.
            if os.path.lexists(path):
                raise FileExistsError(path) from None
            os.replace(temp, path)
    except FileExistsError as exc:
        raise ImageError(
            f"cannot write the result to {path}: a file with that name already exists"
        ) from exc
    except OSError as exc:
        raise _write_error(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the new directory entry durable (best effort: not every platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def render_result(
    blobs: Sequence[bytes], out_dir: Path, job_id: str, *, quality: int = 90, method: int = 4
) -> Path:
    """Decode, grid, encode and write ``out_dir / f"{job_id}.webp"`` (blocking).

    Raises:
        ImageError: corrupt input, no images, or the file cannot be written (or exists).
        ValueError: ``job_id`` is not a plain file name.
    """
    if not job_id or job_id.startswith(".") or any(c in job_id for c in "/\\\0"):
        raise ValueError(f"job id {job_id!r} cannot be a file name")
    image = make_grid(decode_images(blobs))
    path = out_dir / f"{job_id}.webp"
    write_atomic(path, encode_webp(image, quality=quality, method=method))
    return path


async def render_result_async(
    blobs: Sequence[bytes],
    out_dir: Path,
    job_id: str,
    *,
    quality: int = 90,
    method: int = 4,
    limiter: trio.CapacityLimiter | None = None,
) -> Path:
    """`render_result` in a worker thread, at most ``limiter`` (default `RENDER_LIMITER`) at once.

    Cancellation waits for the thread to finish, so a file is never left half-done.
    """
    render = functools.partial(
        render_result, blobs, out_dir, job_id, quality=quality, method=method
    )
    return await trio.to_thread.run_sync(render, limiter=limiter or RENDER_LIMITER)
