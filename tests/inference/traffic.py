"""Load and server memory for the soak and reload tests.

The load itself (request kinds, client threads, outcomes) is bench/traffic.py's, shared with the
benchmarks; this module adds what only tests measure: the server's processes and memory.
"""

import os
import threading
import time
from pathlib import Path

from bench.traffic import DROPPED, Kind, Load, Outcome, judge, summary, version_of

__all__ = [  # the shared load, re-exported for the tests that import it from here
    "DROPPED",
    "Kind",
    "Load",
    "MemorySampler",
    "Outcome",
    "judge",
    "process_tree",
    "summary",
    "tree_rss_bytes",
    "version_of",
]


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/*/stat."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after it.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and every process below it (Gunicorn master + workers)."""
    return sum(rss_bytes(p) for p in process_tree(pid))


class MemorySampler:
    """Samples the RSS of a process tree every `interval` seconds in a background thread."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (monotonic time, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "MemorySampler":
        """Start sampling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), tree_rss_bytes(self.pid)))
            self._stop.wait(self.interval)

    def median_between(self, start: float, end: float) -> int:
        """Median RSS of the samples taken between two monotonic times."""
        values = sorted(b for t, b in self.samples if start <= t <= end)
        assert values, f"no memory sample between {start:.1f} and {end:.1f}"
        return values[len(values) // 2]
