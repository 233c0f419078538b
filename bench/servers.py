"""Servers on free loopback ports, and a model for them to serve: for the benchmarks and the tests.

One runner for both: `gunicorn()` starts the inference service exactly as deployed
(`gunicorn -c inference/gunicorn.conf.py`), `original()` the original-style Flask server, and
`publish_model()` puts a random-init ResNet-18 in a store. No pytest here: bench runs without it.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from bench.common import cpu_seconds
from shared.classes import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from shared.model import build_model
from shared.stores import open_store

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120  # importing torch and loading a model on a busy 2-core box
STOP_TIMEOUT_S = 30


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gunicorn_command() -> list[str]:
    """The venv's gunicorn with the service's config, as `make` installs it next to Python."""
    script = Path(sys.executable).parent / "gunicorn"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gunicorn"]
    return [*command, "-c", "inference/gunicorn.conf.py"]


def publish_model(
    models_dir: Path | str, seed: int = 0, make_latest: bool = True, **meta_overrides
) -> str:
    """Publish a random-init ResNet-18 (weights fixed by `seed`) and return its version.

    The head is scaled up so predictions are confident: two versions disagree clearly and ties
    between classes, where float noise could flip an argmax, do not occur.
    """
    torch.manual_seed(seed)
    model = build_model(meta_overrides.get("arch", "resnet18"), len(CIFAR10_CLASSES))
    with torch.no_grad():
        model.fc.weight.mul_(20)
    meta = model_meta(seed, **meta_overrides)
    return open_store(models_dir).publish(model.state_dict(), meta, make_latest=make_latest)


def model_meta(seed: int = 0, **overrides) -> dict:
    """The model.json fields a publisher supplies for a CIFAR-10 ResNet-18 (overrides win)."""
    return {
        "run_id": f"test-{seed}",
        "arch": "resnet18",
        "class_names": list(CIFAR10_CLASSES),
        "image_size": 32,
        "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD),
        "metrics": {"valid_acc": 0.1},
        "config": {"seed": seed},
        **overrides,
    }


class Server:
    """A server process (its own process group) on a loopback port; `url` is its base URL."""

    def __init__(
        self, proc: subprocess.Popen, port: int, log_path: Path, models_dir: Path | None
    ) -> None:
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
        """Poll `condition` until true; return the seconds it took, or raise naming `what`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if condition():
                return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}\n{self.log()[-3000:]}")

    def wait_answering(self, path: str, timeout: float = START_TIMEOUT_S) -> float:
        """Poll GET `path` until 200; return the seconds it took. Raise if the server died."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"server exited with {code}\n{self.log()[-3000:]}")
            try:
                if self.get(path, timeout=2).status_code == 200:
                    return time.monotonic() - start
            except requests.RequestException:  # refused, or accepted before a worker is up
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.url}{path} not 200 after {timeout} s\n{self.log()[-3000:]}")

    def wait_compiled(self, timeout: float = 900) -> float:
        """Wait until every worker's served version is past its background compile (CPU_COMPILE,
        GET /model "compiled"), so that a measurement times what the service settles at."""
        states: dict[int, bool] = {}

        def settled() -> bool:
            info = self.get("/model").json()
            note = info.get("compiled") or ""
            states[info["worker_pid"]] = not note.startswith(("pending", "compiling"))
            return len(states) >= info["workers"] and all(states.values())

        return self.wait_for(settled, timeout, "every worker's compile (GET /model)")

    def usage(self) -> dict[str, float]:
        """Counters for where the time goes: CPU seconds of the server's processes so far, and
        the batcher's forward passes and images (from /metrics)."""
        text = self.get("/metrics").text
        return {
            "cpu_s": cpu_seconds(self.proc.pid),
            "batches": metric_sample(text, "inference_batch_images_count"),
            "images": metric_sample(text, "inference_batch_images_sum"),
            "at": time.monotonic(),
        }

    def stop(self) -> int:
        """SIGTERM, then wait for a graceful exit (SIGKILL to the group after that)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def metric_sample(text: str, name: str, **labels: str) -> float:
    """Sum of the `name` samples whose labels include `labels`, in Prometheus text (0: none)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


@contextmanager
def _serve(
    command: list[str], env: dict[str, str], port: int, log_dir: Path, name: str, wait: str | None
) -> Iterator[Server]:
    """Run `command` with its output in log_dir/<name>-<port>.log until `wait` answers 200
    (None: at once; the caller waits, e.g. to start several servers side by side)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: cleanup can reach the workers
        )
    models_dir = env.get("MODELS_DIR")
    server = Server(proc, port, log_path, Path(models_dir) if models_dir else None)
    try:
        if wait is not None:
            server.wait_answering(wait)
        yield server
    finally:
        server.stop()


@contextmanager
def gunicorn(
    models_dir: Path | str,
    log_dir: Path,
    env: dict[str, str] | None = None,
    wait: str | None = "/health/ready",
) -> Iterator[Server]:
    """The inference service as deployed, on a free loopback port, once `wait` answers 200.

    `env` adds settings (THREADS, TORCH_THREADS, ACCESS_LOG, ...) to this process's environment.
    """
    port = free_port()
    full_env = {
        **os.environ,
        # A folder is made absolute (the server runs from the repo root); s3:// passes as is.
        "MODELS_DIR": str(Path(models_dir).resolve())
        if isinstance(models_dir, Path)
        else models_dir,
        "PORT": str(port),
        "BIND_ADDRESS": "127.0.0.1",
        **(env or {}),
    }
    # Each server merges its own workers' metrics: never a folder left by another run.
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with _serve(gunicorn_command(), full_env, port, log_dir, "gunicorn", wait) as server:
        yield server


@contextmanager
def original(models_dir: Path, log_dir: Path) -> Iterator[Server]:
    """bench/original_server.py under Flask's development server, on loopback, once ready."""
    port = free_port()
    command = [sys.executable, "-m", "bench.original_server", "--models-dir", str(models_dir)]
    command += ["--port", str(port)]
    with _serve(command, dict(os.environ), port, log_dir, "original", "/health/ready") as server:
        yield server
