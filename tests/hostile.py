"""Hostile uploads, built small: header-only decompression bombs and hand-made multipart bodies.

A bomb here is a tiny valid file whose header declares billions of pixels; a server that
decoded before checking the size would allocate gigabytes.
"""

import io
import struct
import zlib

import numpy as np
from PIL import Image, PngImagePlugin

BOUNDARY = "hostileboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    """`image` encoded as `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A 69-byte PNG whose IHDR (with a valid CRC) declares width x height."""
    data = encode(Image.new("L", (8, 8)), "PNG")
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return data[:8] + ihdr + data[8 + 25 :]


def jpeg_bomb(width: int = 65_000, height: int = 65_000) -> bytes:
    """A 16x16 JPEG whose SOF0 header declares width x height."""
    data = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_bomb(width: int = 65_535, height: int = 65_535) -> bytes:
    """An 8x8 GIF whose screen and image descriptor declare width x height."""
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    descriptor = data.index(b"\x2c", 13)
    data[descriptor + 5 : descriptor + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def bmp_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """An 8x8 BMP whose info header declares width x height."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_bomb(side: int = 60_000) -> bytes:
    """An 8x8 TIFF whose ImageWidth and ImageLength tags say side x side."""
    data = bytearray(encode(Image.new("L", (8, 8)), "TIFF"))
    assert data[:2] == b"II"
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack("<HH", data[entry : entry + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            value = struct.pack("<H", side) + b"\0\0" if kind == 3 else struct.pack("<I", side)
            data[entry + 8 : entry + 12] = value
    return bytes(data)


def webp_bomb() -> bytes:
    """An 8x8 lossless WebP whose VP8L header declares 16384x16384 (the format's maximum)."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L"
    bits = struct.unpack("<I", data[21:25])[0]
    bits = (bits & ~((1 << 28) - 1)) | (16384 - 1) | ((16384 - 1) << 14)  # 14 bits each, minus 1
    data[21:25] = struct.pack("<I", bits)
    return bytes(data)


def png_text_bomb() -> bytes:
    """A ~50 kB PNG whose compressed text chunk inflates to 50 MB of metadata."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * 50_000_000, zip=True)
    return encode(Image.new("L", (8, 8)), "PNG", pnginfo=info)


# name: bytes. Each declares more than MAX_IMAGE_PIXELS, some more than PIL's own hard limit.
BOMBS = {
    "png_60000x60000": png_bomb(),
    "png_7000x7000": png_bomb(7000, 7000),  # 49 MP: over our limit, under PIL's warning
    "jpeg_65000x65000": jpeg_bomb(),
    "gif_65535x65535": gif_bomb(),
    "bmp_40000x40000": bmp_bomb(),
    "tiff_60000x60000": tiff_bomb(),
    "webp_16384x16384": webp_bomb(),
}


def truncated_jpeg() -> bytes:
    """The first 300 bytes of a noisy 64x64 JPEG."""
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    return encode(Image.fromarray(pixels), "JPEG")[:300]


def part(headers: bytes, data: bytes) -> bytes:
    """One multipart part: raw header lines (no trailing CRLF), then the data."""
    return b"--" + BOUNDARY.encode() + b"\r\n" + headers + b"\r\n\r\n" + data + b"\r\n"


def file_part(filename: bytes, data: bytes, field: bytes = b"file") -> bytes:
    """A part carrying `data` as a file called `filename` (raw bytes, not escaped)."""
    disposition = b'Content-Disposition: form-data; name="' + field + b'"; filename="'
    return part(disposition + filename + b'"\r\nContent-Type: image/png', data)


def form(*parts: bytes) -> bytes:
    """A complete multipart body from parts."""
    return b"".join(parts) + b"--" + BOUNDARY.encode() + b"--\r\n"


def tiny_parts_form(count: int = 3000) -> bytes:
    """`count` one-byte file parts in one request."""
    return form(*(file_part(str(i).encode(), b"x") for i in range(count)))


def oversize_form(megabytes: float) -> bytes:
    """One file part of `megabytes` MiB of zeros."""
    return form(file_part(b"big.png", b"\0" * int(megabytes * 1024 * 1024)))


def chunks(body: bytes, size: int = 64 * 1024):
    """`body` as a generator: requests then sends it chunked, without Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


# File names that would escape an upload folder or corrupt a log, if one were ever used.
# (CR and LF cannot appear raw in a part header: they would end the header line.)
EVIL_FILENAMES = [
    b"../../../../../../../../tmp/{marker}/pwned.png",
    b"..\\..\\..\\..\\windows\\system32\\{marker}.png",
    b"/tmp/{marker}/absolute.png",
    b"a\x00b\x01c\x1b[31mred\x7f.png",
    b"\xe2\x80\xaegnp.exe",  # U+202E right-to-left override: shows as "exe.png"
    b"con:aux|*?<>.png",
]
