"""Signals at every stage of a run, and what `--resume` accepts: real processes, real signals."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shared import store
from tests.conftest import REPO, make_image_folders, make_slow_folders, run_trainer

FAST = ["--weights", "none", "--batch-size", "16", "--lr", "0.05", "--device", "cpu"]
pytestmark = pytest.mark.slow


def start(*args, env=None):
    """`python -m trainer ARGS` in the background, output as text lines."""
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(proc, text):
    """Read stdout until a line containing text; the lines read so far."""
    lines = []
    while not lines or text not in lines[-1]:
        line = proc.stdout.readline()
        assert line, (lines, proc.communicate())
        lines.append(line)
    return lines


def wait_for(condition, proc, timeout=600):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.002)


def dirs(root):
    return ["--runs-dir", str(root / "runs"), "--models-dir", str(root / "models")]


def only_run(root):
    (run,) = (root / "runs").iterdir()
    return run


def metrics(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_ctrl_c_while_decoding_exits_130_with_one_line_and_writes_nothing(tmp_path):
    make_slow_folders(tmp_path / "data", per_class=20)  # seconds of decoding
    proc = start("--data-dir", str(tmp_path / "data"), *FAST, *dirs(tmp_path))
    wait_for_line(proc, "loading data")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "data:" not in out  # it was still decoding
    assert err.strip() == "interrupted by signal 2; nothing was written"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert not (tmp_path / "models").exists()


def test_sigterm_in_last_validation_stops_143_and_resume_may_only_extend_epochs(tmp_path):
    data = make_image_folders(tmp_path / "d", per_class=4)
    make_image_folders(data, per_class=20, splits=("valid",), seed=1)  # a long validation
    args = ["--data-dir", str(data), "--epochs", "1", *FAST, *dirs(tmp_path)]
    # Inside the container the image sets TRAINER_COMMAND: the hint is the compose command.
    env = {"TRAINER_DEBUG_DIR": str(tmp_path / "debug"), "TRAINER_COMMAND": "docker compose run"}
    proc = start(*args, env=env)
    # Written after the epoch's last step, just before validation.
    wait_for((tmp_path / "debug" / "rank0-epoch1.json").exists, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    run = only_run(tmp_path)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == (
        f"interrupted by signal 15; state saved after epoch 1. "
        f"Resume with: docker compose run --resume {run.name}"
    )
    assert not (tmp_path / "models" / "LATEST").exists()
    config = (run / "config.json").read_text()

    refused = run_trainer(
        "--resume",
        run.name,
        "--lr",
        "0.5",
        "--seed",
        "3",
        "--epochs",
        "2",
        "--lr-period",
        "4",
        *dirs(tmp_path),
    )
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: run {run.name} keeps its own options; a resume cannot change --lr 0.5 "
        f"(run: 0.05), --seed 3 (run: 0) (drop them, or start a new run)"
    )
    assert (run / "config.json").read_text() == config

    # --epochs may change (and --lr may be given with the run's own value).
    resumed = run_trainer(
        "--resume",
        run.name,
        "--epochs",
        "2",
        "--lr",
        "0.05",
        "--device",
        "cpu",
        *dirs(tmp_path),
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming run {run.name} after epoch 1" in resumed.stdout
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # One-cycle re-planned over 2 epochs of 2 steps: warm-up 1 step, then (4 - 2) / (4 - 1)
    # of the peak at step 2. The 1-epoch plan had reached 0 there.
    assert float(rows[1]["lr"]) == pytest.approx(0.05 * 2 / 3, abs=1e-6)
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    (version,) = store.list_versions(tmp_path / "models")
    assert store.read_meta(tmp_path / "models", version)["metrics"]["epochs"] == 2


def test_sigterm_in_test_evaluation_publishes_nothing_and_in_publishing_completes(tmp_path):
    data = make_image_folders(tmp_path / "d", per_class=4, splits=("train", "valid"))
    make_image_folders(data, per_class=20, splits=("test",), seed=1)  # a long test evaluation
    proc = start("--data-dir", str(data), "--epochs", "1", *FAST, *dirs(tmp_path))
    wait_for_line(proc, "examples/sec")  # printed just before the test evaluation
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    run = only_run(tmp_path)
    assert proc.returncode == 143, err
    assert "published" not in out
    assert f"state saved after epoch 1. Resume with: python -m trainer --resume {run.name}" in err
    assert not (tmp_path / "models").exists() or not store.list_versions(tmp_path / "models")

    # The resumed run has no epoch left: it tests and publishes. A SIGTERM while it publishes
    # lets the publish finish (all or nothing), then exits 143.
    proc = start("--resume", *dirs(tmp_path))
    models = tmp_path / "models"
    wait_for(lambda: models.is_dir() and any(models.iterdir()), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    (version,) = store.list_versions(models)
    assert store.read_latest(models) == version
    store.load_version(models, version)  # complete: the sha256 matches
    assert json.loads((run / "result.json").read_text())["version"] == version
    assert f"signal 15 arrived while publishing: version {version} is complete" in out
