"""Every GPU figure of docs/benchmarks.md in one run (at most 8 minutes): `make bench-gpu`.

    python3 -m bench.gpu [--out FILE]        # on the GPU machine
    python3 -m bench.gpu --cpu-smoke         # the same steps on tiny data, on the CPU (CI)

Steps, each a benchmark script run as a user runs it, results gathered into one JSON:
1. setup: Flask and Gunicorn from the wheels in .whl/ when missing (the GPU machine has no
   index), the CIFAR-10 JPEGs from .data/cifar10-train-jpg.tar.gz when not yet extracted;
2. decode (bench.decode): the trainer's data loading with an empty cache (first decode), again
   (cached), and with no cache;
3. train_throughput: (a) trainer, (b) bare step, (c) original-style DataLoader at the device's
   recipe;
4. time_to_accuracy: the device's default recipe, no recipe flags: per-epoch valid accuracy
   and wall time from launch;
5. cuda_graphs: bench.graphs on the trained model: graphed vs eager forward (batch 1/8/32/64),
   one image in process with decode, graphs on and off, and their agreement (a disagreement
   keeps the figures and fails the run at the end);
6. serving: bench.load against Gunicorn with DEVICE set, 1/16/64 clients x 1/32 images per
   request, WORKERS=1 and WORKERS=auto (--workers), driven by wrk where it is found (also in
   .bin/), with the generator's ceiling and each figure's headroom.
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bench.common import WORK_DIR, header, write_result
from bench.decode import measure as measure_decode

WHEELS = Path(".whl")
TARBALL = Path(".data/cifar10-train-jpg.tar.gz")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options."""
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    a = p.add_argument
    a("--cpu-smoke", action="store_true", help="tiny data on the CPU: checks the steps run")
    a("--data-dir", default="volumes/data/cifar10", help="class folders (default %(default)s)")
    a("--work-dir", default=str(WORK_DIR / "gpu"), help="state of this run (default %(default)s)")
    a(
        "--workers",
        help="WORKERS values of the serving grid, comma-separated, passed to the server as is "
        "(default 1,auto; with --cpu-smoke 1,2)",
    )
    a("--wrk-threads", help="wrk threads of the serving grid (default 4; with --cpu-smoke 2)")
    a("--out", help="JSON file or folder (default bench/results/gpu-<device>.json)")
    args = p.parse_args(argv)
    if args.workers is None:
        args.workers = "1,2" if args.cpu_smoke else "1,auto"
    if args.wrk_threads is None:
        args.wrk_threads = "2" if args.cpu_smoke else "4"
    return args


def setup(args) -> None:
    """Install Flask/Gunicorn from .whl/ if missing; extract the data if missing."""
    if importlib.util.find_spec("flask") is None or importlib.util.find_spec("gunicorn") is None:
        wheels = sorted(str(w) for w in WHEELS.glob("*.whl"))
        if not wheels:
            sys.exit("error: flask/gunicorn missing and no wheels in .whl/ (docs/benchmarks.md)")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        subprocess.run([*pip, *wheels], check=True)
    data = Path(args.data_dir)
    if not (data / "train").is_dir():
        if not TARBALL.is_file():
            sys.exit(f"error: no {data}/train and no {TARBALL} to extract")
        data.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(TARBALL) as tar:
            tar.extractall(data.parent, filter="data")


def tiny_data(root: Path) -> Path:
    """10 classes x 12 random 32x32 JPEGs, for --cpu-smoke."""
    import numpy as np
    from PIL import Image

    from shared.classes import CIFAR10_CLASSES

    rng = np.random.default_rng(0)
    for label, name in enumerate(CIFAR10_CLASSES):
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(12):
            pixels = rng.integers(0, 64, (32, 32, 3), dtype=np.uint8) + label * 19
            Image.fromarray(pixels).save(folder / f"{n:04d}.jpg", quality=75)
    return root


def bench(module: str, out: Path, *args: str) -> dict:
    """Run `python -m bench.<module> --out OUT ARGS`; its JSON result."""
    command = [sys.executable, "-m", f"bench.{module}", "--out", str(out), *args]
    print("running:", " ".join(command), flush=True)
    proc = subprocess.run(command)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "command": command}
    return json.loads(out.read_text())


def cuda_graphs(work: Path, models: Path, data: Path, device: str, smoke: bool) -> dict:
    """bench.graphs on the trained model; when it reports a disagreement, its figures are kept
    beside the error."""
    out = work / "graphs.json"
    out.unlink(missing_ok=True)
    short = ["--iterations", "5", "--rounds", "1", "--batch-sizes", "1,8", "--check-sizes", "1,3"]
    short = short if smoke else []
    result = bench(
        "graphs",
        out,
        *("--models-dir", str(models), "--images", str(data / "train"), "--device", device),
        *short,
    )
    if "error" in result and out.is_file():
        result = json.loads(out.read_text()) | {"error": result["error"]}
    return result


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.cpu_smoke else "cuda"
    if args.cpu_smoke:
        data = tiny_data(work / "data")
        throughput = ["--steps", "2", "--warmup-steps", "1", "--repeats", "1", "--workers", "0"]
        throughput += ["--batch-size", "8"]
        accuracy = ["--epochs", "1", "--", "--batch-size", "8", "--cache-dir", str(work / "c")]
        # One concurrency, no warm-up (the smallest wrk run is a whole second): these figures
        # mean nothing, and the ceiling runs too.
        grid = ["--concurrency", "2", "--images-per-request", "1,4", "--duration", "1"]
        grid += ["--warmup", "0"]
    else:
        setup(args)
        data = Path(args.data_dir)
        throughput = ["--steps", "30", "--repeats", "2"]
        # No --epochs: the CUDA recipe and its time budget decide, as for a user.
        accuracy = ["--epochs", "0"]
        grid = ["--concurrency", "1,16,64", "--images-per-request", "1,32", "--duration", "5"]
        grid += ["--warmup", "2"]
    result = header("gpu")
    result["mode"] = "cpu-smoke" if args.cpu_smoke else "gpu"
    result["decode"] = measure_decode(data, work / "decode-cache")
    print("decode:", result["decode"], flush=True)
    result["train_throughput"] = bench(
        "train_throughput",
        work / "train_throughput.json",
        *("--data-dir", str(data), "--device", device, "--max-others", "99", *throughput),
    )
    tta = work / "time_to_accuracy.json"
    result["time_to_accuracy"] = bench(
        "time_to_accuracy",
        tta,
        *("--data-dir", str(data), "--device", device, "--work-dir", str(work / "tta")),
        *accuracy,
    )
    models = work / "tta" / "models"
    result["cuda_graphs"] = cuda_graphs(work, models, data, device, args.cpu_smoke)
    result["serving"] = {}
    for n in args.workers.split(","):
        result["serving"][f"workers_{n}"] = bench(
            "load",
            work / f"load-workers{n}.json",
            *("--start-server", "--models-dir", str(models), "--images", str(data / "train")),
            *grid,
            *("--wrk-threads", args.wrk_threads, "--max-others", "99"),
            *("--server-env", f"DEVICE={device}", "--server-env", f"WORKERS={n}"),
        )
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    failed = [k for k, v in result.items() if isinstance(v, dict) and "error" in v]
    failed += [f"serving.{k}" for k, v in result["serving"].items() if "error" in v]
    path = write_result(result, args.out, f"gpu-{device}.json")
    print(
        f"wrote {path} in {result['total_seconds']} s" + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
