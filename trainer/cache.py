"""Decoded-image cache: one uint8 (N, 3, S, S) array per split folder, loaded memory-mapped.

File: CACHE_DIR/<folder name>-<sha of its absolute path>-<S>px.u8 =
  MAGIC (8 bytes) | header length (4 bytes, little-endian) | JSON header | zero padding to a
  64-byte boundary | N*3*S*S bytes of pixels.
The header holds the sha256 of the key: every file's relative path, size and mtime_ns, the
image size, PIL's and torchvision's versions (they decode) and CACHE_FORMAT (our decoding
code). A file whose magic, key, shape or length is wrong is never used: it is named in one line
and rebuilt. Writers write a uniquely named temporary file and rename it into place, so two
trainers starting at once each leave a whole file and readers never see a part.
"""

import contextlib
import hashlib
import json
import os
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import torchvision

from shared.store import atomic_path

# Bump when the decoding code changes the pixels it produces.
CACHE_FORMAT = 1
MAGIC = b"T10DCACH"
ALIGN = 64
DEFAULT_CACHE_DIR = "volumes/cache/decoded"
# decode(out): fill the uint8 (N, 3, S, S) array `out` (a file mapping, or memory).
Decode = Callable[[np.ndarray], None]


def cache_key(files: list[tuple[str, int, int]], image_size: int) -> str:
    """sha256 of everything that shapes the decoded pixels: each file's (relative path, size,
    mtime_ns), the image size, the decoders' versions and CACHE_FORMAT."""
    digest = hashlib.sha256()
    digest.update(
        json.dumps([CACHE_FORMAT, PIL.__version__, torchvision.__version__, image_size]).encode()
    )
    digest.update("\n".join(f"{p}\0{size}\0{mtime}" for p, size, mtime in files).encode())
    return digest.hexdigest()


def cache_path(cache_dir: Path, split_dir: Path, image_size: int) -> Path:
    """Where the cache of `split_dir` at `image_size` lives: one file per folder and size."""
    resolved = str(Path(split_dir).resolve())
    tag = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{Path(resolved).name}-{tag}-{image_size}px.u8"


def _read(path: Path, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The cached pixels, memory-mapped; ValueError saying why the file is unusable."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            raise ValueError("not a decoded-image cache file")
        (length,) = struct.unpack("<I", head[len(MAGIC) :])
        if length > 1 << 16:
            raise ValueError("header too long")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("unreadable header") from None
    if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT:
        raise ValueError("written by another cache format")
    if header.get("key") != key:
        raise ValueError("stale: the images, the image size or the decoder changed")
    if tuple(header.get("shape", ())) != shape:
        raise ValueError(f"shape {header.get('shape')} is not {list(shape)}")
    offset = -(-(len(MAGIC) + 4 + length) // ALIGN) * ALIGN
    if path.stat().st_size != offset + int(np.prod(shape)):
        raise ValueError(f"truncated or padded: {path.stat().st_size} bytes")
    # Copy-on-write: a writable view (torch.from_numpy wants one) that never changes the file.
    return np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=shape)


def _write(path: Path, key: str, shape: tuple[int, ...], decode: Decode) -> None:
    """Decode into a new cache file atomically: a unique temporary file that the decoder fills
    in place (header first), fsync, then rename."""
    header = json.dumps(
        {"format": CACHE_FORMAT, "key": key, "shape": list(shape), "dtype": "uint8"}
    ).encode()
    prefix = MAGIC + struct.pack("<I", len(header)) + header
    prefix += b"\0" * (-len(prefix) % ALIGN)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(prefix)
            f.flush()
            # Allocated now: a full disk is an OSError here, not a SIGBUS in a worker later.
            os.posix_fallocate(f.fileno(), len(prefix), int(np.prod(shape)))
        decode(np.memmap(tmp, dtype=np.uint8, mode="r+", offset=len(prefix), shape=shape))


def _decode_in_memory(shape: tuple[int, ...], decode: Decode) -> np.ndarray:
    """Decode into an unnamed temporary file (so that worker processes can write it) and keep
    it mapped; into memory, in this process, where no temporary file can be made."""
    with contextlib.ExitStack() as stack:  # the file goes at the end; its mapping stays
        try:
            tmp = stack.enter_context(tempfile.NamedTemporaryFile(prefix="decoded-"))
            os.posix_fallocate(tmp.fileno(), 0, int(np.prod(shape)))
            out = np.memmap(tmp.name, dtype=np.uint8, mode="r+", shape=shape)
        except (OSError, ValueError):  # no room for a temporary file; ValueError: no images
            out = np.zeros(shape, dtype=np.uint8)
        decode(out)
    return out


def load_or_decode(
    cache_dir: str,
    split_dir: Path,
    files: list[tuple[str, int, int]],
    image_size: int,
    decode: Decode,
) -> tuple[np.ndarray, str]:
    """The (N, 3, S, S) uint8 pixels of `files` ((relative path, size, mtime_ns) each), from
    the cache or from `decode(out)`, and "hit", "miss" or "off".

    `cache_dir` empty or "none" disables the cache. A cache that can't be read or written is
    reported in one line on stderr and the images are decoded; it is never an error.
    """
    shape = (len(files), 3, image_size, image_size)
    if cache_dir in ("", "none"):
        return _decode_in_memory(shape, decode), "off"
    path = cache_path(Path(cache_dir), split_dir, image_size)
    key = cache_key(files, image_size)
    if path.exists():
        try:
            return _read(path, key, shape), "hit"
        except (OSError, ValueError) as exc:
            print(f"cache {path} unusable ({exc}); decoding again", file=sys.stderr)
    try:
        _write(path, key, shape, decode)
        return _read(path, key, shape), "miss"
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"cache {path} not written ({reason}); continuing", file=sys.stderr)
    return _decode_in_memory(shape, decode), "miss"
