"""HAProxy from deploy/haproxy/haproxy.cfg in front of loopback replicas: tests and benchmarks.

The config is the deployed file with its one server-template line (Docker DNS discovery)
replaced by one `server` line per replica port, nothing else changed.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.servers import REPO, free_port

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


def haproxy_binary() -> str:
    """The haproxy executable (Debian's package; .ci/run installs it)."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        raise RuntimeError("haproxy is not installed: apt-get install haproxy (.ci/run does)")
    return binary


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


@contextmanager
def haproxy(ports: list[int], work_dir: Path) -> Iterator[Balancer]:
    """HAProxy on a free loopback port in front of 127.0.0.1:`ports`; stopped afterwards."""
    work_dir.mkdir(parents=True, exist_ok=True)
    config = work_dir / "haproxy.cfg"
    config.write_text(render_config(ports))
    port = free_port()
    env = {**os.environ, "PORT": str(port), "BIND_ADDRESS": "127.0.0.1"}
    checked = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(config)], env=env, capture_output=True, text=True
    )
    if checked.returncode != 0:
        raise RuntimeError(f"haproxy -c refused the config:\n{checked.stdout}{checked.stderr}")
    log_path = work_dir / f"haproxy-{port}.log"
    with open(log_path, "wb") as log:
        # -db: foreground, logs to stdout (the config's `log stdout`).
        proc = subprocess.Popen(
            [haproxy_binary(), "-db", "-f", str(config)], env=env, stdout=log, stderr=log
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
