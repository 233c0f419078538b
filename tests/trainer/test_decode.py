"""Decoding with worker processes: the same pixels as in one process, errors and Ctrl-C intact."""

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import make_image_folders, make_slow_folders, run_trainer
from tests.trainer.test_resume import FAST, dirs, start, wait_for_line
from trainer import TrainerError
from trainer.data import load_folders
from trainer.decode import pool_size


@pytest.fixture
def data(tmp_path):
    # 32 px JPEGs (the libjpeg-turbo path) and PNGs (the PIL path), plus larger images that
    # every size resizes, in a valid/ folder: two cache files.
    root = make_image_folders(tmp_path / "data", per_class=9, classes=["a", "b", "c"])
    make_image_folders(root, per_class=3, splits=("valid",), classes=["a", "b", "c"], seed=1)
    for n, name in enumerate(["a", "b", "c"]):
        Image.new("RGB", (57, 41), (n * 80, 30, 200)).save(root / "train" / name / "big.jpg")
    return root


@pytest.mark.parametrize("size", [32, 24])
def test_worker_processes_decode_the_same_pixels_as_one_process(data, tmp_path, size):
    one = load_folders(data, size, 0.25, 0, cache_dir="", workers=1)
    # Into the cache file (workers write to its temporary file), then read back from it.
    cache = tmp_path / "cache"
    for _ in ("miss", "hit"):
        pooled = load_folders(data, size, 0.25, 0, cache_dir=str(cache), workers=3)
        for a, b in ((one.train, pooled.train), (one.valid, pooled.valid)):
            assert a.paths == b.paths
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert len(list(cache.iterdir())) == 2
    off = load_folders(data, size, 0.25, 0, cache_dir="none", workers=2)
    assert torch.equal(off.train.images, one.train.images)


def test_unreadable_image_in_a_worker_names_the_file_and_leaves_no_cache_file(data, tmp_path):
    (data / "train" / "b" / "bad.jpg").write_bytes(b"not a jpeg")
    cache = tmp_path / "cache"
    with pytest.raises(TrainerError, match=r"unreadable image .*/train/b/bad\.jpg: "):
        load_folders(data, 32, 0.25, 0, cache_dir=str(cache), workers=2)
    assert list(cache.iterdir()) == []  # the temporary file is gone too


def test_trainer_reports_a_workers_unreadable_image_in_one_line_exit_2(data, tmp_path):
    (data / "train" / "b" / "bad.jpg").write_bytes(b"not a jpeg")
    result = run_trainer(
        *("--data-dir", str(data), "--decode-workers", "2"), *FAST, *dirs(tmp_path)
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: unreadable image ") and "/b/bad.jpg" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # nothing else: no worker traceback


def test_auto_uses_one_process_per_core_for_large_sets_only():
    assert pool_size(10, 0) == 1
    assert pool_size(100_000, 0) == len(os.sched_getaffinity(0))
    assert pool_size(3, 8) == 3 and pool_size(1000, 1) == 1


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment holds `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_ctrl_c_while_workers_decode_exits_130_in_one_line_and_stops_them(tmp_path):
    make_slow_folders(tmp_path / "data", per_class=40)  # seconds of decoding
    marker = f"DECODE_TEST={uuid.uuid4().hex}"
    env = {marker.split("=")[0]: marker.split("=")[1], "DECODE_WORKERS": "2"}
    env["CACHE_DIR"] = str(tmp_path / "cache")  # workers write its temporary file
    proc = start("--data-dir", str(tmp_path / "data"), *FAST, *dirs(tmp_path), env=env)
    wait_for_line(proc, "loading data")
    deadline = time.monotonic() + 60
    while len(processes_with(marker)) < 3 and time.monotonic() < deadline:  # and 2 workers
        time.sleep(0.02)
    assert len(processes_with(marker)) >= 3
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "data:" not in out  # it was still decoding
    assert err.strip() == "interrupted by signal 2; nothing was written"
    assert not (tmp_path / "models").exists() and list((tmp_path / "cache").iterdir()) == []
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:  # none outlives the trainer
        time.sleep(0.05)
    assert processes_with(marker) == []
