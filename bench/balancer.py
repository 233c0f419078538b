"""HAProxy from deploy/haproxy/haproxy.cfg in front of loopback replicas: tests and benchmarks.

The config is the deployed file with its one server-template line (Docker DNS discovery)
replaced by one `server` line per replica port, nothing else changed. `trivial()` runs the
same program with a config that answers every request itself: the load generator's ceiling.
"""

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.servers import REPO, free_port
from bench.tools import Tool, find_tool

CONFIG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
START_TIMEOUT_S = 10


def render_config(ports: list[int]) -> str:
    """deploy/haproxy/haproxy.cfg with one server per port on 127.0.0.1, named as the
    server-template names them (inference1, inference2, ...)."""
    lines = CONFIG.read_text().splitlines()
    templates = [i for i, line in enumerate(lines) if line.split()[:1] == ["server-template"]]
    if len(templates) != 1:
        raise ValueError(f"{CONFIG} should have exactly one server-template line")
    line = lines[templates[0]]
    indent = line[: len(line) - len(line.lstrip())]
    prefix = line.split()[1]
    servers = [f"{indent}server {prefix}{n} 127.0.0.1:{port}" for n, port in enumerate(ports, 1)]
    return "\n".join(lines[: templates[0]] + servers + lines[templates[0] + 1 :]) + "\n"


def haproxy_tool() -> Tool:
    """The haproxy executable (Debian's package, which .ci/run installs, or one in .bin/)."""
    tool = find_tool("haproxy")
    if tool is None:
        raise RuntimeError("haproxy is not installed: apt-get install haproxy (.ci/run does)")
    return tool


class Balancer:
    """A running HAProxy: `url` is its frontend."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        """Everything HAProxy printed (its request log and server state changes)."""
        return self.log_path.read_text(errors="replace")


# What the load generator's ceiling is measured against (bench/load.py): an answer that costs
# the server nearly nothing. The body is buffered first, as a real server reads it.
TRIVIAL_CONFIG = """\
global
    maxconn 4096
    tune.bufsize 262144

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout http-request 120s
    timeout http-keep-alive 60s

frontend trivial
    bind "${BIND_ADDRESS}:${PORT}"
    option http-buffer-request
    http-request return status 200 content-type application/json string "{}"
"""


@contextmanager
def haproxy(ports: list[int], work_dir: Path) -> Iterator[Balancer]:
    """HAProxy on a free loopback port in front of 127.0.0.1:`ports`; stopped afterwards."""
    with run_haproxy(render_config(ports), work_dir) as balancer:
        yield balancer


@contextmanager
def trivial(work_dir: Path) -> Iterator[Balancer]:
    """HAProxy on a free loopback port answering every request 200 `{}` by itself."""
    with run_haproxy(TRIVIAL_CONFIG, work_dir, "trivial") as balancer:
        yield balancer


@contextmanager
def run_haproxy(config_text: str, work_dir: Path, name: str = "haproxy") -> Iterator[Balancer]:
    """HAProxy running `config_text` (which binds ${BIND_ADDRESS}:${PORT}) on a free loopback
    port, once it listens; stopped afterwards."""
    tool = haproxy_tool()
    work_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = work_dir / f"{name}-{port}.cfg"
    config.write_text(config_text)
    env = tool.environ(PORT=str(port), BIND_ADDRESS="127.0.0.1")
    checked = subprocess.run(
        [tool.path, "-c", "-f", str(config)], env=env, capture_output=True, text=True
    )
    if checked.returncode != 0:
        raise RuntimeError(f"haproxy -c refused the config:\n{checked.stdout}{checked.stderr}")
    log_path = work_dir / f"{name}-{port}.log"
    with open(log_path, "wb") as log:
        # -db: foreground, logs to stdout (the config's `log stdout`).
        proc = subprocess.Popen(
            [tool.path, "-db", "-f", str(config)], env=env, stdout=log, stderr=log
        )
    balancer = Balancer(proc, port, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {proc.returncode}\n{balancer.log()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"haproxy not listening on {port}\n{balancer.log()}"
                    ) from None
                time.sleep(0.05)
        yield balancer
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
