"""What every benchmark shares: the machine's description, tables, and atomic JSON results."""

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Benchmark state that must not be committed (run folders, model stores, server logs).
WORK_DIR = Path("volumes/bench")
DEFAULT_DATA_DIR = Path(os.environ.get("DATA_DIR") or "volumes/data/cifar10")


# CPU features that decide this network's speed (fp32 vector width, bf16 and int8 units).
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_fields() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def cpu_model() -> str:
    """The CPU model name as lscpu shows it, with family/model where a VM shows only a brand
    ("AMD EPYC family 25 model 1"): the same name covered CPUs 8 x apart in speed."""
    fields = cpu_fields()
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    return name


def cpu_flags() -> list[str]:
    """Which of SPEED_FLAGS this CPU has."""
    flags = set(cpu_fields().get("flags", "").split())
    return [flag for flag in SPEED_FLAGS if flag in flags]


def ram_gib() -> float | None:
    """Total memory in GiB, from /proc/meminfo."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def _busy_ticks() -> int:
    """CPU ticks spent busy on all cores since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def _tree_ticks(root: int | None = None) -> int:
    """CPU ticks used by process `root` (default: this one), its reaped children and its live
    descendants."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # Fields after the ")" that ends the command name: state is [0], ppid [1].
                rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            stats[int(entry.name)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    me = os.getpid() if root is None else root
    total = sum(
        int(x) for x in Path(f"/proc/{me}/stat").read_text().rsplit(")", 1)[1].split()[11:15]
    )
    tree, frontier = set(), {me}
    while frontier:
        frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier} - tree
        tree |= frontier
    return total + sum(stats[pid][1] for pid in tree)


def cpu_seconds(root: int) -> float:
    """CPU seconds used so far by process `root` and its descendants (reaped or alive)."""
    return _tree_ticks(root) / OtherLoad.HZ


class OtherLoad:
    """How many cores other processes kept busy between start() and stop(): the noise gauge.

    Busy ticks of the whole machine minus those of this process tree (the benchmark, servers it
    started, DataLoader workers). Linux only; None elsewhere.
    """

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def start(self) -> "OtherLoad":
        """Take the first reading."""
        try:
            self._t0, self._busy0, self._own0 = time.monotonic(), _busy_ticks(), _tree_ticks()
        except (OSError, ValueError):
            self._t0 = None
        return self

    def stop(self) -> float | None:
        """Cores used by others since start(), averaged over the interval."""
        if self._t0 is None:
            return None
        try:
            busy, own = _busy_ticks() - self._busy0, _tree_ticks() - self._own0
        except (OSError, ValueError):
            return None
        seconds = time.monotonic() - self._t0
        return round(max(0, busy - own) / self.HZ / max(seconds, 1e-9), 2)


def wait_for_quiet(max_cores: float, timeout: float, window: float = 10.0) -> float | None:
    """Sleep until other processes use at most `max_cores` over `window` seconds, or `timeout`.

    Returns the last reading (None where it cannot be measured). A benchmark on a shared box
    calls this before each sample, so that the samples it keeps are the undisturbed ones.
    """
    deadline = time.monotonic() + timeout
    while True:
        gauge = OtherLoad().start()
        time.sleep(window)
        others = gauge.stop()
        if others is None or others <= max_cores or time.monotonic() >= deadline:
            return others
        print(f"other processes use {others} cores: waiting for a quieter machine", flush=True)


def add_data_dir(p: argparse.ArgumentParser) -> None:
    """--data-dir: the class folders the training benchmarks read."""
    p.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        help="class folders DIR/train/<class>/*.jpg (default %(default)s; env DATA_DIR)",
    )


def missing_data(data_dir: Path) -> str | None:
    """None when data_dir has class folders under train/, else the one-line error saying why."""
    if (data_dir / "train").is_dir():
        return None
    return (
        f"error: no {data_dir}/train/<class>/ folders. On the development machines `make data` "
        "extracts them from ../shared/data/cifar10-train-jpg.tar.gz; elsewhere put CIFAR-10 "
        "(or any images) there as train/<class>/*.jpg, or give --data-dir"
    )


def add_noise_options(p: argparse.ArgumentParser, unit: str, retries: int) -> None:
    """--max-others, --retries, --quiet-wait: how a benchmark copes with other processes.

    `unit` names what is measured at a time ("sample", "setting").
    """
    p.add_argument(
        "--max-others",
        type=float,
        default=0.15,
        help=f"re-measure a {unit} when other processes used more cores than this meanwhile "
        "(default %(default)s)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=retries,
        help=f"re-measurements per {unit} (default %(default)s)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0,
        help=f"before each {unit}, wait up to this many seconds for other processes to use at "
        "most --max-others cores (default %(default)s: no wait)",
    )


def machine() -> dict:
    """CPU model, cores usable by this process, RAM, torch version and GPU (if any)."""
    import torch

    from shared.device import usable_cpu_count

    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": usable_cpu_count(),
        "ram_gib": ram_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def header(name: str) -> dict:
    """The common head of every result file: what ran, when, where, and how busy the box was."""
    return {
        "benchmark": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, "-m", f"bench.{name}", *sys.argv[1:]]),
        "machine": machine(),
        "load_average_before": load_average(),
    }


def write_result(result: dict, out: str | None, default_name: str) -> Path:
    """Write `result` (with the load average at the end) as JSON; return the path.

    out: a file, or a folder (one that exists, or a path ending in "/") to write
    `default_name` into; None: bench/results/. A folder given for a file cost a finished
    run once (os.replace onto a directory, after minutes of measuring).
    """
    from shared.store import atomic_write_json

    result["load_average_after"] = load_average()
    path = Path(out) if out else RESULTS_DIR
    if not out or path.is_dir() or out.endswith("/"):
        path = path / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    return path


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Print rows as an aligned text table; columns are (key, heading) pairs."""
    cells = [[heading for _, heading in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key)) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, r in enumerate(cells):
        # First column (labels) left-aligned, figures right-aligned under their headings.
        line = [
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        print("  ".join(line).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def dumps(obj) -> str:
    """Compact JSON for log lines."""
    return json.dumps(obj, separators=(",", ":"))
