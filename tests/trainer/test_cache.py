"""The decoded-image cache: hits give the same pixels, anything stale or damaged is rebuilt."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from shared.preprocess import load_rgb, resize_crop
from tests.conftest import REPO, make_image_folders
from trainer.cache import cache_path
from trainer.data import load_folders
from trainer.decode import decode_chunk


@pytest.fixture
def data(tmp_path):
    return make_image_folders(tmp_path / "data", per_class=3, classes=["a", "b"])


def load(data, cache, size=16):
    return load_folders(data, size, 0.25, 0, cache_dir=str(cache))


def the_file(cache):
    (path,) = cache.iterdir()
    return path


def test_second_load_reads_the_cache_and_gives_identical_tensors(data, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = load(data, cache)
    inode = the_file(cache).stat().st_ino
    second = load(data, cache)
    assert the_file(cache).stat().st_ino == inode  # not rewritten
    assert capsys.readouterr().err == ""
    for a, b in ((first.train, second.train), (first.valid, second.valid)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert a.paths == b.paths
    uncached = load(data, "")
    assert torch.equal(uncached.train.images, second.train.images)


def test_touched_or_changed_image_rebuilds_the_cache(data, tmp_path, capsys):
    cache = tmp_path / "cache"
    load(data, cache, size=32)
    image = data / "train" / "a" / "0000.jpg"
    os.utime(image, ns=(1, 1))  # same bytes, other mtime
    load(data, cache, size=32)
    assert capsys.readouterr().err.count("stale") == 1
    Image.new("RGB", (32, 32), (1, 2, 3)).save(image)  # other pixels
    rebuilt = load_folders(data, 32, 0.25, 0, cache_dir=str(cache))
    assert "stale" in capsys.readouterr().err
    row = (
        rebuilt.train.paths.index("train/a/0000.jpg")
        if "train/a/0000.jpg" in (rebuilt.train.paths)
        else None
    )
    split = rebuilt.train if row is not None else rebuilt.valid
    row = split.paths.index("train/a/0000.jpg")
    with open(image, "rb") as f:
        assert torch.equal(split.images[row], resize_crop(32)(load_rgb(f, draft_size=32)))


def test_other_image_size_gets_its_own_cache(data, tmp_path):
    cache = tmp_path / "cache"
    assert load(data, cache, size=16).train.images.shape[-1] == 16
    assert load(data, cache, size=24).train.images.shape[-1] == 24
    assert len(list(cache.iterdir())) == 2


@pytest.mark.parametrize("damage", ["truncate", "padded", "foreign", "empty"])
def test_damaged_cache_file_is_reported_in_one_line_and_rebuilt(data, tmp_path, capsys, damage):
    cache = tmp_path / "cache"
    good = load(data, cache)
    path = the_file(cache)
    size = path.stat().st_size
    if damage == "truncate":
        os.truncate(path, size - 100)
    elif damage == "padded":
        with open(path, "ab") as f:
            f.write(b"\0" * 64)
    elif damage == "foreign":
        path.write_bytes(b"\x93NUMPY" + os.urandom(size))
    else:
        path.write_bytes(b"")
    again = load(data, cache)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unusable" in err and str(path) in err, err
    assert torch.equal(again.train.images, good.train.images)
    assert path.stat().st_size == size  # rebuilt whole
    load(data, cache)
    assert capsys.readouterr().err == ""


def test_cache_dir_none_writes_nothing(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for off in ("none", ""):
        assert len(load(data, off).train) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_unwritable_cache_folder_is_reported_not_an_error(data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert len(load(data, blocker / "cache").train) == 4
    assert "not written" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_filling_the_cache_at_once_leave_a_valid_file(tmp_path):
    data = make_image_folders(tmp_path / "data", per_class=40, classes=["a", "b"])
    cache = tmp_path / "cache"
    code = (
        "import sys; from trainer.data import load_folders; "
        f"load_folders({str(data)!r}, 32, 0.25, 0, cache_dir={str(cache)!r})"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    assert [p.name for p in cache.iterdir()] == [cache_path(cache, data / "train", 32).name]
    cached = load_folders(data, 32, 0.25, 0, cache_dir=str(cache))
    fresh = load_folders(data, 32, 0.25, 0, cache_dir="")
    assert torch.equal(cached.train.images, fresh.train.images)


def test_fast_jpeg_path_gives_the_pixels_of_the_serving_decoder(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for n, (mode, size) in enumerate([("RGB", 32), ("L", 32), ("RGB", 40), ("RGB", 32)]):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        path = tmp_path / f"{n}.{'png' if n == 3 else 'jpg'}"
        Image.fromarray(pixels).convert(mode).save(path, quality=75)
        files.append(str(path))
    decoded = np.zeros((len(files), 3, 32, 32), dtype=np.uint8)
    assert decode_chunk(decoded, files, 32) is None
    for path, image in zip(files, decoded, strict=True):
        with open(path, "rb") as f:
            expected = resize_crop(32)(load_rgb(f, draft_size=32)).numpy()
        assert np.array_equal(image, expected), path
