"""First and cached decode of a folder data set, as the trainer loads it: `python -m bench.decode`.

Each load runs in a fresh process (imports excluded, like the trainer's "loaded in" line):
1. first: an empty cache folder, so every image is decoded (with --decode-workers) and the
   cache file written;
2. cached: the same again, now read from the cache (memory-mapped);
3. off: no cache (CACHE_DIR=none), decoded again: what a run with the cache disabled costs.
The image files are read once before (the first load should not time the disk); the load
average and the cores other processes used during each load are recorded beside it.
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import WORK_DIR, OtherLoad, add_data_dir, header, missing_data, write_result

CODE = (
    "import sys, time; from trainer.data import load_folders; t = time.perf_counter(); "
    "load_folders(sys.argv[1], 32, 0.1, 0, cache_dir=sys.argv[2], workers=int(sys.argv[3])); "
    "print(time.perf_counter() - t)"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options."""
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__)
    add_data_dir(p)
    p.add_argument(
        "--cache-dir",
        default=str(WORK_DIR / "decode-cache"),
        help="cache folder, emptied first (default %(default)s)",
    )
    p.add_argument(
        "--decode-workers",
        type=int,
        default=0,
        help="the trainer's --decode-workers (default %(default)s: one per core)",
    )
    p.add_argument("--out", help="JSON file or folder (default bench/results/decode.json)")
    return p.parse_args(argv)


def load_seconds(data: Path, cache: str, workers: int) -> tuple[float, float | None]:
    """Seconds one fresh process takes to load `data`, and the cores others used meanwhile."""
    gauge = OtherLoad().start()
    out = subprocess.run(
        [sys.executable, "-c", CODE, str(data), cache, str(workers)],
        capture_output=True,
        text=True,
    )
    others = gauge.stop()
    if out.returncode != 0:
        sys.exit(f"error: loading {data} failed: {out.stderr[-500:]}")
    return round(float(out.stdout.split()[-1]), 3), others


def measure(data: Path, cache: Path, workers: int = 0) -> dict:
    """First (empty cache), cached and cache-off load times of `data`, in seconds."""
    for path in sorted(Path(data).rglob("*")):  # the files into the page cache
        if path.is_file():
            path.read_bytes()
    shutil.rmtree(cache, ignore_errors=True)
    result = {}
    for name, where in (("first", str(cache)), ("cached", str(cache)), ("off", "none")):
        seconds, others = load_seconds(data, where, workers)
        result[f"{name}_seconds"] = seconds
        result[f"{name}_other_cores"] = others
    result["speedup"] = round(result["first_seconds"] / max(result["cached_seconds"], 1e-9), 1)
    return result


def main(args: argparse.Namespace) -> int:
    data = Path(args.data_dir)
    if message := missing_data(data):
        print(message, file=sys.stderr)
        return 2
    result = header("decode")
    result["decode"] = measure(data, Path(args.cache_dir), args.decode_workers)
    d = result["decode"]
    print(
        f"first decode {d['first_seconds']} s, cached load {d['cached_seconds']} s "
        f"({d['speedup']}x), no cache {d['off_seconds']} s; load average "
        f"{result['load_average_before']}"
    )
    print(f"wrote {write_result(result, args.out, 'decode.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
