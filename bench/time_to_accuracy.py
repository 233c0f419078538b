"""Valid accuracy against wall time, per epoch, of the default recipe run as `python -m trainer`.

    python -m bench.time_to_accuracy [--data-dir volumes/data/cifar10] [--epochs 4] [-- ARGS]

The trainer runs as a subprocess from random init (`--weights none`, so no download), exactly as
a user starts it; ARGS after `--` go to it unchanged. Wall time counts from the launch (Python
start-up, imports, decoding the data once) to each epoch's line on stdout; the accuracies come
from the run folder's metrics.csv. The model is published to a store under volumes/bench/, which
the serving benchmarks can load (`--models-dir volumes/bench/models`).
"""

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.common import WORK_DIR, add_data_dir, header, missing_data, print_table, write_result
from shared.device import check_device_name

EPOCH_LINE = re.compile(r"^epoch\s+(\d+)/(\d+)\s")
PUBLISHED_LINE = re.compile(r"^published model version (\S+)")
DEVICE_LINE = re.compile(r"examples/sec on \[device\(type='(\w+)'")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; anything after `--` is passed to the trainer."""
    p = argparse.ArgumentParser(
        prog="python -m bench.time_to_accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    add_data_dir(p)
    a(
        "--epochs",
        type=int,
        default=4,
        help="trainer --epochs; 0: none given, the device's recipe and its time budget decide "
        "(default %(default)s)",
    )
    a(
        "--device",
        type=check_device_name,
        default="auto",
        help="auto, cpu, cuda, cuda:N (default %(default)s)",
    )
    a("--seed", type=int, default=0, help="trainer --seed (default %(default)s)")
    a(
        "--work-dir",
        default=str(WORK_DIR),
        help="runs/ and models/ go here, never into the real store (default %(default)s)",
    )
    a(
        "--target",
        type=float,
        action="append",
        help="report the wall time to this valid accuracy; repeatable (default 0.75 and 0.8)",
    )
    a("--out", help="JSON file or folder (default bench/results/time_to_accuracy-<device>.json)")
    a("trainer_args", nargs=argparse.REMAINDER, help="-- then extra trainer options")
    args = p.parse_args(argv)
    args.trainer_args = [x for x in args.trainer_args if x != "--"]
    args.target = args.target or [0.75, 0.8]
    return args


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv rows with numbers as numbers."""
    with open(path, newline="") as f:
        return [
            {k: float(v) if k != "epoch" else int(v) for k, v in r.items()}
            for r in csv.DictReader(f)
        ]


def main(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    if message := missing_data(data_dir):
        print(message, file=sys.stderr)
        return 2
    work = Path(args.work_dir)
    runs_dir, models_dir = work / "runs", work / "models"
    runs_dir.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in runs_dir.iterdir()}
    command = [sys.executable, "-m", "trainer", "--data-dir", str(data_dir), "--weights", "none"]
    command += ["--device", args.device, "--seed", str(args.seed)]
    command += ["--epochs", str(args.epochs)] if args.epochs else []
    command += ["--runs-dir", str(runs_dir), "--models-dir", str(models_dir), *args.trainer_args]
    result = header("time_to_accuracy")
    print("running:", " ".join(command), flush=True)

    start = time.perf_counter()
    epoch_wall: dict[int, float] = {}
    stdout: list[str] = []
    version, device = None, args.device
    # stderr (the tqdm bar) passes through; stdout is read line by line and timestamped.
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            now = time.perf_counter() - start
            print(f"[{now:7.1f} s] {line}", end="", flush=True)
            stdout.append(line.rstrip("\n"))
            if match := EPOCH_LINE.match(line):
                epoch_wall[int(match.group(1))] = now
            if match := PUBLISHED_LINE.match(line):
                version = match.group(1)
            if match := DEVICE_LINE.search(line):
                device = match.group(1)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"error: the trainer exited with {proc.returncode}", file=sys.stderr)
        return 1
    new_runs = sorted({p.name for p in runs_dir.iterdir()} - before)
    if len(new_runs) != 1:
        print(
            f"error: expected one new run folder in {runs_dir}, found {new_runs}", file=sys.stderr
        )
        return 1
    run = runs_dir / new_runs[0]
    rows = read_metrics(run / "metrics.csv")
    for row in rows:
        row["wall_seconds"] = round(epoch_wall[row["epoch"]], 1)
    reached = {
        str(t): next((r["wall_seconds"] for r in rows if r["valid_acc"] >= t), None)
        for t in args.target
    }
    print()
    print_table(
        rows,
        [
            ("epoch", "epoch"),
            ("train_loss", "train loss"),
            ("train_acc", "train acc"),
            ("valid_acc", "valid acc"),
            ("examples_per_sec", "train img/s"),
            ("seconds", "epoch s"),
            ("wall_seconds", "wall s"),
        ],
    )
    for t, wall in reached.items():
        print(f"valid acc >= {t}: " + (f"{wall:.1f} s after launch" if wall else "not reached"))
    print(f"total wall time {total:.1f} s (launch to exit, including publishing)")
    result.update(
        {
            "settings": {
                "epochs": args.epochs,
                "device": device,
                "seed": args.seed,
                "data_dir": str(data_dir),
                "trainer_args": args.trainer_args,
            },
            "trainer_command": command,
            "run_id": run.name,
            "trainer_config": json.loads((run / "config.json").read_text()),
            "epochs": rows,
            "seconds_to_valid_acc": reached,
            "total_wall_seconds": round(total, 1),
            "published_version": version,
            "models_dir": str(models_dir),
            "trainer_stdout": stdout,
        }
    )
    path = write_result(result, args.out, f"time_to_accuracy-{device}.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
