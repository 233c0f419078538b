import io
import struct

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from shared.preprocess import (
    MAX_IMAGE_PIXELS,
    ImageError,
    augment_batch,
    eval_transform,
    load_rgb,
    normalize_batch,
    resize_crop,
)

META = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        lambda: encode(Image.new("L", (40, 30), 128), "PNG"),
        lambda: encode(Image.new("LA", (40, 30), (128, 100)), "PNG"),
        lambda: encode(Image.new("1", (40, 30), 1), "PNG"),
        lambda: encode(Image.new("RGBA", (40, 30), (255, 0, 0, 0)), "PNG"),
        lambda: encode(Image.new("CMYK", (40, 30), (0, 255, 0, 0)), "JPEG"),
        lambda: encode(Image.new("I;16", (40, 30), 40000), "PNG"),
        lambda: encode(Image.new("P", (40, 30), 3), "GIF", transparency=3),
        lambda: encode(Image.new("RGB", (1, 1), (1, 2, 3)), "BMP"),
        lambda: encode(Image.new("RGB", (4000, 3), (9, 9, 9)), "WEBP"),
        lambda: encode(Image.new("RGB", (40, 30), (9, 9, 9)), "TIFF"),
    ],
    ids=[
        "L",
        "LA",
        "1bit",
        "RGBA",
        "CMYK",
        "I16",
        "P-transparent",
        "1x1-bmp",
        "4000x3-webp",
        "tiff",
    ],
)
def test_odd_modes_decode_to_rgb_and_transform(make):
    im = load_rgb(make())
    assert im.mode == "RGB"
    x = eval_transform(META)(im)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_sixteen_bit_is_rescaled_not_clipped():
    im = load_rgb(encode(Image.new("I;16", (4, 4), 32768), "PNG"))
    assert im.getpixel((0, 0)) == (127, 127, 127)


def test_transparent_pixels_become_white():
    im = load_rgb(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"))
    assert im.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = load_rgb(encode(im, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and bottom[0] < 50


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = io.BytesIO()
    frames[0].save(data, format="GIF", save_all=True, append_images=frames[1:])
    assert load_rgb(data.getvalue()).getpixel((0, 0))[0] > 200


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header declaring width x height pixels with no real pixel data behind it."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_before_decoding():
    with pytest.raises(ImageError, match="limit"):
        load_rgb(bomb_png(MAX_IMAGE_PIXELS, 2))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world",
        b"<html><body>hi</body></html>",
        b'<svg xmlns="http://www.w3.org/2000/svg"/>',
        bytes(range(256)) * 4,
    ],
    ids=["empty", "text", "html", "svg", "random"],
)
def test_non_images_raise_image_error(data):
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_rgb(data)


def test_truncated_jpeg_raises_image_error():
    data = encode(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_rgb(data[: len(data) // 2])


def test_eval_transform_is_resize_then_shared_tail():
    im = Image.new("RGB", (64, 48), (200, 100, 50))
    full = eval_transform(META)(im)
    tail = normalize_batch(META["mean"], META["std"])(resize_crop(32)(im).unsqueeze(0))[0]
    assert torch.equal(full, tail)


def test_normalize_batch_is_torchvision_to_dtype_and_normalize_bit_for_bit():
    """The shared tail keeps torchvision's arithmetic exactly, for uint8 and float batches, and
    leaves a float input unmodified."""
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    normalize = normalize_batch(mean, std)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    for _ in range(2):  # the second call uses the constants kept from the first
        assert torch.equal(normalize(images), reference(images))
    floats = torch.rand(2, 3, 8, 8)
    before = floats.clone()
    assert torch.equal(normalize(floats), reference(floats))
    assert torch.equal(floats, before)
    with pytest.raises(ValueError, match="std"):
        normalize_batch(mean, [0.2, 0.0, 0.2])


def test_augment_batch_draws_per_image_and_keeps_pixels():
    torch.manual_seed(0)
    x = torch.arange(16 * 3 * 8 * 8, dtype=torch.float32).view(16, 3, 8, 8)
    x = x.expand(16, 3, 8, 8).clone()
    x[:] = x[0]  # identical images: any difference comes from per-image draws
    out = augment_batch(x, pad=2)
    assert out.shape == x.shape
    assert len({tuple(o.flatten()[:20].tolist()) for o in out}) > 1
    # Every output pixel is an input pixel or zero padding.
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def test_augment_batch_without_pad_or_flip_is_identity():
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(augment_batch(x, pad=0, flip=False), x)
