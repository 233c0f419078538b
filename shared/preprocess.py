"""Image decoding and the one preprocessing pipeline shared by training, validation and serving.

Pipeline: bytes -> `load_rgb` (any PIL mode to RGB) -> `resize_crop` (PIL, uint8 CHW at
image_size) -> [training only: `augment_batch`] -> `normalize_batch` (float, mean/std).
The trainer caches the output of `resize_crop`, so every stage up to it runs once per image.
"""

import io
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

# Refuse images above this many pixels before decoding them (decompression bombs): 40 MP is a
# large phone photo; PIL's own guard only warns below 89 MP.
MAX_IMAGE_PIXELS = 40_000_000
# Formats PIL may try to decode. PIL knows ~70, several of them rarely used and weakly tested,
# and EPS hands the file to Ghostscript; uploads and datasets only need the common ones. (Phone
# MPO files open through the JPEG entry.)
ALLOWED_FORMATS = ("AVIF", "BMP", "GIF", "JPEG", "PNG", "PPM", "TIFF", "WEBP")
# Longest side over shortest side kept before resizing. Resizing the shorter side first would
# turn a tiny 1,000,000x1 PNG into a 32,000,000x32 image (seconds of CPU, gigabytes of memory);
# only the centre square survives the crop anyway, so the excess is cut before resizing.
MAX_ASPECT_RATIO = 8
# Background that transparent pixels are composited onto.
BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """The bytes are not an image we can use; the message is safe to show a user."""


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha over a white background, high bit depths rescaled."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # convert("L") clips 16/32-bit values at 255; rescale by the type's range instead.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, mode="L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_rgb(data: bytes | BinaryIO, draft_size: int | None = None) -> Image.Image:
    """Decode an image file to an RGB PIL image (EXIF orientation applied, first frame only).

    `draft_size` lets the JPEG decoder downscale while decoding, keeping both sides >= it.
    Raises ImageError for anything that is not a decodable image of acceptable size.
    """
    fp = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        with Image.open(fp, formats=ALLOWED_FORMATS) as im:
            # Image.open reads only the header: check the size before any pixel is decoded.
            width, height = im.size
            if width < 1 or height < 1:
                raise ImageError("image has no pixels")
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageError(
                    f"image is {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS} pixels"
                )
            im.seek(0)  # animations: first frame
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            # In place: the decoded pixels are not needed twice (the copy was ~4 % of a small
            # upload's request time in the service).
            ImageOps.exif_transpose(im, in_place=True)
            return _to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        # PIL's own guard, at open: the header declares over twice PIL's limit (~179 MP).
        raise ImageError(
            f"image is far too large (a decompression bomb?); the limit is "
            f"{MAX_IMAGE_PIXELS} pixels"
        ) from None
    except UnidentifiedImageError:
        raise ImageError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError) as exc:
        # Truncated or corrupt data surfaces as any of these from PIL's plugins.
        raise ImageError(f"image data is corrupt or truncated ({type(exc).__name__})") from None


def crop_extreme_aspect(image: Image.Image) -> Image.Image:
    """Cut the long side of a very elongated image to MAX_ASPECT_RATIO x its short side, centred."""
    width, height = image.size
    short = min(width, height)
    if max(width, height) <= MAX_ASPECT_RATIO * short:
        return image
    keep = MAX_ASPECT_RATIO * short
    if width > height:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))


def resize_crop(image_size: int) -> v2.Compose:
    """Return the deterministic stage RGB PIL image -> uint8 tensor (3, image_size, image_size)."""
    # Shorter side to image_size, then the centre square: keeps the aspect ratio like
    # torchvision's eval presets. A no-op on 32x32 CIFAR images at image_size 32.
    return v2.Compose(
        [
            crop_extreme_aspect,
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.PILToTensor(),
        ]
    )


class BatchNormalizer:
    """uint8 (..., 3, H, W) -> float32 scaled to [0, 1], minus mean, over std (per channel).

    The arithmetic of torchvision's v2.ToDtype(float32, scale=True) + v2.Normalize, bit for bit,
    but with mean and std placed on each device once: v2.Normalize builds them from Python lists
    on every call, i.e. two small host->device copies per batch on a GPU, which a CUDA graph
    cannot capture (inference/graphs.py).
    """

    def __init__(self, mean: list[float], std: list[float]) -> None:
        if not all(std):
            raise ValueError("std must not contain zeros")
        self.mean, self.std = list(mean), list(std)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize `x` on its own device."""
        constants = self._on.get(x.device)
        if constants is None:
            constants = tuple(
                torch.tensor(v, dtype=torch.float32, device=x.device).view(-1, 1, 1)
                for v in (self.mean, self.std)
            )
            self._on[x.device] = constants
        mean, std = constants
        # Float input is only cast, and then not modified in place (x.float() may be x itself).
        scaled = x.float() if x.is_floating_point() else x.float().mul_(1.0 / _int_max(x.dtype))
        return scaled.sub(mean).div_(std)


def _int_max(dtype: torch.dtype) -> int:
    return torch.iinfo(dtype).max


def normalize_batch(mean: list[float], std: list[float]) -> BatchNormalizer:
    """Return the tail shared by all paths: uint8 (..., 3, H, W) -> normalized float32."""
    return BatchNormalizer(mean, std)


def eval_transform(meta: dict) -> v2.Compose:
    """Build the full per-image eval pipeline (RGB PIL -> normalized tensor) from model.json."""
    return v2.Compose([resize_crop(meta["image_size"]), normalize_batch(meta["mean"], meta["std"])])


def augment_batch(
    x: torch.Tensor, pad: int = 4, flip: bool = True, mode: str = "zeros"
) -> torch.Tensor:
    """Random crop (padding `pad`, mode "zeros" or "reflect") and horizontal flip, drawn
    independently per image.

    x: uint8 or float (N, C, H, W) on any device; returns the same shape on the same device.
    torchvision's v2 transforms draw one set of parameters per call, i.e. per batch, so the
    per-image draw is done here with one gather.
    """
    n, c, h, w = x.shape
    device = x.device
    pad_mode = "reflect" if mode == "reflect" else "constant"
    padded = F.pad(x, (pad, pad, pad, pad), mode=pad_mode) if pad else x
    # Offsets in [0, 2*pad] per image; drawn on the CPU generator so runs are reproducible
    # across devices, then moved (N ints: negligible).
    dy = torch.randint(0, 2 * pad + 1, (n,)).to(device)
    dx = torch.randint(0, 2 * pad + 1, (n,)).to(device)
    rows = dy[:, None] + torch.arange(h, device=device)[None, :]  # (N, H)
    cols = dx[:, None] + torch.arange(w, device=device)[None, :]  # (N, W)
    if flip:
        flipped = (torch.rand(n) < 0.5).to(device)
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    index_n = torch.arange(n, device=device)[:, None, None, None]
    index_c = torch.arange(c, device=device)[None, :, None, None]
    return padded[index_n, index_c, rows[:, None, :, None], cols[:, None, None, :]]
