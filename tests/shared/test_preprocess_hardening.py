"""Decoding limits in shared/preprocess.py that protect every caller (trainer and inference)."""

import io

import pytest
from PIL import Image

from shared.preprocess import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, ImageError, load_rgb, resize_crop
from tests.hostile import BOMBS, png_text_bomb


def png_bytes(image: Image.Image) -> bytes:
    """Encode `image` as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(1_000_000, 1), (2, 500_000), (4000, 3), (40, 5)])
def test_resize_crop_handles_extreme_aspect_ratios_cheaply(size):
    # A 1,000,000x1 PNG is ~1 kB; resized on its short side first it became 32,000,000x32.
    image = load_rgb(png_bytes(Image.new("L", size, 128)), draft_size=32)
    out = resize_crop(32)(image)
    assert tuple(out.shape) == (3, 32, 32)
    assert int(out.float().mean().round()) == 128


def test_resize_crop_leaves_ordinary_aspect_ratios_alone():
    wide = Image.new("RGB", (MAX_ASPECT_RATIO * 10, 10), (10, 20, 30))
    wide.paste((200, 100, 50), (MAX_ASPECT_RATIO * 5 - 5, 0, MAX_ASPECT_RATIO * 5 + 5, 10))
    out = resize_crop(10)(wide)
    assert out[:, 5, 5].tolist() == [200, 100, 50]


@pytest.mark.parametrize(
    "fmt, save_args",
    [("PCX", {}), ("TGA", {}), ("ICO", {}), ("EPS", {})],
)
def test_load_rgb_refuses_formats_outside_the_allowlist(fmt, save_args):
    buffer = io.BytesIO()
    try:
        Image.new("RGB", (16, 16)).save(buffer, fmt, **save_args)
    except OSError:
        pytest.skip(f"PIL cannot write {fmt} here")
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_rgb(buffer.getvalue())


@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_of_every_format_are_refused_by_their_declared_size(name):
    # These files hold no pixel data at all: decoding first would fail as "truncated".
    with pytest.raises(ImageError, match=f"the limit is {MAX_IMAGE_PIXELS} pixels"):
        load_rgb(BOMBS[name])


def test_png_text_chunk_bomb_is_refused():
    with pytest.raises(ImageError):
        load_rgb(png_text_bomb())
