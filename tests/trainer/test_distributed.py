"""The trainer under torchrun on the CPU (gloo): `torchrun --nproc-per-node 2 -m trainer`.

Each rank writes its shard and a sha256 of its weights after every epoch when TRAINER_DEBUG_DIR
is set (observation only: trainer/distributed.py::debug_record).
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shared import store
from tests.conftest import REPO, make_image_folders, run_trainer

# 160 training images, a global batch of 32: 5 steps per epoch, 16 images per rank and step.
FAST = ["--weights", "none", "--batch-size", "32", "--lr", "0.05", "--device", "cpu"]
FAST += ["--image-size", "16", "--epochs", "2"]
pytestmark = pytest.mark.slow
# Two starts of two processes and 2 tiny epochs; a restarted group that cannot form would
# otherwise wait until the test runner gives up.
RESTART_TEST_TIMEOUT_S = 240


def torchrun_command(*args, nproc=2, launcher=()):
    """`torchrun --standalone --nproc-per-node N [launcher options] -m trainer ARGS`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*command, f"--nproc-per-node={nproc}", *launcher, "-m", "trainer", *args]


def torchrun(*args, nproc=2, env=None, timeout=900):
    """Run torchrun_command(ARGS) to the end."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        torchrun_command(*args, nproc=nproc),
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dirs(root):
    return ["--runs-dir", str(root / "runs"), "--models-dir", str(root / "models")]


def metrics(root):
    (run,) = (root / "runs").iterdir()
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def debug(root, rank, epoch):
    return json.loads((root / "debug" / f"rank{rank}-epoch{epoch}.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_image_folders(root, per_class=16, splits=("train",))
    return make_image_folders(root, per_class=4, splits=("valid",), seed=1)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, data):
    """One 2-process run of 2 epochs, with each rank's debug records."""
    root = tmp_path_factory.mktemp("two")
    env = {"TRAINER_DEBUG_DIR": str(root / "debug")}
    result = torchrun("--data-dir", str(data), *FAST, *dirs(root), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return root, result


def test_two_process_run_publishes_exactly_one_version(two_processes):
    root, result = two_processes
    (version,) = store.list_versions(root / "models")
    assert store.read_latest(root / "models") == version
    assert result.stdout.count("published model version") == 1  # rank 0 alone speaks
    assert "2 processes (gloo)" in result.stdout
    meta = store.read_meta(root / "models", version)
    assert meta["run_id"] == next((root / "runs").iterdir()).name
    assert [r["epoch"] for r in metrics(root)] == ["1", "2"]


def test_both_ranks_hold_identical_weights_after_every_epoch(two_processes):
    root, _ = two_processes
    for epoch in (1, 2):
        digests = {debug(root, rank, epoch)["weights_sha256"] for rank in (0, 1)}
        assert len(digests) == 1, epoch
    # The digest covers the weights: they changed between epochs.
    assert debug(root, 0, 1)["weights_sha256"] != debug(root, 0, 2)["weights_sha256"]


def test_shards_are_disjoint_and_cover_the_training_set(two_processes):
    root, _ = two_processes
    orders = []
    for epoch in (1, 2):
        shards = [debug(root, rank, epoch)["shard"] for rank in (0, 1)]
        assert len(shards[0]) == len(shards[1]) == 80  # 5 steps of 16 images each
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(160))
        orders.append(shards[0])
    assert orders[0] != orders[1]  # a new permutation every epoch


def test_two_processes_follow_one_process_with_the_same_global_batch(tmp_path, data, two_processes):
    root, _ = two_processes
    single = run_trainer("--data-dir", str(data), *FAST, *dirs(tmp_path), timeout=900)
    assert single.returncode == 0, single.stderr
    one, two = metrics(tmp_path), metrics(root)
    # The same steps: the same learning rate at every epoch and the same images per epoch.
    assert [r["lr"] for r in one] == [r["lr"] for r in two]
    # Not the same numbers: each rank normalizes its 16 images with their own BatchNorm
    # statistics (one process: 32) and draws its own augmentation. First epoch's train loss
    # within 15%, both learning (chance: loss 2.3, acc 0.1).
    loss1, loss2 = float(one[0]["train_loss"]), float(two[0]["train_loss"])
    assert abs(loss1 - loss2) <= 0.15 * loss1, (one, two)
    assert float(one[-1]["train_acc"]) > 0.2 and float(two[-1]["train_acc"]) > 0.2, (one, two)


def test_killed_rank_is_restarted_and_the_run_resumes_and_publishes_once(tmp_path):
    # Smaller than `data` (2 steps of 16 images per epoch) and one layout and precision (no
    # timing at start): the two starts of torch dominate the time.
    data = make_image_folders(tmp_path / "data", per_class=4, splits=("train", "valid"))
    args = ["--data-dir", str(data), *FAST, "--batch-size", "16", "--epochs", "2"]
    args += ["--amp", "off", "--channels-last", "off", *dirs(tmp_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRAINER_DEBUG_DIR": str(tmp_path / "debug")}
    command = torchrun_command(*args, launcher=["--max-restarts=1"])
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True
        )
    try:
        # Once rank 0 has saved epoch 1 (metrics.csv is written after last.pt), SIGKILL the
        # worker process of rank 1 (not torchrun): torchrun restarts both workers.
        record = tmp_path / "debug" / "rank1-epoch1.json"
        deadline = time.monotonic() + RESTART_TEST_TIMEOUT_S
        while not (record.exists() and list((tmp_path / "runs").glob("*/metrics.csv"))):
            assert proc.poll() is None, out_path.read_text() + err_path.read_text()
            assert time.monotonic() < deadline, "no epoch saved in time"
            time.sleep(0.02)
        before = metrics(tmp_path)
        killed = json.loads(record.read_text())["pid"]
        os.kill(killed, signal.SIGKILL)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:  # hung (e.g. a restarted group that never forms): no leftovers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out, err = out_path.read_text(), err_path.read_text()
    assert proc.returncode == 0, out + err
    (run,) = (tmp_path / "runs").iterdir()
    resumed = [line for line in out.splitlines() if line.startswith("resuming run")]
    assert len(resumed) == 1 and resumed[0].startswith(f"resuming run {run.name} after epoch ")
    after = int(resumed[0].rsplit(" ", 1)[1])
    # Not from scratch and not after the end: from the last epoch saved before the kill.
    assert len(before) <= after < 2, (before, resumed)
    rows = metrics(tmp_path)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[: len(before)] == before  # the epochs before the kill are kept as they were
    # The epochs after the resume were trained by new processes.
    assert debug(tmp_path, 1, after + 1)["pid"] != killed
    (version,) = store.list_versions(tmp_path / "models")
    assert store.read_meta(tmp_path / "models", version)["run_id"] == run.name
    assert out.count("published model version") == 1


def test_global_batch_that_does_not_split_evenly_is_a_one_line_error(tmp_path, data):
    result = torchrun("--data-dir", str(data), *FAST, "--batch-size", "33", *dirs(tmp_path))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: --batch-size 33 is the global batch: it must be a multiple of the 2 processes"
    ]
    # One traceback: torchrun's own ChildFailedError report, none from the trainer processes.
    assert result.stderr.count("Traceback") == 1, result.stderr
    assert "ChildFailedError" in result.stderr
    assert not (tmp_path / "models").exists()


def test_sync_bn_on_the_cpu_is_a_one_line_error(tmp_path, data):
    result = run_trainer("--data-dir", str(data), *FAST, "--sync-bn", "on", *dirs(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --sync-bn needs CUDA (SyncBatchNorm has no CPU kernels)"


def test_container_entrypoint_starts_torchrun_for_trainer_nproc():
    env = {**os.environ, "TRAINER_NPROC": "2", "PATH": f"{REPO}/.venv/bin:{os.environ['PATH']}"}
    result = subprocess.run(
        ["sh", "scripts/container-entrypoint.sh", "python", "-m", "trainer", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("usage: python -m trainer") == 2  # one per process
