from __future__ import annotations

import io

import pytest
from PIL import Image

from conftest import png, solid
from fategen.core.grid import decode_images, encode_webp, make_grid
from fategen.errors import ImageError

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


# --- grid geometry -----------------------------------------------------------------------------


def test_one_image_stays_single() -> None:
    image = solid(RED)
    assert make_grid([image]) is image


def test_two_side_by_side() -> None:
    result = make_grid([solid(RED), solid(GREEN)])
    assert result.size == (128, 48)
    assert result.getpixel((10, 10)) == RED
    assert result.getpixel((64 + 10, 10)) == GREEN


def test_three_stand_in_a_row_with_no_empty_cell() -> None:
    result = make_grid([solid(RED), solid(GREEN), solid(BLUE)])
    assert result.size == (192, 48)
    assert result.getpixel((10, 10)) == RED
    assert result.getpixel((74, 10)) == GREEN
    assert result.getpixel((138, 47)) == BLUE
    assert result.getpixel((191, 47)) == BLUE  # no black cell anywhere


def test_four_on_two_by_two() -> None:
    result = make_grid([solid(RED), solid(GREEN), solid(BLUE), solid(WHITE)])
    assert result.size == (128, 96)
    corners = [result.getpixel(p) for p in [(0, 0), (127, 0), (0, 95), (127, 95)]]
    assert corners == [RED, GREEN, BLUE, WHITE]


def test_unequal_sizes_are_centred_in_max_cells() -> None:
    big, small = solid(RED, (100, 60)), solid(GREEN, (40, 20))
    result = make_grid([big, small])
    assert result.size == (200, 60)  # cell = 100 x 60
    # small is centred in the second cell: x 130..169, y 20..39
    assert result.getpixel((130, 20)) == GREEN
    assert result.getpixel((169, 39)) == GREEN
    assert result.getpixel((129, 20)) == BLACK
    assert result.getpixel((130, 19)) == BLACK
    assert result.getpixel((170, 39)) == BLACK
    assert result.getpixel((99, 59)) == RED

    tall = make_grid([solid(RED, (10, 30)), solid(GREEN, (30, 10)), solid(BLUE, (20, 20))])
    assert tall.size == (90, 30)  # cell = 30 x 30, three in a row


def test_other_modes_are_converted() -> None:
    rgba = Image.new("RGBA", (8, 8), (*BLUE, 255))
    gray = Image.new("L", (8, 8), 255)
    result = make_grid([rgba, gray])
    assert result.mode == "RGB"
    assert result.getpixel((0, 0)) == BLUE
    assert result.getpixel((8, 0)) == WHITE


def test_no_images() -> None:
    with pytest.raises(ImageError):
        make_grid([])


# --- decoding and encoding ---------------------------------------------------------------------


def test_decode_round_trip() -> None:
    (image,) = decode_images([png(solid(RED))])
    assert image.size == (64, 48)
    assert image.getpixel((0, 0)) == RED


@pytest.mark.parametrize(
    "blob",
    [b"", b"not an image", png(solid(RED))[:60], png(solid(RED))[:-30]],
    ids=["empty", "garbage", "truncated-header", "truncated-data"],
)
def test_corrupt_image(blob: bytes) -> None:
    with pytest.raises(ImageError) as err:
        decode_images([png(solid(GREEN)), blob])
    assert str(err.value) == "ComfyUI returned an image that cannot be decoded"


def test_encode_webp() -> None:
    data = encode_webp(solid(RED, (32, 32)), quality=80, method=0)
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP"
        assert image.size == (32, 32)
