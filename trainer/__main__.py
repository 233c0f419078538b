"""Fine-tune ResNet-18 on CIFAR-10 and publish the best model: `python -m trainer --help`."""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from shared import store
from shared.classes import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from shared.model import ARCHS, build_model
from shared.precision import variant_name
from shared.preprocess import normalize_batch
from trainer import TrainerError
from trainer.data import Dataset, load_folders, load_torchvision
from trainer.ema import EMA
from trainer.loop import (
    STOP,
    Interrupted,
    evaluate,
    make_optimizer,
    on_signal,
    resolve_device,
    train_one_epoch,
    zero_init_residual,
)
from trainer.recipe import (
    RECIPE_OPTIONS,
    apply_recipe,
    describe,
    device_kind,
    launched_at,
    measure_training,
    plan,
    replan,
)
from trainer.run import RunDir
from trainer.weights import load_initial_weights

# The knobs, each stated once: flag, environment variable, type, default, choices, meaning
# (with unit). Defaults are strings so argparse converts env values too. A default of None
# means the device's recipe (trainer/recipe.py) sets it unless the user does.
# fmt: off
OPTIONS = [
    ("--data-dir", "TRAIN_DATA_DIR", str, "", None,
     "class folders DIR/train/<class>/*, optional DIR/valid/ and DIR/test/; "
     "empty: torchvision's CIFAR-10, downloaded into --download-dir"),
    ("--download-dir", "DATA_DIR", str, "volumes/data", None,
     "where torchvision's CIFAR-10 is downloaded once and reused"),
    ("--epochs", "EPOCHS", int, None, None,
     "passes over the training split; recipe: as many as --time-budget allows"),
    ("--batch-size", "BATCH_SIZE", int, None, None,
     "images per SGD step; recipe: cpu 128, cuda 512"),
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
    ("--device", "DEVICE", str, "auto", ["auto", "cpu", "cuda"], "auto: cuda when available"),
    ("--amp", "AMP", str, "auto", ["auto", "bf16", "off"],
     "bf16 autocast; auto: bf16 or fp32, whichever trains faster, timed at start (fp32 on "
     "CPUs without bf16 units)"),
    ("--seed", "SEED", int, "0", None, "seeds the split, initialisation, order and augmentation"),
    ("--valid-ratio", "VALID_RATIO", float, "0.1", None,
     "share of each class held out for validation when there is no valid/ folder (0: train "
     "on every image, no validation, publish the last epoch)"),
    ("--models-dir", "MODELS_DIR", str, "volumes/models", None, "model store to publish into"),
    ("--runs-dir", "RUNS_DIR", str, "volumes/runs", None, "where run folders are written"),
]
# fmt: on


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) instead of usage plus message."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every option also reads the environment variable named in its help; the device's
    recipe fills the options given neither way (args.recipe says which)."""
    p = Parser(
        prog="python -m trainer",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flag, var, kind, default, choices, meaning in OPTIONS + RECIPE_OPTIONS:
        p.add_argument(
            flag,
            type=kind,
            default=os.environ.get(var, default),
            choices=choices,
            help=f"{meaning} (env {var})",
        )
    p.add_argument(
        "--resume",
        nargs="?",
        const="newest",
        metavar="RUN_ID",
        help="continue RUN_ID, or the newest unfinished run, from its last completed epoch",
    )
    args = p.parse_args(argv)
    for action in p._actions:  # argparse checks choices on the command line, not env defaults
        value = getattr(args, action.dest, None)
        if action.choices and value is not None and value not in action.choices:
            p.error(f"{action.option_strings[0]} must be one of {', '.join(action.choices)}")
    args.recipe = apply_recipe(args, device_kind(args.device, torch.cuda.is_available()))
    if args.epochs is None and not args.time_budget:
        p.error("--time-budget 0 needs --epochs")
    if (args.epochs or 1) < 1 or args.batch_size < 1 or args.image_size < 8 or args.lr <= 0:
        p.error("--epochs and --batch-size must be >= 1, --image-size >= 8, --lr > 0")
    if not 0 <= args.valid_ratio < 1 or not 0 <= args.warmup < 1 or args.crop_padding < 0:
        p.error("--valid-ratio must be in [0, 1), --warmup in [0, 1), --crop-padding >= 0")
    if not 0 <= args.ema < 1 or not 0 <= args.lr_floor < 1 or args.time_budget < 0:
        p.error("--ema and --lr-floor must be in [0, 1), --time-budget >= 0")
    if args.weights not in ("imagenet", "none") and not Path(args.weights).is_file():
        p.error(f"--weights {args.weights}: no such file (or use 'imagenet' or 'none')")
    return args


def load_data(config: dict) -> Dataset:
    if config["data_dir"]:
        return load_folders(
            Path(config["data_dir"]),
            config["image_size"],
            config["valid_ratio"],
            config["seed"],
            config.get("cache_dir", ""),
        )
    return load_torchvision(
        Path(config["download_dir"]), config["image_size"], config["valid_ratio"], config["seed"]
    )


def main(args: argparse.Namespace) -> int:
    launched = launched_at()
    device = resolve_device(args.device)
    if args.resume:
        run = RunDir.find_unfinished(
            args.runs_dir, None if args.resume == "newest" else args.resume
        )
        config = run.read_config()
        state = run.load_state()
        print(f"resuming run {run.run_id} after epoch {state['epoch'] if state else 0}")
    else:
        config = {k: v for k, v in vars(args).items() if k not in ("resume", "device")}
        config["data_dir"] = str(Path(config["data_dir"]).resolve()) if args.data_dir else ""
        run, state = RunDir.create(args.runs_dir), None
        config["run_id"] = run.run_id
        print(describe(args, args.recipe))
    torch.manual_seed(config["seed"])

    t0 = time.time()
    data = load_data(config)
    print(
        f"data: {len(data.train)} train, {len(data.valid)} valid, "
        f"{len(data.test) if data.test else 0} test images, {len(data.class_names)} classes, "
        f"loaded in {time.time() - t0:.1f}s"
    )
    # The whole uint8 dataset lives on the training device (CIFAR-10 at 32 px: 150 MB), so a
    # step never waits for a host-to-device copy.
    data = data.to(device)
    config["class_names"] = data.class_names
    config["split"] = {
        "valid_from_train": data.valid_from_train,
        "valid_ratio": config["valid_ratio"],
        "seed": config["seed"],
        "train": len(data.train),
        "valid": len(data.valid),
    }
    weights_imagenet = config["weights"] == "imagenet"
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if weights_imagenet else (CIFAR10_MEAN, CIFAR10_STD)
    normalize = normalize_batch(list(mean), list(std))

    model = build_model(config["arch"], len(data.class_names))
    if state is None:
        if config["zero_init_residual"] == "on":
            zero_init_residual(model)
        load_initial_weights(model, config["weights"])
    model.to(device)
    if state is None:
        choice = measure_training(model, data.train, config, device, normalize)
        config.update(choice.as_dict())
        print(f"{choice.precision} {choice.memory_format}: {choice.reason}")
        if config["epochs"] is None:
            plan(
                config,
                data,
                choice.timings_ms[variant_name(choice.bf16, choice.channels_last)],
                launched,
            )
        run.write_config(config)
    bf16, channels_last = config["precision"] == "bf16", config["memory_format"] == "channels_last"
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ema = EMA(model, config["ema"]) if config["ema"] else None
    trained = torch.compile(model) if config["compile"] == "on" else model
    steps_per_epoch = max(1, len(data.train) // config["batch_size"])
    opt, sched = make_optimizer(model, config, steps_per_epoch)
    history, best_acc, start_epoch = [], -1.0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        history, best_acc, start_epoch = state["history"], state["best_acc"], state["epoch"]
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        run.write_metrics(history)
    evaluated = ema.model if ema is not None else model  # what is validated and published
    validate = len(data.valid) > 0

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    train_seconds = sum(r["train_seconds"] for r in history)
    train_examples = sum(r["examples"] for r in history)
    epoch = start_epoch
    try:
        while epoch < config["epochs"]:
            t_epoch = time.time()
            lr = sched.get_last_lr()[0]
            with tqdm(
                total=steps_per_epoch * config["batch_size"],
                unit="img",
                leave=False,
                mininterval=2.0,
                desc=f"epoch {epoch + 1}/{config['epochs']}",
                file=sys.stderr,
            ) as bar:
                train_loss, train_acc, seen = train_one_epoch(
                    trained, opt, sched, data.train, config, device, bf16, channels_last,
                    normalize, bar, ema,
                )  # fmt: skip
            train_time = time.time() - t_epoch
            valid_loss = valid_acc = None
            if validate:
                valid_loss, valid_acc, _ = evaluate(
                    evaluated, data.valid, device, bf16, normalize,
                    channels_last=channels_last, tta=config["tta"],
                )  # fmt: skip
            row = {
                "epoch": epoch + 1,
                "lr": round(lr, 6),
                "train_loss": round(train_loss, 4),
                "train_acc": round(train_acc, 4),
                "valid_loss": None if valid_loss is None else round(valid_loss, 4),
                "valid_acc": None if valid_acc is None else round(valid_acc, 4),
                "examples_per_sec": round(seen / train_time, 1),
                "seconds": round(time.time() - t_epoch, 2),
                "examples": seen,
                "train_seconds": train_time,
            }
            history.append(row)
            train_seconds += train_time
            train_examples += seen
            if not validate or valid_acc > best_acc:  # no validation: the last epoch is best
                best_acc = valid_acc if validate else best_acc
                run.save_best(evaluated.state_dict())
            state = {
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
                "best_acc": best_acc,
                "rng_cpu": torch.get_rng_state(),
                "valid_index_paths": data.valid.paths,
            }
            if ema is not None:
                state["ema"] = ema.state_dict()
            if device.type == "cuda":
                state["rng_cuda"] = torch.cuda.get_rng_state()
            run.save_state(state)
            run.write_metrics(history)
            valid_text = f"valid loss {valid_loss:.3f} acc {valid_acc:.3f}" if validate else ""
            print(
                f"epoch {epoch + 1:>3}/{config['epochs']}  lr {lr:.4f}  "
                f"train loss {train_loss:.3f} acc {train_acc:.3f}  {valid_text}  "
                f"{row['examples_per_sec']:.1f} img/s  {time.time() - t_epoch:.1f}s",
                flush=True,
            )
            epoch += 1
            if epoch == 1 and config.get("budget_plan"):
                replan(config, data, sched, steps_per_epoch, time.time() - t_epoch, launched, run)
    except Interrupted:
        done = history[-1]["epoch"] if history else 0
        print(
            f"\ninterrupted by signal {STOP.signum}; state saved after epoch {done}. "
            f"Resume with: python -m trainer --resume {run.run_id}",
            file=sys.stderr,
        )
        return 128 + STOP.signum

    last = history[-1]
    valid_text = f", valid acc {last['valid_acc']:.3f}" if validate else " (no validation)"
    print(f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}{valid_text}")
    print(f"{train_examples / max(train_seconds, 1e-9):.1f} examples/sec on {[device]}")

    evaluated.load_state_dict(run.load_best())
    metrics = {"epochs": config["epochs"]}
    if validate:
        metrics["valid_acc"] = round(best_acc, 4)
    else:
        metrics["validation"] = "none: trained on every image, last epoch published"
    if data.test is not None:
        _, test_acc, confusion = evaluate(
            evaluated, data.test, device, bf16, normalize,
            channels_last=channels_last, tta=config["tta"],
        )  # fmt: skip
        per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
        metrics["test_acc"] = round(test_acc, 4)
        metrics["test_per_class_acc"] = dict(
            zip(data.class_names, [round(a, 4) for a in per_class], strict=True)
        )
        run.plot_confusion(confusion, data.class_names)
        print(f"test acc {test_acc:.4f} on {len(data.test)} images")
    meta = {
        "run_id": run.run_id,
        "arch": config["arch"],
        "class_names": data.class_names,
        "image_size": config["image_size"],
        "mean": list(mean),
        "std": list(std),
        "metrics": metrics,
        "config": config,
    }
    if config["tta"] == "hflip":
        meta["tta"] = "hflip"  # the published accuracy averages each image with its mirror
    try:
        version = store.publish(Path(args.models_dir), evaluated.state_dict(), meta)
    except store.StoreError as exc:
        raise TrainerError(f"{exc}; the run's best weights stay in {run.path}/best.pt") from None
    run.write_result({"version": version, "metrics": metrics})
    published = f"best valid acc {best_acc:.4f}" if validate else "last epoch"
    print(
        f"published model version {version} to {args.models_dir} ({published}, "
        f"{time.time() - launched:.1f}s after launch)"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except TrainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
