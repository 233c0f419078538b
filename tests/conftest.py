"""Fixtures shared by all tests: tiny generated image folders and a published model."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench.servers import publish_model as publish_random_model  # noqa: F401 - one publisher
from shared.classes import CIFAR10_CLASSES

REPO = Path(__file__).resolve().parent.parent


def class_image(label: int, rng: random.Random, size: int = 32) -> Image.Image:
    """A learnable image: a class-specific colour with a bright square and pixel noise."""
    base = ((label * 53) % 256, (255 - label * 29) % 256, (label * 97 + 40) % 256)
    im = Image.new("RGB", (size, size), base)
    x, y = rng.randrange(size // 2), rng.randrange(size // 2)
    im.paste((255 - base[0], 255 - base[1], 255 - base[2]), (x, y, x + size // 3, y + size // 3))
    for _ in range(size):
        im.putpixel(
            (rng.randrange(size), rng.randrange(size)), tuple(rng.randrange(256) for _ in "rgb")
        )
    return im


def make_image_folders(
    root: Path, per_class: int = 8, splits=("train",), classes=None, seed=0
) -> Path:
    """Write root/<split>/<class>/<n>.(png|jpg) for each split; returns root."""
    rng = random.Random(seed)
    for split in splits:
        for label, name in enumerate(classes or CIFAR10_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                suffix = "png" if n % 2 else "jpg"
                class_image(label, rng).save(folder / f"{n:04d}.{suffix}")
    return root


def make_slow_folders(root: Path, per_class: int) -> Path:
    """root/train/<class>/*.png: 1024x1024 noise, one file per class hard-linked `per_class`
    times, so decoding takes seconds on any core (for signals sent while decoding)."""
    for label in range(10):
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True)
        noise = Image.frombytes("RGB", (1024, 1024), os.urandom(1024 * 1024 * 3))
        noise.save(folder / "0000.png", compress_level=1)
        for n in range(1, per_class):
            os.link(folder / "0000.png", folder / f"{n:04d}.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def inductor_cache(tmp_path_factory) -> Path:
    """torch.compile's cache (CPU_COMPILE servers, compiled training) in this run's temp folder:
    its default, /tmp/torchinductor_$USER, outlives every run and grew to GBs."""
    cache = tmp_path_factory.mktemp("inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    return cache


@pytest.fixture
def image_folders(tmp_path: Path) -> Path:
    """A train-only dataset of 10 classes x 8 images."""
    return make_image_folders(tmp_path / "data")


def run_trainer(
    *args: str, env: dict | None = None, timeout: float = 300, preexec_fn=None
) -> subprocess.CompletedProcess:
    """Run `python -m trainer` for real, from the repo root, offline; no decoded-image cache
    unless asked (it would land in the repo's volumes/cache)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "CACHE_DIR": "none", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def assert_one_line_error(result, *parts: str, alone: bool = False) -> None:
    """Exit 2 and exactly one `error:` line (the last one), naming every part, no traceback.

    `alone`: stderr holds that line and nothing else (no progress bar, no warning).
    """
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().endswith(errors[0])
    assert "Traceback" not in result.stderr
    if alone:
        assert result.stderr == errors[0] + "\n", result.stderr
    for part in parts:
        assert part in errors[0], errors[0]
