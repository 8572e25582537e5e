"""Pillow rendering of the simulator's images. Blocking: call through ``trio.to_thread``
(except ``image_size``, which only reads a header)."""

from __future__ import annotations

import functools
import io
import random
import textwrap

from PIL import Image, ImageDraw, ImageFont

from fategen.simulator.imagespec import ImageSpec


def _colors(spec: ImageSpec, index: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    rng = random.Random(spec.seed * 1_000_003 + index)
    if spec.color is not None:
        top = ((spec.color >> 16) & 255, (spec.color >> 8) & 255, spec.color & 255)
        rng = random.Random(spec.color * 1_000_003 + index)
    else:
        top = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    bottom = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    return top, bottom


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _generated(spec: ImageSpec, index: int) -> Image.Image:
    """A vertical gradient (colors from seed or color and index) with the prompt text on it."""
    size = (spec.width, spec.height)
    top, bottom = _colors(spec, index)
    mask = Image.linear_gradient("L").resize(size)
    image = Image.composite(Image.new("RGB", size, bottom), Image.new("RGB", size, top), mask)
    if spec.text:
        font_size = max(8, min(spec.width, spec.height) // 16)
        columns = max(8, int(spec.width / (font_size * 0.6)))
        lines = textwrap.wrap(spec.text, columns)[: max(1, spec.height // (font_size + 4))]
        ImageDraw.Draw(image).multiline_text(
            (font_size // 2, font_size // 2),
            "\n".join(lines),
            fill=(255 - top[0], 255 - top[1], 255 - top[2]),
            font=_font(font_size),
        )
    return image


def decode(data: bytes) -> Image.Image:
    """Image bytes (its first frame) as an RGB picture. Raises OSError (or ValueError) when
    Pillow cannot read them."""
    with Image.open(io.BytesIO(data)) as opened:
        return opened.convert("RGB")


def render(spec: ImageSpec, index: int, source: bytes | None = None) -> Image.Image:
    """Image ``index`` of a batch: the generated picture (a gradient with the prompt text);
    with ``source`` (an input image's bytes), that image resized to the spec's size (LANCZOS)
    and blended with the generated one by ``spec.denoise`` (0: the input, resized)."""
    if source is None:
        return _generated(spec, index)
    base = decode(source).resize((spec.width, spec.height), Image.Resampling.LANCZOS)
    if spec.denoise <= 0:
        return base
    return Image.blend(base, _generated(spec, index), min(1.0, spec.denoise))


def encode(image: Image.Image, image_format: str = "PNG") -> bytes:
    """The image as PNG (fast compression) or JPEG bytes."""
    buffer = io.BytesIO()
    if image_format == "PNG":
        image.save(buffer, "PNG", compress_level=1)
    else:
        image.save(buffer, image_format, quality=85)
    return buffer.getvalue()


def render_png(spec: ImageSpec, index: int, source: bytes | None = None) -> bytes:
    """``render`` then ``encode`` as PNG."""
    return encode(render(spec, index, source))


def render_preview_jpeg(spec: ImageSpec, step: int) -> bytes:
    """A small JPEG like ComfyUI's latent2rgb previews (latent size: an eighth per side)."""
    small = ImageSpec(max(8, spec.width // 8), max(8, spec.height // 8), 1, seed=spec.seed + step)
    return encode(render(small, 0), "JPEG")


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of image bytes in any format Pillow reads (only the header is read);
    None for bytes it cannot identify."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def corrupt(data: bytes) -> bytes:
    """Bytes that start like a PNG but are not one (for the ``corrupt_image`` fault)."""
    return data[:8] + b"\x00\x00\x00\x0dIHDR" + b"\xde\xad\xbe\xef" * 16
