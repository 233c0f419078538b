"""Start and stop the servers the serving benchmarks measure, on free loopback ports."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120  # importing torch and loading a model on a busy 2-core box
STOP_TIMEOUT_S = 30


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path) -> float:
    """Poll GET /health/ready until 200; return the seconds it took. Raise if the server died."""
    start = time.monotonic()
    while time.monotonic() - start < START_TIMEOUT_S:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
        try:
            if requests.get(url + "/health/ready", timeout=2).status_code == 200:
                return time.monotonic() - start
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} not ready after {START_TIMEOUT_S} s (log: {log_path})")


@contextmanager
def _serve(command: list[str], env: dict[str, str], port: int, log_path: Path) -> Iterator[str]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        seconds = wait_ready(url, proc, log_path)
        print(f"server ready at {url} after {seconds:.1f} s (log: {log_path})", flush=True)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def gunicorn(models_dir: Path, log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """The inference service as deployed (`gunicorn -c inference/gunicorn.conf.py`), on loopback.

    `env` adds settings (THREADS, TORCH_THREADS, ACCESS_LOG, ...) to this process's environment.
    """
    port = free_port()
    script = Path(sys.executable).parent / "gunicorn"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gunicorn"]
    # A command-line bind overrides the config file's 0.0.0.0: the benchmarks stay on loopback.
    command += ["-c", "inference/gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"]
    full_env = {**os.environ, "MODELS_DIR": str(Path(models_dir).resolve()), **(env or {})}
    with _serve(command, full_env, port, log_path) as url:
        yield url


@contextmanager
def original(models_dir: Path, log_path: Path) -> Iterator[str]:
    """bench/original_server.py under Flask's development server, on loopback."""
    port = free_port()
    command = [sys.executable, "-m", "bench.original_server", "--models-dir", str(models_dir)]
    command += ["--port", str(port)]
    with _serve(command, dict(os.environ), port, log_path) as url:
        yield url
