"""The trainer as users run it: `python -m trainer ...` in a subprocess."""

import csv
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision

from shared import store
from tests.conftest import REPO, assert_one_line_error, make_image_folders, run_trainer

# Layout and precision fixed: `auto` times them, and two runs compared must compute alike.
FAST = ["--weights", "none", "--batch-size", "16", "--lr", "0.05", "--device", "cpu"]
FAST += ["--amp", "off", "--channels-last", "on", "--cache-dir", "none"]


def dirs(tmp_path):
    return ["--runs-dir", str(tmp_path / "runs"), "--models-dir", str(tmp_path / "models")]


def only_run(tmp_path):
    (run,) = (tmp_path / "runs").iterdir()
    return run


def read_metrics(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_one_epoch_run_publishes_a_model_loadable_by_the_contract(tmp_path, image_folders):
    result = run_trainer("--data-dir", str(image_folders), "--epochs", "1", *FAST, *dirs(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"loss \d+\.\d{3}, train acc \d\.\d{3}, valid acc \d\.\d{3}", lines[-3])
    assert re.fullmatch(r"\d+\.\d examples/sec on \[device\(type='cpu'\)\]", lines[-2])
    models = tmp_path / "models"
    version = store.read_latest(models)
    assert version and version in lines[-1]
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(models / version / "model.pt", weights_only=True))
    meta = json.loads((models / version / "model.json").read_text())
    assert meta["config"]["batch_size"] == 16 and meta["config"]["image_size"] == 32
    assert "valid_acc" in meta["metrics"] and "test_acc" not in meta["metrics"]
    run = only_run(tmp_path)
    for name in ("config.json", "metrics.csv", "curves.png", "last.pt", "best.pt", "result.json"):
        assert (run / name).is_file(), name
    (row,) = read_metrics(run)
    assert set(row) == {
        "epoch",
        "lr",
        "train_loss",
        "train_acc",
        "valid_loss",
        "valid_acc",
        "examples_per_sec",
        "seconds",
    }
    config = json.loads((run / "config.json").read_text())
    assert config["split"]["valid_from_train"] and config["split"]["valid"] == 10


def test_test_split_gives_test_acc_and_confusion_plot(tmp_path):
    data = make_image_folders(tmp_path / "d", per_class=4, splits=("train", "valid", "test"))
    result = run_trainer("--data-dir", str(data), "--epochs", "1", *FAST, *dirs(tmp_path))
    assert result.returncode == 0, result.stderr
    version = store.read_latest(tmp_path / "models")
    meta = json.loads((tmp_path / "models" / version / "model.json").read_text())
    assert 0 <= meta["metrics"]["test_acc"] <= 1
    assert set(meta["metrics"]["test_per_class_acc"]) == set(meta["class_names"])
    assert (only_run(tmp_path) / "confusion.png").is_file()


def test_training_learns_the_generated_classes(tmp_path):
    data = make_image_folders(tmp_path / "d", per_class=24)
    result = run_trainer(
        "--data-dir",
        str(data),
        "--epochs",
        "6",
        "--weights",
        "none",
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--device",
        "cpu",
        *dirs(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    accs = [float(r["valid_acc"]) for r in read_metrics(only_run(tmp_path))]
    assert max(accs) >= 0.5, accs  # chance is 0.1


def start_trainer(args):
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_epoch(run_parent, epochs_done, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = list(run_parent.glob("*/metrics.csv"))
        if runs and len(read_metrics(runs[0].parent)) >= epochs_done:
            return runs[0].parent
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("trainer made no progress")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=str)
def test_killed_run_resumes_to_the_same_metrics_as_an_uninterrupted_one(tmp_path, sig):
    data = make_image_folders(tmp_path / "d", per_class=24)
    args = ["--data-dir", str(data), "--epochs", "5", *FAST, "--seed", "7"]
    straight = run_trainer(*args, *dirs(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr

    proc = start_trainer([*args, *dirs(tmp_path / "b")])
    run = wait_for_epoch(tmp_path / "b" / "runs", 1, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    if sig != signal.SIGKILL:
        assert f"--resume {run.name}" in stderr
    assert not (tmp_path / "b" / "models" / "LATEST").exists()

    # The state the kill left: the epoch to continue after, and the rows (timings included)
    # that a resume must keep rather than recompute.
    done = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert 1 <= done < 5
    before = read_metrics(run)

    resumed = run_trainer("--resume", *dirs(tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming run {run.name} after epoch {done}" in resumed.stdout
    ran = [int(m) for m in re.findall(r"^epoch +(\d+)/5 ", resumed.stdout, re.MULTILINE)]
    assert ran == list(range(done + 1, 6)), resumed.stdout  # a restart would run 1..5
    rows = read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert rows[: len(before)] == before  # earlier epochs' rows, timings too, kept as they were
    expected = read_metrics(only_run(tmp_path / "a"))
    keys = ("lr", "train_loss", "train_acc", "valid_loss", "valid_acc")
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in expected]


def test_resume_without_unfinished_run_is_an_error(tmp_path):
    result = run_trainer("--resume", *dirs(tmp_path))
    assert result.returncode == 2 and "no unfinished run" in result.stderr


def test_imagenet_weights_offline_stop_with_a_hint(tmp_path, image_folders):
    # A closed local port as proxy makes any download fail at once, as offline hosts do.
    env = {
        "TORCH_HOME": str(tmp_path / "cache"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    result = run_trainer(
        "--data-dir",
        str(image_folders),
        "--epochs",
        "1",
        "--weights",
        "imagenet",
        "--device",
        "cpu",
        *dirs(tmp_path),
        env=env,
    )
    assert result.returncode == 2
    assert "--weights none" in result.stderr and "--weights PATH" in result.stderr
    assert not (tmp_path / "models").exists()


def test_imagenet_weights_come_from_torchvisions_cache(tmp_path, image_folders):
    checkpoints = tmp_path / "cache" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    imagenet_like = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(imagenet_like, checkpoints / "resnet18-f37072fd.pth")
    env = {"TORCH_HOME": str(tmp_path / "cache"), "https_proxy": "http://127.0.0.1:9"}
    result = run_trainer(
        "--data-dir",
        str(image_folders),
        "--epochs",
        "1",
        "--weights",
        "imagenet",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        *dirs(tmp_path),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads(
        (tmp_path / "models" / store.read_latest(tmp_path / "models") / "model.json").read_text()
    )
    assert meta["mean"] == [0.485, 0.456, 0.406]  # ImageNet statistics travel with the model


def test_weights_from_a_path_are_the_ones_trained(tmp_path, image_folders):
    torch.manual_seed(123)  # weights no seed of the trainer would draw
    initial = torchvision.models.resnet18(num_classes=10).state_dict()
    path = tmp_path / "init.pt"
    torch.save(initial, path)
    # A learning rate this small leaves the weights where they started: the published model
    # shows which weights the run began from.
    result = run_trainer(
        "--data-dir",
        str(image_folders),
        "--epochs",
        "1",
        "--weights",
        str(path),
        "--lr",
        "1e-12",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        *dirs(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    models = tmp_path / "models"
    published = torch.load(models / store.read_latest(models) / "model.pt", weights_only=True)
    weights = [k for k in initial if k.endswith(".weight")]  # BatchNorm statistics do move
    assert len(weights) > 40
    for key in weights:
        torch.testing.assert_close(published[key], initial[key], atol=1e-6, rtol=0, msg=key)


def bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    one_empty = make_image_folders(tmp_path / "one_empty", per_class=2)
    for f in (one_empty / "train" / "cat").iterdir():
        f.unlink()
    broken = make_image_folders(tmp_path / "broken", per_class=2)
    (broken / "train" / "dog" / "bad.jpg").write_bytes(b"not a jpeg")
    mismatch = make_image_folders(tmp_path / "mismatch", per_class=2)
    make_image_folders(mismatch, per_class=2, splits=("test",), classes=["cat", "dog"])
    good = make_image_folders(tmp_path / "good", per_class=2)
    not_weights = tmp_path / "not-weights.pt"
    not_weights.write_bytes(b"not a torch file")
    return {
        "missing": (["--data-dir", str(tmp_path / "nope")], "no train/ folder"),
        "empty": (["--data-dir", str(empty)], "at least two class folders"),
        "empty-class": (["--data-dir", str(one_empty)], "no images in"),
        "unreadable": (["--data-dir", str(broken)], "bad.jpg"),
        "mismatch": (["--data-dir", str(mismatch)], "don't match"),
        "bad-weights": (
            ["--data-dir", str(broken), "--weights", str(tmp_path / "x.pt")],
            "no such",
        ),
        "unloadable-weights": (
            ["--data-dir", str(good), "--weights", str(not_weights)],
            "not a loadable state_dict",
        ),
        "zero-epochs": (["--epochs", "0"], "--epochs"),
        "bad-ratio": (["--valid-ratio", "1.5"], "--valid-ratio"),
        "bad-device": (["--device", "tpu"], "--device"),
        "bad-ema": (["--ema", "1.5"], "--ema"),
        "bad-crop-mode": (["--crop-mode", "wrap"], "--crop-mode"),
        "no-budget-no-epochs": (["--time-budget", "0"], "needs --epochs"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "empty-class",
        "unreadable",
        "mismatch",
        "bad-weights",
        "unloadable-weights",
        "zero-epochs",
        "bad-ratio",
        "bad-device",
        "bad-ema",
        "bad-crop-mode",
        "no-budget-no-epochs",
    ],
)
def test_bad_input_is_one_line_exit_2_and_publishes_nothing(tmp_path, case):
    args, message = bad_inputs(tmp_path)[case]
    # Defaults only for the flags the case does not set: argparse keeps the last value given.
    defaults = [
        arg
        for flag, value in (("--weights", "none"), ("--device", "cpu"))
        if flag not in args
        for arg in (flag, value)
    ]
    result = run_trainer(*args, *defaults, *dirs(tmp_path))
    assert_one_line_error(result, message, alone=True)
    models = tmp_path / "models"
    assert not models.exists() or list(models.iterdir()) == []  # no version, no LATEST


def test_help_names_every_option_with_its_environment_variable():
    result = run_trainer("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag, var in [
        ("--data-dir", "DATA_DIR"),
        ("--download-dir", "DOWNLOAD_DIR"),
        ("--epochs", "EPOCHS"),
        ("--lr", "LR"),
        ("--batch-size", "BATCH_SIZE"),
        ("--image-size", "IMAGE_SIZE"),
        ("--weights", "WEIGHTS"),
        ("--device", "DEVICE"),
        ("--seed", "SEED"),
        ("--models-dir", "MODELS_DIR"),
        ("--runs-dir", "RUNS_DIR"),
        ("--valid-ratio", "VALID_RATIO"),
        ("--lr-period", "LR_PERIOD"),
        ("--lr-decay", "LR_DECAY"),
        ("--momentum", "MOMENTUM"),
        ("--weight-decay", "WEIGHT_DECAY"),
        ("--time-budget", "TIME_BUDGET"),
        ("--cache-dir", "CACHE_DIR"),
        ("--channels-last", "CHANNELS_LAST"),
        ("--ema", "EMA"),
        ("--tta", "TTA"),
        ("--compile", "COMPILE"),
    ]:
        assert flag in text and f"env {var}" in text, flag
    assert "--resume" in text
