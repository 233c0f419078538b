"""Helpers for the inference tests: tiny images, and a real Gunicorn from bench/servers.py.

The runner and the model publisher are the benchmarks' own (bench/servers.py), so tests and
benchmarks start the service the same way.
"""

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from bench.servers import (
    REPO,
    Server,
    free_port,
    gunicorn,
    gunicorn_command,
    metric_sample,
    publish_model,
)

__all__ = [
    "REPO",
    "Server",
    "free_port",
    "gunicorn_command",
    "image_bytes",
    "metric_sample",
    "publish_model",
    "run_server",
    "wait_ready",
]


def image_bytes(
    size: tuple[int, int] = (40, 30), color=(200, 30, 60), fmt: str = "PNG", mode: str = "RGB"
) -> bytes:
    """A small solid-colour image encoded as `fmt`."""
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)
    return buffer.getvalue()


@contextmanager
def run_server(models_dir: Path, log_dir: Path, **env: str) -> Iterator[Server]:
    """Gunicorn on a free port serving models_dir with `env`, once live; stopped afterwards."""
    settings = {"THREADS": "8", "ACCESS_LOG": "", **env}
    with gunicorn(models_dir, log_dir, settings, wait="/health/live") as server:
        yield server


def wait_ready(server: Server, timeout: float = 60) -> None:
    """Wait until /health/ready answers 200."""
    server.wait_for(
        lambda: server.get("/health/ready").status_code == 200, timeout, "/health/ready 200"
    )
