"""Fine-tune ResNet-18 on CIFAR-10 and publish the best model: `python -m trainer --help`."""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from shared.classes import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from shared.model import build_model
from shared.preprocess import normalize_batch
from shared.stores import open_store
from trainer import TrainerError
from trainer import distributed as ddp
from trainer.cli import OPTIONS, parse_args
from trainer.data import Dataset, load_folders, load_torchvision
from trainer.ema import EMA
from trainer.loop import (
    STOP,
    Interrupted,
    evaluate,
    lr_factor,
    make_optimizer,
    on_signal,
    replan,
    train_one_epoch,
    zero_init_residual,
)
from trainer.publish import best_model_meta, publish_once
from trainer.recipe import (
    choose_and_plan,
    describe,
    launched_at,
    replan_epochs,
)
from trainer.resume import plan_run, resume_command, start_run
from trainer.run import RunDir
from trainer.weights import load_initial_weights


def load_data(config: dict) -> Dataset:
    if config["data_dir"]:
        return load_folders(
            Path(config["data_dir"]),
            config["image_size"],
            config["valid_ratio"],
            config["seed"],
            config.get("cache_dir", ""),
            config.get("decode_workers", 0),
        )
    return load_torchvision(
        Path(config["download_dir"]), config["image_size"], config["valid_ratio"], config["seed"]
    )


def main(args: argparse.Namespace) -> int:
    # First thing: a Ctrl-C while the data loads stops at once, with one line, no traceback.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    launched = launched_at()
    d = ddp.init_distributed_mode(args.device)  # ddp: rank, world size, this rank's device
    log = print if d.is_main else lambda *_, **__: None  # ddp: rank 0 speaks for all
    run, history = None, []
    try:
        keys = [flag[2:].replace("-", "_") for flag, *_ in OPTIONS]
        plan = ddp.on_main(d, plan_run, args, keys)  # ddp: rank 0 decides
        if "finished" in plan:
            log(f"run {plan['run_id']} already published {plan['finished']['version']}")
            return 0
        config, state = plan["config"], plan["state"]
        if config["batch_size"] % d.world_size:
            raise TrainerError(
                f"--batch-size {config['batch_size']} is the global batch: it must be a "
                f"multiple of the {d.world_size} processes"
            )
        if state is not None:
            log(f"resuming run {plan['run_id']} after epoch {state['epoch']}")
        elif plan["run_id"] is None:
            config["recipe"] = args.recipe
            log(describe(args, args.recipe))
        device = d.device
        torch.manual_seed(config["seed"])

        t0 = time.time()
        log("loading data", flush=True)
        with ddp.local_main_first(d):  # ddp: one download (or cache write) per node
            data = load_data(config)
        log(
            f"data: {len(data.train)} train, {len(data.valid)} valid, "
            f"{len(data.test) if data.test else 0} test images, {len(data.class_names)} "
            f"classes, loaded in {time.time() - t0:.1f}s; {ddp.describe(d)}"
        )
        # The whole uint8 dataset lives on the training device (CIFAR-10 at 32 px: 150 MB), so
        # a step never waits for a host-to-device copy.
        data = data.to(device)
        config["class_names"] = data.class_names
        config["split"] = {
            "valid_from_train": data.valid_from_train,
            "valid_ratio": config["valid_ratio"],
            "seed": config["seed"],
            "train": len(data.train),
            "valid": len(data.valid),
        }
        run_id = ddp.on_main(d, start_run, args, plan["run_id"], config)  # ddp: rank 0 writes
        run = RunDir(Path(args.runs_dir) / run_id)
        config["run_id"] = run_id
        weights_imagenet = config["weights"] == "imagenet"
        mean, std = (
            (IMAGENET_MEAN, IMAGENET_STD) if weights_imagenet else (CIFAR10_MEAN, CIFAR10_STD)
        )
        normalize = normalize_batch(list(mean), list(std))

        net = build_model(config["arch"], len(data.class_names))
        if state is None:  # ddp: rank 0's weights; DDP copies them to the other ranks
            if config.get("zero_init_residual") == "on":
                zero_init_residual(net)  # before --weights: loaded weights win
            ddp.on_main(d, load_initial_weights, net, config["weights"])
        else:
            net.load_state_dict(state["model"])
        net.to(device)
        if "precision" not in config:  # ddp: rank 0 times the choices and plans the budget
            config.update(
                ddp.on_main(d, choose_and_plan, net, data, config, device, normalize, launched)
            )
            if d.is_main:
                run.write_config(config)
        bf16 = config["precision"] == "bf16"
        channels_last = config["memory_format"] == "channels_last"
        net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        ema = EMA(net, config["ema"]) if config.get("ema") else None
        if ema is not None and state is not None:
            ema.load_state_dict(state["ema"])
        model = ddp.wrap_model(net, d, config.get("sync_bn") == "on")  # ddp: DDP(model)
        net = getattr(model, "module", model)
        if config.get("compile") == "on":
            model = torch.compile(model)
        evaluated = ema.model if ema is not None else net  # validated and published
        # A time budget on a slow machine may train on part of each epoch (recipe.plan).
        epoch_images = min(len(data.train), config.get("epoch_images") or len(data.train))
        steps_per_epoch = max(1, epoch_images // config["batch_size"])
        opt, sched = make_optimizer(net, config, steps_per_epoch)
        history, best_acc, start_epoch = [], -1.0, 0
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            replan(sched)  # --epochs may have changed: the plan for the new total, from here
            history, best_acc, start_epoch = state["history"], state["best_acc"], state["epoch"]
            torch.set_rng_state(state["rng_cpu"])
            if device.type == "cuda" and "rng_cuda" in state:
                torch.cuda.set_rng_state(state["rng_cuda"])
            if d.is_main:
                run.write_metrics(history)
        # ddp: each rank validates its share of valid/, the counts are summed
        valid = data.valid.subset(torch.arange(d.rank, len(data.valid), d.world_size))
        validate = len(data.valid) > 0  # --valid-ratio 0: every epoch is the best so far

        STOP.immediate = False  # from here a signal stops after the current step (state kept)
        train_seconds = sum(r["train_seconds"] for r in history)
        train_examples = sum(r["examples"] for r in history)
        epoch = start_epoch
        while epoch < config["epochs"]:
            t_epoch = time.time()
            lr = sched.get_last_lr()[0]
            batches = ddp.epoch_batches(  # ddp: this rank's shard of the epoch's permutation
                len(data.train), config["batch_size"], config["seed"], epoch, d
            )[:steps_per_epoch]
            with tqdm(
                total=batches.numel(),
                unit="img",
                leave=False,
                mininterval=2.0,
                desc=f"epoch {epoch + 1}/{config['epochs']}",
                file=sys.stderr,
                disable=not d.is_main,
            ) as bar:
                train_loss, train_acc, seen = train_one_epoch(
                    model,
                    opt,
                    sched,
                    data.train,
                    batches,
                    config,
                    device,
                    bf16,
                    normalize,
                    bar,
                    stop=lambda: ddp.agree_stop(d),  # ddp: a signal on any rank stops all
                    channels_last=channels_last,
                    ema=ema,
                )
            ddp.sync_buffers(net, d)  # ddp: rank 0's BatchNorm statistics everywhere
            ddp.debug_record(d, epoch + 1, batches, net)
            train_loss, train_acc, seen = ddp.reduce_mean(d, train_loss, train_acc, seen)
            train_time = time.time() - t_epoch
            valid_loss = valid_acc = None
            if validate:
                valid_loss, valid_acc, _ = ddp.reduce_evaluation(
                    d,
                    *evaluate(
                        evaluated, valid, device, bf16, normalize,
                        channels_last=channels_last, tta=config.get("tta", "off"),
                    ),
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
            state = {
                "epoch": epoch + 1,
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
                "best_acc": max(best_acc, valid_acc or -1.0),
                "rng_cpu": torch.get_rng_state(),
                "valid_index_paths": data.valid.paths,
            }
            if ema is not None:
                state["ema"] = ema.state_dict()
            if device.type == "cuda":
                state["rng_cuda"] = torch.cuda.get_rng_state()
            if d.is_main:  # ddp: only rank 0 writes the run folder
                if not validate or valid_acc > best_acc:
                    run.save_best(evaluated.state_dict())
                run.save_state(state)
                run.write_metrics(history)
            best_acc = max(best_acc, valid_acc or -1.0)
            shown = f"valid loss {valid_loss:.3f} acc {valid_acc:.3f}" if validate else ""
            log(
                f"epoch {epoch + 1:>3}/{config['epochs']}  lr {lr:.4f}  "
                f"train loss {train_loss:.3f} acc {train_acc:.3f}  {shown}  "
                f"{row['examples_per_sec']:.1f} img/s  {row['seconds']:.1f}s",
                flush=True,
            )
            epoch += 1
            if epoch == 1 and state["epoch"] == 1:  # ddp: rank 0's measured epoch decides
                epochs = ddp.on_main(d, replan_epochs, config, time.time() - t_epoch, launched)
                if epochs:
                    config["epochs"] = config["budget_plan"]["epochs_after_epoch_1"] = epochs
                    sched.lr_lambdas = [lr_factor(config, steps_per_epoch)] * len(sched.base_lrs)
                    replan(sched)
                    if d.is_main:
                        run.write_config(config)
            if ddp.agree_stop(d):  # e.g. a signal during validation: stop, the epoch is saved
                raise Interrupted

        last = history[-1]
        shown = f", valid acc {last['valid_acc']:.3f}" if validate else " (no validation)"
        log(f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}{shown}")
        log(f"{train_examples / max(train_seconds, 1e-9):.1f} examples/sec on {[device]}")
        # ddp: rank 0 tests and publishes while the others wait for it
        meta = ddp.on_main(
            d, best_model_meta, run, net, data, config, best_acc if validate else None,
            device, bf16, normalize, mean, std, channels_last,
        )  # fmt: skip
        if ddp.agree_stop(d):  # a signal during the test evaluation: nothing published
            raise Interrupted
        version = ddp.on_main(d, publish_once, open_store(args.models_dir), run, net, meta)
    except Interrupted:
        done = history[-1]["epoch"] if run and history else 0
        saved = (
            f"state saved after epoch {done}. Resume with: {resume_command(run.run_id)}"
            if run
            else "nothing was written"
        )
        log(f"\ninterrupted by signal {STOP.signum}; {saved}", file=sys.stderr)
        return 128 + STOP.signum
    finally:
        ddp.close(d)
    best = f"best valid acc {best_acc:.4f}" if validate else "last epoch: no validation"
    log(
        f"published model version {version} to {args.models_dir} ({best}, "
        f"{time.time() - launched:.1f}s after launch)"
    )
    if STOP.signum:  # the signal came while publishing, which is all or nothing: it finished
        log(f"signal {STOP.signum} arrived while publishing: version {version} is complete")
        return 128 + STOP.signum
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except TrainerError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has the same error
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
