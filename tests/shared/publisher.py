"""Real publisher processes that tests kill or stop in the middle of a write.

Importing torch takes seconds on a loaded machine, far longer than a publish, so one child
imports once and forks a fresh publisher per request. Each publisher prints `writing PID` as
store.publish begins and `published VERSION SECONDS` when it returns; a kill timed from the
`writing` line lands inside the write. No torch computation runs before a fork (OpenMP thread
pools do not survive fork), so every publisher starts from the same state.
"""

import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

FORK_SERVER = """
import os, sys, time
from shared import store
from tests.conftest import publish_random_model

publish = store.publish

def signalling_publish(*args, **kwargs):
    print(f"writing {os.getpid()}", flush=True)
    start = time.monotonic()
    version = publish(*args, **kwargs)
    print(f"published {version} {time.monotonic() - start:.3f}", flush=True)
    return version

store.publish = signalling_publish
print("ready", flush=True)
for line in sys.stdin:
    if os.fork() == 0:
        for _ in range(int(line)):
            publish_random_model(sys.argv[1])
        os._exit(0)
"""


class Publishers:
    """A fork server of publishers into `models_dir`; read its lines with `expect`."""

    def __init__(self, models_dir: Path, timeout: float = 120):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER, str(models_dir)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.timeout = timeout
        self.buffer = b""
        self.expect("ready")

    def start(self, publishes: int) -> int:
        """Fork a publisher that publishes `publishes` times; its pid once it is writing."""
        self.proc.stdin.write(f"{publishes}\n".encode())
        self.proc.stdin.flush()
        return int(self.expect("writing")[1])

    def expect(self, word: str) -> list[str]:
        """The next output line starting with `word`, split (other lines are skipped)."""
        deadline = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                while b"\n" in self.buffer:
                    line, self.buffer = self.buffer.split(b"\n", 1)
                    fields = line.decode().split()
                    if fields and fields[0] == word:
                        return fields
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise TimeoutError(f"no {word!r} line from the publishers in {self.timeout} s")
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise EOFError(f"publishers exited before a {word!r} line")
                self.buffer += chunk

    def close(self) -> None:
        """Stop the fork server (its publishers are the caller's to end)."""
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()

    def __enter__(self) -> "Publishers":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self.proc.kill()
        self.close()
