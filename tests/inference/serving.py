"""Helpers for the inference tests: publish models, make tiny images, run a real Gunicorn."""

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

from shared.classes import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from shared.model import build_model
from shared.stores import open_store

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90  # importing torch on a busy 2-core machine can take a while
STOP_TIMEOUT_S = 30


def publish_model(
    models_dir: Path | str, seed: int = 0, make_latest: bool = True, **meta_overrides
) -> str:
    """Publish a random-init ResNet-18 (weights fixed by `seed`) and return its version.

    The head is scaled up so predictions are confident: two versions disagree clearly and ties
    between classes, where float noise could flip an argmax, do not occur.
    """
    torch.manual_seed(seed)
    model = build_model(meta_overrides.get("arch", "resnet18"), 10)
    with torch.no_grad():
        model.fc.weight.mul_(20)
    meta = {
        "run_id": f"test-{seed}",
        "arch": "resnet18",
        "class_names": list(CIFAR10_CLASSES),
        "image_size": 32,
        "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD),
        "metrics": {"valid_acc": 0.1},
        "config": {"seed": seed},
        **meta_overrides,
    }
    return open_store(models_dir).publish(model.state_dict(), meta, make_latest=make_latest)


def image_bytes(
    size: tuple[int, int] = (40, 30), color=(200, 30, 60), fmt: str = "PNG", mode: str = "RGB"
) -> bytes:
    """A small solid-colour image encoded as `fmt`."""
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)
    return buffer.getvalue()


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gunicorn_command() -> list[str]:
    """The venv's gunicorn, as `make` installs it next to this Python."""
    script = Path(sys.executable).parent / "gunicorn"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gunicorn"]
    return [*command, "-c", "inference/gunicorn.conf.py"]


class Server:
    """A Gunicorn process serving the app; `url` is its base URL."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, models_dir: Path):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.models_dir = models_dir

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kwargs) -> requests.Response:
        """GET `path`."""
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 30), **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        """POST to `path`."""
        return requests.post(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def model_version(self) -> str | None:
        """The version GET /model reports."""
        return self.get("/model").json()["version"]

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll `condition` until true; return the seconds it took, or fail naming `what`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if condition():
                return time.monotonic() - start
            time.sleep(0.05)
        pytest.fail(f"timed out after {timeout} s waiting for {what}\n{self.log()[-3000:]}")

    def stop(self) -> int:
        """SIGTERM, then wait for a graceful exit; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def run_server(models_dir: Path, log_dir: Path, **env: str) -> Iterator[Server]:
    """Start Gunicorn on a free port with MODELS_DIR=models_dir and `env`; stop it afterwards."""
    port = free_port()
    full_env = {
        **os.environ,
        "MODELS_DIR": str(models_dir),
        "PORT": str(port),
        "THREADS": "8",
        "ACCESS_LOG": "",
        **env,
    }
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log_path = log_dir / f"gunicorn-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            gunicorn_command(),
            cwd=REPO,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: cleanup can reach the workers
        )
    server = Server(proc, port, log_path, Path(models_dir))
    try:
        start = time.monotonic()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gunicorn exited with {proc.returncode}\n{server.log()[-3000:]}")
            try:
                if server.get("/health/live", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # refused, or accepted before a worker is up
                pass
            if time.monotonic() - start > START_TIMEOUT_S:
                pytest.fail(f"gunicorn did not answer /health/live\n{server.log()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        server.stop()


def wait_ready(server: Server, timeout: float = 60) -> None:
    """Wait until /health/ready answers 200."""
    server.wait_for(
        lambda: server.get("/health/ready").status_code == 200, timeout, "/health/ready 200"
    )
