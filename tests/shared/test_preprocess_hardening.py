"""Decoding limits in shared/preprocess.py that protect every caller (trainer and inference)."""

import io
import time

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


def cpu_seconds_to_prepare(data: bytes) -> float:
    """CPU time (best of 3) to decode and resize `data` as /predict does at 32 px."""
    times = []
    for _ in range(3):
        start = time.process_time()  # CPU time: other work on the machine does not count
        resize_crop(32)(load_rgb(data, draft_size=32))
        times.append(time.process_time() - start)
    return min(times)


@pytest.mark.parametrize("size", [(200_000, 1), (1, 200_000)])
def test_extreme_aspect_ratio_costs_no_more_than_an_ordinary_image_of_as_many_pixels(size):
    # Resized on its short side first, 200,000x1 became 6,400,000x32 RGB: 600 MB and about a
    # second of CPU, against milliseconds for a 447x447 image of the same pixel count.
    extreme = cpu_seconds_to_prepare(png_bytes(Image.new("L", size, 128)))
    ordinary = cpu_seconds_to_prepare(png_bytes(Image.new("L", (447, 447), 128)))
    assert extreme <= 3 * ordinary + 0.05, (extreme, ordinary)


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
    # PIL's text-chunk guard raises ValueError ("Decompressed Data Too Large").
    with pytest.raises(ImageError, match=r"corrupt or truncated \(ValueError\)"):
        load_rgb(png_text_bomb())
