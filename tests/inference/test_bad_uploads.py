"""Bad and unusual input to a real Gunicorn: JSON errors, never a 5xx, good files still served."""

import contextlib
import io
import shutil
import socket
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.preprocess import MAX_IMAGE_PIXELS, eval_transform, load_rgb
from shared.store import load_version
from tests import hostile
from tests.inference.serving import image_bytes


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    """`image` encoded as `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A ~60 kB PNG of 64 megapixels: over MAX_IMAGE_PIXELS, refused before decoding."""
    return encode(Image.new("1", (8000, 8000)), "PNG")


BAD_FILES = {
    "empty": b"",
    "text": b"just some words, not an image\n",
    "html": b"<!doctype html><html><body><script>alert(1)</script></body></html>",
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>',
    "truncated_png": image_bytes(size=(64, 64), fmt="PNG")[:60],
    "truncated_jpeg": encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG"
    )[:300],
    "random_bytes": np.random.default_rng(1).integers(0, 256, 5000, np.uint8).tobytes(),
    "pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
    "bomb": bomb_png(),
}


def exif_rotated_jpeg() -> bytes:
    """A JPEG whose EXIF orientation says "rotate 90 degrees"."""
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    """A 3-frame GIF animation."""
    frames = [Image.new("P", (30, 30), i * 40) for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def palette_with_transparency() -> bytes:
    """A palette PNG with a transparent colour (tRNS)."""
    image = Image.new("P", (30, 30), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(0, (0, 0, 15, 30))
    return encode(image, "PNG", transparency=0)


def sixteen_bit_png() -> bytes:
    """A 16-bit grayscale PNG (mode I;16)."""
    pixels = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    image = Image.fromarray(pixels)
    assert image.mode == "I;16"
    return encode(image, "PNG")


RGB = Image.new("RGB", (40, 30), (30, 160, 90))
# name: (bytes, filename sent, content type sent)
UNUSUAL_IMAGES = {
    "grayscale": (encode(RGB.convert("L"), "PNG"), "g.png", "image/png"),
    "one_bit": (encode(RGB.convert("1"), "PNG"), "b.png", "image/png"),
    "palette_transparency": (palette_with_transparency(), "p.png", "image/png"),
    "rgba": (encode(Image.new("RGBA", (40, 30), (10, 20, 30, 100)), "PNG"), "a.png", "image/png"),
    "cmyk_jpeg": (encode(RGB.convert("CMYK"), "JPEG"), "c.jpg", "image/jpeg"),
    "sixteen_bit": (sixteen_bit_png(), "s.png", "image/png"),
    "exif_rotated": (exif_rotated_jpeg(), "r.jpg", "image/jpeg"),
    "animated_gif": (animated_gif(), "anim.gif", "image/gif"),
    "bmp": (encode(RGB, "BMP"), "x.bmp", "image/bmp"),
    "tiff": (encode(RGB, "TIFF"), "x.tiff", "image/tiff"),
    "webp": (encode(RGB, "WEBP"), "x.webp", "image/webp"),
    "one_pixel": (encode(Image.new("RGB", (1, 1), (5, 5, 5)), "PNG"), "1.png", "image/png"),
    "wide_4000x3": (encode(Image.new("RGB", (4000, 3), (9, 99, 9)), "PNG"), "w.png", "image/png"),
    "tall_3x4000": (encode(Image.new("RGB", (3, 4000), (9, 9, 99)), "PNG"), "t.png", "image/png"),
    "wide_20000x1": (encode(Image.new("RGB", (20000, 1), (99, 9, 9)), "PNG"), "w.png", "image/png"),
    "tall_1x20000": (encode(Image.new("RGB", (1, 20000), (9, 9, 9)), "PNG"), "t.png", "image/png"),
    "png_named_jpg_sent_as_gif": (encode(RGB, "PNG"), "photo.jpg", "image/gif"),
    "jpeg_sent_as_text": (encode(RGB, "JPEG"), "notes.txt", "text/plain"),
    "no_content_type": (encode(RGB, "PNG"), "x", "application/octet-stream"),
}


@pytest.fixture(scope="module")
def local_model(served_models):
    """The served version loaded in-process, with its eval transform."""
    models_dir, version = served_models
    loaded = load_version(models_dir, version)
    return loaded, eval_transform(loaded.meta)


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_gets_an_error_entry_and_other_files_are_predicted(server, name):
    files = [
        ("file", ("good1.png", image_bytes())),
        ("file", (f"{name}.png", BAD_FILES[name], "image/png")),
        ("file", ("good2.jpg", image_bytes(fmt="JPEG"))),
    ]
    response = server.post("/predict", files=files)
    assert response.status_code == 200, response.text
    good1, bad, good2 = response.json()["predictions"]
    assert "category" in good1 and "category" in good2
    assert bad["filename"] == f"{name}.png"
    assert bad["error"]["code"] == "invalid_image"
    assert "category" not in bad
    assert "Traceback" not in response.text


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_request_with_only_bad_files_is_422(server, name):
    response = server.post("/predict", files={"file": (f"{name}.bin", BAD_FILES[name])})
    assert response.status_code == 422
    body = response.json()
    assert body["error"]["code"] == "no_usable_image"
    assert body["predictions"][0]["error"]["code"] == "invalid_image"


def test_bomb_is_refused_by_its_declared_size(server):
    response = server.post("/predict", files={"file": ("bomb.png", BAD_FILES["bomb"])})
    assert "8000x8000" in response.json()["predictions"][0]["error"]["message"]


@pytest.mark.parametrize("name", list(UNUSUAL_IMAGES))
def test_unusual_valid_image_is_predicted_like_in_process(server, local_model, name):
    data, filename, content_type = UNUSUAL_IMAGES[name]
    response = server.post("/predict", files={"file": (filename, data, content_type)})
    assert response.status_code == 200, response.text
    entry = response.json()["predictions"][0]
    assert entry["filename"] == filename
    loaded, transform = local_model
    with torch.inference_mode():
        x = transform(load_rgb(data, draft_size=loaded.meta["image_size"]))
        expected = int(loaded.model(x[None]).argmax())
    assert entry["category_index"] == expected


def test_missing_file_field_is_400(server):
    response = server.post("/predict", files={"image": ("a.png", image_bytes())})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "no_file" and "image" in error["message"]


def test_text_field_named_file_is_400_with_a_hint(server):
    response = server.post("/predict", files={"file": (None, "cavalo.jpg")})
    assert response.status_code == 400
    assert "-F file=@" in response.json()["error"]["message"]


def test_empty_multipart_form_is_400(server):
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
    response = server.post("/predict", data=b"--xyz--\r\n", headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "no_file"


def test_multipart_without_boundary_is_400(server):
    headers = {"Content-Type": "multipart/form-data"}
    response = server.post("/predict", data=b"whatever", headers=headers)
    assert response.status_code == 400


@pytest.mark.parametrize(
    "kwargs",
    [
        {"json": {"file": "a.png"}},
        {"data": {"file": "a.png"}},  # application/x-www-form-urlencoded
        {"data": image_bytes(), "headers": {"Content-Type": "image/png"}},
        {},  # no body at all
    ],
    ids=["json", "urlencoded", "raw_image", "no_body"],
)
def test_non_multipart_body_is_400(server, kwargs):
    response = server.post("/predict", **kwargs)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "not_multipart"


def big_form(megabytes: float) -> tuple[bytes, str]:
    """A multipart body with one `file` part of `megabytes` MiB; returns (body, content type)."""
    boundary = "limitboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    body = head + b"\0" * int(megabytes * 1024 * 1024) + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_body_over_the_limit_with_content_length_is_413(server):
    body, content_type = big_form(3)  # the server's limit is 2 MiB
    response = server.post("/predict", data=body, headers={"Content-Type": content_type})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_body_over_the_limit_sent_chunked_is_413(server):
    body, content_type = big_form(3)

    def chunks():  # a generator makes requests use Transfer-Encoding: chunked
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    response = server.post("/predict", data=chunks(), headers={"Content-Type": content_type})
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_more_files_than_max_files_is_413(server):
    files = [("file", (f"{i}.png", image_bytes(size=(4, 4)))) for i in range(25)]  # max 24
    response = server.post("/predict", files=files)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_files"


def test_thousands_of_tiny_parts_are_413(server):
    files = [("file", (f"{i}", b"x")) for i in range(3000)]
    response = server.post("/predict", files=files)
    assert response.status_code == 413


def test_file_name_with_path_and_control_characters_is_echoed_safely(server):
    boundary = "nameboundary"
    name = b"..\\../etc/\x01pass\x1bwd\x7f.png"
    body = (
        f"--{boundary}\r\n".encode()
        + b'Content-Disposition: form-data; name="file"; filename="'
        + name
        + b'"\r\nContent-Type: image/png\r\n\r\n'
        + image_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    response = server.post("/predict", data=body, headers=headers)
    assert response.status_code == 200
    echoed = response.json()["predictions"][0]["filename"]
    assert echoed.endswith(".png") and "pass" in echoed
    assert not any(ord(c) < 32 or ord(c) == 127 for c in echoed)


def test_unknown_route_is_json_404(server):
    response = server.get("/no/such/route")
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("method, path", [("GET", "/predict"), ("DELETE", "/health/live")])
def test_wrong_method_is_json_405(server, method, path):
    import requests

    response = requests.request(method, server.url + path, timeout=30)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert "Allow" in response.headers


def raw_request(server, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection and return all the server answers."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\nZZZ\r\nnot a chunk\r\n",
            b"400",
        ),
    ],
    ids=["garbage_request_line", "huge_header", "broken_chunking"],
)
def test_malformed_http_gets_a_json_4xx(server, request_bytes, status):
    answer = raw_request(server, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == status, answer[:300]
    assert b"application/json" in head
    assert body.startswith(b'{"error": {"code": ') or body.startswith(b'{"error":{"code":')


@pytest.mark.parametrize("name", list(hostile.BOMBS))
def test_bomb_in_any_format_is_refused_by_its_declared_size(server, name):
    files = [("file", ("ok.png", image_bytes())), ("file", (name, hostile.BOMBS[name]))]
    response = server.post("/predict", files=files)
    assert response.status_code == 200, response.text
    good, bomb = response.json()["predictions"]
    assert "category" in good
    # The file has no pixel data at all: only a check of the header gives this reason.
    assert f"the limit is {MAX_IMAGE_PIXELS} pixels" in bomb["error"]["message"]


def test_endless_chunked_body_is_cut_off_with_413(server):
    head = (
        b"POST /predict HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: " + hostile.MULTIPART.encode() + b"\r\n\r\n"
    )
    start = hostile.file_part(b"endless.png", b"")[:-2]  # an open part, never finished
    chunk = b"\0" * (256 * 1024)
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    sent, limit = 0, 64 << 20  # the server's limit is 2 MiB
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + b"%x\r\n" % len(start) + start + b"\r\n")
        try:
            while sent < limit:
                sock.sendall(frame)
                sent += len(frame)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: what we want
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert sent < limit, "the server kept reading an endless body"
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"payload_too_large"' in answer


def header_lines(count: int) -> bytes:
    """`count` filler header lines for one multipart part."""
    return b"".join(b"\r\nX-Filler-%d: v" % i for i in range(count))


@pytest.mark.parametrize(
    "headers, status",
    [
        (b'Content-Disposition: form-data; name="file"; filename="' + b"n" * 400_000 + b'"', 200),
        (b'Content-Disposition: form-data; name="file"; filename="h"' + header_lines(40_000), 413),
        (
            b'Content-Disposition: form-data; name="file"; filename="h"\r\nContent-Type: image/png'
            + b"; a=b" * 80_000,
            200,
        ),
    ],
    ids=["400kB_file_name", "500kB_of_header_lines", "400kB_of_content_type_parameters"],
)
def test_huge_multipart_part_headers_are_bounded(server, headers, status):
    body = hostile.form(hostile.part(headers, image_bytes()))
    response = server.post("/predict", data=body, headers={"Content-Type": hostile.MULTIPART})
    assert response.status_code == status, response.text[:300]
    if status == 200:
        assert len(response.json()["predictions"][0]["filename"]) <= 255


def test_file_names_are_never_used_as_paths_and_echo_without_control_characters(server):
    marker = Path(tempfile.mkdtemp(prefix="upload-names-"))
    try:
        names = [n.replace(b"{marker}", marker.name.encode()) for n in hostile.EVIL_FILENAMES]
        encoded = (
            b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''"
            b"..%2F..%2Ftmp%2F" + marker.name.encode() + b"%2Fx%0D%0Ay%00%E2%80%AE.png"
        )
        parts = [hostile.file_part(name, image_bytes()) for name in names]
        body = hostile.form(*parts, hostile.part(encoded, image_bytes()))
        response = server.post("/predict", data=body, headers={"Content-Type": hostile.MULTIPART})
        assert response.status_code == 200, response.text
        echoed = [entry["filename"] for entry in response.json()["predictions"]]
        assert len(echoed) == len(names) + 1
        for name in echoed:
            assert not any(unicodedata.category(c)[0] == "C" for c in name), repr(name)
        assert list(marker.iterdir()) == [], "an uploaded file name was used as a path"
    finally:
        shutil.rmtree(marker)
