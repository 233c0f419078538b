"""Load for the soak and reload tests: request kinds, a pool of client threads, server memory.

Each request kind knows how to send itself and what a correct answer looks like; the pool
records one Outcome per request, so a test can assert "zero 5xx, zero dropped connections".
"""

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

# A request that got no HTTP answer (reset, refused, timed out) is recorded with this status.
DROPPED = 0
CLIENT_TIMEOUT_S = 60  # generous: the machine running CI is shared and slow


@dataclass
class Kind:
    """One kind of request: how to send it, which statuses are correct, what else to check.

    `send(session, url)` returns the response. `fresh_connection` kinds are sent without the
    thread's keep-alive session: the server may close the connection after answering them
    (a 413 leaves the rest of the body unread), which is correct but would race a reused one.
    """

    name: str
    weight: float
    send: Callable[[requests.Session, str], requests.Response]
    statuses: tuple[int, ...]
    check: Callable[[requests.Response], str | None] = lambda response: None
    fresh_connection: bool = False


@dataclass
class Outcome:
    """What one request got: status (DROPPED if none) and the problem, if any."""

    kind: str
    status: int
    problem: str | None
    started: float
    seconds: float
    version: str | None = None
    served_by: str | None = None  # a load balancer's X-Served-By: which replica answered


@dataclass
class Load:
    """`concurrency` threads sending a weighted random mix of `kinds` until stopped."""

    url: str
    kinds: list[Kind]
    concurrency: int
    seed: int = 0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> "Load":
        """Start the client threads."""
        for i in range(self.concurrency):
            thread = threading.Thread(target=self._client, args=(self.seed + i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[Outcome]:
        """Let every thread finish its request in flight, then return all outcomes."""
        self._stop.set()
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"
        return self.outcomes

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        weights = [kind.weight for kind in self.kinds]
        session = requests.Session()
        while not self._stop.is_set():
            kind = rng.choices(self.kinds, weights)[0]
            started = time.monotonic()
            try:
                if kind.fresh_connection:
                    with requests.Session() as once:
                        response = kind.send(once, self.url)
                else:
                    response = kind.send(session, self.url)
            except requests.RequestException as exc:
                outcome = Outcome(kind.name, DROPPED, repr(exc)[:300], started, 0.0)
                session = requests.Session()  # start over on a clean connection
            else:
                outcome = Outcome(
                    kind.name,
                    response.status_code,
                    judge(kind, response),
                    started,
                    time.monotonic() - started,
                    version_of(response),
                    response.headers.get("X-Served-By"),
                )
            with self._lock:
                self.outcomes.append(outcome)
        session.close()


def judge(kind: Kind, response: requests.Response) -> str | None:
    """None if `response` is a correct answer to a `kind` request, else what is wrong."""
    if response.status_code not in kind.statuses:
        return f"status {response.status_code}, expected {kind.statuses}: {response.text[:200]}"
    if not response.headers.get("Content-Type", "").startswith("application/json"):
        return f"not JSON: {response.headers.get('Content-Type')}"
    try:
        body = response.json()
    except ValueError:
        return f"unparseable JSON: {response.text[:200]}"
    if response.status_code >= 400 and "code" not in body.get("error", {}):
        return f"error without a code: {response.text[:200]}"
    return kind.check(response)


def version_of(response: requests.Response) -> str | None:
    """The model_version of a JSON answer, if it has one."""
    try:
        return response.json().get("model_version")
    except ValueError:
        return None


def summary(outcomes: list[Outcome]) -> str:
    """Counts by kind and status, then the first problems: for assertion messages."""
    counts = Counter((o.kind, o.status) for o in outcomes)
    lines = [f"{kind:<22} {status}: {n}" for (kind, status), n in sorted(counts.items())]
    problems = [f"{o.kind}: {o.problem}" for o in outcomes if o.problem][:8]
    return "\n".join(lines + ["problems:", *problems])


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
