"""A training recipe per device, and the time budget that sets the number of epochs.

Options a recipe sets default to None in the parser; `apply_recipe` fills every None from the
device's recipe, so anything the user gave (flag or environment variable) wins, and config.json
records both the values and which of them came from the recipe.
"""

import copy
import math
import os
import time

import torch

from shared.precision import Choice, candidates, choose
from trainer.data import Dataset
from trainer.loop import train_step

# The recipes. Every value is an option of `python -m trainer` (same name and unit).
# cpu: the max-pool-free ResNet-18 at batch 128, peak lr 0.1, 2 px crops: the recipe measured
#   best for short CPU runs (README, Results). No fixed epochs: the 600 s budget sets them, so
#   the default command ends within 10 minutes on any CPU and trains longer on a faster one.
# cuda: the CIFAR-stem ResNet-18 at batch 512, peak lr 0.4, 4 px reflect crops, label smoothing
#   0.2, EMA and hflip TTA: the settings of published short-schedule CIFAR-10 ResNet-18 runs
#   (not measured here: no GPU was lent to the session that wrote it; bench/gpu.py measures
#   it). The 18 s budget aims at the 15-20 s launch-to-published target on an H200.
RECIPES: dict[str, dict] = {
    "cpu": {
        "arch": "resnet18_nomaxpool",
        "batch_size": 128,
        "lr": 0.1,
        "epochs": None,
        "time_budget": 600.0,
        "label_smoothing": 0.1,
        "crop_padding": 2,
        "crop_mode": "zeros",
        "warmup": 0.2,
        "lr_floor": 0.0,
        "ema": 0.0,
        "tta": "off",
        "zero_init_residual": "off",
        "compile": "off",
    },
    "cuda": {
        "arch": "resnet18_cifar",
        "batch_size": 512,
        "lr": 0.4,
        "epochs": None,
        "time_budget": 18.0,
        "label_smoothing": 0.2,
        "crop_padding": 4,
        "crop_mode": "reflect",
        "warmup": 0.15,
        "lr_floor": 0.0,
        "ema": 0.999,
        "tta": "hflip",
        "zero_init_residual": "on",
        "compile": "off",
    },
}

# Seconds per epoch spent outside training and validation (checkpoint, metrics, plot),
# as a first guess until epoch 1 measures it.
CHECKPOINT_SECONDS = 1.0

# The recipe's own options (the older ones -- arch, batch size, lr, epochs, label smoothing,
# crop padding, warm-up -- are in trainer/cli.py with default None). Same tuple shape:
# flag, env var, type, default, choices, meaning.
# fmt: off
RECIPE_OPTIONS = [
    ("--time-budget", "TIME_BUDGET", float, None, None,
     "seconds from launch to published model: the trainer times its first steps and sets "
     "--epochs to fit (an explicit --epochs wins); 0: no budget. Recipe: cpu 600, cuda 18"),
    ("--crop-mode", "CROP_MODE", str, None, ["zeros", "reflect"],
     "padding of random crops: zeros or reflect (mirror the border)"),
    ("--lr-floor", "LR_FLOOR", float, None, None,
     "onecycle: the lr decays to this fraction of the peak instead of 0"),
    ("--ema", "EMA", float, None, None,
     "decay per step of an exponential moving average of the weights, evaluated and "
     "published instead of the raw weights (0: off; e.g. 0.999)"),
    ("--tta", "TTA", str, None, ["off", "hflip"],
     "test-time augmentation: hflip averages the predictions for the image and its mirror "
     "(validation, test, and the server through model.json)"),
    ("--zero-init-residual", "ZERO_INIT_RESIDUAL", str, None, ["on", "off"],
     "start each residual block's last BatchNorm at zero (blocks begin as identities)"),
    ("--compile", "COMPILE", str, None, ["on", "off"],
     "torch.compile the model for training (compiles for tens of seconds first)"),
    ("--channels-last", "CHANNELS_LAST", str, "auto", ["auto", "on", "off"],
     "memory layout: channels_last or contiguous; auto: the faster, timed at start"),
    ("--cache-dir", "CACHE_DIR", str, "volumes/cache/decoded", None,
     "where decoded images are cached (uint8, one file per folder); '' or none: no cache"),
    ("--decode-workers", "DECODE_WORKERS", int, 0, None,
     "processes decoding images when the cache misses; 0: one per core (none below 1,024 "
     "images), 1: decode in the trainer's own process"),
]
# fmt: on


def device_kind(device_choice: str, cuda_available: bool) -> str:
    """The recipe a --device choice gets: "cuda" or "cpu"."""
    if device_choice.startswith("cuda") or (device_choice == "auto" and cuda_available):
        return "cuda"
    return "cpu"


def apply_recipe(args, kind: str) -> dict:
    """Fill each option left None from RECIPES[kind]; return {"device", "from_recipe"}."""
    recipe = RECIPES[kind]
    filled = []
    for name, value in recipe.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
            filled.append(name)
    if "epochs" not in filled and "time_budget" in filled:  # an explicit --epochs wins
        args.time_budget = 0.0
    return {"device": kind, "from_recipe": filled}


def describe(args, recipe: dict) -> str:
    """One line: the device's recipe and what the user set instead."""
    ours = ", ".join(f"{k}={getattr(args, k)}" for k in recipe["from_recipe"])
    given = [k for k in RECIPES[recipe["device"]] if k not in recipe["from_recipe"]]
    return f"recipe {recipe['device']}: {ours}" + (f"; given: {', '.join(given)}" if given else "")


def plan_epochs(
    budget: float,
    elapsed: float,
    epoch_seconds: float,
    finish_seconds: float,
    margin: float = 0.1,
    at_least: int = 1,
) -> int:
    """Epochs that fit: launch to published within `budget` seconds.

    elapsed: seconds already spent since launch; epoch_seconds: one epoch with its validation
    and checkpoint; finish_seconds: test evaluation and publishing. `margin` of the budget is
    kept back for what the estimate misses (noise from other work, a slower epoch).
    """
    left = budget * (1 - margin) - elapsed - finish_seconds
    return max(at_least, math.floor(left / max(epoch_seconds, 1e-6)))


def launched_at() -> float:
    """Unix time this process started (Linux /proc), so the budget counts interpreter start and
    imports too; the current time where /proc is missing."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def measure_training(model, train, config: dict, device, normalize) -> Choice:
    """Time training steps at the real batch size for each allowed precision and layout.

    Runs on a copy of the model with its own optimizer, and restores the random generators,
    so the run trains exactly as it would have without the measurement.
    """
    options = candidates(config["amp"], config["channels_last"], device)
    probe = copy.deepcopy(model)
    opt = torch.optim.SGD(probe.parameters(), lr=1e-6, momentum=0.9)
    x = train.images[: config["batch_size"]]
    y = train.labels[: config["batch_size"]]
    rng = torch.get_rng_state()
    layout = [None]

    def step(bf16: bool, channels_last: bool) -> None:
        if layout[0] != channels_last:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            probe.to(memory_format=fmt)
            layout[0] = channels_last
        loss, _ = train_step(probe, opt, x, y, config, device, bf16, channels_last, normalize)
        loss.item()  # wait for the step to finish

    try:
        return choose(step, options, device, repeats=2, what=f"training step at batch {len(y)}")
    finally:
        torch.set_rng_state(rng)


def plan(config: dict, data: Dataset, step_ms: float, launched: float) -> None:
    """Set config["epochs"] (and, when not even one epoch fits, config["epoch_images"]) from the
    time budget and the measured step time; say so."""
    steps = max(1, len(data.train) // config["batch_size"])
    # A forward pass costs about a third of a training step; TTA doubles it.
    eval_images = len(data.valid) * (2 if config["tta"] == "hflip" else 1)
    per_image = step_ms / 1000 / config["batch_size"]
    eval_s = eval_images * per_image / 3 + CHECKPOINT_SECONDS
    epoch_s = steps * step_ms / 1000 + eval_s
    test_images = len(data.test) if data.test else 0
    finish_s = test_images * per_image / 3 * (2 if config["tta"] == "hflip" else 1) + 2.0
    elapsed = time.time() - launched
    config["epochs"] = plan_epochs(config["time_budget"], elapsed, epoch_s, finish_s)
    # On a slow CPU a whole epoch can take longer than the budget: train one epoch on the steps
    # that fit (the schedule spans them) rather than overrun the budget.
    fit = plan_epochs(config["time_budget"], elapsed, step_ms / 1000, finish_s + eval_s)
    config["epoch_images"] = fit * config["batch_size"] if fit < steps else None
    config["budget_plan"] = {
        "budget_seconds": config["time_budget"],
        "elapsed_at_plan_seconds": round(elapsed, 2),
        "epoch_seconds_estimate": round(epoch_s, 2),
        "finish_seconds_estimate": round(finish_s, 2),
        "epochs": config["epochs"],
        "epoch_images": config["epoch_images"],
    }
    partial = ""
    if config["epoch_images"]:
        partial = (
            f" of {config['epoch_images']} images (a whole epoch of {len(data.train)} does not fit)"
        )
    print(
        f"time budget {config['time_budget']:.0f}s: {elapsed:.1f}s spent, about {epoch_s:.1f}s "
        f"per epoch and {finish_s:.1f}s to publish -> {config['epochs']} epochs{partial}"
    )


def choose_and_plan(net, data: Dataset, config: dict, device, normalize, launched: float) -> dict:
    """Time the layout and precision choices, say which won, and (with a time budget and no
    --epochs) plan the epochs; returns the entries to add to config."""
    choice = measure_training(net, data.train, config, device, normalize)
    print(f"{choice.precision} {choice.memory_format}: {choice.reason}")
    updates = choice.as_dict()
    if config["epochs"] is None:
        planned = {**config, **updates}
        plan(
            planned, data, choice.timings_ms[f"{choice.precision}/{choice.memory_format}"], launched
        )
        updates.update(
            epochs=planned["epochs"],
            epoch_images=planned["epoch_images"],
            budget_plan=planned["budget_plan"],
        )
    return updates


def replan_epochs(config: dict, epoch_s: float, launched: float) -> int | None:
    """After epoch 1: the epochs that fit, now that an epoch's real time is known; None when the
    plan stands (or there is no budget)."""
    budget = config.get("budget_plan")
    if not budget or config.get("epoch_images"):  # a partial epoch: the budget holds no more
        return None
    elapsed = time.time() - launched
    finish_s = budget["finish_seconds_estimate"]
    # Epoch 1 is done: when it overran the estimate, no more epochs is a valid answer.
    left = plan_epochs(config["time_budget"], elapsed, epoch_s, finish_s, at_least=0)
    epochs = 1 + left
    if epochs == config["epochs"]:
        return None
    print(
        f"time budget: epoch 1 took {epoch_s:.1f}s -> {epochs} epochs instead of {config['epochs']}"
    )
    return epochs
