"""Input images (``--image URL``): check what a user sent, then turn it into the exact picture a
workflow takes. Pure and blocking (Pillow): callers run it in ``trio.to_thread``.

Only the PNG, JPEG, WebP, GIF and BMP decoders ever see the bytes (no TIFF, EPS/Ghostscript or
the other thirty formats Pillow reads). :func:`probe` reads the header alone; :func:`prepare`
decodes, but only after the same check. An image with more pixels than the caller allows is
refused before anything is decoded, by fategen's limit, not by Pillow's global
``MAX_IMAGE_PIXELS`` (which another library may have changed or turned off); Pillow's own
decompression-bomb refusals, which can still come from inside a decoder, are refusals too.
Every refusal is an :class:`InputImageError` whose text is one line a chat bot can relay;
nothing else comes out of either function for bad input. An embedded colour profile (a
phone's Display P3, CMYK) is applied, so the PNG, which carries none, holds sRGB pixels.
"""

from __future__ import annotations

import functools
import io
import struct
from collections.abc import Callable
from typing import TypeVar

from PIL import (
    BmpImagePlugin,
    ExifTags,
    GifImagePlugin,
    Image,
    ImageCms,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from fategen.errors import InputImageError

#: The formats taken (Pillow's names). A JPEG holding several pictures (MPO, as some cameras
#: and phones write) counts as a JPEG: its first picture is used.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_JPEG_FAMILY = ("JPEG", "MPO")

NOT_AN_IMAGE = "the input image is not a PNG, JPEG, WebP, GIF or BMP image"
DAMAGED = "the input image is damaged or cut short"
TOO_LARGE_TO_OPEN = "the input image is too large to open safely; send a smaller one"

#: EXIF orientation -> the transpose that shows the picture upright (ImageOps.exif_transpose's
#: table, applied here so that probe and prepare always agree on the orientation).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_WHITE = (255, 255, 255, 255)
#: PNG's zlib level: 3 is several times faster than the default 6, a little larger.
_COMPRESS_LEVEL = 3
#: Modes whose colour profile is applied, and the mode the sRGB result has.
_PROFILED = {"RGB": "RGB", "RGBA": "RGBA", "CMYK": "RGB"}
#: Importing the decoders registers them in ``Image.OPEN`` (Image.open would import them).
_DECODERS = (BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin, WebPImagePlugin)

_T = TypeVar("_T")


def probe(data: bytes, *, max_pixels: int) -> tuple[int, int]:
    """The image's (width, height) as it is shown (EXIF orientations 5 to 8 swap them), from
    its header alone: nothing is decoded.

    Raises:
        InputImageError: not one of :data:`FORMATS`, no pixels, or more than ``max_pixels``.
    """

    def work() -> tuple[int, int]:
        with _open(data) as image:
            return _check(image, max_pixels)[0]

    return _guarded(work)


def prepare(data: bytes, width: int, height: int, *, max_pixels: int) -> bytes:
    """The image as a ``width`` x ``height`` RGB PNG without metadata: checked as by
    :func:`probe`, decoded in full (a damaged or truncated file is refused, whatever
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set to), turned upright by its EXIF orientation,
    its first frame if it is animated, transparency laid on white, scaled to cover the size
    (Lanczos) and cropped to it around the centre. The same input always gives the same bytes.

    Raises:
        InputImageError: as :func:`probe`, or the picture cannot be decoded.
        ValueError: ``width`` or ``height`` is below 1 (the caller's mistake, not the user's).
    """
    if width < 1 or height < 1:
        raise ValueError(f"cannot prepare an input image of {width}x{height}")
    return _guarded(lambda: _prepare(data, (width, height), max_pixels))


def _guarded(work: Callable[[], _T]) -> _T:
    """Runs ``work`` so that bad input can only end in an InputImageError: Pillow raises
    OSError, SyntaxError, ValueError, struct.error, EOFError, ... on hostile files."""
    try:
        return work()
    except InputImageError:
        raise
    except UnidentifiedImageError:
        raise InputImageError(NOT_AN_IMAGE) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # The warning arrives as an exception only where warnings are made errors.
        raise InputImageError(TOO_LARGE_TO_OPEN) from None
    except Exception:
        raise InputImageError(DAMAGED) from None


def _open(data: bytes) -> Image.Image:
    """The image, its header read (no pixels), by the decoders of :data:`FORMATS` only.

    This is ``Image.open(..., formats=FORMATS)`` without its check against Pillow's global
    ``MAX_IMAGE_PIXELS`` (a warning, or an error at twice the value, that another library may
    have changed or turned off): :func:`_check` applies fategen's own limit next, with a
    sentence that names the size."""
    prefix = data[:16]
    for name in FORMATS:
        factory, accept = Image.OPEN[name]
        accepted = True if accept is None else accept(prefix)
        if accepted is not True:  # False, or a str: Pillow's "support not installed"
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # as Image.open: not this format after all
    raise InputImageError(NOT_AN_IMAGE)


def _check(image: Image.Image, max_pixels: int) -> tuple[tuple[int, int], int]:
    """((width, height) as shown, EXIF orientation) of an opened image, or the refusal."""
    if image.format not in FORMATS + _JPEG_FAMILY:
        raise InputImageError(NOT_AN_IMAGE)
    stored_width, stored_height = image.size
    if stored_width < 1 or stored_height < 1:
        raise InputImageError(f"the input image has no pixels ({stored_width}x{stored_height})")
    pixels = stored_width * stored_height
    if pixels > max_pixels:
        raise InputImageError(
            f"the input image is {stored_width}x{stored_height} ({pixels / 1e6:.1f} "
            f"megapixels), over the limit of {max_pixels / 1e6:.1f} megapixels; "
            "send a smaller one"
        )
    orientation = _orientation(image)
    if orientation >= 5:
        return (stored_height, stored_width), orientation
    return (stored_width, stored_height), orientation


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 to 8; 1 if none, or unreadable), read from the header alone.

    A PNG may put its EXIF after the pixels; Pillow would decode the whole image to find it,
    so only EXIF placed before them counts (probe and prepare agree either way)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # A broken EXIF block: viewers ignore it, so do we.
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _prepare(data: bytes, size: tuple[int, int], max_pixels: int) -> bytes:
    with _open(data) as image:
        (shown_width, shown_height), orientation = _check(image, max_pixels)
        if image.format in _JPEG_FAMILY:
            # Let libjpeg scale down by 2, 4 or 8 while decoding when the result still covers
            # the size: a 24-megapixel photo for a 1-megapixel input decodes in a fraction of
            # the time and memory.
            scale = max(size[0] / shown_width, size[1] / shown_height)
            stored = image.size
            image.draft("RGB", (int(stored[0] * scale) + 1, int(stored[1] * scale) + 1))
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            # Pillow's decoders let a cut-short file through when this global is set (by any
            # library in the process): check the file's own structure instead.
            _ensure_complete(data, image.format)
        image.load()  # the first frame: an animation's other frames are never decoded
        profile = image.info.get("icc_profile")
        upright = image.transpose(_TRANSPOSE[orientation]) if orientation != 1 else image
        rgb = _to_rgb(_to_srgb(upright, profile))
    fitted = ImageOps.fit(rgb, size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    fitted.info = {}  # no ICC profile, EXIF, text or DPI carried into the PNG
    out = io.BytesIO()
    fitted.save(out, format="PNG", compress_level=_COMPRESS_LEVEL)
    return out.getvalue()


def _ensure_complete(data: bytes, image_format: str | None) -> None:
    """Refuses a file that is cut short, judged by its own structure: its end marker (PNG,
    JPEG, GIF) or its declared length (WebP, BMP)."""
    if image_format == "PNG":
        complete = data.rfind(b"IEND\xaeB`\x82") > 0
    elif image_format in _JPEG_FAMILY:
        # The last scan must be followed by the end-of-image marker (0xFFD9 cannot occur in
        # entropy-coded data; an EXIF thumbnail's own markers all come before the scans).
        last_scan = data.rfind(b"\xff\xda")
        complete = last_scan > 0 and data.rfind(b"\xff\xd9") > last_scan
    elif image_format == "GIF":
        complete = data.rstrip(b"\x00")[-1:] == b";"
    elif image_format == "WEBP":
        complete = len(data) >= int.from_bytes(data[4:8], "little") + 8
    else:  # BMP: the file size in its header (0 in some writers: then the pixels' start)
        declared = int.from_bytes(data[2:6], "little") or int.from_bytes(data[10:14], "little")
        complete = len(data) >= declared
    if not complete:
        raise InputImageError(DAMAGED)


@functools.cache
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _to_srgb(image: Image.Image, profile: object) -> Image.Image:
    """The image in sRGB, when it carries a colour profile (a phone photo's Display P3, a
    print's CMYK): ComfyUI, and the PNG without a profile, take pixels as sRGB. A profile
    that cannot be read or used is ignored, as browsers do."""
    if not isinstance(profile, bytes) or image.mode not in _PROFILED:
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        converted = ImageCms.profileToProfile(
            image, source, _srgb(), outputMode=_PROFILED[image.mode]
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return image
    return converted if isinstance(converted, Image.Image) else image


def _to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy: transparency laid on white; palette, grey, 16-bit and CMYK too."""
    mode = image.mode
    if mode.startswith("I"):
        # 16-bit grey (PNG): Pillow's conversion to 8 bits would clip at 255, not scale.
        scaled = image.convert("I").point(lambda value: value / 256)
        return scaled.convert("L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
