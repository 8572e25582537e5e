"""Input images: what probe reads from a header, what prepare makes of every kind of file a
user may send, and that bad bytes only ever end in one InputImageError line."""

from __future__ import annotations

import io
import random
import struct
import zlib
from typing import Any

import pytest
from PIL import Image, ImageCms, ImageFile, PngImagePlugin

from fategen.core import inputimage
from fategen.core.inputimage import FORMATS, prepare, probe
from fategen.errors import InputImageError

LIMIT = 25_000_000
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, kind: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, kind, **options)
    return out.getvalue()


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def quadrants(size: tuple[int, int] = (60, 40)) -> Image.Image:
    """Red top left, green top right, blue bottom left, white bottom right: any turn or
    flip shows."""
    width, height = size
    image = Image.new("RGB", size)
    image.paste(RED, (0, 0, width // 2, height // 2))
    image.paste(GREEN, (width // 2, 0, width, height // 2))
    image.paste(BLUE, (0, height // 2, width // 2, height))
    image.paste(WHITE, (width // 2, height // 2, width, height))
    return image


def corners(image: Image.Image) -> tuple[tuple[int, ...], ...]:
    width, height = image.size
    points = [(2, 2), (width - 3, 2), (2, height - 3), (width - 3, height - 3)]
    return tuple(tuple(image.getpixel(point)) for point in points)  # type: ignore[arg-type]


def close(got: tuple[tuple[int, ...], ...], want: tuple[tuple[int, ...], ...]) -> bool:
    pairs = (pair for g, w in zip(got, want, strict=True) for pair in zip(g, w, strict=True))
    return all(abs(a - b) <= 24 for a, b in pairs)


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (its pixels are not there)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def refused(data: bytes, **kw: Any) -> str:
    """The one line prepare (and probe, unless it could pass) refuse ``data`` with."""
    with pytest.raises(InputImageError) as err:
        prepare(data, 32, 32, max_pixels=kw.get("max_pixels", LIMIT))
    message = str(err.value)
    assert "\n" not in message and message
    return message


# --- probe ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FORMATS)
def test_probe_reads_the_size_of_each_format(kind: str) -> None:
    image = quadrants((123, 45))
    assert probe(encode(image, kind), max_pixels=LIMIT) == (123, 45)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_probe_gives_the_size_as_shown(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(quadrants((300, 100)), "JPEG", exif=exif.tobytes())
    expected = (100, 300) if orientation >= 5 else (300, 100)
    assert probe(data, max_pixels=LIMIT) == expected


def test_probe_reads_the_header_alone() -> None:
    """Pixels that do not decode do not matter to probe: it never decodes."""
    data = png_claiming(640, 480)
    assert probe(data, max_pixels=LIMIT) == (640, 480)
    assert refused(data) == "the input image is damaged or cut short"


@pytest.mark.parametrize("check", [probe, lambda data, **kw: prepare(data, 64, 64, **kw)])
def test_too_many_pixels_are_refused_before_decoding(check: Any) -> None:
    with pytest.raises(InputImageError) as err:
        check(png_claiming(9000, 9000), max_pixels=LIMIT)
    assert str(err.value) == (
        "the input image is 9000x9000 (81.0 megapixels), over the limit of 25.0 megapixels; "
        "send a smaller one"
    )


def test_a_tiny_file_claiming_30000x30000_is_refused_by_its_header() -> None:
    data = png_claiming(30000, 30000)
    assert len(data) < 100
    for check in (probe, lambda d, **kw: prepare(d, 64, 64, **kw)):
        with pytest.raises(InputImageError) as err:
            check(data, max_pixels=LIMIT)
        assert str(err.value) == (
            "the input image is 30000x30000 (900.0 megapixels), over the limit of 25.0 "
            "megapixels; send a smaller one"
        )


@pytest.mark.parametrize("pillow_limit", [None, 100])
def test_pillows_global_pixel_limit_decides_nothing(
    monkeypatch: pytest.MonkeyPatch, pillow_limit: int | None
) -> None:
    """Turned off (None: another library did so), fategen's limit still refuses; set very
    low, it does not refuse what fategen takes."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    with pytest.raises(InputImageError, match="9000x9000"):
        probe(png_claiming(9000, 9000), max_pixels=LIMIT)
    data = encode(quadrants((64, 48)), "PNG")  # 3,072 pixels: past twice Pillow's 100
    assert probe(data, max_pixels=LIMIT) == (64, 48)
    out = prepare(data, 16, 16, max_pixels=LIMIT)
    monkeypatch.undo()  # for the test's own Image.open
    assert decoded(out).size == (16, 16)


def test_a_limit_just_at_the_size_is_enough() -> None:
    data = encode(quadrants((100, 50)), "PNG")
    assert probe(data, max_pixels=5000) == (100, 50)
    with pytest.raises(InputImageError, match=r"100x50 \(0.0 megapixels\)"):
        probe(data, max_pixels=4999)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is text",
        b"\x89PNG\r\n\x1a\n",
        b"GIF89a",
        b"\xff\xd8\xff",
        b"RIFF\x10\x00\x00\x00WEBPVP8 ",
        b"BM" + b"\0" * 12,
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
    ],
)
def test_what_is_no_image_is_refused(data: bytes) -> None:
    with pytest.raises(InputImageError) as err:
        probe(data, max_pixels=LIMIT)
    assert str(err.value) in (inputimage.NOT_AN_IMAGE, inputimage.DAMAGED)


@pytest.mark.parametrize("kind", ["TIFF", "ICO", "PPM", "TGA", "PCX"])
def test_other_formats_are_refused_even_though_pillow_reads_them(kind: str) -> None:
    data = encode(quadrants((32, 32)), kind)
    assert Image.open(io.BytesIO(data)).format == kind  # Pillow itself would open it
    with pytest.raises(InputImageError) as err:
        probe(data, max_pixels=LIMIT)
    assert str(err.value) == "the input image is not a PNG, JPEG, WebP, GIF or BMP image"


# --- prepare ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [(640, 480), (480, 640), (1000, 100), (100, 1000), (33, 77)])
@pytest.mark.parametrize("target", [(512, 512), (768, 512), (512, 768), (1024, 576), (17, 91)])
def test_the_output_has_exactly_the_size_asked_for(
    source: tuple[int, int], target: tuple[int, int]
) -> None:
    out = decoded(prepare(encode(quadrants(source), "PNG"), *target, max_pixels=LIMIT))
    assert out.size == target
    assert out.mode == "RGB"


def test_the_picture_covers_the_size_and_is_cropped_around_the_centre() -> None:
    """A wide picture, green in its middle third, red at its sides, made square: the sides
    are cut off, the middle fills it."""
    image = Image.new("RGB", (300, 100), RED)
    image.paste(GREEN, (100, 0, 200, 100))
    out = decoded(prepare(encode(image, "PNG"), 64, 64, max_pixels=LIMIT))
    assert close(corners(out), (GREEN, GREEN, GREEN, GREEN))  # Lanczos rings by a unit


#: Each EXIF orientation -> how a camera stored an upright picture (the inverse of the turn
#: a viewer makes).
STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("kind", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(kind: str, orientation: int) -> None:
    upright = quadrants((120, 80))
    turn = STORED[orientation]
    stored = upright if turn is None else upright.transpose(turn)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, kind, exif=exif.tobytes())
    assert probe(data, max_pixels=LIMIT) == (120, 80)
    out = decoded(prepare(data, 60, 40, max_pixels=LIMIT))
    assert close(corners(out), (RED, GREEN, BLUE, WHITE)), corners(out)


def test_the_same_input_gives_the_same_bytes() -> None:
    data = encode(quadrants((333, 222)), "JPEG", quality=80)
    first = prepare(data, 200, 300, max_pixels=LIMIT)
    assert all(prepare(data, 200, 300, max_pixels=LIMIT) == first for _ in range(3))
    assert first.startswith(b"\x89PNG")


def test_no_metadata_is_carried_over() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "the user's secret")
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010E] = "a description"
    data = encode(quadrants(), "PNG", pnginfo=info, icc_profile=srgb, dpi=(300, 300), exif=exif)
    out = prepare(data, 30, 20, max_pixels=LIMIT)
    assert decoded(out).info == {}
    assert b"secret" not in out and b"description" not in out


def test_transparency_is_laid_on_white() -> None:
    image = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 20, 40))
    out = decoded(prepare(encode(image, "PNG"), 40, 40, max_pixels=LIMIT))
    assert out.getpixel((5, 20)) == BLUE
    assert out.getpixel((35, 20)) == WHITE


def test_half_transparent_grey_with_alpha() -> None:
    image = Image.new("LA", (20, 20), (0, 128))
    pixel = decoded(prepare(encode(image, "PNG"), 8, 8, max_pixels=LIMIT)).getpixel((4, 4))
    assert pixel == pytest.approx((127, 127, 127), abs=2)


def test_a_gif_gives_its_first_frame_with_its_transparency_on_white() -> None:
    frames = [Image.new("P", (30, 30), 1), Image.new("P", (30, 30), 2)]
    palette = [0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    for frame in frames:
        frame.putpalette(palette)
    frames[0].paste(0, (0, 0, 10, 30))  # index 0 is transparent
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], transparency=0)
    assert probe(data, max_pixels=LIMIT) == (30, 30)
    out = decoded(prepare(data, 30, 30, max_pixels=LIMIT))
    assert out.getpixel((25, 15)) == RED  # frame 1 (red), not frame 2 (blue)
    assert out.getpixel((3, 15)) == WHITE


def test_an_animated_webp_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (30, 30), RED), Image.new("RGB", (30, 30), BLUE)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert decoded(prepare(data, 10, 10, max_pixels=LIMIT)).getpixel((5, 5)) == RED


def test_a_cmyk_jpeg_is_converted() -> None:
    data = encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    pixel = decoded(prepare(data, 10, 10, max_pixels=LIMIT)).getpixel((5, 5))
    assert pixel == pytest.approx(RED, abs=8)


def test_a_16_bit_png_is_scaled_not_clipped() -> None:
    ramp = Image.linear_gradient("L").resize((64, 64)).convert("I").point(lambda v: v * 257)
    data = encode(ramp.convert("I;16"), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decoded(prepare(data, 64, 64, max_pixels=LIMIT))
    top, middle, bottom = (out.getpixel((32, y)) for y in (0, 32, 63))
    assert top == pytest.approx((0, 0, 0), abs=6)
    assert middle == pytest.approx((128, 128, 128), abs=8)
    assert bottom == pytest.approx((255, 255, 255), abs=6)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB"])
@pytest.mark.parametrize("kind", ["BMP", "PNG"])
def test_other_modes_are_converted(mode: str, kind: str) -> None:
    image = quadrants((40, 40)).convert(mode)
    out = decoded(prepare(encode(image, kind), 20, 20, max_pixels=LIMIT))
    assert out.mode == "RGB" and out.size == (20, 20)


def test_a_multi_picture_jpeg_counts_as_a_jpeg() -> None:
    pictures = [Image.new("RGB", (40, 30), RED), Image.new("RGB", (40, 30), BLUE)]
    data = encode(pictures[0], "MPO", save_all=True, append_images=pictures[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert probe(data, max_pixels=LIMIT) == (40, 30)
    pixel = decoded(prepare(data, 8, 8, max_pixels=LIMIT)).getpixel((4, 4))
    assert pixel == pytest.approx(RED, abs=8)


def test_a_large_jpeg_is_drafted_and_still_exact() -> None:
    """libjpeg scales by 8 while decoding a 4000x3000 photo for 256x256; the result has the
    size asked for and the picture's colours where they were."""
    data = encode(quadrants((4000, 3000)).resize((4000, 3000)), "JPEG", quality=90)
    out = decoded(prepare(data, 400, 300, max_pixels=LIMIT))
    assert out.size == (400, 300)
    assert close(corners(out), (RED, GREEN, BLUE, WHITE))


def test_a_size_below_one_is_the_callers_mistake() -> None:
    with pytest.raises(ValueError, match="0x64"):
        prepare(encode(quadrants(), "PNG"), 0, 64, max_pixels=LIMIT)


# --- damaged files ---------------------------------------------------------------------------


SAMPLES = {
    "png": encode(quadrants((80, 60)), "PNG"),
    "jpeg": encode(quadrants((80, 60)), "JPEG"),
    "progressive jpeg": encode(quadrants((80, 60)), "JPEG", progressive=True),
    "webp": encode(quadrants((80, 60)), "WEBP"),
    "lossless webp": encode(quadrants((80, 60)), "WEBP", lossless=True),
    "gif": encode(quadrants((80, 60)).convert("P"), "GIF"),
    "bmp": encode(quadrants((80, 60)), "BMP"),
    "rgba png": encode(quadrants((80, 60)).convert("RGBA"), "PNG"),
    "cmyk jpeg": encode(quadrants((80, 60)).convert("CMYK"), "JPEG"),
}


@pytest.mark.parametrize("truncated", [False, True])
@pytest.mark.parametrize("name", ["png", "jpeg", "progressive jpeg", "webp", "gif", "bmp"])
def test_a_file_cut_in_half_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, truncated: bool
) -> None:
    """Also when some library set ``ImageFile.LOAD_TRUNCATED_IMAGES`` (Pillow would then
    fill the missing part with grey and say nothing)."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", truncated)
    data = SAMPLES[name]
    assert decoded(prepare(data, 16, 16, max_pixels=LIMIT)).size == (16, 16)
    message = refused(data[: len(data) // 2])
    assert message == "the input image is damaged or cut short"


@pytest.mark.parametrize("truncated", [False, True])
def test_fuzzed_bytes_only_ever_end_in_an_input_image_error(
    monkeypatch: pytest.MonkeyPatch, truncated: bool
) -> None:
    """Random bytes, every sample cut at many lengths, and samples with bytes overwritten:
    a refusal (one line) or a picture of the size asked for, nothing else."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", truncated)
    rnd = random.Random(20261201)
    cases = [rnd.randbytes(rnd.randrange(1, 400)) for _ in range(100)]
    for data in SAMPLES.values():
        cases += [data[:cut] for cut in range(0, len(data), max(1, len(data) // 40))]
        for _ in range(40):
            damaged = bytearray(data)
            for _ in range(rnd.randrange(1, 8)):
                damaged[rnd.randrange(len(damaged))] = rnd.randrange(256)
            cases.append(bytes(damaged))
    messages: set[str] = set()
    for data in cases:
        for check in (probe, lambda d, **kw: prepare(d, 24, 16, **kw)):
            try:
                result = check(data, max_pixels=1_000_000)
            except InputImageError as err:
                messages.add(str(err))
                continue
            if isinstance(result, bytes):
                assert decoded(result).size == (24, 16)
    assert all(message and "\n" not in message for message in messages)
    assert inputimage.NOT_AN_IMAGE in messages and inputimage.DAMAGED in messages


# --- colour profiles ----------------------------------------------------------------------------


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + b"\0" * 4 + _s15(x) + _s15(y) + _s15(z)


def rgb_profile(primaries: tuple[tuple[float, float, float], ...], gamma: float = 2.2) -> bytes:
    """An ICC v2 matrix/TRC display profile (what a phone's Display P3 is), built by hand:
    Pillow can only make sRGB ones."""
    curve = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    text = b"a wide-gamut display\0"
    tags = [
        (b"desc", b"desc" + b"\0" * 4 + struct.pack(">I", len(text)) + text + b"\0" * 78),
        (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", _xyz(*primaries[0])),
        (b"gXYZ", _xyz(*primaries[1])),
        (b"bXYZ", _xyz(*primaries[2])),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
        (b"cprt", b"text" + b"\0" * 4 + b"none\0\0\0\0"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    entries, blobs = b"", b""
    for signature, blob in tags:
        blobs += b"\0" * (-(offset + len(blobs)) % 4)
        entries += struct.pack(">4sII", signature, offset + len(blobs), len(blob))
        blobs += blob
    body = struct.pack(">I", len(tags)) + entries + blobs
    header = (
        struct.pack(">I", 128 + len(body))
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 24
        + b"\0" * 4
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)
        + b"\0" * 48
    )
    return header + body


#: Display P3's primaries, adapted to D50 (as an ICC profile holds them).
P3 = ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841))


def with_profile(color: tuple[int, int, int], profile: bytes, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, image_format, icc_profile=profile, quality=95)
    return buffer.getvalue()


def first_pixel(data: bytes) -> tuple[int, ...]:
    with Image.open(io.BytesIO(data)) as image:
        assert "icc_profile" not in image.info  # none carried over
        return tuple(image.convert("RGB").getpixel((0, 0)))  # type: ignore[arg-type]


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_a_display_p3_photo_is_turned_into_srgb(image_format: str) -> None:
    data = with_profile((200, 100, 50), rgb_profile(P3), image_format)
    red, green, blue = first_pixel(prepare(data, 32, 24, max_pixels=10_000))
    # P3's (200, 100, 50) is a more saturated orange than sRGB's: about (216, 93, 24).
    assert red >= 210 and green <= 97 and blue <= 32, (red, green, blue)


def test_an_srgb_or_unusable_profile_keeps_the_pixels() -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for profile in (srgb, b"not a profile at all", rgb_profile(P3)[:200]):
        data = with_profile((200, 100, 50), profile, "PNG")
        pixel = first_pixel(prepare(data, 32, 24, max_pixels=10_000))
        assert all(abs(a - b) <= 2 for a, b in zip(pixel, (200, 100, 50), strict=True)), pixel
