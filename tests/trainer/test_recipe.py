"""Recipe per device, measured precision, time budget and the short-schedule options."""

import copy
import json
import time
import types

import pytest
import torch

from shared import store
from shared.classes import CIFAR10_MEAN, CIFAR10_STD
from shared.model import build_model
from shared.precision import Choice, candidates
from shared.preprocess import augment_batch, normalize_batch
from tests.conftest import make_image_folders, run_trainer
from trainer.cli import parse_args
from trainer.data import Split
from trainer.ema import EMA
from trainer.loop import evaluate, lr_factor, zero_init_residual
from trainer.recipe import RECIPES, measure_training, plan, plan_epochs, replan_epochs

CPU = torch.device("cpu")


def dirs(tmp_path):
    return ["--runs-dir", str(tmp_path / "runs"), "--models-dir", str(tmp_path / "models")]


def test_cpu_recipe_fills_what_the_user_left_and_the_user_wins(monkeypatch):
    args = parse_args(["--device", "cpu"])
    assert args.recipe["device"] == "cpu"
    for name, value in RECIPES["cpu"].items():
        if name != "epochs":
            assert getattr(args, name) == value, name
    assert args.epochs is None and args.time_budget == 600  # the budget sets the epochs
    monkeypatch.setenv("BATCH_SIZE", "8")
    args = parse_args(["--device", "cpu", "--lr", "0.3", "--epochs", "2", "--ema", "0"])
    assert (args.batch_size, args.lr, args.epochs, args.ema) == (8, 0.3, 2, 0.0)
    assert {"batch_size", "lr", "epochs", "ema"}.isdisjoint(args.recipe["from_recipe"])
    assert args.time_budget == 0  # an explicit --epochs wins over the recipe's budget
    assert parse_args(["--device", "cpu", "--arch", "resnet18"]).arch == "resnet18"


def test_explicit_precision_and_layout_are_obeyed():
    assert candidates("off", "off", CPU) == [(False, False)]
    assert candidates("bf16", "on", CPU) == [(True, True)]
    assert (False, True) in candidates("auto", "auto", CPU)
    assert (False, False) in candidates("auto", "auto", CPU)


def tiny_config(**overrides):
    config = vars(parse_args(["--device", "cpu", "--epochs", "1", "--batch-size", "4"]))
    config.update(overrides)
    return config


def test_measured_choice_records_the_timings_and_leaves_the_model_and_rng_alone():
    model = build_model("resnet18", 10)
    before = copy.deepcopy(model.state_dict())
    train = Split(torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8), torch.arange(4), [])
    normalize = normalize_batch(list(CIFAR10_MEAN), list(CIFAR10_STD))
    rng = torch.get_rng_state()
    auto = measure_training(model, train, tiny_config(), CPU, normalize)
    assert set(auto.timings_ms) >= {"fp32/channels_last", "fp32/contiguous"}
    assert auto.timings_ms[f"{auto.precision}/{auto.memory_format}"] == min(
        auto.timings_ms.values()
    )
    assert "fastest" in auto.reason and "ms" in auto.reason
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    fixed = measure_training(
        model, train, tiny_config(amp="off", channels_last="off"), CPU, normalize
    )
    assert (fixed.bf16, fixed.channels_last) == (False, False)
    assert list(fixed.timings_ms) == ["fp32/contiguous"]


def test_budget_planning_fits_the_epochs_in_the_time_left():
    assert plan_epochs(100, elapsed=10, epoch_seconds=8, finish_seconds=2, margin=0.1) == 9
    assert plan_epochs(10, elapsed=30, epoch_seconds=8, finish_seconds=2) == 1  # at least one
    # After epoch 1 (replan_epochs): an epoch that overran leaves no room for another.
    config = {"time_budget": 10, "epochs": 1, "budget_plan": {"finish_seconds_estimate": 2}}
    assert replan_epochs(config, epoch_s=12, launched=time.time() - 14) is None
    assert replan_epochs({**config, "epochs": 3}, epoch_s=12, launched=time.time() - 14) == 1


def test_a_budget_shorter_than_one_epoch_trains_on_the_steps_that_fit():
    """A slow CPU: 100 steps of 1 s per epoch, 60 s budget -> one epoch of the steps that fit."""
    data = types.SimpleNamespace(train=range(1000), valid=range(100), test=None)
    config = {"batch_size": 10, "tta": "off", "time_budget": 60.0}
    plan(config, data, step_ms=1000.0, launched=time.time())
    # 60 s * 0.9 margin - 2 s publish - (100 valid images at a third of a step's cost + 1 s)
    assert config["epochs"] == 1 and config["epoch_images"] == 10 * 47
    roomy = {**config, "time_budget": 600.0}
    plan(roomy, data, step_ms=1000.0, launched=time.time())
    assert roomy["epochs"] == 5 and roomy["epoch_images"] is None  # whole epochs fit


def test_lr_floor_ends_the_onecycle_at_that_fraction():
    config = {"epochs": 2, "schedule": "onecycle", "warmup": 0.25, "lr_floor": 0.1}
    factor = lr_factor(config, steps_per_epoch=4)
    assert factor(1) == pytest.approx(1.0) and factor(8) == pytest.approx(0.1)
    assert factor(5) == pytest.approx(0.1 + 0.9 * 3 / 6)


def test_zero_init_residual_zeroes_each_blocks_last_batchnorm():
    model = build_model("resnet18", 10)
    zero_init_residual(model)
    blocks = [m for m in model.modules() if hasattr(m, "bn2")]
    assert len(blocks) == 8 and all(b.bn2.weight.abs().sum() == 0 for b in blocks)
    assert model.bn1.weight.abs().sum() > 0
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    # Each block is then the identity plus its shortcut: output depends on the stem only.
    assert torch.isfinite(model(x)).all()


def test_reflect_crops_mirror_the_border_instead_of_zeros():
    x = torch.full((64, 3, 8, 8), 7, dtype=torch.uint8)
    x[:, :, :, 0] = 200  # left column
    torch.manual_seed(0)
    zeros = augment_batch(x, pad=2, flip=False)
    torch.manual_seed(0)
    reflect = augment_batch(x, pad=2, flip=False, mode="reflect")
    assert (zeros == 0).any()
    assert not (reflect == 0).any() and (reflect == 200).any()


def test_ema_trails_the_weights_and_averages_batchnorm_statistics():
    model = build_model("resnet18", 10)
    ema = EMA(model, decay=0.5)
    start = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # moves BatchNorm's running statistics
    ema.update(model)
    decay = min(0.5, 2 / 11)  # the warm-up ramp on the first update
    shadow, live = ema.model.state_dict(), model.state_dict()
    assert torch.allclose(shadow["fc.weight"], start["fc.weight"] + (1 - decay))
    mean = "bn1.running_mean"
    assert torch.allclose(shadow[mean], decay * start[mean] + (1 - decay) * live[mean])
    assert shadow["bn1.num_batches_tracked"] == live["bn1.num_batches_tracked"] == 1
    restored = EMA(build_model("resnet18", 10), 0.5)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.model.state_dict()["fc.weight"], shadow["fc.weight"])


def test_hflip_tta_evaluates_the_mean_of_image_and_mirror():
    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    images = torch.randint(0, 255, (6, 3, 16, 16), dtype=torch.uint8)
    split = Split(images, torch.arange(6) % 10, [])
    normalize = normalize_batch(list(CIFAR10_MEAN), list(CIFAR10_STD))
    loss, acc, _ = evaluate(model, split, CPU, False, normalize, tta="hflip")
    with torch.no_grad():
        x = normalize(images)
        probs = (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2
    expected = torch.nn.functional.nll_loss(probs.log(), split.labels).item()
    assert loss == pytest.approx(expected, rel=1e-4)
    assert acc == (probs.argmax(1) == split.labels).float().mean().item()


def test_short_schedule_flags_reach_config_model_json_and_the_published_weights(tmp_path):
    data = make_image_folders(tmp_path / "d", per_class=4)
    args = ["--data-dir", str(data), "--epochs", "2", "--weights", "none", "--device", "cpu"]
    args += ["--batch-size", "8", "--image-size", "16", "--cache-dir", "none", "--amp", "off"]
    args += ["--channels-last", "off", "--ema", "0.9", "--tta", "hflip", "--lr-floor", "0.1"]
    args += ["--zero-init-residual", "on", "--crop-mode", "reflect", "--valid-ratio", "0"]
    result = run_trainer(*args, *dirs(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "(no validation)" in result.stdout and "last epoch" in result.stdout
    (run,) = (tmp_path / "runs").iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["precision"] == "fp32" and config["memory_format"] == "contiguous"
    assert config["split"] == {**config["split"], "train": 40, "valid": 0}
    for key, value in [("ema", 0.9), ("tta", "hflip"), ("lr_floor", 0.1)]:
        assert config[key] == value
    version = store.read_latest(tmp_path / "models")
    meta = json.loads((tmp_path / "models" / version / "model.json").read_text())
    assert meta["tta"] == "hflip" and "valid_acc" not in meta["metrics"]
    assert "validation" in meta["metrics"]
    published = torch.load(tmp_path / "models" / version / "model.pt", weights_only=True)
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 2
    assert torch.equal(published["fc.weight"], state["ema"]["model"]["fc.weight"])
    assert not torch.equal(published["fc.weight"], state["model"]["fc.weight"])
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].split(",")[4:6] == ["", ""]  # valid loss, acc empty


@pytest.mark.slow
def test_time_budget_sets_the_epochs_and_the_run_ends_within_it(tmp_path):
    data = make_image_folders(tmp_path / "d", per_class=6)
    budget = 60
    start = time.time()
    result = run_trainer(
        *("--data-dir", str(data), "--weights", "none", "--device", "cpu", "--batch-size", "8"),
        *("--image-size", "16", "--time-budget", str(budget)),
        *("--cache-dir", str(tmp_path / "cache")),
        *dirs(tmp_path),
    )
    wall = time.time() - start
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "runs").iterdir()
    config = json.loads((run / "config.json").read_text())
    plan = config["budget_plan"]
    assert plan["budget_seconds"] == budget and config["epochs"] >= 1
    assert f"time budget {budget}s" in result.stdout
    assert f"-> {plan['epochs']} epochs" in result.stdout
    assert "recipe cpu:" in result.stdout and config["recipe"]["device"] == "cpu"
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + config["epochs"]
    assert wall < budget * 1.25, (wall, result.stdout)  # noise from other work on the machine
    assert len(list((tmp_path / "cache").glob("train-*-16px.u8"))) == 1


@pytest.mark.slow
def test_compile_option_trains_and_publishes(tmp_path):
    data = make_image_folders(tmp_path / "d", per_class=2, classes=["a", "b"])
    result = run_trainer(
        *("--data-dir", str(data), "--weights", "none", "--device", "cpu", "--epochs", "1"),
        *("--batch-size", "2", "--image-size", "16", "--compile", "on", "--amp", "off"),
        *("--channels-last", "off", "--cache-dir", "none"),
        *dirs(tmp_path),
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert store.read_latest(tmp_path / "models")


def test_choice_serialises_for_config_and_get_model():
    choice = Choice(False, True, "fastest", {"fp32/channels_last": 1.0})
    assert choice.as_dict() == {
        "precision": "fp32",
        "memory_format": "channels_last",
        "precision_reason": "fastest",
        "precision_timings_ms": {"fp32/channels_last": 1.0},
    }
