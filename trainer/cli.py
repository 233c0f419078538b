"""The trainer's command line: every option once, with its environment variable and meaning."""

import argparse
import os
import sys
from pathlib import Path

import torch

from shared.device import DEVICE_NAMES, DeviceError, check_device_name
from shared.model import ARCHS
from trainer.recipe import RECIPE_OPTIONS, apply_recipe, device_kind

# The knobs, each stated once: flag, environment variable, type, default, choices, meaning
# (with unit). Defaults are strings so argparse converts env values too. A default of None
# means the device's recipe (trainer/recipe.py) sets it unless the user does.
# fmt: off
OPTIONS = [
    ("--data-dir", "DATA_DIR", str, "", None,
     "class folders DIR/train/<class>/*, optional DIR/valid/ and DIR/test/; "
     "empty: torchvision's CIFAR-10, downloaded into --download-dir"),
    ("--download-dir", "DOWNLOAD_DIR", str, "volumes/data", None,
     "where torchvision's CIFAR-10 is downloaded once and reused"),
    ("--epochs", "EPOCHS", int, None, None,
     "passes over the training split; recipe: as many as --time-budget allows"),
    ("--batch-size", "BATCH_SIZE", int, None, None,
     "images per SGD step, over all processes under torchrun (each takes an equal share); "
     "recipe: cpu 128, cuda 512"),
    ("--lr", "LR", float, None, None, "peak learning rate; recipe: cpu 0.1, cuda 0.4"),
    ("--schedule", "SCHEDULE", str, "onecycle", ["onecycle", "step"],
     "onecycle: linear warm-up, then linear decay to 0; step: lr * lr-decay every lr-period "
     "epochs (the original project's)"),
    ("--warmup", "WARMUP", float, None, None,
     "onecycle: fraction of all steps spent warming up; recipe: cpu 0.2, cuda 0.15"),
    ("--lr-period", "LR_PERIOD", int, "4", None, "step: epochs between decays"),
    ("--lr-decay", "LR_DECAY", float, "0.9", None, "step: factor applied at each decay"),
    ("--momentum", "MOMENTUM", float, "0.9", None, "SGD Nesterov momentum"),
    ("--weight-decay", "WEIGHT_DECAY", float, "5e-4", None,
     "L2 penalty on conv and linear weights (not BatchNorm or biases)"),
    ("--label-smoothing", "LABEL_SMOOTHING", float, None, None,
     "cross-entropy label smoothing; recipe: cpu 0.1, cuda 0.2"),
    ("--image-size", "IMAGE_SIZE", int, "32", None,
     "side in pixels images are resized to, for training and serving"),
    ("--crop-padding", "CROP_PADDING", int, None, None,
     "random-crop padding in pixels (0: no cropping); recipe: cpu 2, cuda 4"),
    ("--arch", "ARCH", str, None, list(ARCHS),
     "resnet18: torchvision's; resnet18_nomaxpool: the same without the max-pool (16x16 maps "
     "in layer1 at 32 px, identical state_dict); resnet18_cifar: 3x3 stride-1 stem, no "
     "max-pool; recipe: cpu resnet18_nomaxpool, cuda resnet18_cifar"),
    ("--weights", "WEIGHTS", str, "imagenet", None,
     "imagenet (torchvision IMAGENET1K_V1, cached in TORCH_HOME), none, or a state_dict PATH"),
    ("--device", "DEVICE", str, "auto", None, f"{DEVICE_NAMES}; auto: cuda when available"),
    ("--amp", "AMP", str, "auto", ["auto", "bf16", "off"],
     "bf16 autocast; auto: bf16 or fp32, whichever trains faster, timed at start (fp32 on "
     "CPUs without bf16 units)"),
    ("--seed", "SEED", int, "0", None, "seeds the split, initialisation, order and augmentation"),
    ("--valid-ratio", "VALID_RATIO", float, "0.1", None,
     "share of each class held out for validation when there is no valid/ folder (0: train "
     "on every image, no validation, publish the last epoch)"),
    ("--models-dir", "MODELS_DIR", str, "volumes/models", None,
     "model store to publish into: a folder or s3://bucket/prefix (AWS_* variables)"),
    ("--runs-dir", "RUNS_DIR", str, "volumes/runs", None, "where run folders are written"),
    ("--sync-bn", "SYNC_BN", str, "off", ["off", "on"],
     "on: BatchNorm statistics over the global batch under torchrun (CUDA only); off: per "
     "process"),
]
# fmt: on
OPTIONS += RECIPE_OPTIONS  # time budget, short-schedule options, layout, cache (recipe.py)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) instead of usage plus message."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser(defaults: bool = True) -> Parser:
    """The options; with defaults=False an option absent from the command line stays unset."""
    p = Parser(
        prog="python -m trainer",
        description="Fine-tune ResNet-18 on CIFAR-10 (or any class folders) and publish the best "
        "model to the model store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=None if defaults else argparse.SUPPRESS,
    )
    for flag, var, kind, default, choices, meaning in OPTIONS:
        p.add_argument(
            flag,
            type=kind,
            choices=choices,
            help=f"{meaning} (env {var})",
            **({"default": os.environ.get(var, default)} if defaults else {}),
        )
    p.add_argument(
        "--resume",
        nargs="?",
        const="newest",
        metavar="RUN_ID",
        help="continue RUN_ID, or the newest unfinished run, from its last completed epoch; "
        "only --epochs (the schedule is re-planned), --device and the folders may change",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every option also reads the environment variable named in its help."""
    p = build_parser()
    if os.environ.get("TRAIN_DATA_DIR"):
        # Renamed: the old DATA_DIR meant the download folder, so a silent fallback could
        # read the wrong folder. Say so once, plainly.
        p.error(
            "TRAIN_DATA_DIR was renamed DATA_DIR (class folders, --data-dir); the CIFAR-10 "
            "download folder is DOWNLOAD_DIR (--download-dir)"
        )
    args = p.parse_args(argv)
    for action in p._actions:  # argparse checks choices on the command line, not env defaults
        value = getattr(args, action.dest, None)
        if action.choices and value is not None and value not in action.choices:
            p.error(f"{action.option_strings[0]} must be one of {', '.join(action.choices)}")
    try:
        check_device_name(args.device)
    except DeviceError as exc:
        p.error(f"--device (env DEVICE): {exc}")
    args.recipe = apply_recipe(args, device_kind(args.device, torch.cuda.is_available()))
    if args.epochs is None and not args.time_budget:
        p.error("--time-budget 0 needs --epochs")
    if (
        (args.epochs is not None and args.epochs < 1)
        or args.batch_size < 1
        or args.image_size < 8
        or args.lr <= 0
    ):
        p.error("--epochs and --batch-size must be >= 1, --image-size >= 8, --lr > 0")
    if not 0 <= args.valid_ratio < 1 or not 0 <= args.warmup < 1 or args.crop_padding < 0:
        p.error("--valid-ratio must be in [0, 1), --warmup in [0, 1), --crop-padding >= 0")
    if not 0 <= args.ema < 1 or not 0 <= args.lr_floor < 1 or args.time_budget < 0:
        p.error("--ema and --lr-floor must be in [0, 1), --time-budget >= 0")
    if args.weights not in ("imagenet", "none") and not Path(args.weights).is_file():
        p.error(f"--weights {args.weights}: no such file (or use 'imagenet' or 'none')")
    # What the user chose (command line or environment), as opposed to defaults: a resume
    # refuses the ones that would change the run.
    from_env = {flag[2:].replace("-", "_") for flag, var, *_ in OPTIONS if var in os.environ}
    args.given = sorted(from_env | set(vars(build_parser(defaults=False).parse_args(argv))))
    return args
